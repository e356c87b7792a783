"""jaxgpt.serve against real clients: the `openai` SDK, lm-eval's local-completions model, many streams.

The server runs in this process (uvicorn in a thread, loopback, a free port) over a tiny GPT-2 with
GPT-2's own vocabulary, saved as an HF folder with the vendored tokenizer and the plain chat template.
Tolerances: prompt log-probs within 1e-4 of jaxgpt's full forward; lm-eval's per-item
log-likelihoods within 1e-3 of its `hf` model on the same folder (PyTorch).
"""

import asyncio
import json
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.model import GPT2Config
from jaxgpt.sample import generate
from jaxgpt.serve import build_engine, create_app
from jaxgpt.tokenizer import add_chat_template, load_tokenizer
from jaxgpt.weights import save_pretrained
from test_sample import random_model

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")
aiohttp = pytest.importorskip("aiohttp")

CFG = GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=4)
NAME = "tiny-gpt2"
SLOTS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = add_chat_template(load_tokenizer(), "plain")
    return save_pretrained(random_model(CFG, scale=0.1), tmp_path_factory.mktemp("tiny"), tok)


@pytest.fixture(scope="module")
def server(folder):
    import uvicorn

    engine = build_engine(str(folder), max_batch=SLOTS)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, NAME), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine}
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


def metrics(server) -> dict[str, float]:
    text = requests.get(server["url"] + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def greedy(server, prompt: list[int], max_tokens: int) -> list[int]:
    engine = server["engine"]
    return generate(engine.model, [prompt], max_new_tokens=max_tokens, stop_ids=sorted(engine.stop_ids))[0]


# ----------------------------------------------------------------------------- the engine's sampler

def test_sample_rows_per_row_settings_match_their_distributions():
    """Rows with their own temperature / top-k / top-p draw from exactly the distribution that
    sorting would give (numpy reference), and greedy rows take the argmax."""
    from jaxgpt.kv_slots import sample_rows

    v, draws = 50, 4000
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, v)).astype(np.float32) * 2
    logits[0, 7] = logits[0, 8] = logits.max() + 0.5  # a tie at the top
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 10, 0.8)]
    temp, top_k, top_p = (np.array(col, dtype) for col, dtype in zip(zip(*settings), (np.float32, np.int32, np.float32)))
    rows = len(settings)
    fn = jax.jit(jax.vmap(lambda c: sample_rows(jnp.repeat(jnp.asarray(logits), rows, 0), jnp.arange(rows) + 3,
                                                jnp.full(rows, c), temp, top_k, top_p)))
    got = np.asarray(fn(jnp.arange(draws)))  # [draws, rows]
    assert (got[:, 0] == np.argmax(logits)).all()
    for r, (t, k, p) in enumerate(settings[1:], start=1):
        x = logits[0] / t
        order = np.argsort(-x, kind="stable")
        keep = np.ones(v, bool)
        if k:
            keep[order[k:]] = False
        probs = np.where(keep, np.exp(x - x.max()), 0)
        probs /= probs.sum()
        mass_before = np.cumsum(probs[order]) - probs[order]
        keep[order[mass_before >= p]] = False
        want = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
        freq = np.bincount(got[:, r], minlength=v) / draws
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(keep)), f"row {r} drew a cut token"
        np.testing.assert_allclose(freq, want, atol=0.03, err_msg=f"row {r}")


# ----------------------------------------------------------------------------- openai client

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert requests.get(server["url"] + "/health").json() == {"status": "ok"}


def test_chat_greedy_stream_and_not(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    tok = server["engine"].tokenizer
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)
    ref = greedy(server, prompt, 12)
    reason = "stop" if ref[-1] in server["engine"].stop_ids else "length"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == reason
    assert choice.message.content == tok.decode(ref, skip_special_tokens=True) and choice.message.content
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(ref))
    assert out.usage.total_tokens == len(prompt) + len(ref)

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == len(ref)


