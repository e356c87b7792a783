"""jaxgpt.kernels' Pallas kernels, run in Pallas' interpreter on the CPU, against float32 math on
the same inputs (values and gradients), and in the model and the chunked loss against the XLA path.
How fast they are is measured on a GPU (tools/bench_gpu.sh: the step with and without them), not here."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import kernels
from tests.test_train import tiny_config

EPS = 1e-5


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(want).max() > 0
    return float(np.abs(got - want).max() / np.abs(want).max())


@functools.partial(jax.jit, static_argnums=0)  # one program: the interpreter primitive by primitive took seconds
def value_and_grads(fn, args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent.astype(out.dtype))


# 70 rows: not a multiple of any tiling's rows per program; widths not powers of two.
@pytest.mark.parametrize("dtype,width", [(jnp.float32, 96), (jnp.bfloat16, 96), (jnp.bfloat16, 200)])
def test_layer_norm_kernels_match_float32_math(dtype, width):
    k = jax.random.split(jax.random.key(0), 4)
    x = (jax.random.normal(k[0], (2, 35, width)) * 3 + 1).astype(dtype)
    scale = 1 + 0.2 * jax.random.normal(k[1], (width,))
    bias = 0.2 * jax.random.normal(k[2], (width,))
    dy = jax.random.normal(k[3], x.shape).astype(dtype)
    truth = value_and_grads(lambda x, s, b: kernels.reference_layer_norm(x.astype(jnp.float32), s, b, EPS),
                            (x, scale, bias), dy.astype(jnp.float32))
    got = value_and_grads(lambda x, s, b: kernels.layer_norm(x, s, b, EPS, interpret=True), (x, scale, bias), dy)
    assert got[0].dtype == dtype and [g.dtype for g in got[1]] == [dtype, jnp.float32, jnp.float32]
    # float32: rounding only. bf16: the output and dx are rounded to bf16 (2^-8 relative); the
    # scale and bias gradients are float32 sums over rows, as in the reference.
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    assert rel_err(got[0], truth[0]) <= tol
    assert rel_err(got[1][0], truth[1][0]) <= tol
    assert rel_err(got[1][1], truth[1][1]) <= 1e-5
    assert rel_err(got[1][2], truth[1][2]) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_layer_norm_kernels_match_float32_math(dtype):
    """The residual add fused into LayerNorm: s = x + delta and LayerNorm(s), and the gradient of
    both inputs, that of s plus LayerNorm's."""
    k = jax.random.split(jax.random.key(4), 6)
    x, delta = ((jax.random.normal(k[i], (2, 35, 96)) * 2).astype(dtype) for i in (0, 1))
    scale, bias = 1 + 0.2 * jax.random.normal(k[2], (96,)), 0.2 * jax.random.normal(k[3], (96,))
    ds, dy = (jax.random.normal(k[i], x.shape).astype(dtype) for i in (4, 5))
    f32 = lambda *a: [v.astype(jnp.float32) for v in a]

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(fn, cast):
        (s, y), vjp = jax.vjp(fn, x, delta, scale, bias)
        return (s, y), vjp(tuple(cast(ds, dy)))

    truth = run(lambda x, d, s, b: kernels.reference_add_layer_norm(*f32(x, d), s, b, EPS), f32)
    got = run(lambda x, d, s, b: kernels.add_layer_norm(x, d, s, b, EPS, interpret=True), lambda *a: a)
    assert [v.dtype for v in got[0]] == [dtype, dtype]
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    for a, b in zip(got[0] + got[1][:2], truth[0] + truth[1][:2]):  # s, y, dx, ddelta
        assert rel_err(a, b) <= tol
    for a, b in zip(got[1][2:], truth[1][2:]):  # the scale and bias gradients
        assert rel_err(a, b) <= (1e-5 if dtype == jnp.float32 else 8e-3)  # s rounded to bf16 first


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_gelu_kernels_match_float32_math(dtype):
    k = jax.random.split(jax.random.key(1), 3)
    y = (jax.random.normal(k[0], (3, 23, 600)) * 2).astype(dtype)  # 600 columns: a partial column block
    bias = 0.3 * jax.random.normal(k[1], (600,))
    dh = jax.random.normal(k[2], y.shape).astype(dtype)
    truth = value_and_grads(lambda y, b: kernels.reference_bias_gelu(y.astype(jnp.float32), b), (y, bias),
                            dh.astype(jnp.float32))
    got = value_and_grads(lambda y, b: kernels.bias_gelu(y, b, interpret=True), (y, bias), dh)
    assert got[0].dtype == dtype and [g.dtype for g in got[1]] == [dtype, jnp.float32]
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    assert rel_err(got[0], truth[0]) <= tol
    assert rel_err(got[1][0], truth[1][0]) <= tol
    assert rel_err(got[1][1], truth[1][1]) <= 1e-5


