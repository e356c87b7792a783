"""Where a traced train step's device time goes: a summary of a `jax.profiler` perfetto trace.

    python tools/trace_summary.py TRACE_DIR_OR_FILE [--steps N] [--top 25]

Reads the ``*.trace.json.gz`` that ``jax.profiler.trace(dir, create_perfetto_trace=True)``
writes and keeps the device's kernel events (the GPU's or TPU's stream tracks). Per traced
step it prints the kernels' summed time by kind (matmul, attention, fusion, reduction, copy,
other), the device's busy time (the union of its kernel intervals) against the time from its
first kernel to its last, and the kernels that took longest. ``summarize`` returns the same
as a dict; ``tools/bench.py --gpu --profile`` stores it with the run's numbers.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

# Kernel name -> kind, first match wins. cuBLAS / cuBLASLt GEMMs on Hopper are "nvjet_*",
# "sm90_xmma_*" or CUTLASS kernels; XLA's own Triton GEMMs are fusions named "*gemm*".
KINDS = [
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|xmma|cutlass|cublas|matmul|dot|sm90_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("fusion", re.compile(r"fusion|triton|loop_|elementwise|convert|add|multiply", re.I)),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _trace_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("*.trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"{path}: no *.trace.json.gz under it (jax.profiler.trace(..., create_perfetto_trace=True))")
    return found[-1]


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(path, steps: int = 1, top: int = 25) -> dict:
    """Per-step device time by kind and the ``top`` kernels, from the trace at ``path``."""
    events = json.load(gzip.open(_trace_file(Path(path))))["traceEvents"]
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    # Device tracks: "/device:GPU:0" and its streams, less the rows that repeat the kernels as XLA ops.
    gpu = {pid for pid, name in processes.items() if re.search(r"/device:(GPU|TPU)", name)}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None and e["pid"] in gpu
               and not re.search(r"XLA Ops|XLA Modules|Steps|TraceMe", threads.get((e["pid"], e["tid"]), ""))]
    if not kernels:
        return {"error": f"no device kernel events in the trace (device tracks: {sorted(processes.values())})"}
    per_kind, per_name = collections.Counter(), collections.Counter()
    counts = collections.Counter()
    for e in kernels:
        per_kind[kind_of(e["name"])] += e["dur"]
        per_name[e["name"]] += e["dur"]
        counts[e["name"]] += 1
    t0 = min(e["ts"] for e in kernels)
    t1 = max(e["ts"] + e["dur"] for e in kernels)
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    ms = 1e-3 / steps  # trace times are microseconds; report milliseconds per step
    return {
        "steps": steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_sum_ms": sum(per_kind.values()) * ms,
        "device_busy_ms": busy * ms,
        "first_to_last_kernel_ms": (t1 - t0) * ms,
        "by_kind_ms": {k: v * ms for k, v in per_kind.most_common()},
        "top": [{"name": n[:160], "ms": v * ms, "calls": counts[n] / steps, "kind": kind_of(n)}
                for n, v in per_name.most_common(top)],
    }


def format_summary(s: dict) -> str:
    if "error" in s:
        return s["error"]
    lines = [f"device: {s['kernels_per_step']:.0f} kernels a step, {s['kernel_sum_ms']:.1f} ms summed, "
             f"{s['device_busy_ms']:.1f} ms busy of {s['first_to_last_kernel_ms']:.1f} ms first-to-last kernel"]
    lines += [f"  {k:10s} {v:8.2f} ms  {100 * v / s['kernel_sum_ms']:5.1f}%" for k, v in s["by_kind_ms"].items()]
    lines.append("  top kernels (ms a step, calls a step, kind, name):")
    lines += [f"  {t['ms']:8.2f} {t['calls']:6.0f}  {t['kind']:9s} {t['name']}" for t in s["top"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", type=Path, help="a jax.profiler trace folder, or its *.trace.json.gz")
    p.add_argument("--steps", type=int, default=1, help="train steps in the trace (times are per step)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    print(format_summary(summarize(args.trace, args.steps, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
