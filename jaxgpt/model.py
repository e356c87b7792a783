"""GPT-2 in Flax NNX, numerically the same model as transformers' GPT2LMHeadModel.

Modules carry HF's names (``h.N.attn.c_attn``, ...). Each projection is a ``Linear`` (``kernel`` [in,
out] as HF's Conv1D, heads as their own axis) that a wrapper (LoRA) or a decoding layout
(``jaxgpt.decoding``) can replace. Parameters name their axes for ``jaxgpt.sharding``.

``model(ids)`` gives float32 logits, ``model.hidden(ids)`` the final hidden states [B, T, E] and
``model.lm_head(h)`` the tied head on them (the chunked loss applies its own); ``model.decode(ids,
cache)`` a KV-cache step, (logits, new cache). Optional inputs: ``positions`` [B, T], ``segment_ids``
[B, T] (a token attends to earlier tokens of its own segment; 0 is padding, never attended),
``constrain`` (``fn(x, *logical_axes)`` pinning activations to a mesh; the model knows none),
``last_only``. What runs on this backend is a ``jaxgpt.backend.Policy`` resolved once, at construction.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt import flash, kernels
from jaxgpt import backend
from jaxgpt.backend import DTYPES, REMAT_POLICIES, Policy
from jaxgpt.decoding import few_rows_product, takes_few_rows_product


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture (HF ``config.json`` names) plus jaxgpt's numeric policy."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None -> 4 * n_embd, as in HF
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # jaxgpt-only knobs (not architecture): never written to config.json. "auto" / None: jaxgpt.backend.
    dtype: str = "float32"  # computation dtype; logits and loss stay float32
    param_dtype: str = "float32"
    vocab_multiple: int = 1  # pad the embedding to a multiple (128 on TPU/GPU)
    dropout: float = 0.0
    remat: bool | str = "auto"  # backend.REMAT; True / False are read as "full" / "none"
    scan_layers: bool | None = None  # blocks as one lax.scan (full forward only)
    attention: str = "auto"  # full-sequence attention: backend.ATTENTION
    loss_chunks: int | None = None  # training loss: the head + cross-entropy in chunks
    kernels: str = "auto"  # LayerNorm, bias + GELU, the loss's log-sum-exp: backend.KERNELS

    def settings(self) -> dict[str, Any]:
        """jaxgpt's knobs (everything after ``eos_token_id``), as keyword arguments."""
        return {k: getattr(self, k) for k in SETTINGS}

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for key, choices in (("activation_function", ACTIVATIONS), ("dtype", DTYPES), ("param_dtype", DTYPES)):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}={getattr(self, key)!r} is not supported (choose from {sorted(choices)})")
        backend.check_settings(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // max(1, self.vocab_multiple)) * max(1, self.vocab_multiple)

    def replace(self, **kw) -> "GPT2Config":
        return dataclasses.replace(self, **kw)


# jaxgpt's own settings (the run config's model.* keys of the same names): the fields after the architecture.
_FIELDS = [f.name for f in dataclasses.fields(GPT2Config)]
SETTINGS = tuple(_FIELDS[_FIELDS.index("eos_token_id") + 1:])

_TANH_GELU = functools.partial(jax.nn.gelu, approximate=True)
ACTIVATIONS = {"gelu_new": _TANH_GELU, "gelu_pytorch_tanh": _TANH_GELU,
               "gelu": functools.partial(jax.nn.gelu, approximate=False), "relu": jax.nn.relu}
# On a CPU, einsum attention over CHUNKED_FROM positions or more runs in chunks of at most
# QUERY_CHUNK queries (2 to 8 chunks): the scores stay in the caches (docs/benchmarks.md).
CHUNKED_FROM, QUERY_CHUNK = 128, 256

# Set by abstract_model: parameters are created as shapes (``jax.ShapeDtypeStruct``), not initialised.
_SHAPES_ONLY = contextvars.ContextVar("jaxgpt_shapes_only", default=False)


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    # `axes` are logical names, one per dimension; jaxgpt.sharding maps them to the mesh.
    key = rngs.params()  # drawn for shapes too: the RNG streams advance as in a real construction
    return nnx.Param(jax.ShapeDtypeStruct(shape, dtype) if _SHAPES_ONLY.get() else init(key, shape, dtype), axes=axes)


def _no_constraint(x, *_logical_axes):
    return x


class Linear(nnx.Module):
    """``x @ kernel + bias`` in ``x``'s dtype; ``kernel`` [*in, *out] as HF's Conv1D (``in_dims`` input axes)."""

    trains = True  # jaxgpt.decoding.DecodingLinear, its sampling-only replacement, does not

    def __init__(self, shape, axes, init, rngs: nnx.Rngs, param_dtype, flat: bool, in_dims: int = 1):
        self.flat = flat  # the product on x as [rows, in]: autodiff's weight gradient contracts one axis
        self.kernel = _param(rngs, init, shape, axes, param_dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, shape[in_dims:], axes[in_dims:], param_dtype)
        self.n_in = math.prod(shape[:in_dims])

    def product(self, x):
        w = self.kernel[...].astype(x.dtype).reshape(self.n_in, -1)
        return x @ w if not self.flat else (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[1])

    def __call__(self, x):
        return self.product(x) + self.bias[...].astype(x.dtype).reshape(-1)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs, fused: bool = False):
        self.eps, self.fused = eps, fused
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, x):
        # Statistics in float32 whatever the compute dtype.
        norm = kernels.layer_norm if self.fused else kernels.reference_layer_norm
        return norm(x, self.scale[...], self.bias[...], self.eps)

    def add_norm(self, x, delta):
        """(x + delta, LayerNorm(x + delta)): a residual add and this LayerNorm, one kernel each way when fused."""
        add_norm = kernels.add_layer_norm if self.fused else kernels.reference_add_layer_norm
        return add_norm(x, delta, self.scale[...], self.bias[...], self.eps)


