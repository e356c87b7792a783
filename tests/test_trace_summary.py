"""tools/trace_summary.py on a small hand-made trace in the format jax.profiler writes
(process / thread name records, then complete events with microsecond times)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import trace_summary  # noqa: E402


def write_trace(path: Path, events: list[dict]) -> Path:
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 14, "args": {"name": "Stream #14(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 15, "args": {"name": "Stream #15(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 99, "args": {"name": "XLA Ops"}}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    return path


def kernel(name, ts, dur, tid=14, pid=1):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}


def test_device_time_by_kind_busy_union_and_per_step(tmp_path):
    write_trace(tmp_path / "host.trace.json.gz", [
        kernel("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT", 0, 400),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 300, 200, tid=15),  # overlaps the GEMM by 100
        kernel("loop_add_fusion_3", 600, 100),
        kernel("input_reduce_fusion_1", 800, 50),
        kernel("Memset 0", 900, 10),
        kernel("fusion.7", 0, 1000, tid=99),  # the XLA Ops row repeats kernels as ops: not counted
        kernel("python work", 0, 5000, pid=7),  # host events: not counted
    ])
    s = trace_summary.summarize(tmp_path, steps=2, top=3)  # the folder: the trace is found under it
    assert s["by_kind_ms"] == pytest.approx({"matmul": 0.2, "attention": 0.1, "fusion": 0.05,
                                             "reduction": 0.025, "copy": 0.005})
    assert s["kernel_sum_ms"] == pytest.approx(0.38)
    assert s["device_busy_ms"] == pytest.approx((500 + 100 + 50 + 10) / 2 / 1e3)  # the overlap counted once
    assert s["first_to_last_kernel_ms"] == pytest.approx(0.455)
    assert s["kernels_per_step"] == 2.5
    assert [t["kind"] for t in s["top"]] == ["matmul", "attention", "fusion"]
    assert "matmul" in trace_summary.format_summary(s)


def test_a_trace_without_device_kernels_says_so(tmp_path):
    trace = write_trace(tmp_path / "cpu.trace.json.gz", [kernel("python work", 0, 5, pid=7)])
    assert "no device kernel events" in trace_summary.summarize(trace)["error"]
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
        trace_summary.summarize(tmp_path / "empty")
