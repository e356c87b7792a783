"""An OpenAI-compatible HTTP server: ``python -m jaxgpt.serve --model PATH``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (the tokenizer's chat template;
``stream: true`` as server-sent events ending in ``data: [DONE]``), ``POST /v1/completions``
(string or token-id prompts, one or a list; ``echo``, ``logprobs``), ``GET /health`` and
``GET /metrics`` (Prometheus text). Requests are batched continuously by ``jaxgpt.engine``.

Per request: ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``
(default 1.0, as OpenAI's; 0 = greedy), ``top_p``, ``top_k`` (an extra field; 0 or -1 = off),
``stop`` (strings, matched on the decoded text and left out of it), ``seed``, ``n``,
``logprobs`` / ``top_logprobs``. Bad requests get OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``) with status 400, or 404 for an unknown
model; the server keeps serving.

``create_app(engine, model_name)`` builds the FastAPI app (tests run it in-process);
``main()`` loads the model with ``jaxgpt.loader.load_model`` and runs uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
import uuid
from typing import Any, Sequence

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from jaxgpt.engine import Engine, Request
from jaxgpt.kv_slots import MAX_TOP_LOGPROBS
from jaxgpt.inputs import Range

log = logging.getLogger("jaxgpt.serve")

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """A request the server refuses: ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- request fields
# Every number in a request obeys jaxgpt.inputs' rule (finite, then its own range), as the
# config and the CLIs do; a violation is a 400 naming the field.

def _number(body: dict, key: str, default: float, lo: float, hi: float, *, open_lo: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    return Range(lo, hi, low_open=open_lo).check(key, value, lambda msg: APIError(400, msg, key))


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    bounds = Range(lo, math.inf if hi is None else hi, integer=True)
    return bounds.check(key, value, lambda msg: APIError(400, msg, key))


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false, got {value!r}", key)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    return stop


class Server:
    """The requests' logic over one engine; ``create_app`` puts HTTP routes on it."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.vocab = engine.cfg.vocab_size
        self.created = int(time.time())

    # --- parsing

    def check_model(self, body: dict):
        model = body.get("model")
        if model is None:
            raise APIError(400, "model is required", "model")
        if model != self.name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.name}`", "model",
                           "model_not_found")

    def sampling(self, body: dict, prompt_lens: Sequence[int], default_max: int | None) -> dict:
        """The engine's Request fields shared by every prompt of ``body``."""
        context = self.engine.max_context
        longest = max(prompt_lens)
        if longest >= context:
            raise APIError(400, f"the prompt has {longest} tokens; this model's context is {context} tokens, "
                           "with at least one for the completion", "messages" if "messages" in body else "prompt",
                           "context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, key, default_max, 1)
        max_tokens = context - longest if max_tokens is None else max_tokens
        if longest + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                           "completion). Please reduce the prompt or the completion length.", key,
                           "context_length_exceeded")
        top_k = _integer(body, "top_k", 0, -1)
        return dict(max_tokens=max_tokens, n=_integer(body, "n", 1, 1, self.engine.max_batch),
                    temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True), top_k=max(top_k, 0),
                    stop=_stop(body), seed=_integer(body, "seed", None, -(2**63), 2**63 - 1))

    def completion_prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if prompt is None:
            raise APIError(400, "prompt is required", "prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such "
                           "lists", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.tokenizer.encode(p) if p else [self.engine.cfg.bos_token_id]
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = p
            else:
                raise APIError(400, "prompt must be a string, a list of strings, a non-empty list of token ids or "
                               "a list of such lists", "prompt")
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise APIError(400, f"prompt has token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}",
                               "prompt")
            out.append(ids)
        return out

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages is required: a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] must be an object with a role and content", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
            clean.append({"role": m["role"], "content": content})
        try:
            text = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template's own error (jinja raises its own types)
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    # --- running

    def submit(self, prompts: list[list[int]], fields: dict, logprobs: int | None, echo_logprobs: int | None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handles = [self.engine.submit(Request(p, logprobs=logprobs, echo_logprobs=echo_logprobs, **fields), loop,
                                      events, tag=i) for i, p in enumerate(prompts)]
        return handles, events

    async def events(self, handles, events: asyncio.Queue):
        """(choice index, Event) until every choice has finished; an engine error raises APIError 500."""
        left = sum(h.request.n for h in handles)
        n = handles[0].request.n
        while left:
            tag, event = await events.get()
            if event.kind == "error":
                raise APIError(500, event.text)
            if event.kind == "finish":
                left -= 1
            yield tag * n + event.index, tag, event

    async def gather(self, handles, events: asyncio.Queue) -> tuple[dict[int, dict], dict[int, list]]:
        """Every choice's whole result, {index: {text, tokens, logprobs, finish_reason}}, and the
        prompts' log-probs by prompt, for the non-streaming responses."""
        choices: dict[int, dict] = {}
        prompt_lp: dict[int, list] = {}
        async for index, tag, event in self.events(handles, events):
            if event.kind == "prompt":
                prompt_lp[tag] = event.logprobs
                continue
            c = choices.setdefault(index, {"text": "", "tokens": [], "logprobs": [], "finish_reason": None})
            if event.kind == "delta":
                c["text"] += event.text
                c["tokens"] += event.tokens
                c["logprobs"] += event.logprobs
            else:
                c["finish_reason"] = event.finish_reason
        return choices, prompt_lp

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def completion_logprobs(self, entries: list, tokens: list[int], offset: int = 0) -> dict:
        """OpenAI's legacy logprobs object for ``tokens`` (entries: None or (lp, [(id, lp)]))."""
        strings = [self.token_text(t) for t in tokens]
        offsets, at = [], offset
        for s in strings:
            offsets.append(at)
            at += len(s)
        return {"tokens": strings, "token_logprobs": [None if e is None else e[0] for e in entries],
                "top_logprobs": [None if e is None else {self.token_text(i): lp for i, lp in e[1]} for e in entries],
                "text_offset": offsets}

    def chat_logprobs(self, entries: list, tokens: list[int]) -> dict:
        def item(t, lp):
            s = self.token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**item(t, e[0]), "top_logprobs": [item(i, lp) for i, lp in e[1]]}
                            for t, e in zip(tokens, entries)]}