def _inits(cfg: GPT2Config):
    """(normal, projection) initialisers; the projections' std scaled by depth as in GPT-2."""
    return nnx.initializers.normal(0.02), nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer))


class Attention(nnx.Module):
    """Causal self-attention with a fused QKV projection (HF ``c_attn``)."""

    def __init__(self, cfg: GPT2Config, policy: Policy, rngs: nnx.Rngs):
        e, h, d, pd = cfg.n_embd, cfg.n_head, cfg.head_dim, DTYPES[cfg.param_dtype]
        normal, proj = _inits(cfg)
        self.n_head, self.head_dim, self.implementation = h, d, policy.attention
        self.chunked = policy.cpu  # long sequences' queries in chunks (_attend_chunked)
        self.c_attn = Linear((e, 3, h, d), ("embed", None, "heads", "head_dim"), normal, rngs, pd, policy.cpu)
        self.c_proj = Linear((h, d, e), ("heads", "head_dim", "embed"), proj, rngs, pd, policy.cpu, in_dims=2)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, mask, layer_cache=None, cache_index=None, constrain=_no_constraint):
        (b, t, _), h, d = x.shape, self.n_head, self.head_dim
        # A plain 2-D product with heads folded into columns: XLA:CPU runs 4-D dots much slower.
        qkv = constrain(self.c_attn(x).reshape(b, t, 3, h, d), "batch", "seq", None, "heads", "head_dim")
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, D]
        if layer_cache is not None:
            return self._attend_cached(q, k, v, x, mask, layer_cache, cache_index)
        if self.implementation == "flash":  # mask: the [B, T] segment ids (or None), read per tile
            out = flash.attention(q, k, v, mask)
        elif self.implementation != "einsum":
            # A mask (packed segments) becomes an additive bias; is_causal lets cuDNN skip blocks.
            out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                               is_causal=True, implementation=self.implementation)
        elif t >= CHUNKED_FROM and self.chunked:
            out = self._attend_chunked(q, k, v, mask)
        else:
            out = self._softmax_attention(q, k, v, mask, heads_leading=False)
        return self._project(out, x), None

    def _softmax_attention(self, q, k, v, mask, heads_leading):
        """softmax(q k^T / sqrt(d), where mask) v, scores in float32; [B, T, H, D] (or [B, H, T, D]) in and out."""
        qk, pv = ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd") if heads_leading else ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
        scores = jnp.einsum(qk, q, k, preferred_element_type=jnp.float32) / math.sqrt(self.head_dim)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = self.dropout(jax.nn.softmax(scores, axis=-1))
        return jnp.einsum(pv, probs.astype(q.dtype), v)

    def _attend_chunked(self, q, k, v, mask):
        """Causal attention in chunks of queries, each against the keys up to its last query (the
        later ones are masked anyway): smaller scores that stay in the CPU's caches. Heads lead."""
        t = q.shape[1]
        q, k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in (q, k, v))  # [B, H, T, D]
        c = -(-t // min(8, max(2, -(-t // QUERY_CHUNK))))  # 2 to 8 chunks of at most QUERY_CHUNK queries
        outs = [self._softmax_attention(q[:, :, start:start + c], k[:, :, :start + c], v[:, :, :start + c],
                                        mask[:, start:start + c, :start + c], heads_leading=True)
                for start in range(0, t, c)]
        return jnp.transpose(jnp.concatenate(outs, axis=2), (0, 2, 1, 3))

    def _attend_cached(self, q, k, v, x, mask, layer_cache, cache_index):
        """Write the new keys/values into the cache at ``cache_index`` and attend to it. Keys [B*H, D, S]
        and values [B*H, S, D], as both products read them (others made XLA:CPU copy the cache)."""
        dt = x.dtype
        (b, t, h, d), bh = q.shape, q.shape[0] * q.shape[2]
        kt = jnp.transpose(k, (0, 2, 3, 1)).reshape(bh, d, t).astype(layer_cache["k"].dtype)
        vt = jnp.transpose(v, (0, 2, 1, 3)).reshape(bh, t, d).astype(layer_cache["v"].dtype)
        k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], kt, cache_index, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], vt, cache_index, axis=1)
        q = jnp.transpose(q, (0, 2, 1, 3)).reshape(bh, t, d)
        scores = jnp.einsum("xqd,xdk->xqk", q, k.astype(dt), preferred_element_type=jnp.float32)
        scores = scores.reshape(b, h, t, -1) / math.sqrt(self.head_dim)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).reshape(bh, t, -1)
        out = jnp.einsum("xqk,xkd->xqd", probs.astype(dt), v.astype(dt))
        out = jnp.transpose(out.reshape(b, h, t, d), (0, 2, 1, 3))
        return self._project(out, x), {"k": k, "v": v}

    def _project(self, out, x):
        """[B, T, H, D] attention output -> [B, T, E] (HF ``c_proj``), with residual dropout."""
        b, t, _ = x.shape
        return self.dropout(self.c_proj(out.reshape(b, t, -1)))


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, policy: Policy, rngs: nnx.Rngs):
        e, i, pd = cfg.n_embd, cfg.inner_dim, DTYPES[cfg.param_dtype]
        normal, proj = _inits(cfg)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.fused = policy.kernels and cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.c_fc = Linear((e, i), ("embed", "mlp"), normal, rngs, pd, policy.cpu)
        self.c_proj = Linear((i, e), ("mlp", "embed"), proj, rngs, pd, policy.cpu)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, constrain=_no_constraint):
        if not self.c_fc.trains:  # a decoding layout: no gradients
            h = self.act(self.c_fc(x))
        elif self.fused:  # bias + GELU as one kernel each way, recomputed in the backward too
            h = kernels.bias_gelu(self.c_fc.product(x), self.c_fc.bias[...])
        else:
            # Recomputed from the product's output in the backward; else XLA:GPU stores tanh's [B, T, 4E] output.
            h = jax.checkpoint(lambda y, bias: self.act(y + bias.astype(y.dtype)))(
                self.c_fc.product(x), self.c_fc.bias[...])
        return self.dropout(self.c_proj(constrain(h, "batch", "seq", "mlp")))


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, policy: Policy, rngs: nnx.Rngs):
        pd = DTYPES[cfg.param_dtype]
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, pd, rngs, policy.kernels)
        self.attn = Attention(cfg, policy, rngs)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, pd, rngs, policy.kernels)
        self.mlp = MLP(cfg, policy, rngs)

    def __call__(self, x, mask, layer_cache=None, cache_index=None, constrain=_no_constraint):
        a, layer_cache = self.attn(self.ln_1(x), mask, layer_cache, cache_index, constrain)
        x, h = self.ln_2.add_norm(x, a)
        x = x + self.mlp(h, constrain)
        # The residual stream: split over the batch, whole along embed (FSDP gathers weights, not activations).
        return constrain(x, "batch", "seq", None), layer_cache


