"""What training minimises: an ``Objective`` gives the loss of a batch; the step, the loop and
the eval know nothing else of it.

An objective returns *sums* over its units (trained tokens for SFT, preference pairs for DPO) and
names the metric that counts them (``weight``): the step adds micro-batches' sums and divides once,
so gradient accumulation equals one large batch exactly, and eval weighs every batch by its units.
An objective is a pytree and an argument of the jitted steps: arrays it holds (say a frozen
reference model's parameters, for DPO) are inputs of the step, not constants compiled into it;
its other fields are static.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from jaxgpt import sharding
from jaxgpt.loss import chunked_cross_entropy


class Objective(Protocol):
    batch_keys: tuple[str, ...]  # the batch arrays ``loss`` reads ("segment_ids" is optional)
    metrics: tuple[str, ...]  # the float32 scalars ``loss`` sums, logged as means over ``weight``
    weight: str  # the one of ``metrics`` counting the units the sums are over (logged as the count)

    def loss(self, model, batch: dict[str, jax.Array], rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(float32 loss summed over the batch's units, metrics summed likewise, incl. ``weight``)."""

    def eval_summary(self, loss_sum: float, sums: dict[str, float]) -> dict[str, float]:
        """The held-out set's numbers to log, from its summed loss and metrics."""


def constrainer(mesh):
    """The model's ``constrain`` for a mesh (None: activations are laid out by XLA alone)."""
    return None if mesh is None else (lambda x, *axes: sharding.constrain(x, mesh, *axes))


@dataclasses.dataclass(frozen=True)
class SFT:
    """Next-token cross-entropy over the trained tokens (``loss_mask``), in float32; with
    ``model.loss_chunks`` > 1 the head runs one sequence chunk at a time (jaxgpt.loss)."""

    mesh: Any = None
    batch_keys: tuple[str, ...] = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
    metrics: tuple[str, ...] = ("trained_tokens",)
    weight: str = "trained_tokens"

    def loss(self, model, batch, rng=None):
        del rng  # dropout draws from the model's own streams, reseeded by the step
        # segment_ids (packing) are optional: without them attention is causal only.
        inputs = dict(positions=batch["positions"], segment_ids=batch.get("segment_ids"),
                      constrain=constrainer(self.mesh))
        mask = batch["loss_mask"].astype(jnp.float32)
        chunks = model.policy.loss_chunks_for(batch["input_ids"].shape[1])
        if chunks > 1:  # config.validate: seq_len divides by the chunks
            h = model.hidden(batch["input_ids"], **inputs)
            ce_sum = chunked_cross_entropy(h, model.wte[...].astype(h.dtype), batch["targets"], mask,
                                           model.config.vocab_size, chunks, model.policy.logsumexp)
            return ce_sum, {self.weight: jnp.sum(mask)}
        logits = model(batch["input_ids"], **inputs)
        if self.mesh is not None:  # the largest activation: keep it split on batch and vocab
            logits = sharding.constrain(logits, self.mesh, "batch", "seq", "vocab")
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
        return jnp.sum(ce * mask), {self.weight: jnp.sum(mask)}

    def eval_summary(self, loss_sum, sums):
        count = sums[self.weight]
        loss = loss_sum / count if count else float("nan")  # no trained token held out: no number to report
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


jax.tree_util.register_dataclass(SFT, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(SFT)])
