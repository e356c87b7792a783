"""The float32 matmuls of a GPT-2 train step, alone: XLA:CPU (jax.jit) against PyTorch, same process.

On a CPU both train steps spend most of their time in these products, so this separates the
GEMM libraries' speed (XLA:CPU's YNNPACK / oneDNN / Eigen against PyTorch's) from everything
else in the step. Each shape runs on both sides in turn, best of ``--repeats``; a square 4096^3
product first, for scale (the machine's float32 GEMM speed on an easy shape):

    python tools/bench_gemm.py                       # GPT-2 124M shapes at 8 x 512 and 4 x 256 tokens
    python tools/bench_gemm.py --tokens 4096 --repeats 7
    XLA_FLAGS=--xla_cpu_use_onednn=true python tools/bench_gemm.py   # another XLA:CPU GEMM path
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# (name, lhs shape, rhs shape, einsum) with M tokens, E embed, F = 4E (MLP), V vocab (50257: the CPU train step does not pad it).
SHAPES = [
    ("MLP up, forward        x @ W", ("M", "E"), ("E", "F"), "me,ef->mf"),
    ("MLP up, input grad    dY @ W^T", ("M", "F"), ("E", "F"), "mf,ef->me"),
    ("MLP up, weight grad  X^T @ dY", ("M", "E"), ("M", "F"), "me,mf->ef"),
    ("head, forward          x @ wte^T", ("M", "E"), ("V", "E"), "me,ve->mv"),
    ("head, input grad      dY @ wte", ("M", "V"), ("V", "E"), "mv,ve->me"),
    ("head, weight grad    dY^T @ X", ("M", "V"), ("M", "E"), "mv,me->ve"),
]


def best_of(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 1024], help="rows M (batch x seq)")
    p.add_argument("--embed", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary rows (default: the CPU train step's, unpadded)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(a.threads)
    print(f"jax {jax.__version__} ({jax.default_backend()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    rng = np.random.default_rng(0)

    def row(name, x, y, eq):
        lhs, rhs = eq.split("->")[0].split(",")
        flop = 2.0 * np.prod(list({**dict(zip(lhs, x.shape)), **dict(zip(rhs, y.shape))}.values()), dtype=np.float64)
        f = jax.jit(lambda u, v: jnp.einsum(eq, u, v))
        jx, jy = jnp.asarray(x), jnp.asarray(y)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        t_jax = best_of(lambda: f(jx, jy).block_until_ready(), a.repeats)
        t_torch = best_of(lambda: torch.einsum(eq, tx, ty), a.repeats)
        print(f"  {name:34s} {t_jax * 1e3:8.1f} {flop / t_jax / 1e9:6.1f} {t_torch * 1e3:10.1f} "
              f"{flop / t_torch / 1e9:6.1f}   {t_torch / t_jax:.2f}x", flush=True)

    print(f"\nfor scale{'':29s}   jax ms   GF/s   torch ms   GF/s   jax/torch speed")
    sq = rng.standard_normal((4096, 4096), dtype=np.float32)
    row("square, 4096 x 4096 x 4096", sq, sq, "mk,kn->mn")
    for m in a.tokens:
        dims = {"M": m, "E": a.embed, "F": 4 * a.embed, "V": a.vocab}
        print(f"\nM = {m} tokens{'':22s}   jax ms   GF/s   torch ms   GF/s   jax/torch speed")
        for name, ls, rs, eq in SHAPES:
            row(name, rng.standard_normal([dims[d] for d in ls], dtype=np.float32),
                rng.standard_normal([dims[d] for d in rs], dtype=np.float32), eq)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
