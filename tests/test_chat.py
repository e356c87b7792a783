"""jaxgpt.chat: the CLI driven through stdin, history trimming, the no-template fallback."""

import io
import sys

import pytest
from flax import nnx

from jaxgpt.chat import ChatSession, main
from jaxgpt.model import GPT2, GPT2Config
from jaxgpt.sample import SampleError, generate, load_model
from jaxgpt.tokenizer import add_chat_template, load_tokenizer, stop_token_ids
from jaxgpt.weights import save_pretrained

MAX_NEW = 12


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny random GPT-2 with the ChatML tokenizer (50259 tokens), saved as an HF folder."""
    tok = add_chat_template(load_tokenizer())
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    return save_pretrained(model, tmp_path_factory.mktemp("chat"), tok)


def _reference_reply(model, tok, messages):
    """Greedy reply from first principles: the template text, generate, strip the stop token, decode."""
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)
    (new,) = generate(model, [ids], max_new_tokens=MAX_NEW, stop_ids=stop_token_ids(tok))
    if new and new[-1] in stop_token_ids(tok):
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=True)


def test_chat_cli_through_stdin(chat_folder, monkeypatch, capsys):
    """``main`` reads a piped stdin (not a tty): two turns, /reset, a turn, /exit."""
    from jaxgpt.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nhow are you?\n/reset\nhello there\n/exit\nnever read\n"))
    code = main(["--model", str(chat_folder), "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--chunk", "4"])
    out = capsys.readouterr().out
    assert code == 0
    model, tok = load_model(str(chat_folder))
    first = _reference_reply(model, tok, [{"role": "user", "content": "hello there"}])
    second = _reference_reply(model, tok, [{"role": "user", "content": "hello there"},
                                           {"role": "assistant", "content": first},
                                           {"role": "user", "content": "how are you?"}])
    assert first and second and first != second
    assert out.count(f"bot> {first}\n") == 2  # turn 1, and turn 3 after /reset (history forgotten)
    assert f"bot> {second}\n" in out  # turn 2 saw turn 1
    assert "(conversation cleared)" in out
    assert "never read" not in out  # /exit stopped reading
    assert "note:" not in out  # the folder's ChatML template was used


def test_history_is_trimmed_to_the_context(chat_folder):
    model, tok = load_model(str(chat_folder))
    session = ChatSession(model, tok, max_new_tokens=MAX_NEW, temperature=0.0, system="Be brief.")
    budget = model.config.n_positions - MAX_NEW
    long = "one two three four five six seven eight nine ten"  # 10 tokens
    for i in range(5):
        session.reply(f"{i} {long}")
        ids = session._encode(session.messages[:-1])  # the prompt that produced the last reply
        assert len(ids) <= budget
    assert session.messages[0] == {"role": "system", "content": "Be brief."}  # never dropped
    assert session.messages[-2]["content"].startswith("4 ")  # the newest turn is kept ...
    assert all(not m["content"].startswith("0 ") for m in session.messages)  # ... the oldest went
    with pytest.raises(SampleError, match="too long"):
        session.reply(long * 6)
    # The reply budget is at most half the context: the default 128 on this 64-position model
    # once left a single position for the message.
    assert ChatSession(model, tok).max_new_tokens == model.config.n_positions // 2


def test_plain_fallback_without_chat_template(shared_data):
    model, tok = load_model(str(shared_data / "models" / "tiny-random-gpt2-flax"))  # no tokenizer files
    assert not tok.chat_template
    session = ChatSession(model, tok, max_new_tokens=4, temperature=0.0)
    assert "plain" in session.template_note
    session.reply("hi")
    prompt = tok.decode(session._encode(session.messages[:1]))
    assert prompt == "User:\nhi\n\nAssistant:\n"
    assert len(session.messages) == 2 and session.messages[1]["role"] == "assistant"


def test_chunk_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "unused", "--chunk", "0"])  # refused before any model is loaded
    assert e.value.code == 2 and "--chunk must be at least 1, got 0" in capsys.readouterr().err


def test_sampling_flags_refused_before_loading(capsys):
    for flags, message in ((["--top-p", "0"], "--top-p=0.0: must be in (0, 1] (1 = off)"),
                           (["--temperature", "-1"], "--temperature=-1.0: must be >= 0 (0 = greedy)"),
                           (["--max-new-tokens", "0"], "--max-new-tokens=0: must be >= 1")):
        assert main(["--model", "/nonexistent/never/loaded", *flags]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"


def test_a_system_message_that_leaves_no_room_is_refused_at_once(chat_folder):
    model, tok = load_model(str(chat_folder))
    with pytest.raises(SampleError, match=r"--system is too long: .* at most 32 fit beside the reply "
                                          r"\(--max-new-tokens=128, capped to 32 \(half the model's 64 positions\)\)"):
        ChatSession(model, tok, system="word " * 40)


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(chat_folder, monkeypatch, capsys):
    """Ctrl-C while the first reply is generated: the session goes on, and the next prompt holds
    no trace of the interrupted turn."""
    import jaxgpt.chat

    real_stream, prompts = jaxgpt.chat.stream, []

    def stream(model, batch, **kw):
        prompts.append(list(batch[0]))
        if len(prompts) == 1:
            raise KeyboardInterrupt
        yield from real_stream(model, batch, **kw)

    monkeypatch.setattr(jaxgpt.chat, "stream", stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first message\nsecond message\n"))
    assert main(["--model", str(chat_folder), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    _, tok = load_model(str(chat_folder))
    assert "(interrupted)" in out and len(prompts) == 2
    assert "second message" in tok.decode(prompts[1]) and "first message" not in tok.decode(prompts[1])

def test_stop_ids_include_the_folders_generation_config(chat_folder, tmp_path):
    import json
    import shutil

    from jaxgpt.sample import stop_ids_for

    folder = shutil.copytree(chat_folder, tmp_path / "m")
    model, tok = load_model(str(folder))
    base = stop_ids_for(tok, model, str(folder))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [50256, 11671]}))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [50256, 42]}))
    assert stop_ids_for(tok, model, str(folder)) == sorted(set(base) | {11671, 42})
    assert stop_ids_for(tok, model) == base == sorted(set(stop_token_ids(tok)) | {50256})
    # more than the decode loop takes: the tokenizer's own first, then the folder's, up to 8
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(range(100, 110))}))
    capped = stop_ids_for(tok, model, str(folder))
    assert len(capped) == 8 and set(base) <= set(capped)


def test_help_shows_each_clis_own_sampling_defaults(capsys):
    from jaxgpt.sample import main as sample_main

    for cli, want in ((sample_main, ["0 = greedy (default 0.8)", "tokens to generate (default 64)"]),
                      (main, ["0 = greedy (default 0.7)", "at most half the context (default 128)"])):
        with pytest.raises(SystemExit):
            cli(["--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert all(w in out for w in want), out
