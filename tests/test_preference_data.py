"""Preference pairs: TRL's three forms read alike, only the replies (and their <|im_end|>) scored,
bad records named by file:line or skipped and counted, the objective and the data must agree."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxgpt.config import DataConfig, DataError
from jaxgpt.data import build_preference_datasets
from jaxgpt.tokenizer import add_chat_template, load_tokenizer

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
FORMS = {
    "standard": {"prompt": "Who are you?", "chosen": "I am Pip.", "rejected": "A cat, meow meow."},
    "conversational": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "I am Pip."}],
                       "rejected": [{"role": "assistant", "content": "A cat, meow meow."}]},
    "implicit": {"chosen": PROMPT + [{"role": "assistant", "content": "I am Pip."}],
                 "rejected": PROMPT + [{"role": "assistant", "content": "A cat, meow meow."}]},
}


@pytest.fixture(scope="module")
def tok():
    return add_chat_template(load_tokenizer(), "chatml")


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _scored_text(tok, ids, mask):
    return tok.decode(ids[mask.astype(bool)].tolist())


@pytest.mark.parametrize("form", list(FORMS))
def test_forms_score_only_the_replies(tmp_path, tok, form):
    ds, _ = build_preference_datasets(DataConfig(sources=[_write(tmp_path / "p.jsonl", [FORMS[form]])], seq_len=128),
                                      tok)
    (c_ids, c_mask), (r_ids, r_mask) = ds.segment(0), ds.segment(1)
    assert _scored_text(tok, c_ids, c_mask) == "I am Pip.<|im_end|>"
    assert _scored_text(tok, r_ids, r_mask) == "A cat, meow meow.<|im_end|>"
    first = int(np.flatnonzero(c_mask)[0])
    assert c_ids[:first].tolist() == r_ids[:first].tolist()  # the same rendered prompt
    assert tok.decode(c_ids[:first].tolist()).endswith("<|im_start|>assistant\n")
    batch = ds.batch([0])
    assert set(np.unique(batch["segment_ids"][0])) == {0, 1, 2}  # chosen = segment 1, rejected = 2
    assert batch["loss_mask"][0][batch["segment_ids"][0] == 1].sum() == c_mask[1:].sum()


BAD = [
    ({"prompt": "Hi", "chosen": "Hello"}, "missing field 'rejected'"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "  "}, "rejected is empty"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, "chosen and rejected are identical"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}, "share no prompt"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_pairs_name_file_and_line(tmp_path, tok, record, message):
    path = _write(tmp_path / "p.jsonl", [FORMS["standard"], record])
    with pytest.raises(DataError, match=f"p.jsonl:2: .*{message}"):
        build_preference_datasets(DataConfig(sources=[path], seq_len=128), tok)


def test_skip_invalid_counts(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [FORMS["standard"]] + [r for r, _ in BAD] + [FORMS["implicit"]])
    ds, _ = build_preference_datasets(DataConfig(sources=[path], seq_len=128, skip_invalid=True), tok)
    assert ds.num_pairs == 2 and ds.stats.skipped == len(BAD)
    assert ds.stats.skip_reasons[0].startswith(f"{path}:2: ")


def test_packed_rows_keep_pairs_whole(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [FORMS[f] for f in FORMS] * 4)
    packed, _ = build_preference_datasets(DataConfig(sources=[path], seq_len=256), tok)
    padded, _ = build_preference_datasets(DataConfig(sources=[path], seq_len=256, pack=False), tok)
    assert padded.num_rows == 12 and packed.num_rows < 12
    for r in range(packed.num_rows):
        segs = packed.row_segment_ids(r)
        assert (segs[0::2] % 2 == 0).all() and (segs[1::2] == segs[0::2] + 1).all()


def _train(tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "jaxgpt.train", "model.n_layer=1", "model.n_embd=32",
                           "model.n_head=2", f"train.output_dir={tmp_path / 'run'}", *overrides],
                          capture_output=True, text=True, timeout=300)


def test_objective_and_data_must_agree(tmp_path):
    pairs = _write(tmp_path / "pairs.jsonl", [FORMS["standard"]])
    chats = _write(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]}])
    sft = _train(tmp_path, f"data.sources=[{pairs}]")
    assert sft.returncode == 1
    assert f"{pairs}:1: a preference pair (chosen / rejected): it trains with objective.name=dpo" in sft.stderr
    dpo = _train(tmp_path, f"data.sources=[{chats}]", "objective.name=dpo")
    assert dpo.returncode == 1
    assert f"{chats}:1: not a preference pair (missing field 'chosen'" in dpo.stderr
    smooth = _train(tmp_path, f"data.sources=[{pairs}]", "objective.name=dpo", "objective.label_smoothing=0.1")
    assert smooth.returncode == 1 and "only objective.loss=robust" in smooth.stderr


def test_inspect_marks_scored_tokens(tmp_path):
    path = _write(tmp_path / "p.jsonl", [FORMS["conversational"]])
    out = subprocess.run([sys.executable, "-m", "jaxgpt.data", "inspect", "--data", path, "--color", "never"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"── {path}:1  (pair 1 of 1)" in out.stdout
    assert "⟦I am Pip.<|im_end|>⟧" in out.stdout and "⟦A cat, meow meow.<|im_end|>⟧" in out.stdout
    assert "Be brief.<|im_end|>" in out.stdout and "⟦Be brief" not in out.stdout
