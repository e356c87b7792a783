"""`make demo` end to end on a shrunken model (a few steps): every stage runs and leaves its files.

Whether the full demo *learns* (replies after training answer the held-out
questions) is shown by running `make demo` itself (minutes, see README); here
the same code path runs with a 1-layer model so the suite stays fast.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from jaxgpt import demo  # noqa: E402
from jaxgpt.checkpoint import checkpoint_dir  # noqa: E402


def tiny_overrides(out) -> list[str]:
    return ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.steps=4", "train.batch_size=4",
            "train.eval_every=0", "checkpoint.save_every=2", "checkpoint.async_save=false",
            "logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_prompts=[]",
            f"train.output_dir={out}"]


def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--show", "2", *tiny_overrides(out)]) == 0
    text = capsys.readouterr().out
    for marker in ("trained FROM SCRATCH", "BEFORE training", "trained steps 1-4", "AFTER training",
                   "check vs transformers GPT2LMHeadModel", "transformers pipeline", "Where everything is"):
        assert marker in text, marker
    assert sorted(p.name for p in checkpoint_dir(out).iterdir() if p.name.isdigit()) == ["2", "4"]
    hf = out / "hf"
    assert (hf / "model.safetensors").is_file() and (hf / "tokenizer_config.json").is_file()
    assert json.loads((hf / "config.json").read_text())["n_layer"] == 1
    assert not (out / "hf.partial").exists()


def test_heldout_questions_are_not_training_questions():
    train_q = {m["content"].lower().strip("?!. :)")
               for line in (demo.ASSETS / "demo_chat.jsonl").read_text().splitlines()
               for m in json.loads(line)["messages"] if m["role"] == "user"}
    held = demo.read_heldout()
    assert len(held) >= 10
    assert not [h for h in held if h["question"].lower().strip("?!. :)") in train_q]
    answers = {json.loads(line)["messages"][-1]["content"]
               for line in (demo.ASSETS / "demo_chat.jsonl").read_text().splitlines()}
    assert all(h["answer"] in answers for h in held)  # every held-out answer is taught by the training set


def test_bad_override_is_one_line(capsys):
    assert demo.main(["train.nonsense=1"]) == 1
    err = capsys.readouterr().err
    assert "train.nonsense" in err and "Traceback" not in err