def test_chat_sampling_seed_n_and_stop(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16,
              temperature=1.2, top_p=0.9, extra_body={"top_k": 40})
    a = client.chat.completions.create(n=3, seed=7, **kw)
    b = client.chat.completions.create(n=3, seed=7, **kw)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]  # the seed fixes every choice
    assert len(set(texts)) > 1  # and the choices differ from each other
    assert [c.index for c in a.choices] == [0, 1, 2]
    # a stop string taken from the text ends it just before, with finish_reason "stop"
    text = texts[0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"the sample is too short to cut: {text!r}"
    cut = client.chat.completions.create(n=1, seed=7, stop=[stop], **kw).choices[0]
    assert cut.message.content == text[: text.index(stop)] and cut.finish_reason == "stop"


def test_completions_echo_logprobs_match_forward(server, client):
    text = "The quick brown fox jumps over the lazy dog"
    out = client.completions.create(model=NAME, prompt=text, max_tokens=1, logprobs=3, echo=True, temperature=0)
    engine = server["engine"]
    ids = engine.tokenizer.encode(text)
    lp = np.asarray(jax.nn.log_softmax(engine.model(jnp.asarray([ids]))[0], axis=-1))
    choice = out.choices[0]
    got = choice.logprobs.token_logprobs
    assert len(got) == len(ids) + 1 and got[0] is None and choice.text.startswith(text)
    np.testing.assert_allclose(got[1: len(ids)], lp[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    np.testing.assert_allclose(got[-1], lp[-1].max(), atol=1e-4)  # greedy: the best next token
    best = np.sort(lp[:-1], axis=-1)[:, ::-1][:, :3]
    for t, top in enumerate(choice.logprobs.top_logprobs[1: len(ids)]):
        np.testing.assert_allclose(sorted(top.values(), reverse=True), best[t][: len(top)], atol=1e-4)
    assert choice.logprobs.tokens[: len(ids)] == [engine.tokenizer.decode([i]) for i in ids]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 1)


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Count to ten."}],
                                         max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:  # greedy: each token is its position's best, and the alternatives come best first
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6) and item.logprob <= 0


def test_long_requests_grow_and_shift_the_cache(server, client):
    """A long prompt joins while a long reply is being decoded: the cache grows and its rows move
    (a right shift for the prompt, left shifts as the reply passes the cache's end); both greedy
    outputs stay those of `generate`."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    short, long = rng.integers(0, 50000, size=5).tolist(), rng.integers(0, 50000, size=110).tolist()
    text, joined = "", None
    with ThreadPoolExecutor(1) as pool:
        for chunk in client.completions.create(model=NAME, prompt=short, max_tokens=120, temperature=0, stream=True):
            text += chunk.choices[0].text
            if joined is None:
                joined = pool.submit(client.completions.create, model=NAME, prompt=long, max_tokens=18, temperature=0)
        other = joined.result().choices[0].text
    tok = server["engine"].tokenizer
    assert text == tok.decode(greedy(server, short, 120), skip_special_tokens=True)
    assert other == tok.decode(greedy(server, long, 18), skip_special_tokens=True)


def test_completions_token_prompts_batch(server, client):
    prompts = [[464, 2068, 7586], [40, 1842, 257, 3797, 11, 290]]
    out = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    tok = server["engine"].tokenizer
    for c in out.choices:
        ref = greedy(server, prompts[c.index // 2], 6)
        assert c.text == tok.decode(ref, skip_special_tokens=True)
    streamed = {}
    for chunk in client.completions.create(model=NAME, prompt=prompts[1], max_tokens=6, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: out.choices[2].text}


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": NAME}, 400, "prompt"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 500}, 400, "max_tokens"),
    ({"model": NAME, "prompt": [1] * 128}, 400, "prompt"),
    ({"model": NAME, "prompt": "hi", "n": SLOTS + 1}, 400, "n"),
    ({"model": NAME, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": NAME, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": NAME, "prompt": [[1, 2], [50257]]}, 400, "prompt"),
    ({"model": NAME, "prompt": "hi", "stop": [1]}, 400, "stop"),
])
def test_bad_completion_requests(server, body, status, param):
    r = requests.post(server["url"] + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_bad_requests_through_the_client(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 200}])
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"top_k": 1.5})
    chat = server["url"] + "/v1/chat/completions"
    for raw, says in ((b"{not json", "JSON"), (b"[1, 2]", "JSON"),
                      (b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
                       % NAME.encode(), "temperature")):
        r = requests.post(chat, data=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and says in r.json()["error"]["message"]
    # still serving
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.usage.completion_tokens >= 1


# ----------------------------------------------------------------------------- lm-eval

TASK_YAML = """\
task: serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

MC = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a small green frog"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " seven", " the colour blue"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Fahrenheit"], "answer": 0},
    {"question": "The opposite of hot is", "choices": [" cold", " loud", " tomorrow"], "answer": 0},
    {"question": "A cat says", "choices": [" meow", " woof"], "answer": 0},
    {"question": "The sun rises in the", "choices": [" east", " west", " cupboard"], "answer": 0},
]


