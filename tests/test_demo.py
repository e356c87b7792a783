"""`make demo` end to end on a shrunken model (a few steps): every stage runs and leaves its files.

Whether the full demo *learns* (replies after training answer the held-out
questions, later questions of a conversation included) is the slow test here
(`make test-slow`, minutes); in `make test` the same code path runs with a
1-layer model so the suite stays fast.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

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


def read_chats(name: str) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in (demo.ASSETS / name).read_text().splitlines() if line.strip()]


def user_turns(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def test_heldout_questions_are_not_training_questions():
    def norm(q):
        return q.lower().strip("?!. :)")

    train, held = read_chats("demo_chat.jsonl"), read_chats("demo_chat_heldout.jsonl")
    train_q = {norm(q) for msgs in train for q in user_turns(msgs)}
    assert not [q for msgs in held for q in user_turns(msgs) if norm(q) in train_q]
    answers = {m["content"] for msgs in train for m in msgs if m["role"] == "assistant"}
    assert all(m["content"] in answers for msgs in held for m in msgs if m["role"] == "assistant")
    for chats in (train, held):  # single questions and conversations of 2-4, some with a system message
        assert {len(user_turns(msgs)) for msgs in chats} == {1, 2, 3, 4}
        assert any(msgs[0]["role"] == "system" for msgs in chats)
        for msgs in chats:  # each question of a conversation asks another fact
            replies = [m["content"] for m in msgs if m["role"] == "assistant"]
            assert len(set(replies)) == len(replies), msgs


def test_heldout_turns_are_scored_with_the_true_history():
    turns = demo.read_heldout()
    later = [t for t in turns if t["turn"] > 1]
    assert len([t for t in turns if t["turn"] == 1]) >= 40 and len(later) >= 40
    for t in later:  # the history holds the reference replies, ending with the previous one
        assert t["history"][-1]["role"] == "assistant" and len(user_turns(t["history"])) == t["turn"] - 1
    answers = [t["answer"] for t in turns]
    assert demo.score(answers, turns) == {"first": (len(turns) - len(later), len(turns) - len(later)),
                                          "later": (len(later), len(later))}
    # The failure users met: every reply of a conversation repeats its first answer.
    first_answer = {t["chat"]: t["answer"] for t in turns if t["turn"] == 1}
    assert demo.score([first_answer[t["chat"]] for t in turns], turns)["later"][0] == 0
    # A reply that runs on past its answer, or holds it among others, is not right.
    assert demo.score([a + " " + a for a in answers], turns) == {"first": (0, len(turns) - len(later)),
                                                                   "later": (0, len(later))}


@pytest.mark.slow
def test_trained_demo_answers_each_question_of_a_conversation(tmp_path, capsys):
    """The shipped demo (full config): its report's two scores, and a two-question chat ("Who made you?" then "What can you do?") through
    `python -m jaxgpt.chat` as a user types it (default sampling, no /reset)."""
    out = tmp_path / "demo"
    assert demo.main(["--no-pipeline", "logging.progress_bar=false", f"train.output_dir={out}"]) == 0
    done = capsys.readouterr().out.split("\ndone in ")[-1]
    m = re.search(r"first turns (\d+)/(\d+), later turns (\d+)/(\d+)", done)
    first, n_first, later, n_later = map(int, m.groups())
    assert first >= 0.95 * n_first and later >= 0.90 * n_later, done
    chat = subprocess.run([sys.executable, "-m", "jaxgpt.chat", "--model", str(out)], input="Who made you?\n"
                          "What can you do?\n", capture_output=True, text=True, timeout=600, check=True)
    bots = [line.removeprefix("bot> ") for line in chat.stdout.splitlines() if line.startswith("bot> ")]
    answers = {rec["fact"]: rec["messages"][-1]["content"]
               for rec in map(json.loads, (demo.ASSETS / "demo_chat.jsonl").read_text().splitlines())}
    assert bots == [answers["creator"], answers["skills"]], chat.stdout


def test_bad_override_is_one_line(capsys):
    assert demo.main(["train.nonsense=1"]) == 1
    err = capsys.readouterr().err
    assert "train.nonsense" in err and "Traceback" not in err
