"""Backend policy: which attention, kernels, layer loop, recomputation and loss chunks run here.

``Policy.resolve(cfg)`` reads ``jax.default_backend()`` once and turns the ``auto`` settings of a
``GPT2Config`` into decisions; the model receives the result and asks nothing of jax afterwards.
Why each default is what it is: docs/benchmarks.md, "Backend defaults".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "einsum": two einsums around a float32 softmax (the only path that reads a KV cache). "xla" /
# "cudnn": jax.nn.dot_product_attention; "cudnn" is cuDNN's fused flash attention (NVIDIA GPUs,
# bf16/fp16). "flash": jaxgpt.flash, jax's Pallas flash kernel reading packed rows' segment ids (on
# a GPU; elsewhere in Pallas' interpreter, for tests). "auto": "cudnn" where it applies (a GPU,
# bf16/fp16, no dropout), else "einsum"; whether "flash" beats it on packed rows awaits a GPU run.
ATTENTION = ("auto", "einsum", "xla", "cudnn", "flash")
# LayerNorm, bias + GELU and the loss's log-sum-exp as jaxgpt.kernels' Pallas kernels ("pallas") or
# jax.numpy fused by XLA ("xla"). "auto": "pallas" on NVIDIA GPUs of compute capability 8.0 or more
# with bf16 / fp16 compute.
KERNELS = ("auto", "xla", "pallas")
# What the backward pass recomputes. "none": nothing. "full": each block from its input. "minimal"
# (MaxText's name): the weight matmuls' outputs are kept, LayerNorm, GELU and attention recomputed.
# "auto": "minimal" for scanned blocks on a CPU (faster and half the memory there), else "none".
REMAT = ("auto", "none", "minimal", "full")
REMAT_POLICIES = {"minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}
# On a CPU, blocks run unrolled for a micro-batch of at most this many positions (batch x seq) and as
# one scan above it: unrolled skips the scan's stacking but keeps every layer's activations.
UNROLL_ROWS = 2048


def attention_implementation(cfg) -> str:
    """The implementation ``cfg.attention`` means on the default backend."""
    if cfg.attention == "flash" and jax.default_backend() not in ("gpu", "cpu"):  # cpu: the interpreter, for tests
        raise ValueError(f"attention='flash' is a GPU kernel (the backend here is {jax.default_backend()}); "
                         f"use attention='auto'")
    if cfg.attention != "auto":
        return cfg.attention
    fused = jax.default_backend() == "gpu" and cfg.dtype != "float32" and not cfg.dropout
    return "cudnn" if fused else "einsum"


def fused_kernels(cfg) -> bool:
    """Whether LayerNorm, bias + GELU and the loss's log-sum-exp run as jaxgpt.kernels' Pallas kernels."""
    gpu = jax.default_backend() == "gpu"
    if cfg.kernels == "pallas" and not gpu:
        raise ValueError(f"kernels='pallas' needs an NVIDIA GPU (the backend here is {jax.default_backend()}); "
                         f"use kernels='xla' or 'auto'")
    if cfg.kernels == "auto":
        return gpu and cfg.dtype != "float32" and _compute_capability() >= (8, 0)
    return cfg.kernels == "pallas"


def _compute_capability() -> tuple[int, ...]:
    """The first device's CUDA compute capability, e.g. (9, 0); () where it has none (a CPU, a ROCm GPU)."""
    try:
        return tuple(int(v) for v in str(getattr(jax.devices()[0], "compute_capability", "")).split("."))
    except ValueError:  # "" or not "major.minor"
        return ()


def check_settings(cfg) -> None:
    """A ValueError naming the setting of ``cfg`` (a GPT2Config) that no backend can run."""
    for key, choices in (("attention", ATTENTION), ("kernels", KERNELS)):
        if getattr(cfg, key) not in choices:
            raise ValueError(f"{key}={getattr(cfg, key)!r}: choose from {list(choices)}")
    if cfg.loss_chunks is not None and cfg.loss_chunks < 1:
        raise ValueError(f"loss_chunks={cfg.loss_chunks}: must be at least 1")
    if isinstance(cfg.remat, bool):  # configs written before the policies
        object.__setattr__(cfg, "remat", "full" if cfg.remat else "none")
    if cfg.remat not in REMAT:
        raise ValueError(f"remat={cfg.remat!r}: choose from {list(REMAT)}")
    if cfg.attention in ("cudnn", "flash") and cfg.dropout:
        raise ValueError(f"attention={cfg.attention!r} has no attention-probability dropout: use dropout=0 or "
                         f"attention='einsum'")
    if cfg.attention == "cudnn" and cfg.dtype == "float32":
        raise ValueError("attention='cudnn' needs dtype bfloat16 or float16 (cuDNN's fused attention has no float32)")


