"""The decoding layouts (bfloat16, int8, w8a8) against float32, on a trained model and real conversations.

    make demo && python tools/decode_quality.py     # the demo's model, its held-out chats
    python tools/decode_quality.py --model HF_DIR_OR_RUN --data chats.jsonl --limit 100

Loads the model in float32, and with each ``--param-dtypes`` (default bfloat16, int8
and w8a8: the decoding layouts of ``jaxgpt.decoding.for_decoding``, what ``--param-dtype``
gives ``jaxgpt.sample`` and ``jaxgpt.chat``). For every conversation of ``--data``
(any format jaxgpt trains on, rendered with the model's chat template), each
against float32:
- teacher-forced, at every assistant token: top-1 agreement of the two, KL(f32 ||
  other) of their next-token distributions, the largest log-prob difference, and the
  loss of each;
- free-running: the greedy reply of each to the conversation's first user turn
  (identical replies, and agreeing tokens up to where they part).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxgpt.data import DataSource, detect_format, read_records, to_example, tokenize_chats  # noqa: E402
from jaxgpt.sample import generate, load_model, stop_ids_for  # noqa: E402


def conversations(path: str, limit: int):
    out = []
    for where, rec in read_records(DataSource(path)):
        ex = to_example(rec, detect_format(rec), where)
        if ex.messages:
            out.append(ex)
        if len(out) == limit:
            break
    if not out:
        raise SystemExit(f"{path}: no conversations found")
    return out


@nnx.jit
def forward(model, x):
    return model(x)


def teacher_forced(f32, low, ids: np.ndarray, mask: np.ndarray) -> dict:
    """Per-token comparisons at the positions whose next token is a trained (assistant) token."""
    n = f32.config.n_positions  # one padded shape: one compilation (causal: padding changes nothing before it)
    x = jnp.asarray(np.pad(ids[:-1], (0, n - len(ids) + 1))[None])
    at = np.flatnonzero(mask[1:])  # predicting token j+1 from position j
    a = jax.nn.log_softmax(forward(f32, x)[0])[at]
    b = jax.nn.log_softmax(forward(low, x)[0])[at]
    target = jnp.asarray(ids[1:][at])
    return {"top1": np.asarray(a.argmax(-1) == b.argmax(-1)),
            "kl": np.asarray((jnp.exp(a) * (a - b)).sum(-1)),
            "max_logit_diff": float(jnp.abs(a - b).max()),
            "loss_f32": np.asarray(-jnp.take_along_axis(a, target[:, None], -1)[:, 0]),
            "loss_other": np.asarray(-jnp.take_along_axis(b, target[:, None], -1)[:, 0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs/demo/hf"), help="HF folder or jaxgpt run (default: make demo's)")
    ap.add_argument("--data", default=str(ROOT / "jaxgpt/assets/demo_chat_heldout.jsonl"))
    ap.add_argument("--limit", type=int, default=200, help="at most this many conversations")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--param-dtypes", default="bfloat16,int8,w8a8", help="decoding layouts to compare with float32")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    if not Path(args.model).exists():
        raise SystemExit(f"{args.model}: not found (run `make demo` first, or pass --model)")
    f32, tok = load_model(args.model)
    n_pos = f32.config.n_positions
    exs = conversations(args.data, args.limit)
    chats = [(ids[:n_pos], mask[:n_pos]) for ids, mask in tokenize_chats(exs, tok, "assistant") if mask[1:n_pos].any()]
    prompts = []
    for ex in exs:
        first_user = next((i for i, m in enumerate(ex.messages) if m["role"] == "user"), None)
        if first_user is None:  # nothing to answer
            continue
        text = tok.apply_chat_template(ex.messages[: first_user + 1], add_generation_prompt=True, tokenize=False)
        prompts.append(tok.encode(text, add_special_tokens=False)[-(n_pos - args.max_new_tokens):])
    stops = stop_ids_for(tok, f32)

    def generate_all(model):  # 16 prompts at a time: the KV cache of 200 long prompts at once would not fit
        return [row for i in range(0, len(prompts), 16)
                for row in generate(model, prompts[i: i + 16], max_new_tokens=args.max_new_tokens, stop_ids=stops)]

    ref = generate_all(f32)
    print(f"{len(chats)} conversations with assistant tokens in the first {n_pos} positions, model {args.model}")

    res = {"model": args.model, "data": args.data, "conversations": len(chats)}
    for dt in args.param_dtypes.split(","):
        low, _ = load_model(args.model, param_dtype=dt)
        rows = [teacher_forced(f32, low, ids, mask) for ids, mask in chats]
        cat = {k: np.concatenate([row[k] for row in rows]) for k in ("top1", "kl", "loss_f32", "loss_other")}
        got = generate_all(low)
        same = [r == g for r, g in zip(ref, got)]
        prefix = [next((i for i, (x, y) in enumerate(zip(r, g)) if x != y), min(len(r), len(g))) for r, g in zip(ref, got)]
        r = res[dt] = {
            "assistant_tokens": int(cat["top1"].size), "teacher_forced_top1_agreement": float(cat["top1"].mean()),
            "mean_kl": float(cat["kl"].mean()), "max_kl": float(cat["kl"].max()),
            "max_logprob_diff": max(row["max_logit_diff"] for row in rows),
            "loss_f32": float(cat["loss_f32"].mean()), "loss": float(cat["loss_other"].mean()),
            "identical_greedy_replies": float(np.mean(same)),
            "greedy_tokens_before_first_difference": float(np.sum(prefix) / max(1, sum(map(len, ref))))}
        print(f"{dt} against float32, {r['assistant_tokens']} assistant tokens:")
        print(f"  teacher-forced top-1 agreement {r['teacher_forced_top1_agreement']:.2%}, "
              f"KL(f32||{dt}) mean {r['mean_kl']:.2e} max {r['max_kl']:.2e}, "
              f"largest log-prob difference {r['max_logprob_diff']:.3f}")
        print(f"  loss on assistant tokens: float32 {r['loss_f32']:.4f}, {dt} {r['loss']:.4f}")
        print(f"  greedy replies identical: {r['identical_greedy_replies']:.1%} "
              f"({r['greedy_tokens_before_first_difference']:.1%} of float32's tokens before the first difference)")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