def _usage(prompts, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _until_disconnect(request):
    """Returns once the client has gone (the body is read: ``receive`` waits for the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, model_name: str):
    """The FastAPI app over a started ``engine``."""
    server = Server(engine, model_name)
    app = FastAPI(title="jaxgpt", version="1")
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def any_error(_, e: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    async def read_json(request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        server.check_model(body)
        return body

    async def respond(request: HTTPRequest, handles, stream_chunks, collect):
        """A streaming response of ``stream_chunks()`` or the JSON of ``collect()``; either way a
        client that goes away cancels the request's slots."""
        if stream_chunks is not None:
            async def body():
                try:
                    async for chunk in stream_chunks():
                        yield _sse(chunk)
                except APIError as e:
                    yield _sse(e.body())
                finally:
                    for h in handles:
                        h.cancel()
                yield "data: [DONE]\n\n"

            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            for h in handles:
                h.cancel()
        if not work.done():
            work.cancel()
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        return JSONResponse(work.result())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "jaxgpt", "max_model_len": engine.max_context}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_json(request)
        prompts = server.completion_prompts(body)
        fields = server.sampling(body, [len(p) for p in prompts], default_max=16)
        logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        echo, stream = _flag(body, "echo"), _flag(body, "stream")
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
        handles, events = server.submit(prompts, fields, logprobs, logprobs if echo else None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = fields["n"]
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.name}
        prompt_text = [server.tokenizer.decode(p) for p in prompts]

        def prompt_logprobs(tag, event):
            return server.completion_logprobs(event.logprobs, prompts[tag])

        async def stream_chunks():
            generated = 0
            prompt_lp: dict[int, dict] = {}
            started = set()
            async for index, tag, event in server.events(handles, events):
                if event.kind == "prompt":
                    prompt_lp[tag] = prompt_logprobs(tag, event)
                    continue
                choice = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
                if echo and index not in started:
                    choice["text"] = prompt_text[tag]
                    choice["logprobs"] = prompt_lp.get(tag)
                started.add(index)
                if event.kind == "delta":
                    generated += len(event.tokens)
                    choice["text"] += event.text
                    if logprobs is not None:
                        lp = server.completion_logprobs(event.logprobs, event.tokens)
                        if choice["logprobs"]:  # the echoed prompt's, then this token's
                            lp = {k: choice["logprobs"][k] + lp[k] for k in lp}
                        choice["logprobs"] = lp
                else:
                    choice["finish_reason"] = event.finish_reason
                yield {**head, "choices": [choice]}
            if usage_in_stream:
                yield {**head, "choices": [], "usage": _usage(prompts, generated)}

        async def collect():
            results, prompt_lp = await server.gather(handles, events)
            choices = []
            for index in range(len(prompts) * n):
                tag, r = index // n, results[index]
                text, lp = r["text"], None
                if echo:
                    text = prompt_text[tag] + text
                    if logprobs is not None:
                        lp = server.completion_logprobs(prompt_lp[tag] + r["logprobs"], prompts[tag] + r["tokens"])
                elif logprobs is not None:
                    lp = server.completion_logprobs(r["logprobs"], r["tokens"])
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": r["finish_reason"]})
            return {**head, "choices": choices,
                    "usage": _usage(prompts, sum(len(r["tokens"]) for r in results.values()))}

        return await respond(request, handles, stream_chunks if stream else None, collect)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_json(request)
        prompt = server.chat_prompt(body)
        fields = server.sampling(body, [len(prompt)], default_max=None)
        want_lp = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want_lp:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        stream = _flag(body, "stream")
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
        handles, events = server.submit([prompt], fields, (top or 0) if want_lp else None, None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        async def stream_chunks():
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name}
            generated, started = 0, set()
            async for index, _, event in server.events(handles, events):
                delta = {} if index in started else {"role": "assistant", "content": ""}
                started.add(index)
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                if event.kind == "delta":
                    generated += len(event.tokens)
                    delta["content"] = event.text
                    if want_lp:
                        choice["logprobs"] = server.chat_logprobs(event.logprobs, event.tokens)
                else:
                    choice["finish_reason"] = event.finish_reason
                yield {**head, "choices": [choice]}
            if usage_in_stream:
                yield {**head, "choices": [], "usage": _usage([prompt], generated)}

        async def collect():
            results, _ = await server.gather(handles, events)
            choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                        "logprobs": server.chat_logprobs(r["logprobs"], r["tokens"]) if want_lp else None,
                        "finish_reason": r["finish_reason"]} for i, r in sorted(results.items())]
            return {"id": rid, "object": "chat.completion", "created": created, "model": server.name,
                    "choices": choices, "usage": _usage([prompt], sum(len(r["tokens"]) for r in results.values()))}

        return await respond(request, handles, stream_chunks if stream else None, collect)

    return app