@jax.custom_vjp
def gradient_fence(x):
    """The identity, whose gradient XLA must materialise as it is (the unrolled blocks' input on a CPU).

    Unrolled, XLA:CPU fused the residual stream's gradient, an elementwise chain through every later
    layer's LayerNorm backward, into each layer's consumers of it: work quadratic in depth.
    ``lax.optimization_barrier`` does not stop it (XLA:CPU removes barriers before fusing); a loop
    whose trip count XLA cannot know does. Its body negates, so the gradient passes unchanged, bit
    for bit, after its two trips (none when its first element is NaN).
    """
    return x


gradient_fence.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.fori_loop(
    0, 2 * (~jnp.isnan(g.reshape(-1)[0])).astype(jnp.int32), lambda _, v: -v, g),))


@dataclasses.dataclass(frozen=True)
class Policy:
    """A config's ``auto`` choices, resolved for one backend (hashable: a static attribute of the model)."""

    backend: str  # jax.default_backend() when resolved
    attention: str  # "einsum", "xla", "cudnn" or "flash"
    kernels: bool  # jaxgpt.kernels' Pallas kernels for LayerNorm, bias + GELU, the log-sum-exp
    scan_layers: bool | None  # None: by the number of positions (scan_blocks)
    remat: str  # one of REMAT
    loss_chunks: int | None  # None: by the sequence length (loss_chunks_for)

    @classmethod
    def resolve(cls, cfg) -> "Policy":
        return cls(jax.default_backend(), attention_implementation(cfg), fused_kernels(cfg),
                   cfg.scan_layers, cfg.remat, cfg.loss_chunks)

    @property
    def cpu(self) -> bool:
        """XLA:CPU's layouts: 2-D training products, chunked attention, the unrolled blocks' gradient fence."""
        return self.backend == "cpu"

    @property
    def logsumexp(self) -> str:
        """The loss's log-sum-exp (jaxgpt.loss): the Pallas kernel, else one variadic reduction on a GPU
        (faster there, slower on a CPU), else jax.nn.logsumexp."""
        return "pallas" if self.kernels else "one_pass" if self.backend == "gpu" else "xla"

    def scan_blocks(self, rows: int) -> bool:
        """Whether a full forward over ``rows`` (batch x seq) positions runs the blocks as one scan: by
        default never on a GPU, above UNROLL_ROWS on a CPU, always elsewhere (compile time independent
        of depth, as in MaxText)."""
        if self.scan_layers is not None:
            return self.scan_layers
        return self.backend != "gpu" and not (self.cpu and rows <= UNROLL_ROWS)

    def remat_policy(self, rows: int) -> str:
        """What ``remat`` means for a full forward over ``rows`` positions: "none", "minimal" or "full"."""
        if self.remat != "auto":
            return self.remat
        return "minimal" if self.cpu and self.scan_blocks(rows) else "none"

    def loss_chunks_for(self, seq_len: int) -> int:
        """The training loss's sequence chunks (jaxgpt.loss): by default 8 on a GPU, where the float32
        logits are the step's largest tensors, fewer where seq_len does not divide; else 1."""
        if self.loss_chunks is not None:
            return self.loss_chunks
        if self.backend != "gpu":
            return 1
        return next(c for c in (8, 4, 2, 1) if seq_len % c == 0)

    def describe(self, rows: int, seq_len: int) -> str:
        """One line for the training log: what runs."""
        return (f"attention {self.attention}, blocks {'scanned' if self.scan_blocks(rows) else 'unrolled'}, "
                f"remat {self.remat_policy(rows)}, loss in {self.loss_chunks_for(seq_len)} chunk(s), "
                f"kernels {'pallas' if self.kernels else 'xla'}")
