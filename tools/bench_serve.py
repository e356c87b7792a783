"""Serving speed: ``python -m jaxgpt.serve`` vs ``transformers serve --continuous-batching``.

    python tools/bench_serve.py                      # GPT-2 124M random init, CPU, concurrency 1, 8, 32
    python tools/bench_serve.py --model gpt2-chat-hf # an exported folder (python -m jaxgpt.export)
    python tools/bench_serve.py --quick              # tiny model, short replies: a smoke run

Both servers load the same HF folder (by default a random-init GPT-2 124M written with
``save_pretrained``, the vendored tokenizer and jaxgpt's plain chat template: no download)
and answer the same request mix through ``POST /v1/chat/completions`` with ``stream: true``:
chat prompts of 4-60 words, ``max_tokens`` cycling through ``--max-tokens``, greedy. Each
concurrency level runs ``--requests`` requests (at least 2 per client) from that many
concurrent clients, after an untimed round of the same requests (each side compiles or
allocates there: the numbers are the steady state; ``ready_s`` is each server's start-up). Each side runs in its own server process, one after the other.

Measured per level: output tokens/s (the replies' text re-tokenised with the folder's
tokenizer, over the level's wall time: the same count for both sides), time to first token
(request sent -> first non-empty content chunk) p50 / p95, and the mean request latency.

``tools/bench.py --sections serve`` calls ``run(work_dir, quick=...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
TINY = dict(n_layer=2, n_head=2, n_embd=128, n_positions=512)
WORDS = ("the a of river mountain city story small quiet bright old new light dark water stone tree bird "
         "morning evening song road house window garden friend letter music journey question answer").split()


def make_folder(work: Path, quick: bool) -> Path:
    """A random-init GPT-2 HF folder with the vendored tokenizer and the plain chat template."""
    from flax import nnx

    from jaxgpt.model import GPT2, GPT2Config
    from jaxgpt.tokenizer import add_chat_template, load_tokenizer
    from jaxgpt.weights import save_pretrained

    folder = work / ("tiny-hf" if quick else "gpt2-124m-hf")
    if not (folder / "model.safetensors").exists():
        model = GPT2(GPT2Config(**(TINY if quick else GPT2_124M)), rngs=nnx.Rngs(0))
        save_pretrained(model, folder, add_chat_template(load_tokenizer(), "plain"))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(side: str, folder: Path, port: int, max_batch: int) -> list[str]:
    if side == "jaxgpt":
        return [sys.executable, "-m", "jaxgpt.serve", "--model", str(folder), "--port", str(port),
                "--max-batch", str(max_batch), "--log-level", "warning"]
    return [str(Path(sys.executable).with_name("transformers")), "serve", "--continuous-batching", "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", str(folder)]


def mix(n: int, max_tokens: list[int], seed: int) -> list[tuple[list[dict], int]]:
    """``n`` (messages, max_tokens) pairs, the same for both sides."""
    import random

    rng = random.Random(seed)
    return [([{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))}],
             max_tokens[i % len(max_tokens)]) for i in range(n)]


async def one_request(http, url: str, model: str, messages, max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    first, text = None, ""
    async with http.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text += piece
    done = time.perf_counter()
    return {"ttft": (first or done) - sent, "latency": done - sent, "text": text}


async def level(url: str, model: str, requests, concurrency: int) -> tuple[list[dict], float]:
    import aiohttp

    queue = list(requests)
    results = []

    async def client(http):
        while queue:
            messages, max_tokens = queue.pop(0)
            results.append(await one_request(http, url, model, messages, max_tokens))

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return results, time.perf_counter() - start


def pct(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def wait_ready(proc, port: int, timeout: float = 900):
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no answer on port {port} within {timeout:.0f} s")


def bench_side(side: str, folder: Path, levels: list[int], requests: int, max_tokens: list[int], tokenizer,
               log=print) -> dict:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(server_command(side, folder, port, max(levels)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    out = {"side": side, "levels": {}}
    try:
        wait_ready(proc, port)
        out["ready_s"] = round(time.perf_counter() - started, 1)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for c in levels:
            n = max(requests, 2 * c)
            requests_ = mix(n, max_tokens, seed=c)
            asyncio.run(level(url, str(folder), requests_, c))  # warm-up: every shape compiled / allocated
            results, wall = asyncio.run(level(url, str(folder), requests_, c))
            tokens = sum(len(tokenizer.encode(r["text"])) for r in results)
            ttft = [r["ttft"] for r in results]
            row = {"requests": n, "output_tokens": tokens, "wall_s": round(wall, 2),
                   "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(pct(ttft, 0.5), 3),
                   "ttft_p95_s": round(pct(ttft, 0.95), 3),
                   "latency_mean_s": round(statistics.mean(r["latency"] for r in results), 3)}
            out["levels"][c] = row
            log(f"{side:>12} c={c:<3} {row['tokens_per_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_s']:.3f} s  "
                f"p95 {row['ttft_p95_s']:.3f} s  ({n} requests, {tokens} tokens, {wall:.1f} s)")
    except Exception as e:  # a side that fails is reported, the other still runs
        out["error"] = f"{type(e).__name__}: {e}"
        proc.terminate()
        try:
            out["stderr_tail"] = proc.communicate(timeout=30)[1][-2000:]
        except subprocess.TimeoutExpired:
            proc.kill()
        log(f"{side}: {out['error']}")
        return out
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    return out


def run(work: Path, quick: bool = False, model: str | None = None, levels=(1, 8, 32), requests: int = 16,
        max_tokens=None, sides=("jaxgpt", "transformers"), log=print) -> dict:
    from jaxgpt.tokenizer import load_tokenizer

    folder = Path(model) if model else make_folder(work, quick)
    max_tokens = list(max_tokens or ([8, 16] if quick else [32, 64, 128]))
    tokenizer = load_tokenizer(folder)
    result = {"model": str(folder), "levels": list(levels), "requests": requests, "max_tokens": max_tokens,
              "sides": {side: bench_side(side, folder, list(levels), requests, max_tokens, tokenizer, log)
                        for side in sides}}
    ours, peer = (result["sides"].get(s, {}).get("levels", {}) for s in ("jaxgpt", "transformers"))
    result["ratios"] = {c: {"tokens_per_s": round(ours[c]["tokens_per_s"] / peer[c]["tokens_per_s"], 2),
                            "ttft_p95": round(ours[c]["ttft_p95_s"] / peer[c]["ttft_p95_s"], 2)}
                        for c in levels if c in ours and c in peer and peer[c]["tokens_per_s"]}
    for c, r in result["ratios"].items():
        log(f"c={c}: jaxgpt / transformers throughput {r['tokens_per_s']}x, TTFT p95 {r['ttft_p95']}x")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="an HF folder (default: a random-init GPT-2 124M written once)")
    p.add_argument("--quick", action="store_true", help="tiny model, short replies")
    p.add_argument("--levels", default="1,8,32", help="concurrency levels (default %(default)s)")
    p.add_argument("--requests", type=int, default=16, help="requests per level, at least 2 per client (default %(default)s)")
    p.add_argument("--max-tokens", default=None, help="reply lengths cycled through (default 32,64,128; quick 8,16)")
    p.add_argument("--sides", default="jaxgpt,transformers")
    p.add_argument("--work", default=None, help="where the model folder is written (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(args.work or tmp), quick=args.quick, model=args.model,
                     levels=[int(c) for c in args.levels.split(",")], requests=args.requests,
                     max_tokens=[int(t) for t in args.max_tokens.split(",")] if args.max_tokens else None,
                     sides=args.sides.split(","))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ratios"]))


if __name__ == "__main__":
    main()