def test_logsumexp_kernel_skips_the_padding_columns():
    x = jax.random.normal(jax.random.key(2), (3, 7, 2500)) * 6
    x = x.at[..., 2400:].set(1e4)  # padding columns: they would dominate if they were read
    kernels_lse = jax.jit(lambda x: kernels.logsumexp(x, 2400, interpret=True))(x)
    assert kernels_lse.shape == (3, 7) and kernels_lse.dtype == jnp.float32
    np.testing.assert_allclose(kernels_lse, jax.nn.logsumexp(x[..., :2400], axis=-1), rtol=1e-6)
    np.testing.assert_allclose(kernels.logsumexp(x[0], interpret=True), jax.nn.logsumexp(x[0], axis=-1), rtol=1e-6)


def test_one_pass_logsumexp_of_the_loss():
    from jaxgpt.loss import _logsumexp

    x = jax.random.normal(jax.random.key(3), (5, 1000)) * 8
    x = x.at[:, 900:].set(jnp.finfo(jnp.float32).min)  # the head's padding rows, as the loss masks them
    np.testing.assert_allclose(jax.jit(_logsumexp)(x), jax.nn.logsumexp(x[:, :900], axis=-1), rtol=1e-6)


def interpret_kernels(monkeypatch, fused):
    """The model and the loss built with the kernels while ``fused["on"]``, run in the interpreter."""
    from jaxgpt import backend

    # the CPU has no Triton: the kernels run in the interpreter
    monkeypatch.setattr(backend, "fused_kernels", lambda cfg: fused["on"])
    for name in ("layer_norm", "add_layer_norm", "bias_gelu", "logsumexp"):
        monkeypatch.setattr(kernels, name, lambda *a, _f=getattr(kernels, name), **kw: _f(*a, **kw, interpret=True))


def kernels_against_xla(monkeypatch, out_dir, mesh_shape, rows: int, model: dict):
    """jaxgpt.step.loss_terms on a packed batch of ``rows`` rows on a mesh, the model built without
    the kernels and with them (in the interpreter), the same weights: (both losses, each gradient's
    largest difference relative to its largest value, by path, the kernels' gradient's jaxpr).
    The loss runs in 2 chunks, so its log-sum-exp kernel runs too."""
    from flax import nnx

    from jaxgpt import setup, sharding, step
    from jaxgpt.data import build_datasets

    fused = {"on": False}
    interpret_kernels(monkeypatch, fused)
    mesh = sharding.make_mesh(mesh_shape)
    cfg = tiny_config(out_dir, model={"loss_chunks": 2, "vocab_multiple": 64, **model})
    tok = setup.load_tokenizer_for(cfg)
    data, _ = build_datasets(cfg.data, tok)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in data.batch(range(rows)).items()}
    results = []
    for on in (False, True):
        fused["on"] = on
        graphdef, params, rest, _ = setup.build_model(cfg, len(tok), mesh)
        assert nnx.merge(graphdef, params, rest).h[0].ln_1.fused is on
        grad_fn = jax.value_and_grad(lambda p: (lambda s, m: s / m["trained_tokens"])(*step.loss_terms(graphdef, p, rest, batch, mesh=mesh)))
        loss, grads = jax.jit(grad_fn)(params)
        results.append((float(loss), nnx.to_flat_state(grads)))
    (l0, g0), (l1, g1) = results
    errors = {".".join(map(str, path)): float(jnp.abs(b.get_value() - a.get_value()).max())
              / max(float(jnp.abs(a.get_value()).max()), 1e-12) for (path, a), (_, b) in zip(g0, g1)}
    return (l0, l1), errors, str(jax.make_jaxpr(grad_fn)(params))