class GPT2(nnx.Module):
    """GPT-2 language model; the head is tied to the token embedding ``wte``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs, policy: Policy | None = None):
        self.config = cfg
        self.policy = policy = policy or Policy.resolve(cfg)
        pd = DTYPES[cfg.param_dtype]
        self.wte = _param(rngs, nnx.initializers.normal(0.02), (cfg.padded_vocab_size, cfg.n_embd), ("vocab", "embed"), pd)
        self.wpe = _param(rngs, nnx.initializers.normal(0.01), (cfg.n_positions, cfg.n_embd), (None, "embed"), pd)
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.h = nnx.List([Block(cfg, policy, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, pd, rngs, policy.kernels)
        self.decoding_layout = None  # "float32", "bfloat16", "int8" or "w8a8": jaxgpt.decoding.for_decoding
        self.head_layout = nnx.data(None)  # the tied head's decoding layout (jaxgpt.decoding.DecodingHead)

    def __call__(self, input_ids, *, positions=None, segment_ids=None, constrain=None, last_only=False):
        """Logits [B, T, vocab] (float32; ``last_only``: [B, 1, vocab])."""
        return self.lm_head(self.hidden(input_ids, positions=positions, segment_ids=segment_ids,
                                        constrain=constrain, last_only=last_only))

    def hidden(self, input_ids, *, positions=None, segment_ids=None, constrain=None, last_only=False):
        """The final hidden states [B, T, E], after ``ln_f``."""
        return self._forward(input_ids, positions, segment_ids, None, constrain, last_only)[0]

    def decode(self, input_ids, cache, *, positions=None, segment_ids=None, last_only=False):
        """(logits, new cache): the tokens' keys and values written at ``cache["index"]``."""
        x, cache = self._forward(input_ids, positions, segment_ids, cache, None, last_only)
        return self.lm_head(x, cached=True), cache

    def lm_head(self, x, cached: bool = False):
        """Hidden states [B, T, E] -> float32 logits [B, T, vocab] through the tied embedding."""
        if self.head_layout is not None:
            logits = self.head_layout.logits(x, self.wte[...])
        elif cached and self.policy.cpu and takes_few_rows_product(x.shape[0] * x.shape[1], x.dtype):
            logits = few_rows_product(x.reshape(-1, x.shape[-1]), self.wte[...]).reshape(*x.shape[:2], -1)
        else:
            logits = jnp.einsum("bte,ve->btv", x, self.wte[...].astype(x.dtype), preferred_element_type=jnp.float32)
        return logits[..., : self.config.vocab_size]  # padded rows never get probability

    def _mask(self, segment_ids, cache, t):
        """The attention mask [B, T, S] (causal, same segment, no padding), the keys' segment ids."""
        if cache is None:
            q_seg = k_seg = segment_ids
            causal = jnp.tril(jnp.ones((t, t), bool))
        else:
            index, q_seg = cache["index"], segment_ids
            k_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32), index, axis=1)
            causal = jnp.arange(k_seg.shape[1])[None, :] <= (index + jnp.arange(t))[:, None]
        return causal[None] & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0), k_seg

    def _forward(self, input_ids, positions, segment_ids, cache, constrain, last_only):
        cfg = self.config
        dt = DTYPES[cfg.dtype]
        b, t = input_ids.shape
        if positions is None and cache is None and t > cfg.n_positions:
            # jax would clamp the lookup and quietly compute something else (explicit positions are the caller's)
            raise ValueError(f"input of {t} tokens is longer than the model's context, n_positions={cfg.n_positions}")
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        # jax.nn.dot_product_attention applies causality itself: a mask only for packed segments.
        library_causal_only = segment_ids is None and cache is None and self.policy.attention != "einsum"
        if cache is None and self.policy.attention == "flash":
            mask, k_seg = segment_ids, None  # the flash kernel builds its masks per tile from the [B, T] ids
        else:
            if segment_ids is None:
                segment_ids = jnp.ones((b, t), jnp.int32)
            mask, k_seg = self._mask(segment_ids, cache, t)
            if library_causal_only:
                mask = None

        constrain = constrain or _no_constraint
        # The lookup reads whole rows: gather the (FSDP/vocab-sharded) tables first, as FSDP does for every weight.
        wte, wpe = constrain(self.wte[...], None, None), constrain(self.wpe[...], None, None)
        tok = wte[input_ids].astype(dt)
        if self.head_layout is not None:
            tok = self.head_layout.scale_rows(tok, input_ids)
        x = constrain(self.drop(tok + wpe[positions].astype(dt)), "batch", "seq", None)

        new_layers = []
        remat = "none" if cache is not None else self.policy.remat_policy(b * t)
        if cache is None and self.policy.scan_blocks(b * t) and len(self.h) > 1:
            x = self._scan_blocks(x, mask, constrain, remat)
        else:
            for i, block in enumerate(self.h):
                if cache is None and self.policy.cpu:
                    x = backend.gradient_fence(x)
                if remat != "none":
                    x, _ = nnx.remat(lambda blk, y, m: blk(y, m, constrain=constrain),
                                     policy=REMAT_POLICIES[remat])(block, x, mask)
                    continue
                x, layer_cache = block(x, mask, None if cache is None else cache["layers"][i],
                                       None if cache is None else cache["index"], constrain)
                new_layers.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        new_cache = None if cache is None else {"layers": new_layers, "segment_ids": k_seg, "index": cache["index"] + t}
        return self.ln_f(x), new_cache

    def _scan_blocks(self, x, mask, constrain, remat):
        """The blocks as one ``lax.scan`` over their states, stacked on the fly (stored per layer, as in
        HF): compile time independent of depth. The dropout streams come back updated, as unrolled."""
        graphdef = nnx.graphdef(self.h[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(block) for block in self.h])

        def body(y, state):
            block = nnx.merge(graphdef, state)
            y, _ = block(y, mask, constrain=constrain)
            return y, nnx.state(block, nnx.RngState)  # not the (maybe frozen) weights

        if remat != "none":
            body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[remat])
        x, new_rest = jax.lax.scan(body, x, stacked)
        for i, block in enumerate(self.h):
            nnx.update(block, jax.tree.map(lambda a, i=i: a[i], new_rest))
        return x


def abstract_model(cfg: GPT2Config, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest) of ``GPT2(cfg, rngs=nnx.Rngs(seed))``, the parameters as shapes (their
    ``axes`` kept), the rest (dropout streams) on this host. Built eagerly, each RNG draw made but no
    initialiser run: traced (``nnx.eval_shape``) it is much slower (jax-ml/jax#40041)."""
    token = _SHAPES_ONLY.set(True)
    try:
        return nnx.split(GPT2(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    finally:
        _SHAPES_ONLY.reset(token)


def init_cache(cfg: GPT2Config, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
    """An empty KV cache of ``max_len`` slots (at most ``n_positions``)."""
    dtype = DTYPES[cfg.dtype] if dtype is None else dtype
    # batch and heads as one axis, keys transposed: the layouts attention reads (Attention._attend_cached)
    bh, d = batch * cfg.n_head, cfg.head_dim
    layers = [{"k": jnp.zeros((bh, d, max_len), dtype), "v": jnp.zeros((bh, max_len, d), dtype)}
              for _ in range(cfg.n_layer)]
    return {"layers": layers, "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.array(0, jnp.int32)}


def num_params(model: GPT2, *, exclude_embeddings: bool = False) -> int:
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return n - model.wpe.size if exclude_embeddings else n