def test_lm_eval_local_completions_matches_hf(server, folder, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "serve_mc.yaml").write_text(TASK_YAML.format(data=data))
    manager = TaskManager(include_path=str(tasks))

    def run(model, model_args):
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["serve_mc"], task_manager=manager,
                                      log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        samples = sorted(out["samples"]["serve_mc"], key=lambda s: s["doc_id"])
        return out["results"]["serve_mc"]["acc,none"], [[r[0][0] for r in s["resps"]] for s in samples]

    api_acc, api_ll = run("local-completions", {
        "model": NAME, "base_url": server["url"] + "/v1/completions", "tokenizer": str(folder),
        "tokenizer_backend": "huggingface", "num_concurrent": 4, "max_retries": 1, "max_length": CFG.n_positions})
    hf_acc, hf_ll = run("hf", {"pretrained": str(folder), "device": "cpu", "dtype": "float32"})
    assert len(api_ll) == len(MC) and all(len(a) == len(d["choices"]) for a, d in zip(api_ll, MC))
    np.testing.assert_allclose(np.concatenate(api_ll), np.concatenate(hf_ll), atol=1e-3)
    assert api_acc == hf_acc


# ----------------------------------------------------------------------------- load

def test_many_streams_and_disconnects(server):
    """64 streaming clients x 4 requests (mixed lengths and settings) and 8 that hang up: 6 mid-stream,
    2 while waiting for a whole response."""
    rng = np.random.default_rng(0)
    words = "the a of cat dog ran sat on mat red blue big small house tree river".split()
    jobs = []
    for client_id in range(64):
        for k in range(4):
            prompt = " ".join(rng.choice(words, size=int(rng.integers(1, 24))))
            # greedy, plain sampling with a seed, and (rarer: its cut-off costs the whole batch a few passes
            # over the vocabulary at tests' -O0) top-k + top-p
            settings = ([{"temperature": 0}, {"temperature": 0.8, "seed": client_id}] * 4 +
                        [{"temperature": 0}, {"temperature": 1.1, "top_p": 0.9, "top_k": 40}])[(client_id + k) % 10]
            jobs.append((client_id, prompt, int(rng.integers(1, 12)), settings))

    async def stream(http, prompt, max_tokens, settings, hang_up_after=None):
        body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": True, **settings}
        text, reason, chunks = "", None, 0
        async with http.post(server["url"] + "/v1/completions", json=body) as r:
            assert r.status == 200
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return text, reason
                c = json.loads(line[6:])["choices"][0]
                text += c["text"]
                reason = c["finish_reason"] or reason
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    return None, "hung up"  # leaving the block closes the connection
        raise AssertionError("the stream ended without [DONE]")

    async def hang_up_waiting(http):  # a non-streaming request whose client gives up
        body = {"model": NAME, "prompt": "a long story", "max_tokens": 100, "temperature": 0.9}
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(server["url"] + "/v1/completions", json=body,
                                 timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                await r.read()
        return None, "hung up"

    async def client(http, mine):
        return [await stream(http, p, m, s) for _, p, m, s in mine]

    async def main():
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
            by_client = [[j for j in jobs if j[0] == c] for c in range(64)]
            hang = [stream(http, "a long story about the river", 100, {"temperature": 0.9}, hang_up_after=2)
                    for _ in range(6)] + [hang_up_waiting(http) for _ in range(2)]
            return await asyncio.wait_for(asyncio.gather(*(client(http, m) for m in by_client), *hang), 600)

    results = asyncio.run(main())
    assert [r for r in results[64:]] == [(None, "hung up")] * 8
    engine, tok = server["engine"], server["engine"].tokenizer
    for mine, outs in zip([[j for j in jobs if j[0] == c] for c in range(64)], results[:64]):
        for (_, prompt, max_tokens, settings), (text, reason) in zip(mine, outs):
            assert reason in ("stop", "length")
            if settings["temperature"] == 0:
                assert text == tok.decode(greedy(server, tok.encode(prompt), max_tokens), skip_special_tokens=True)
    deadline = time.monotonic() + 30  # the hung-up streams' slots are freed at the next step
    while (m := metrics(server))["jaxgpt_active"] or m["jaxgpt_queued"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["jaxgpt_cancelled_total"] >= 8 and m["jaxgpt_errors_total"] == 0
    assert m["jaxgpt_finished_total"] >= 256


def test_cli_refuses_a_context_past_the_model(folder, capsys):
    from jaxgpt.serve import main

    assert main(["--model", str(folder), "--max-context", str(CFG.n_positions + 1), "--port", "1"]) == 2
    assert "max_context=129" in capsys.readouterr().err