@pytest.mark.parametrize("model", [{}, {"scan_layers": True, "remat": "full"}], ids=["unrolled", "scanned-remat"])
def test_train_step_with_kernels_matches_xla(tmp_path, monkeypatch, model):
    """One device: loss and every parameter gradient agree in float32, with the blocks unrolled,
    and scanned and recomputed in the backward."""
    (l0, l1), errors, _ = kernels_against_xla(monkeypatch, tmp_path, (1, 1, 1), 4, model)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for path, err in errors.items():
        assert err <= 1e-5, path


def mesh_worker(out_dir: str) -> None:
    """In a process with 8 CPU devices: ``kernels_against_xla`` on a 2x2x2 mesh (rows over data x
    fsdp, the MLP's hidden units and the vocabulary over tensor), the kernels per shard; writes the
    losses, the largest relative gradient difference and whether the kernels ran per shard."""
    import json
    from pathlib import Path

    with pytest.MonkeyPatch.context() as mp:
        losses, errors, jaxpr = kernels_against_xla(mp, Path(out_dir), (2, 2, 2), 8, {})
    per_shard = jaxpr.count("shard_map") >= 3 and "pallas_call" in jaxpr  # pallas_calls inside shard_maps
    # Several devices without kernels.on_mesh: the reference runs (the Triton kernel would fail on a CPU).
    x = jax.random.normal(jax.random.key(0), (8, 4, 16))
    reference_ran = bool(jnp.array_equal(kernels.layer_norm(x, jnp.ones(16), jnp.zeros(16), 1e-5),
                                         kernels.reference_layer_norm(x, jnp.ones(16), jnp.zeros(16), 1e-5)))
    Path(out_dir, "result.json").write_text(json.dumps({"losses": losses, "worst": max(errors.values()),
                                                        "reference": reference_ran, "per_shard": per_shard}))


def test_kernels_per_shard_on_a_mesh_match_xla(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, xla_flags

    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    code = f"from tests.test_kernels import mesh_worker; mesh_worker({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    np.testing.assert_allclose(r["losses"][1], r["losses"][0], rtol=1e-6)
    assert r["worst"] <= 1e-5 and r["reference"] and r["per_shard"], r


def test_kernels_setting(monkeypatch):
    """model.kernels: auto is the kernels on NVIDIA GPUs (A100 or later) with bf16 / fp16 compute
    only; pallas without a GPU is an error that says why; a bad value is refused by name."""
    from jaxgpt import backend
    from jaxgpt.backend import fused_kernels
    from jaxgpt.config import Config, ConfigError, validate
    from jaxgpt.model import GPT2Config

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=8, dtype="bfloat16")
    assert fused_kernels(cfg) is False  # the CPU
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        fused_kernels(cfg.replace(kernels="pallas"))
    with pytest.raises(ValueError, match="kernels='triton'"):
        cfg.replace(kernels="triton")
    monkeypatch.setattr(backend.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(backend, "_compute_capability", lambda: (7, 0))  # a V100: auto keeps XLA's
    assert fused_kernels(cfg) is False
    monkeypatch.setattr(backend, "_compute_capability", lambda: (9, 0))  # an H100 / H200
    assert fused_kernels(cfg) is True
    assert fused_kernels(cfg.replace(dtype="float32")) is False
    assert fused_kernels(cfg.replace(dtype="float32", kernels="pallas")) is True
    assert fused_kernels(cfg.replace(kernels="xla")) is False
    run = Config()
    run.model.kernels = "triton"
    with pytest.raises(ConfigError, match="model.kernels='triton'"):
        validate(run, 1)
    run.model.kernels = "pallas"
    validate(run, 8)
