"""``make demo``: train a small chat model offline, watch it learn, export it to PyTorch.

    python -m jaxgpt.demo [--config demo] [--fresh] [section.key=value ...]

What it does, on a laptop CPU in a few minutes, with nothing downloaded:
  1. builds the model of ``jaxgpt/configs/demo.yaml`` and asks it held-out questions
     (``jaxgpt/assets/demo_chat_heldout.jsonl``: single questions and conversations
     of 2-4 questions, paraphrases that are not in the training set), each after
     its conversation so far with the reference replies; first and later
     questions are scored apart -- before training the replies are noise;
  2. trains it with ``jaxgpt.train.train`` on the bundled persona chats
     (``jaxgpt/assets/demo_chat.jsonl``, made by ``tools/make_demo_data.py``),
     saving orbax checkpoints, metrics, TensorBoard events and a loss plot;
  3. reloads the last checkpoint and asks the same questions again;
  4. exports it with ``jaxgpt.export`` to a Hugging Face PyTorch folder (the
     export checks its logits against transformers) and chats with that folder
     through transformers' ``pipeline("text-generation")`` (a second question
     of a conversation). Without torch (a plain ``pip install jaxgpt``) the export
     re-reads its own file instead and the pipeline is skipped.

Honest scope: no pretrained GPT-2 can be downloaded offline, so the demo model
is a small GPT-2-architecture network trained from scratch with GPT-2's real
tokenizer. It learns this dataset's answers, not English in general; the real
workflow (``--config gpt2-chat``) fine-tunes pretrained GPT-2 on a GPU/TPU.
Running the demo again resumes the finished run (nothing is retrained or lost);
``--fresh`` moves the old run aside and trains again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
HELDOUT = ASSETS / "demo_chat_heldout.jsonl"
MAX_NEW_TOKENS = 40


def read_heldout(path: Path = HELDOUT) -> list[dict]:
    """Every assistant turn of a messages-format JSONL as {"history", "question", "answer", "turn", "chat"}.

    ``history`` is the conversation before the question, with the reference replies (the true
    history), so each turn is scored on its own; ``turn`` counts the user turns from 1.
    """
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        msgs = json.loads(line)["messages"]
        turn = 0
        for i, m in enumerate(msgs):
            turn += m["role"] == "user"
            if m["role"] == "assistant":
                rows.append({"history": msgs[:i - 1], "question": msgs[i - 1]["content"], "answer": m["content"],
                             "turn": turn, "chat": n})
    return rows


def ask(model, tokenizer, turns: list[dict]) -> list[str]:
    """Greedy replies (jaxgpt.sample.generate, one batch) to each turn's question after its history."""
    from jaxgpt.sample import generate, stop_ids_for

    prompts = [tokenizer.apply_chat_template(t["history"] + [{"role": "user", "content": t["question"]}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for t in turns]
    outs = generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids_for(tokenizer, model))
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def score(replies: list[str], turns: list[dict]) -> dict[str, tuple[int, int]]:
    """{"first" | "later": (replies equal to their reference answer, turns)}: whole-reply equality,
    so a reply that repeats an earlier answer, or runs on past it, is wrong."""
    counts = {"first": [0, 0], "later": [0, 0]}
    for r, t in zip(replies, turns):
        c = counts["first" if t["turn"] == 1 else "later"]
        c[0] += r == t["answer"]
        c[1] += 1
    return {k: (right, n) for k, (right, n) in counts.items()}


def summary(replies: list[str], turns: list[dict]) -> str:
    s = score(replies, turns)
    return (f"first turns {s['first'][0]}/{s['first'][1]}, "
            f"later turns {s['later'][0]}/{s['later'][1]} (with the true history in context)")


def show(title: str, turns: list[dict], replies: list[str], shown: int) -> None:
    known = {t["answer"] for t in turns}
    print(f"\n{title}: held-out questions answered correctly: {summary(replies, turns)}; "
          f"{sum(r in known for r in replies)}/{len(replies)} replies are answers from the dataset")
    for i in pick(turns, shown):
        mark = "ok " if replies[i] == turns[i]["answer"] else "   "
        print(f"  {mark} Q: {turns[i]['question']}\n       A: {replies[i][:120]!r}")
    chat = next((t["chat"] for t in turns if t["turn"] == 3), None)
    if chat is not None:  # one whole conversation: the later questions answered in context
        print("  one held-out conversation:")
        for t, r in zip(turns, replies):
            if t["chat"] == chat:
                mark = "ok " if r == t["answer"] else "   "
                print(f"  {mark} Q{t['turn']}: {t['question']}\n        A: {r[:120]!r}")


def pick(turns: list[dict], n: int) -> list[int]:
    """Indices of up to n first questions, one per answer first (so the printout covers different facts)."""
    seen, first, rest = set(), [], []
    for i, t in enumerate(turns):
        if t["turn"] == 1:
            (rest if t["answer"] in seen else first).append(i)
            seen.add(t["answer"])
    return (first + rest)[:n]


def pipeline_reply(hf_dir: Path, messages: list[dict]) -> str:
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    pipe = pipeline("text-generation", model=str(hf_dir), device="cpu")
    out = pipe(messages, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0]["generated_text"][-1]["content"].strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.demo", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="demo", help="YAML file or shipped config name (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="move a previous run aside and train again")
    p.add_argument("--show", type=int, default=5, help="held-out first questions printed before/after")
    p.add_argument("--no-pipeline", action="store_true", help="skip the transformers pipeline reply")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:  # ConfigError / DataError / ExportError / CheckpointError: one line
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    t_start = time.time()
    import jax
    from flax import nnx

    from jaxgpt import compile_cache, sharding
    from jaxgpt.checkpoint import checkpoint_dir
    from jaxgpt.loader import load_for_inference
    from jaxgpt.config import load_config, validate
    from jaxgpt.export import export
    from jaxgpt.tokenizer import add_chat_template
    from jaxgpt.setup import build_model, load_tokenizer_for
    from jaxgpt.train import train

    compile_cache.enable()  # before the first compilation: a second `make demo` compiles nothing
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.train.output_dir)
    if args.fresh and out.exists():
        old = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(old)
        print(f"moved the previous run to {old}")
    m = cfg.model
    print("jaxgpt demo: train a chat model on this machine, offline, then export it to PyTorch.\n"
          f"Model: GPT-2 architecture, {m.n_layer} layers, width {m.n_embd}, {m.n_head} heads, trained FROM SCRATCH\n"
          "(no pretrained weights can be downloaded offline) with GPT-2's tokenizer + ChatML tokens, on\n"
          f"jaxgpt's bundled persona chats. {cfg.train.steps} steps of {cfg.train.batch_size} x {cfg.data.seq_len} tokens. "
          f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)).")

    heldout = read_heldout()

    # 1. Before: the exact initial weights training starts from (same config, same init seed).
    tok = load_tokenizer_for(cfg)
    if cfg.data.template != "tokenizer":  # as jaxgpt.data does before tokenizing the chats
        add_chat_template(tok, cfg.data.template)
    mesh = sharding.make_mesh(validate(cfg, jax.device_count(), jax.process_count()))
    graphdef, params, rest, _ = build_model(cfg, len(tok), mesh)
    before = ask(nnx.merge(graphdef, params, rest), tok, heldout)
    show("BEFORE training", heldout, before, args.show)
    del graphdef, params, rest

    # 2. Train (resumes if this output dir already holds checkpoints).
    print(f"\ntraining -> {out}")
    t0 = time.time()
    result = train(cfg)
    train_s = time.time() - t0
    losses = result.losses
    if losses:
        first, last = losses[min(losses)], losses[max(losses)]
        print(f"trained steps {min(losses)}-{max(losses)} in {train_s:.0f}s: loss {first:.3f} -> {last:.3f}")
    else:
        print(f"nothing to train: {out} already holds step {result.step} (use --fresh to train again)")

    # 3. After: reload from the checkpoint on disk, as a user would.
    model, tok = load_for_inference(str(out.resolve()))
    after = ask(model, tok, heldout)
    show("AFTER training (reloaded from the last checkpoint)", heldout, after, args.show)

    # 4. Export to PyTorch (verified against transformers) and chat through transformers.
    hf_dir = out / "hf"
    print()
    export(str(out), hf_dir, overwrite=True)
    pipe_text = None
    if not args.no_pipeline and importlib.util.find_spec("torch") is None:
        print("torch is not installed: skipped the transformers pipeline reply (pip install torch to see it)")
    elif not args.no_pipeline:
        t = next(t for t in heldout if t["turn"] == 2)  # a second question, after the first exchange
        pipe_text = pipeline_reply(hf_dir, t["history"] + [{"role": "user", "content": t["question"]}])
        print(f"transformers pipeline('text-generation', '{hf_dir}'), a second question in a conversation:")
        for m in t["history"]:
            print(f"  {m['role']}: {m['content']}")
        print(f"  user: {t['question']}\n  reply: {pipe_text!r}")

    print(f"\ndone in {time.time() - t_start:.0f}s (training {train_s:.0f}s); held-out questions answered "
          f"correctly after training: {summary(after, heldout)}.")
    print("Where everything is:\n"
          f"  checkpoints (orbax)   {checkpoint_dir(out)}\n"
          f"  metrics               {out}/metrics.jsonl, TensorBoard: tensorboard --logdir {out}\n"
          f"  loss plot             {out}/loss.png\n"
          f"  PyTorch / HF folder   {hf_dir}  (GPT2LMHeadModel.from_pretrained / pipeline)\n"
          "Next:\n"
          f"  python -m jaxgpt.chat --model {out}\n"
          f"  python -m jaxgpt.sample --model {hf_dir} --prompt 'Hello'\n"
          "  python -m jaxgpt.train --config gpt2-chat   # real fine-tuning of GPT-2 on a GPU/TPU")
    shutil.rmtree(out / "hf.partial", ignore_errors=True)
    return 0


if __name__ == "__main__":
    from jaxgpt.host_memory import reexec_with_cpu_malloc

    reexec_with_cpu_malloc()  # on a CPU host: restart once with malloc settings for XLA:CPU
    sys.exit(main())
