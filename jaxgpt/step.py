"""The train and eval steps over an ``Objective`` (jaxgpt.objectives), and the optimizer they apply.

The hot path is one ``jax.jit``-compiled function over plain pytrees (``nnx.split`` state, not
``nnx.jit``) with the train state donated. Gradient accumulation adds the objective's sums over
micro-batches and divides once, so it equals one large batch exactly. A step whose loss, gradient
or new parameters are not finite changes nothing; the loop counts it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import kernels, sharding
from jaxgpt.config import Config
from jaxgpt.objectives import SFT, Objective

# ----------------------------------------------------------------------------- optimizer


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay to ``min_lr_ratio * lr``, or constant."""
    s, lr = cfg.schedule, cfg.optimizer.lr
    total = s.decay_steps or cfg.train.steps
    # A warmup longer than the run keeps its slope (lr * step / warmup_steps) and the run ends
    # before the peak, as in transformers; it is not squeezed into the run.
    warmup = s.warmup_steps
    end = lr * s.min_lr_ratio
    if s.name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), end_value=end)
    decay = max(total - warmup, 1)
    after = (optax.linear_schedule(lr, end, decay) if s.name == "linear" else optax.constant_schedule(lr))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg: Config, params: nnx.State) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optimizer
    schedule = make_schedule(cfg)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
    decays = nnx.from_flat_state([(path, var.replace(_decays(path, var, o.decay_embeddings)))
                                  for path, var in nnx.to_flat_state(params)])
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decays))
    return optax.chain(*parts), schedule


def _decays(path, var, decay_embeddings: bool) -> bool:
    name = str(path[0]) if str(path[0]) in ("wte", "wpe") else str(path[-1])  # a LoRA run's added rows: wte.added
    if name in ("wte", "wpe"):
        return decay_embeddings
    return len(var.shape) >= 2 and not name.endswith("bias")


def applied_steps(opt_state) -> jax.Array:
    """The schedule's step counter (optimizer updates actually applied)."""
    for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)):
        if isinstance(leaf, optax.ScaleByScheduleState):
            return leaf.count
    raise ValueError("optimizer state has no schedule counter")


# ----------------------------------------------------------------------------- the steps

def loss_terms(graphdef, params, rest, batch, *, objective: Objective | None = None, mesh=None,
               train: bool = True, rng=None):
    """The objective's (loss sum, metric sums) for one [B, T] batch; default: SFT."""
    objective = objective or SFT(mesh)
    with kernels.on_mesh(mesh):  # model.kernels' Pallas kernels run on each device's shard
        # Fresh non-parameter Variables in this trace (nnx.remat / Dropout update them in place).
        model = nnx.merge(graphdef, params, reseeded(rest, rng))
        if not train:
            model.eval()
        return objective.loss(model, batch, rng)


def reseeded(rest: nnx.State, key=None) -> nnx.State:
    """A copy of the non-parameter state as fresh Variables of the current trace (not
    ``.replace``, which keeps the old trace), so Dropout / nnx.remat may update them.

    With ``key``, the dropout RNG streams restart from it: one stream per module path, so
    each layer draws its own masks and a step's masks depend only on (seed, step, micro-batch).
    """
    flat = []
    for path, var in nnx.to_flat_state(rest):
        if key is None:
            value = var.get_value()
        elif isinstance(var, nnx.RngKey):
            value = jax.random.fold_in(key, sharding.path_seed(path))
        elif isinstance(var, nnx.RngCount):
            value = jnp.zeros(var.shape, var.dtype)
        else:
            value = var.get_value()
        flat.append((path, type(var)(value, **var.get_metadata())))
    return nnx.from_flat_state(flat)


def make_train_step(graphdef, rest, tx, *, objective: Objective | None = None, mesh=None, dropout: bool = False,
                    state_shardings=None) -> Callable:
    """``step(state, batch, rng) -> (state, metrics)``, jitted, ``state`` donated.

    state = {"params", "opt_state"}; batch arrays are [grad_accum, micro_batch, T].
    """
    objective = objective or SFT(mesh)

    def step(state, batch, rng, objective, rest):
        params, opt_state = state["params"], state["opt_state"]
        grad_fn = jax.value_and_grad(
            lambda p, mb, k: loss_terms(graphdef, p, rest, mb, objective=objective, mesh=mesh, rng=k), has_aux=True)

        def micro(carry, xs):
            g_sum, l_sum, m_sum = carry
            mb, i = xs
            k = jax.random.fold_in(jax.random.wrap_key_data(rng), i) if dropout else None
            (l, m), g = grad_fn(params, mb, k)
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, jax.tree.map(jnp.add, m_sum, m)), None

        first = jax.tree.map(lambda a: a[0], batch)
        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.float32(0),
                 {k: jnp.float32(0) for k in objective.metrics})
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        if n_micro == 1:  # no accumulation loop for one micro-batch (XLA folds the zero accumulator away)
            (g_sum, l_sum, m_sum), _ = micro(zeros, (first, 0))
        else:
            (g_sum, l_sum, m_sum), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(n_micro)))
        denom = jnp.maximum(m_sum[objective.weight], 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
        loss = l_sum / denom
        grad_norm = optax.tree.norm(grads)
        grads_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        lr_step = applied_steps(opt_state)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # Finite gradients can still give non-finite parameters (an infinite or huge learning rate):
        # the new parameters are checked too, a reduction XLA fuses with the update (on a mesh, each
        # shard's, then one all-reduce of a flag), read back with the other metrics.
        params_ok = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]))
        ok = grads_ok & params_ok
        # A non-finite step changes nothing (not even the optimizer's counters).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, opt_state)}
        means = {k: v if k == objective.weight else v / denom for k, v in m_sum.items()}
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok, "params_ok": params_ok, **means,
                   "lr_step": lr_step}
        return new_state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)
    # rest is an argument, not a constant compiled in: a LoRA run's frozen base weights live there
    return lambda state, batch, rng: jitted(state, batch, rng, objective, rest)


def make_eval_step(graphdef, rest, *, objective: Objective | None = None, mesh=None) -> Callable:
    """``eval_step(params, batch) -> (loss sum, metric sums)`` for one [B, T] batch, dropout off."""

    def eval_step(params, batch, objective, rest):
        return loss_terms(graphdef, params, rest, batch, objective=objective, mesh=mesh, train=False)

    jitted = jax.jit(eval_step)
    return lambda params, batch: jitted(params, batch, objective or SFT(mesh), rest)


FLOAT_INPUTS = ("ref_logps",)  # batch arrays that are not integers (DPO's precomputed reference log-probs)


def place_batch(local: list[dict[str, np.ndarray]], mesh, micro: int) -> dict[str, jax.Array]:
    """grad_accum process-local micro-batches -> global [grad_accum, micro, T] arrays on (data, fsdp)."""
    stacked = {k: np.stack([b[k] for b in local]).astype(np.float32 if k in FLOAT_INPUTS else np.int32)
               for k in local[0]}
    return sharding.global_batch(stacked, mesh, micro, rows_axis=1)
