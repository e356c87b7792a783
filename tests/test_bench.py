"""tools/bench.py's PyTorch peers: the torch.compile side records a compiler setting that fails
and runs the next one, and trains the same steps as PyTorch eager (same weights, batches, AdamW)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402


def test_compiled_side_falls_back_and_trains_as_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the worker points it at its own folder; undone after
    model = str(bench.write_init_model(tmp_path / "tiny", bench.TINY, chat=False))
    a = {"model": model, "batch": 2, "seq": 32, "steps": 2, "warmup": 1, "t_spawn": time.time()}
    eager = bench.worker_train_torch(a)
    # dynamo's "eager" backend: the worker's compile path without inductor's minutes of code generation
    compiled = bench.worker_train_torch({**a, "compile": True,
                                         "compile_tries": [{"backend": "no-such-backend"}, {"backend": "eager"}]})
    assert compiled["compile"]["settings"] == {"backend": "eager"}
    [failed] = compiled["compile"]["failed"]
    assert failed["settings"] == {"backend": "no-such-backend"} and "no-such-backend" in failed["error"]
    assert compiled["fused_adamw"] and not eager["fused_adamw"]
    assert compiled["attention"] == eager["attention"] == "sdpa"
    # Three steps each (fused and foreach AdamW round differently, so not bitwise)
    assert len(compiled["losses"]) == 3
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
