"""tools/ab_step.py: its variant syntax, and a run of two variants of a tiny model's train step
in one process (remat changes what the backward pass recomputes, never the loss)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import ab_step  # noqa: E402
import bench  # noqa: E402


def test_parse_variant():
    assert ab_step.parse_variant("base") == ("base", {})
    assert ab_step.parse_variant("remat=none") == ("remat=none", {"remat": "none"})
    assert ab_step.parse_variant("unrolled: scan_layers=false, loss_chunks=2") == (
        "unrolled", {"scan_layers": False, "loss_chunks": 2})
    with pytest.raises(SystemExit, match="'lr=3' is not key=value with a key of remat"):
        ab_step.parse_variant("fast: lr=3")
    with pytest.raises(SystemExit, match="empty name"):
        ab_step.parse_variant(": remat=none")


def test_variants_take_turns_from_the_same_weights(tmp_path):
    model = str(bench.write_init_model(tmp_path / "tiny", bench.TINY, chat=False))
    out = ab_step.run({"base": {}, "full": {"remat": "full"}}, model, batch=2, seq=32, steps=3)
    assert list(out) == ["base", "full"]
    for r in out.values():
        assert len(r["times"]) == 3 and all(t > 0 for t in r["times"])
    # Same weights and batches, each variant its own state: both steps' losses agree (the second
    # after each variant's own update; float32 recomputation, so not bitwise).
    assert out["full"]["losses"] == pytest.approx(out["base"]["losses"], rel=1e-5)
