"""jaxgpt.tokenizer: the offline GPT-2 tokenizer and the chat templates, checked against transformers' own API."""

import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from jaxgpt.tokenizer import (ENDOFTEXT, IM_END, IM_START, TokenizerError, add_chat_template, end_of_turn_id,
                              from_pretrained, load_tokenizer, stop_token_ids, template_name)

from conftest import shared_path

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Hi there\n"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "\n4."},
]


def test_vendored_tokenizer_is_gpt2():
    tok = load_tokenizer()
    assert len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]  # from the shared data README
    assert tok.eos_token == ENDOFTEXT and tok.eos_token_id == 50256
    assert tok.pad_token == ENDOFTEXT


def test_training_and_sampling_do_not_import_torch(tmp_path):
    # torch (installed here as the tests' reference) costs ~1.3 s of every command's start-up when
    # transformers' AutoTokenizer or tensorboardX drags it in; only the export's check needs it.
    add_chat_template(load_tokenizer()).save_pretrained(tmp_path)
    code = ("import sys, jaxgpt.train, jaxgpt.metrics, jaxgpt.sample, jaxgpt.chat, jaxgpt.tokenizer as t; t.load_tokenizer(); "
            f"assert len(t.load_tokenizer({str(tmp_path)!r})) == 50259; "
            f"w = jaxgpt.metrics._summary_writer()({str(tmp_path / 'tb')!r}); w.add_scalar('loss', 2.5, 1); w.close(); "
            "print(sorted(m for m in ('torch', 'transformers.models.auto') if m in sys.modules)); "
            "import torch; print(torch.ones(2).sum().item())")  # torch hidden only while tensorboardX loads
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["[]", "2.0"], r.stdout
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("folder", ["chatml", "tiny-random-gpt2"])
def test_from_pretrained_is_autotokenizers_choice(folder, tmp_path):
    if folder == "chatml":
        add_chat_template(load_tokenizer()).save_pretrained(tmp_path)
        folder = tmp_path
    else:
        folder = shared_path("models", folder)
    ours, auto = from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert type(ours) is type(auto)
    assert (len(ours), ours.special_tokens_map, ours.chat_template, ours.added_tokens_decoder) == \
        (len(auto), auto.special_tokens_map, auto.chat_template, auto.added_tokens_decoder)
    text = "Hi <|im_start|>user\n  naïve 東京<|im_end|><|endoftext|>"
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    if ours.chat_template:
        kw = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ours.apply_chat_template(CHAT, **kw) == auto.apply_chat_template(CHAT, **kw)


def test_vendored_matches_shared_copy():
    ref = AutoTokenizer.from_pretrained(str(shared_path("models", "tiny-random-gpt2")))
    tok = load_tokenizer()
    text = "The quick brown fox — naïve café 東京 🙂\n\n  indented\tcode()"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]


def test_chatml_tokens_template_and_idempotence():
    tok = add_chat_template(load_tokenizer())
    assert len(tok) == 50259
    assert tok.convert_tokens_to_ids([IM_START, IM_END]) == [50257, 50258]
    assert tok.pad_token_id == 50256 and end_of_turn_id(tok) == 50258
    assert stop_token_ids(tok) == [50256, 50258]
    assert template_name(tok) == "chatml"
    add_chat_template(tok)  # again: nothing added twice
    assert len(tok) == 50259
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4.<|im_end|>\n")
    # special tokens are single tokens
    ids = tok(text)["input_ids"]
    assert ids.count(50257) == 5 and ids.count(50258) == 5


def test_assistant_mask_covers_reply_and_end_of_turn_only():
    tok = add_chat_template(load_tokenizer())
    out = tok.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
    assert trained == "Hello! How can I help?<|im_end|>4.<|im_end|>"
    # every im_end that closes an assistant turn is trained; those closing user/system turns are not
    ends = [m for i, m in zip(ids, mask) if i == 50258]
    assert ends == [0, 0, 1, 0, 1]


def test_plain_template_adds_no_tokens():
    tok = add_chat_template(load_tokenizer(), "plain")
    assert len(tok) == 50257 and end_of_turn_id(tok) == 50256 and template_name(tok) == "plain"
    out = tok.apply_chat_template(CHAT[1:3], return_dict=True, return_assistant_tokens_mask=True)
    assert tok.decode(out["input_ids"]) == "User:\nHi there\n\nAssistant:\nHello! How can I help?<|endoftext|>\n\n"
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(trained) == "Hello! How can I help?<|endoftext|>"


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_saved_tokenizer_renders_what_was_trained(tmp_path, template):
    """After save_pretrained, plain transformers renders the generation prompt as a prefix of the trained text."""
    tok = add_chat_template(load_tokenizer(), template)
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))  # what a user of the exported model gets
    assert len(hf) == len(tok) and hf.pad_token == ENDOFTEXT
    full = tok.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    prompt = hf.apply_chat_template(CHAT[:4], add_generation_prompt=True)["input_ids"]
    assert full["input_ids"][: len(prompt)] == prompt
    # the first token after the prompt is the first trained token of the last reply
    assert full["assistant_masks"][len(prompt)] == 1 and full["assistant_masks"][len(prompt) - 1] == 0
    assert load_tokenizer(tmp_path).chat_template == tok.chat_template


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(TokenizerError, match=r"missing: no such folder"):  # a path: never looked up on the hub
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="cannot load a tokenizer from .*empty"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="template='llama'"):
        add_chat_template(load_tokenizer(), "llama")
