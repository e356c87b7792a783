"""Terminal chat with a jaxgpt / HF GPT-2 model: ``python -m jaxgpt.chat --model PATH``.

Each turn renders the whole conversation with the tokenizer's chat template
(``apply_chat_template(..., add_generation_prompt=True)``), generates the reply
with ``jaxgpt.sample.stream`` and prints it in chunks as it is decoded. The
oldest turns are dropped when the conversation no longer fits the context
window together with ``--max-new-tokens`` (at most half the context, so that a
message always has room). A tokenizer without a chat template
gets jaxgpt's ``plain`` one (``User:`` / ``Assistant:``, end of turn =
``<|endoftext|>``), which needs no new tokens; the CLI says so when it starts.

Commands: ``/reset`` forgets the conversation, ``/exit`` (or end of input) quits.
Reads from a pipe as well as a terminal, one message per line; bytes that are
not UTF-8 read as U+FFFD (the replacement character), so the chat goes on.

``ChatSession`` is the same logic as a class, for scripts and the demo.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from jaxgpt import compile_cache
from jaxgpt.decoding import DECODING_LAYOUTS
from jaxgpt.inputs import readable
from jaxgpt.loader import load_model, stop_ids_for
from jaxgpt.sample import ADAPTER_HELP, PARAM_DTYPE_HELP, SampleError, check_sampling, stream
from jaxgpt.tokenizer import add_chat_template


class ChatSession:
    """A conversation with a model: ``reply(text)`` generates, ``reset()`` forgets."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 128, temperature: float = 0.7, top_k: int = 0,
                 top_p: float = 0.95, seed: int = 0, system: str | None = None, chunk: int = 8,
                 source: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.template_note = None
        if not tokenizer.chat_template:
            add_chat_template(tokenizer, "plain")
            self.template_note = "the tokenizer has no chat template: using jaxgpt's plain 'User:/Assistant:' format"
        # At most half the context: the default 128 would leave a 128-position model
        # no room for the message.
        self.max_new_tokens = min(max_new_tokens, model.config.n_positions // 2)
        self.reply_note = f"--max-new-tokens={max_new_tokens}" + (
            f", capped to {self.max_new_tokens} (half the model's {model.config.n_positions} positions)"
            if self.max_new_tokens < max_new_tokens else "")
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed, self.system, self.chunk = seed, system and readable(system), chunk
        self.stop_ids = set(stop_ids_for(tokenizer, model, source))  # source: its generation_config's EOS too
        self.turns = 0
        self.reset()
        if system:  # a system message that leaves no room would fail every message: say so now
            n = len(self._encode(self.messages + [{"role": "user", "content": "?"}]))
            budget = model.config.n_positions - self.max_new_tokens
            if n > budget:
                raise SampleError(f"--system is too long: with a one-word message the prompt is {n} tokens, but "
                                  f"at most {budget} fit beside the reply ({self.reply_note})")

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _encode(self, messages) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _fit(self, messages) -> tuple[list[dict], list[int]]:
        """Drop the oldest turns (never the system message or the new one) until the prompt fits."""
        budget = self.model.config.n_positions - self.max_new_tokens
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head):]
        while True:
            ids = self._encode(head + body)
            if len(ids) <= budget:
                return head + body, ids
            if len(body) <= 1:
                what = "the system message and this message are" if head else "the message is"
                raise SampleError(f"{what} too long: {len(ids)} tokens with the template, but at most {budget} "
                                  f"fit beside the reply ({self.reply_note}): a shorter message, or lower "
                                  "--max-new-tokens")
            body = body[2:] if body[0]["role"] == "user" and len(body) > 2 else body[1:]

    def reply(self, text: str, on_text: Callable[[str], None] = lambda s: None) -> str:
        """Generate the assistant's answer to ``text``; ``on_text`` receives it piece by piece."""
        messages, ids = self._fit(self.messages + [{"role": "user", "content": readable(text)}])
        shown = ""
        for (new,) in stream(self.model, [ids], max_new_tokens=self.max_new_tokens, stop_ids=sorted(self.stop_ids),
                             seed=self.seed + self.turns, chunk=self.chunk, **self.sampling):
            if new and new[-1] in self.stop_ids:
                new = new[:-1]
            full = self.tokenizer.decode(new, skip_special_tokens=True)
            # Hold back a trailing partial UTF-8 character until its other bytes arrive.
            ready = full.rstrip("\ufffd")
            if len(ready) > len(shown) and ready.startswith(shown):
                on_text(ready[len(shown):])
                shown = ready
        if full != shown:
            on_text(full[len(shown):] if full.startswith(shown) else full)
        self.turns += 1
        self.messages = messages + [{"role": "assistant", "content": full}]
        return full


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxgpt.chat", description="Chat with a GPT-2 in the terminal.")
    ap.add_argument("--model", required=True, help="HF folder or hub id, or a jaxgpt training checkpoint")
    ap.add_argument("--max-new-tokens", type=int, default=128,
                    help="reply length, at most half the context (default %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default %(default)s)")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off (default %(default)s)")
    ap.add_argument("--top-p", type=float, default=0.95, help="1.0 = off (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    ap.add_argument("--system", default=None, help="system message (kept when old turns are dropped)")
    ap.add_argument("--chunk", type=int, default=8, help="tokens decoded between screen updates (default %(default)s)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (default %(default)s)")
    ap.add_argument("--param-dtype", default="float32", choices=DECODING_LAYOUTS, help=PARAM_DTYPE_HELP)
    ap.add_argument("--adapter", metavar="PEFT_DIR", help=ADAPTER_HELP)
    args = ap.parse_args(argv)
    if args.chunk < 1:
        ap.error(f"--chunk must be at least 1, got {args.chunk}")
    compile_cache.enable()  # a second chat session starts without compiling
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 read as U+FFFD, not a crash mid-chat
        sys.stdin.reconfigure(errors="replace")
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, flags=True)  # before loading
        loaded = load_model(args.model, dtype=args.dtype, param_dtype=args.param_dtype, adapter=args.adapter)
        session = ChatSession(loaded.model, loaded.tokenizer, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, system=args.system,
                              chunk=args.chunk, source=loaded.folder)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if session.template_note:
        print(f"note: {session.template_note}")
    print("Type a message; /reset forgets the conversation, /exit quits.")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not sys.stdin.isatty():
            print(line)  # echo piped input so the transcript reads like a session
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: use /reset or /exit")
            continue
        print("bot> ", end="", flush=True)
        try:
            session.reply(line, on_text=lambda s: print(s, end="", flush=True))
        except SampleError as e:
            print(f"\nerror: {e}")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation so far is kept
            print("\n(interrupted)")
            continue
        print()


if __name__ == "__main__":
    sys.exit(main())
