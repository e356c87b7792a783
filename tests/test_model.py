"""The model's two ways of running its blocks compute the same thing.

``scan_layers=True`` (the default) runs the blocks as one ``lax.scan`` over their
stacked states; ``False`` unrolls them (the KV-cache path always does). Both must give
the same loss, the same gradients and the same dropout masks, and leave the dropout
RNG streams in the same state. The reference for the unrolled model itself is
transformers' PyTorch GPT-2 (tests/test_weights.py, tests/test_train.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.model import GPT2, GPT2Config


def _loss_grads_twice(cfg: GPT2Config):
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    ids = (jnp.arange(2 * 16).reshape(2, 16) * 7) % cfg.vocab_size
    seg = jnp.array([[1] * 10 + [2] * 6, [1] * 16])  # two packed segments in row 0

    def loss(m):
        return jnp.mean(m(ids, segment_ids=seg) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    again = nnx.jit(loss)(model)  # the dropout streams moved on: with dropout, a different number
    return float(value), float(again), nnx.state(grads, nnx.Param)


@pytest.mark.parametrize("dropout,remat", [(0.0, False), (0.1, True)])
def test_scanned_blocks_match_unrolled(dropout, remat):
    """Loss equal to 1e-6 relative, gradients within 1e-5 of the largest gradient (float32 reassociation only)."""
    base = dict(vocab_size=300, n_positions=64, n_embd=64, n_layer=3, n_head=4, dropout=dropout, remat=remat)
    s_val, s_again, s_grads = _loss_grads_twice(GPT2Config(**base, scan_layers=True))
    u_val, u_again, u_grads = _loss_grads_twice(GPT2Config(**base, scan_layers=False))
    assert s_val == pytest.approx(u_val, rel=1e-6)
    assert s_again == pytest.approx(u_again, rel=1e-6)  # same RNG state after the scanned call
    if dropout:
        assert s_again != pytest.approx(s_val, rel=1e-6)  # dropout really drew new masks
    flat_s, flat_u = jax.tree.leaves(s_grads), jax.tree.leaves(u_grads)
    assert len(flat_s) == len(flat_u) == 4 + 12 * 3
    scale = max(float(jnp.max(jnp.abs(g))) for g in flat_u)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat_s, flat_u))
    assert worst <= 1e-5 * scale, f"max gradient difference {worst:.2e} (largest gradient {scale:.2e})"
    assert np.isfinite(scale) and scale > 0
