"""OpenAssistant message trees -> conversational preference pairs for ``objective.name: dpo``.

    python tools/oasst_pairs.py 2023-04-12_oasst_ready.trees.jsonl.gz pairs.jsonl [--lang en]

Input: the OASST ``*.trees.jsonl[.gz]`` export (one tree a line: ``prompt`` with nested ``replies``;
assistant replies to one message carry ``rank``, 0 = best). Every user message with at least two
ranked assistant replies gives one pair: the conversation up to it as ``prompt``, the best-ranked
reply as ``chosen``, the worst-ranked as ``rejected`` (TRL's conversational form). Deleted messages,
and replies without a rank, are left out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROLES = {"prompter": "user", "assistant": "assistant"}


def pairs_of(tree: dict, lang: str | None = None) -> list[dict]:
    """The pairs of one message tree, in depth-first order."""
    out = []

    def walk(message: dict, history: list[dict]) -> None:
        if message.get("deleted") or (lang and message.get("lang") != lang):
            return
        history = history + [{"role": ROLES[message["role"]], "content": message["text"]}]
        replies = [r for r in message.get("replies", []) if not r.get("deleted")]
        if message["role"] == "prompter":
            ranked = sorted((r for r in replies if r.get("rank") is not None and r["role"] == "assistant"
                             and (not lang or r.get("lang") == lang)), key=lambda r: r["rank"])
            if len(ranked) >= 2 and ranked[0]["text"].strip() != ranked[-1]["text"].strip():
                out.append({"prompt": history,
                            "chosen": [{"role": "assistant", "content": ranked[0]["text"]}],
                            "rejected": [{"role": "assistant", "content": ranked[-1]["text"]}]})
        for r in replies:
            walk(r, history)

    walk(tree["prompt"], [])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", help="OASST *.trees.jsonl or .jsonl.gz")
    p.add_argument("out", help="pairs .jsonl to write")
    p.add_argument("--lang", default=None, help="keep only messages in this language (e.g. en)")
    p.add_argument("--max-pairs", type=int, default=None)
    args = p.parse_args(argv)
    path = Path(args.trees)
    opener = gzip.open if path.suffix == ".gz" else open
    pairs, trees = [], 0
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tree = json.loads(line)
                pairs += pairs_of(tree, args.lang)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                print(f"error: {path}:{lineno}: not an OASST message tree ({type(e).__name__}: {e})", file=sys.stderr)
                return 1
            trees += 1
    pairs = pairs[: args.max_pairs]
    Path(args.out).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs), encoding="utf-8")
    print(f"{trees} trees -> {len(pairs)} pairs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