METRICS = {  # stats key -> (Prometheus type, help)
    "requests": ("counter", "requests received"),
    "finished": ("counter", "requests completed"),
    "cancelled": ("counter", "requests cancelled (the client went away)"),
    "errors": ("counter", "engine failures (the requests in flight got an error)"),
    "prompt_tokens": ("counter", "prompt tokens prefilled"),
    "generated_tokens": ("counter", "tokens generated"),
    "steps": ("counter", "batched decode steps"),
    "active": ("gauge", "slots decoding a request now"),
    "slots": ("gauge", "slots (the batch size)"),
    "queued": ("gauge", "requests waiting for a slot"),
    "occupancy": ("gauge", "mean share of the slots busy per decode step"),
    "cache_len": ("gauge", "KV cache columns"),
    "ttft_p50_s": ("gauge", "time to first token, median of the last 2000 requests (seconds)"),
    "ttft_p95_s": ("gauge", "time to first token, 95th percentile of the last 2000 requests (seconds)"),
}


def prometheus(stats: dict[str, Any]) -> str:
    lines = []
    for key, (kind, text) in METRICS.items():
        name = f"jaxgpt_{key}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {stats[key]}"]
    return "\n".join(lines) + "\n"


def build_engine(model_path: str, *, max_batch: int = 8, max_context: int | None = None, dtype: str = "float32",
                 param_dtype: str = "float32", warmup: bool = True, adapter: str | None = None) -> Engine:
    """Load ``model_path`` (``jaxgpt.loader.load_model``) into a started engine; ``warmup`` compiles
    the decode step for every cache length and a first prefill before any request comes."""
    from jaxgpt.loader import load_model, stop_ids_for
    from jaxgpt.tokenizer import add_chat_template

    loaded = load_model(model_path, dtype=dtype, param_dtype=param_dtype, adapter=adapter)
    model, tokenizer = loaded.model, loaded.tokenizer
    if not tokenizer.chat_template:
        add_chat_template(tokenizer, "plain")
        log.warning("the tokenizer has no chat template: chat requests use jaxgpt's plain 'User:/Assistant:' format")
    engine = Engine(model, tokenizer, max_batch=max_batch, max_context=max_context,
                    stop_ids=stop_ids_for(tokenizer, model, loaded.folder))  # after the template: its end of turn
    if warmup:
        engine.compile_steps()
    engine.start()
    if warmup:
        handle = engine.submit(Request([model.config.bos_token_id], max_tokens=2, temperature=0.0))
        while handle.events.get()[1].kind not in ("finish", "error"):
            pass
    return engine


def main(argv: Sequence[str] | None = None) -> int:
    from jaxgpt import compile_cache
    from jaxgpt.decoding import DECODING_LAYOUTS
    from jaxgpt.sample import ADAPTER_HELP, PARAM_DTYPE_HELP

    ap = argparse.ArgumentParser(prog="python -m jaxgpt.serve",
                                 description="Serve a GPT-2 over an OpenAI-compatible HTTP API, batching requests "
                                             "continuously.")
    ap.add_argument("--model", required=True, help="HF folder or hub id, or a jaxgpt training checkpoint")
    ap.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded at once (default %(default)s)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="most tokens per request, prompt + completion (default: the model's n_positions)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (default %(default)s)")
    ap.add_argument("--param-dtype", default="float32", choices=DECODING_LAYOUTS, help=PARAM_DTYPE_HELP)
    ap.add_argument("--adapter", metavar="PEFT_DIR", help=ADAPTER_HELP)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    if args.max_batch < 1:
        ap.error(f"--max-batch must be >= 1, got {args.max_batch}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    compile_cache.enable()
    import uvicorn

    try:
        engine = build_engine(args.model, max_batch=args.max_batch, max_context=args.max_context, dtype=args.dtype,
                              param_dtype=args.param_dtype, adapter=args.adapter)
    except (ValueError, OSError) as e:  # the engine names --max-context's bound (the model's n_positions)
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or args.model
    log.info("serving %s as %r on http://%s:%d/v1 (%d slots, context %d)", args.model, name, args.host, args.port,
             args.max_batch, engine.max_context)
    try:
        uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
