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
from flax import nnx

from jaxgpt import sharding
from jaxgpt.loss import chunked_cross_entropy, token_logprobs


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


# ----------------------------------------------------------------------------- DPO

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def segment_sums(x: jax.Array, segment_ids: jax.Array, n: int) -> jax.Array:
    """[B, T] values summed per (row, segment id in [0, n)) -> [B, n]."""
    b = x.shape[0]
    ids = segment_ids + jnp.arange(b, dtype=segment_ids.dtype)[:, None] * n
    return jax.ops.segment_sum(x.reshape(-1), ids.reshape(-1), num_segments=b * n).reshape(b, n)


def sequence_logps(model, batch, mesh=None) -> tuple[jax.Array, jax.Array]:
    """(summed scored-token log-probs, scored-token counts), each [B, n] by segment id: a row's
    segments 1, 3, 5, ... are chosen replies and 2, 4, 6, ... the rejected ones of the same pairs
    (jaxgpt.data.preference); segment 0 is padding."""
    x = batch["input_ids"]
    h = model.hidden(x, positions=batch["positions"], segment_ids=batch["segment_ids"], constrain=constrainer(mesh))
    chunks = model.policy.loss_chunks_for(x.shape[1])
    lp = token_logprobs(h, model.wte[...].astype(h.dtype), batch["targets"], model.config.vocab_size, chunks,
                        model.policy.logsumexp)
    mask = batch["loss_mask"].astype(jnp.float32)
    n = 2 * (x.shape[1] // 2) + 1  # a reply takes at least one slot: at most T / 2 pairs a row
    return segment_sums(lp * mask, batch["segment_ids"], n), segment_sums(mask, batch["segment_ids"], n)


@dataclasses.dataclass(frozen=True)
class DPO:
    """Direct preference optimisation over summed reply log-probs, as TRL's ``DPOTrainer`` computes
    it (``loss_type`` sigmoid, ipo, hinge, robust; its metric names). Each pair's chosen and rejected
    replies are segments of one row, so both go through the model in one batch.

    ``reference``: the frozen reference parameters (a data field: an input of the step), or None
    when the batch carries precomputed ones (``ref_logps``: a segment's sum at its first slot)."""

    mesh: Any = None
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: Any = None
    batch_keys: tuple[str, ...] = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
    metrics: tuple[str, ...] = ("pairs", *DPO_METRICS)
    weight: str = "pairs"
    progress: tuple[str, ...] = ("rewards/accuracies", "rewards/margins")  # beside the loss on the progress bar

    def reference_logps(self, model, batch) -> jax.Array:
        if self.reference is None:
            return segment_sums(batch["ref_logps"], batch["segment_ids"], 2 * (batch["input_ids"].shape[1] // 2) + 1)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        ref = nnx.merge(graphdef, self.reference, rest)
        ref.eval()  # the reference scores without dropout, as TRL's reference model
        return jax.lax.stop_gradient(sequence_logps(ref, batch, self.mesh)[0])

    def loss(self, model, batch, rng=None):
        del rng  # dropout draws from the model's own streams, reseeded by the step
        logps, counts = sequence_logps(model, batch, self.mesh)
        ref = self.reference_logps(model, batch)
        pi_c, pi_r, n_c, n_r = logps[:, 1::2], logps[:, 2::2], counts[:, 1::2], counts[:, 2::2]
        valid = ((n_c > 0) & (n_r > 0)).astype(jnp.float32)
        per_pair, rewards_c, rewards_r = dpo_loss(pi_c, pi_r, ref[:, 1::2], ref[:, 2::2], n_c, n_r, self.beta,
                                                  self.loss_type, self.label_smoothing)
        total = lambda v: jnp.sum(v * valid)
        metrics = {"pairs": jnp.sum(valid), "rewards/chosen": total(rewards_c), "rewards/rejected": total(rewards_r),
                   "rewards/accuracies": total((rewards_c > rewards_r).astype(jnp.float32)),
                   "rewards/margins": total(rewards_c - rewards_r), "logps/chosen": total(pi_c),
                   "logps/rejected": total(pi_r)}
        return total(per_pair), jax.tree.map(jax.lax.stop_gradient, metrics)

    def eval_summary(self, loss_sum, sums):
        count = sums[self.weight]
        mean = lambda v: v / count if count else float("nan")  # no pair held out: no number to report
        return {"eval_loss": mean(loss_sum), **{f"eval_{k}": mean(sums[k]) for k in DPO_METRICS}}


def dpo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float, loss_type: str, label_smoothing: float = 0.0):
    """(per-pair loss, chosen rewards, rejected rewards): TRL 1.16's ``DPOTrainer._compute_loss``
    for one loss type, on summed reply log-probs (``n_*``: scored tokens, IPO's length normaliser)."""
    chosen, rejected = pi_c - ref_c, pi_r - ref_r
    delta = chosen - rejected
    if loss_type == "sigmoid":
        loss = -jax.nn.log_sigmoid(beta * delta)
    elif loss_type == "hinge":
        loss = jax.nn.relu(1 - beta * delta)
    elif loss_type == "ipo":  # TRL divides each reply's log-ratio by its length (agreed with IPO's authors)
        ipo = chosen / jnp.maximum(n_c, 1.0) - rejected / jnp.maximum(n_r, 1.0)
        loss = (ipo - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":  # label_smoothing: the assumed share of flipped preference labels
        e = label_smoothing
        loss = (-(1 - e) * jax.nn.log_sigmoid(beta * delta) + e * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * e)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: choose from {', '.join(DPO_LOSSES)}")
    return loss, beta * chosen, beta * rejected


jax.tree_util.register_dataclass(DPO, data_fields=["reference"],
                                 meta_fields=[f.name for f in dataclasses.fields(DPO) if f.name != "reference"])
