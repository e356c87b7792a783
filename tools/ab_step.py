"""Variants of jaxgpt's train step in one process, their steps taking turns: an A/B test of a
few percent on a host whose speed drifts.

On a shared VM a step's time drifts by more than that within minutes (docs/benchmarks.md), so two
runs one after the other cannot show a 3% change. Here every variant is built from the same weights
and batches in one process, each with its own state, and their steps take turns (the order reversed
every other round), so a slow stretch of the host falls on all of them. Prints each variant's
fastest and median step and its speed relative to the first variant.

    python tools/ab_step.py base remat=none "unrolled: scan_layers=false"
    python tools/ab_step.py --batch 8 --seq 128 --steps 12 base "chunks4: loss_chunks=4"
    python tools/ab_step.py --quick base remat=full      # tiny model: a check that it runs

A variant is ``NAME: key=value, ...``, or ``key=value, ...`` (named after itself), or a bare name
(jaxgpt's defaults). The keys are the ones tools/bench.py's train worker takes (``VARIANT_KEYS``).
Like ``python -m jaxgpt.train``, it restarts once with jaxgpt's malloc settings on a CPU host.
"""

from __future__ import annotations

if __name__ == "__main__":  # before jax loads, as jaxgpt's CLIs do (jaxgpt/host_memory.py)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jaxgpt.host_memory import reexec_with_cpu_malloc

    reexec_with_cpu_malloc()

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: the train worker's set-up, the init model)

VARIANT_KEYS = ("remat", "scan_layers", "attention", "loss_chunks", "vocab_multiple", "dtype", "segments")


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"unrolled: scan_layers=false"`` -> ("unrolled", {"scan_layers": False}); values are YAML."""
    name, sep, rest = spec.partition(":")
    if not sep:
        name, rest = (spec, spec) if "=" in spec else (spec, "")
    args = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in VARIANT_KEYS:
            raise SystemExit(f"variant {spec!r}: {item!r} is not key=value with a key of {', '.join(VARIANT_KEYS)}")
        args[key] = yaml.safe_load(value)
    if not name.strip():
        raise SystemExit(f"variant {spec!r}: empty name")
    return name.strip(), args


def run(variants: dict[str, dict], model: str, batch: int, seq: int, steps: int) -> dict[str, dict]:
    """Build every variant, run two untimed steps each, then ``steps`` timed steps each, taking
    turns. Returns, per variant, the losses of its two untimed steps and its timed step times."""
    import jax

    base = {"model": model, "batch": batch, "seq": seq, "warmup": 2, "steps": 2, "segments": False}
    runs = {}
    for name, args in variants.items():
        t0 = time.perf_counter()
        step, state, batches, rng, _ = bench.train_setup({**base, **args})
        losses = []
        for b in batches[:2]:  # compile, then one step more: the timed steps reuse the program
            state, m = step(state, b, rng)
            losses.append(float(m["loss"]))
        runs[name] = {"step": step, "state": state, "batches": batches, "rng": rng, "losses": losses, "times": []}
        print(f"{name}: {args or 'defaults'}; ready in {time.perf_counter() - t0:.1f} s, losses of steps 1-2 "
              f"{losses[0]:.5f} {losses[1]:.5f}", flush=True)
    for i in range(steps):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            r = runs[name]
            t0 = time.perf_counter()
            r["state"], _ = r["step"](r["state"], r["batches"][i % len(r["batches"])], r["rng"])
            jax.block_until_ready(r["state"])
            r["times"].append(time.perf_counter() - t0)
    return {name: {"losses": r["losses"], "times": r["times"]} for name, r in runs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="NAME[: key=value, ...]; the first is the reference")
    p.add_argument("--model", help="an HF GPT-2 folder (default: a random-init GPT-2 124M, written once)")
    p.add_argument("--quick", action="store_true", help="a tiny random model (2 layers, width 128)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant, after two untimed ones")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "jaxgpt-ab-step",
                   help="where the default model is written (and reused)")
    a = p.parse_args(argv)
    variants = dict(parse_variant(s) for s in a.variants)
    if len(variants) != len(a.variants):
        raise SystemExit("variant names must differ")
    import jax

    model = a.model or str(bench.write_init_model(a.work_dir / ("init-tiny" if a.quick else "init-124m"),
                                                  bench.TINY if a.quick else bench.GPT2_124M, chat=False))
    results = run(variants, model, a.batch, a.seq, a.steps)
    from jaxgpt import host_memory

    malloc = f", host malloc: {host_memory.describe()}" if jax.default_backend() == "cpu" else ""
    print(f"{jax.default_backend()}{malloc}; batch x seq {a.batch} x {a.seq}, {a.steps} timed steps each, taking turns:")
    ref = None
    for name, r in results.items():
        med = statistics.median(r["times"])
        ref = ref or med
        print(f"  {name:16s} fastest {min(r['times']):7.3f} s  median {med:7.3f} s  "
              f"{a.batch * a.seq / med:8.1f} tok/s  {ref / med:5.3f}x the first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
