"""jaxgpt.sample against references: transformers' PyTorch generate, the Flax fixture, full recomputation."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import shared_path
from jaxgpt.decoding import DECODING_DTYPES, few_rows_product, for_decoding, int8_matmul, quantize_int8
from jaxgpt.loader import LoadError
from jaxgpt.model import GPT2, GPT2Config
from jaxgpt.sample import (SampleError, bucket, decode, decode_no_hoisting, generate, load_model, prefill,
                           sample_logits, split_for_inference, stream)
from jaxgpt.weights import save_pretrained

# vocab 300 padded to 384 rows: every test also checks that padded rows change nothing
CFG = GPT2Config(vocab_size=300, n_positions=96, n_embd=64, n_layer=2, n_head=4, eos_token_id=299,
                 bos_token_id=299, vocab_multiple=128)
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [100], [3, 1, 4, 1, 5]]


def random_model(cfg=CFG, seed=0, scale=0.25):
    """A GPT-2 whose weights are large enough that greedy text does not collapse into one repeated token."""
    model = GPT2(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)  # numpy: no per-shape compilations
    nnx.update(model, jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape, np.float32), state))
    return model


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def hf_model(model, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = save_pretrained(model, tmp_path_factory.mktemp("hf"))
    return transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()


# ----------------------------------------------------------------------------- 1. PyTorch parity

@pytest.mark.parametrize("layout", ["training", "float32"])
def test_greedy_matches_transformers_generate_batched(model, hf_model, layout):
    """Both float32 layouts: the training one, and the decoding one that ``load_model`` gives on a
    CPU (kernels [out, in]; several rows take ``few_rows_product`` there)."""
    import torch

    new = 24
    decoder = model if layout == "training" else for_decoding(model, "float32")
    ours = generate(decoder, PROMPTS, max_new_tokens=new, stop_ids=[CFG.eos_token_id])
    # transformers: the same batch, left padding + attention_mask (positions from the mask).
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                                eos_token_id=CFG.eos_token_id)
    for row, (p, got) in enumerate(zip(PROMPTS, ours)):
        ref = out[row, width:].tolist()
        if CFG.eos_token_id in ref:  # HF pads finished rows; ours returns up to and including the stop
            ref = ref[: ref.index(CFG.eos_token_id) + 1]
        assert got == ref, f"row {row}"
    # the test is only meaningful if the continuations are not degenerate
    assert len({t for seq in ours for t in seq}) > 8


# ----------------------------------------------------------------------------- 2. Flax fixture

def test_flax_fixture_greedy_row0():
    folder = shared_path("models", "tiny-random-gpt2-flax")
    ref = json.loads((folder / "reference.json").read_text())
    model, _ = load_model(str(folder))
    prompt = ref["input_ids"][0]
    expected = ref["greedy_sequence_row0"][len(prompt):]
    assert generate(model, [prompt], max_new_tokens=len(expected)) == [expected]


# ----------------------------------------------------------------------------- 3. KV cache vs recomputation

def test_cached_decode_logits_equal_full_forward(model):
    """After the prefill and after every decode step, the carried next-token logits equal a
    plain causal forward over that row alone (no cache, no padding): <= 1e-4 in float32."""
    steps = 20
    width = bucket(max(map(len, PROMPTS)))
    ids = np.zeros((len(PROMPTS), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    graphdef, state = split_for_inference(model)
    carry = prefill(graphdef, state, ids, mask, cache_len=width + bucket(steps), max_new=bucket(steps))
    seen = [np.asarray(carry["logits"])]
    key = jax.random.key(3)
    stops = np.full((8,), -1, np.int32)
    for s in range(1, steps + 1):  # one step per call: exercises the donated-carry continuation too
        carry = decode(graphdef, state, carry, key, np.int32(s), np.float32(1.0), np.float32(0.9), stops,
                       greedy=False, top_k=40, use_top_p=True)
        seen.append(np.asarray(carry["logits"]))
    tokens = np.asarray(carry["tokens"])[:, :steps]
    # the reference: each row unpadded from position 0, right-padded to one width (pads come later, so
    # a causal forward never sees them)
    seqs = [p + tokens[row].tolist() for row, p in enumerate(PROMPTS)]
    full_ids = np.array([s + [0] * (width + steps - len(s)) for s in seqs], np.int32)
    full = np.asarray(model(jnp.asarray(full_ids)))
    for row, p in enumerate(PROMPTS):
        expected = full[row, len(p) - 1: len(p) + steps]
        got = np.stack([s[row] for s in seen])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"row {row}")


# ----------------------------------------------------------------------------- 4. sampling statistics

PROBS = np.array([0.02, 0.25, 0.05, 0.4, 0.1, 0.15, 0.03])  # deliberately not sorted
N_DRAWS = 40_000


def _draw(temperature=1.0, top_k=0, top_p=1.0, seed=0):
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (N_DRAWS, len(PROBS)))
    fn = jax.jit(sample_logits, static_argnames=("greedy", "top_k", "use_top_p"))
    out = fn(logits, jax.random.key(seed), greedy=False, temperature=temperature, top_k=top_k, top_p=top_p,
             use_top_p=top_p < 1.0)
    return np.asarray(out)


def _expected(temperature=1.0, allowed=None):
    p = PROBS ** (1.0 / temperature)
    if allowed is not None:
        p = np.where(np.isin(np.arange(len(p)), allowed), p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,allowed", [
    (1.0, 0, 1.0, None),
    (0.5, 0, 1.0, None),
    (2.0, 0, 1.0, None),
    (1.0, 3, 1.0, [3, 1, 5]),  # the three most likely
    (1.0, 0, 0.7, [3, 1, 5]),  # 0.4 + 0.25 < 0.7 -> the third (0.15) is still needed
    (1.0, 0, 0.38, [3]),  # the first token (0.4) alone reaches 0.38
    (2.0, 4, 0.8, None),  # all three combined: temperature, then top-k, then top-p
])
def test_sampling_distribution(temperature, top_k, top_p, allowed):
    if allowed is None and top_k:  # combined case: work the filters out on the tempered distribution
        p = _expected(temperature)
        order = np.argsort(-p)[:top_k]
        q = p[order] / p[order].sum()
        allowed = order[(np.cumsum(q) - q) < top_p].tolist()
    draws = _draw(temperature, top_k, top_p)
    counts = np.bincount(draws, minlength=len(PROBS)) / N_DRAWS
    expected = _expected(temperature, allowed)
    if allowed is not None:
        assert set(np.unique(draws)) <= set(allowed)
    # 5 standard deviations of a binomial frequency: a wrong distribution fails, noise does not
    tol = 5 * np.sqrt(expected * (1 - expected) / N_DRAWS) + 1e-4
    np.testing.assert_array_less(np.abs(counts - expected), tol)


def test_same_seed_same_sample_and_stream_equals_generate(model):
    kw = dict(max_new_tokens=20, temperature=1.2, top_k=40, top_p=0.95)
    a = generate(model, PROMPTS, seed=7, **kw)
    assert a == generate(model, PROMPTS, seed=7, **kw)
    assert a != generate(model, PROMPTS, seed=8, **kw)
    *_, chunked = stream(model, PROMPTS, seed=7, chunk=3, **kw)
    assert chunked == a
    # top_k=1 is greedy whatever the temperature
    assert generate(model, PROMPTS, max_new_tokens=20, temperature=3.0, top_k=1) == \
        generate(model, PROMPTS, max_new_tokens=20)


def test_padded_vocab_rows_never_sampled(model):
    assert CFG.padded_vocab_size > CFG.vocab_size
    out = generate(model, PROMPTS, max_new_tokens=32, temperature=50.0, seed=1)  # near-uniform draws
    tokens = np.array(out)
    assert tokens.max() < CFG.vocab_size and tokens.max() > 250


# ----------------------------------------------------------------------------- 5. per-row stop

def test_rows_stop_independently(model):
    free = generate(model, PROMPTS, max_new_tokens=20)
    # stop ids taken from the middle of rows 0 and 1: each row must end at its own first stop
    stop = {free[0][4], free[1][9]}
    expected = []
    for seq in free:
        cut = next((i for i, t in enumerate(seq) if t in stop), None)
        expected.append(seq if cut is None else seq[: cut + 1])
    got = generate(model, PROMPTS, max_new_tokens=20, stop_ids=sorted(stop))
    assert got == expected
    assert len(got[0]) <= 5 and len(got[1]) <= 10 and len({len(g) for g in got}) > 1


# ----------------------------------------------------------------------------- shapes, dtypes, errors

def test_bucketed_shapes_do_not_recompile(model):
    generate(model, PROMPTS, max_new_tokens=24)
    before = (prefill._cache_size(), decode._cache_size())
    for n in range(17, 33, 3):  # prompt lengths and budgets inside the same buckets (32, 32)
        generate(model, [list(range(1, n))] + PROMPTS[1:], max_new_tokens=n)
    assert (prefill._cache_size(), decode._cache_size()) == before


def test_bfloat16_close_to_float32(model):
    """bfloat16 compute (cfg.dtype, KV cache in bf16) on bfloat16 weights in the decoding layout."""
    bf16 = for_decoding(model)
    bf16.config = bf16.config.replace(dtype="bfloat16")
    assert bf16.wte[...].dtype == jnp.bfloat16 and model.wte[...].dtype == jnp.float32
    ref = generate(model, PROMPTS, max_new_tokens=20)
    got = generate(bf16, PROMPTS, max_new_tokens=20)
    assert [len(g) for g in got] == [20] * len(PROMPTS)
    # bf16 rounding may flip a near-tie and the continuation then diverges: require the first tokens
    assert np.mean([r[0] == g[0] for r, g in zip(ref, got)]) >= 0.75


def test_batch1_decode_loop_does_not_copy_the_kv_cache(model):
    """With a [B, H, ...] cache, XLA:CPU squeezed the size-1 batch axis at batch 1, split each
    layer's cache update into two fusions and copied the cache 4 times per token (~18% of a
    GPT-2 124M step). The cache keeps batch and heads as one axis so that cannot happen."""
    graphdef, state = split_for_inference(model)
    carry = prefill(graphdef, state, np.ones((1, 16), np.int32), np.ones((1, 16), np.int32), cache_len=32, max_new=16)
    hlo = decode.lower(graphdef, state, carry, jax.random.key(0), np.int32(16), np.float32(1), np.float32(1),
                       np.full((8,), -1, np.int32), greedy=True, top_k=0, use_top_p=False).compile().as_text()
    copies = re.findall(r"= f32\[([0-9,]+)\]\{[0-9,]+\} copy\(", hlo)
    one_layer = CFG.n_head * CFG.head_dim * 32
    big = [c for c in copies if math.prod(map(int, c.split(","))) >= one_layer]
    assert not big, f"the decode loop copies cache-sized arrays: {big}"


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=90), "exceeds the model's context"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
])
def test_bad_arguments(model, kw, match):
    with pytest.raises(SampleError, match=match):
        generate(model, PROMPTS, **kw)
    with pytest.raises(SampleError, match="outside the vocabulary"):
        generate(model, [[CFG.vocab_size]], max_new_tokens=2)
    with pytest.raises(SampleError, match=r"chunk must be >= 1 decode steps \(None = only at the end\), got 0"):
        next(stream(model, PROMPTS, max_new_tokens=4, chunk=0))


# ----------------------------------------------------------------------------- the decoding layout

@pytest.fixture(scope="module", params=DECODING_DTYPES)
def decoding(model, request):
    return for_decoding(model, request.param)


def test_for_decoding_layout(model, decoding):
    """[out, in] kernels in bfloat16, or int8 with a scale per output row (the tied ``wte`` too;
    w8a8 also keeps their int32 row sums); the other parameters in bfloat16 (w8a8: as they were);
    the float32 model is left as it was."""
    e, i = CFG.n_embd, CFG.inner_dim
    blk, ref = decoding.h[0], model.h[0]
    assert blk.attn.c_attn.kernel.shape == (3 * e, e) and blk.mlp.c_fc.kernel.shape == (i, e)
    assert blk.mlp.c_proj.kernel.shape == (e, i) and blk.attn.c_proj.kernel.shape == (e, e)
    want = ref.mlp.c_fc.kernel[...].T
    if decoding.decoding_layout == "bfloat16":
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(decoding, nnx.Param)))
        np.testing.assert_array_equal(np.asarray(blk.mlp.c_fc.kernel[...]), np.asarray(want.astype(jnp.bfloat16)))
    else:
        assert blk.mlp.c_fc.kernel.dtype == decoding.wte.dtype == jnp.int8
        assert blk.mlp.c_fc.scale.shape == (i,) and decoding.head_layout.scale.shape == (CFG.padded_vocab_size,)
        rest = jnp.float32 if decoding.decoding_layout == "w8a8" else jnp.bfloat16
        assert blk.ln_1.scale.dtype == decoding.wpe.dtype == blk.mlp.c_fc.bias.dtype == rest
        if decoding.decoding_layout == "w8a8":
            np.testing.assert_array_equal(np.asarray(blk.mlp.c_fc.kernel_sum[...]),
                                          np.asarray(blk.mlp.c_fc.kernel[...], np.int64).sum(1))
            assert decoding.head_layout.kernel_sum.shape == (CFG.padded_vocab_size,)
        else:
            assert blk.mlp.c_fc.kernel_sum is None
        back = np.asarray(blk.mlp.c_fc.kernel[...], np.float32) * np.asarray(blk.mlp.c_fc.scale[...])[:, None]
        assert np.abs(back - np.asarray(want)).max() <= np.asarray(blk.mlp.c_fc.scale[...]).max() / 2 + 1e-7
    assert ref.mlp.c_fc.kernel[...].dtype == jnp.float32 and not model.decoding_layout
    with pytest.raises(ValueError, match="already in the decoding layout"):
        for_decoding(decoding)
    with pytest.raises(ValueError, match="choose from"):
        for_decoding(model, "float16")


@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_float32_decoding_layout_gives_the_same_logits(model, rows):
    """``for_decoding(model, "float32")``: the same float32 numbers with the kernels stored [out, in].
    One row, a few rows (``few_rows_product`` on a CPU) and many rows (40 > its 32) give the
    training layout's logits up to float32 summation order (1e-5 of the largest logit)."""
    f32 = for_decoding(model, "float32")
    assert f32.decoding_layout == "float32" and f32.config.param_dtype == "float32"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(f32, nnx.Param)))
    np.testing.assert_array_equal(np.asarray(f32.h[0].mlp.c_fc.kernel[...]), np.asarray(model.h[0].mlp.c_fc.kernel[...]).T)
    ids = jnp.asarray(np.random.default_rng(rows).integers(0, CFG.vocab_size, (rows, 1)))
    ref, got = model(ids), f32(ids)
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("rows", [2, 8, 32])
def test_few_rows_product(rows):
    """``x @ kernel.T`` against float64 numpy, and computed in the orientation that XLA:CPU streams
    the weights in: the compiled program's product is [out, rows] (without the barrier, XLA
    folds the transpose back into a [rows, out] product, 1.8x slower for GPT-2's head)."""
    rng = np.random.default_rng(rows)
    x, w = rng.normal(size=(rows, 64)).astype(np.float32), rng.normal(size=(96, 64)).astype(np.float32)
    got = few_rows_product(jnp.asarray(x), jnp.asarray(w))
    assert got.shape == (rows, 96)
    np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    hlo = jax.jit(few_rows_product).lower(jnp.asarray(x), jnp.asarray(w)).compile().as_text()
    assert re.search(rf"f32\[96,{rows}\]\{{[0-9,]+\}} dot\(", hlo), hlo


def test_quantize_int8():
    """Symmetric per-row int8: the largest weight of each row maps to +-127, every weight is
    within half a step, and an all-zero row (vocabulary padding) gets a usable scale."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 64)), jnp.float32).at[3].set(0.0)
    q, scale = quantize_int8(w)
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (5,)
    assert np.all(np.abs(np.asarray(q)).max(1)[[0, 1, 2, 4]] == 127) and not np.asarray(q[3]).any()
    err = np.abs(np.asarray(q, np.float32) * np.asarray(scale)[:, None] - np.asarray(w))
    assert np.all(err <= np.asarray(scale)[:, None] / 2 + 1e-7) and np.isfinite(np.asarray(scale)).all()


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_int8_matmul(rows):
    """The w8a8 product against float64 numpy on the same int8 weights. The activations are
    quantised per row over their range (widened to hold 0): each off by at most half a step
    (range / 255 / 2), so the product is off by at most half a step times sum|w| per output.
    Rows of all-positive (GELU-like), mixed and all-zero values; one row takes the padded path."""
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.normal(size=(48, 96)), jnp.float32)
    kernel, scale = quantize_int8(w)
    ksum = jnp.asarray(np.asarray(kernel, np.int32).sum(1))
    x = rng.normal(size=(rows, 96)).astype(np.float32) * np.linspace(0.1, 10, rows)[:, None]
    x[0] = np.abs(x[0]) + 0.5
    if rows > 2:
        x[2] = 0.0
    got = np.asarray(int8_matmul(jnp.asarray(x), kernel, scale, ksum))
    w_deq = np.asarray(kernel, np.float64) * np.asarray(scale, np.float64)[:, None]
    want = x.astype(np.float64) @ w_deq.T
    step = (np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0)) / 255
    bound = step[:, None] / 2 * np.abs(w_deq).sum(1)[None] * 1.001 + 1e-5
    assert got.shape == (rows, 48) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()
    assert np.abs(got - want).max() > 0  # really quantised, not a float product
    if rows > 2:
        assert not got[2].any()


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_for_decoding_logits_close_to_float32(model, decoding, rows):
    """Both products of ``linear`` (one row; several rows): bf16 weights cost ~2^-8 relative,
    int8 ones (a step of 1/127 of each row's largest weight) about as much on these logits, and
    w8a8's int8 activations (a step of 1/255 of each row's range) add about as much again."""
    ids = jnp.asarray(np.random.default_rng(rows).integers(0, CFG.vocab_size, (rows, 1)))
    ref, got = model(ids), decoding(ids)
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(got - ref).max()) < 0.03 * scale


def test_for_decoding_generates_like_float32(model, decoding):
    """Greedy decoding with bf16 / int8 weights follows float32's tokens (a near-tie may flip
    late ones); the loop is compiled without hoisting, and reads the weights as stored (nothing
    converts them to float32 outside the loop)."""
    ref = generate(model, PROMPTS, max_new_tokens=16)
    before = decode_no_hoisting._cache_size()
    got = generate(decoding, PROMPTS, max_new_tokens=16)
    one = generate(decoding, PROMPTS[:1], max_new_tokens=16)
    assert decode_no_hoisting._cache_size() == before + 2  # batch 4 and batch 1
    assert one[0] == got[0]
    agree = np.mean([np.mean(np.array(r[:8]) == np.array(g[:8])) for r, g in zip(ref, got)])
    assert agree >= 0.9, (ref, got)

    graphdef, state = split_for_inference(decoding)
    carry = prefill(graphdef, state, np.ones((1, 16), np.int32), np.ones((1, 16), np.int32), cache_len=32, max_new=16)
    hlo = decode_no_hoisting.lower(graphdef, state, carry, jax.random.key(0), np.int32(16), np.float32(1),
                                   np.float32(1), np.full((8,), -1, np.int32), greedy=True, top_k=0,
                                   use_top_p=False).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    e, i = CFG.n_embd, CFG.inner_dim
    assert f"f32[{i},{e}]" not in entry and f"f32[{e},{i}]" not in entry, "a float32 copy of the MLP weights was hoisted"


def test_decoding_layout_cannot_be_saved(decoding, tmp_path):
    with pytest.raises(ValueError, match="decoding layout"):
        save_pretrained(decoding, tmp_path / "x")


def test_load_model_gives_the_decoding_layout(model, tmp_path):
    folder = save_pretrained(model, tmp_path / "hf")
    loaded, _ = load_model(str(folder), param_dtype="bfloat16")
    assert loaded.decoding_layout == "bfloat16" and loaded.config.param_dtype == "bfloat16"
    assert loaded.h[0].mlp.c_fc.kernel.shape == (CFG.inner_dim, CFG.n_embd)
    # int8 is quantised from the float32 weights, not from a bfloat16 copy
    q, _ = load_model(str(folder), param_dtype="int8")
    assert q.decoding_layout == "int8"
    v = CFG.vocab_size  # the saved folder has no vocabulary padding
    np.testing.assert_array_equal(np.asarray(q.wte[...][:v]), np.asarray(quantize_int8(model.wte[...])[0][:v]))
    w8a8, _ = load_model(str(folder), param_dtype="w8a8")  # the same int8 weights, float32 elsewhere
    assert w8a8.decoding_layout == "w8a8" and w8a8.config.param_dtype == "float32"
    np.testing.assert_array_equal(np.asarray(w8a8.wte[...]), np.asarray(q.wte[...]))
    plain, _ = load_model(str(folder))  # float32: the same weights, stored [out, in] on a CPU
    assert plain.decoding_layout == ("float32" if jax.default_backend() == "cpu" else None)
    assert plain.config.param_dtype == "float32"
    with pytest.raises(LoadError, match="param_dtype 'int4'"):  # jaxgpt.loader's check
        load_model(str(folder), param_dtype="int4")


# ----------------------------------------------------------------------------- sharded parameters

SHARDED_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax
from flax import nnx
from jaxgpt.decoding import for_decoding
from jaxgpt.model import GPT2
from jaxgpt.sample import generate
from jaxgpt.sharding import make_mesh, make_place
from jaxgpt.weights import config_from_hf, load_pretrained

folder, prompts, kw, expected, expected_int8 = sys.argv[1], *map(json.loads, sys.argv[2:])
cfg = config_from_hf(folder + "/config.json")
mesh = make_mesh((1, 2, 4))  # fsdp 2 x tensor 4
abstract = nnx.state(nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0))), nnx.Param)
sharded, _ = load_pretrained(folder, place=make_place(abstract, mesh))
assert len(sharded.wte[...].sharding.device_set) == 8
assert sharded.h[0].attn.c_attn.kernel[...].sharding.spec != jax.sharding.PartitionSpec()
got = generate(sharded, prompts, **kw)
assert got == expected, (got, expected)
int8 = for_decoding(sharded, "int8")  # quantised where the weights lie, kept sharded
assert int8.h[0].mlp.c_fc.kernel[...].sharding.spec != jax.sharding.PartitionSpec()
got = generate(int8, prompts, max_new_tokens=12)
assert got == expected_int8, (got, expected_int8)
print("SHARDED_OK")
"""


def test_sharded_params_generate_the_same(model, tmp_path):
    """Parameters sharded over an 8-device CPU mesh (fsdp x tensor) give the unsharded tokens,
    sampling with top-k and top-p (a sort over vocab-sharded logits); so do int8 decoding
    weights made from the sharded parameters (greedy)."""
    import subprocess
    import sys

    from conftest import ROOT

    kw = dict(max_new_tokens=20, temperature=1.2, top_k=40, top_p=0.95, seed=7)
    expected = generate(model, PROMPTS, **kw)
    expected_int8 = generate(for_decoding(model, "int8"), PROMPTS, max_new_tokens=12)
    folder = save_pretrained(model, tmp_path / "hf")  # vocab padding is a load-time choice: 384 -> 300 rows
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(folder), *map(json.dumps, (PROMPTS, kw, expected, expected_int8))],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]


def test_a_flat_token_list_is_refused_clearly(model):
    with pytest.raises(SampleError, match=r"prompts must be a batch: a list of token-id lists"):
        generate(model, [1, 2, 3], max_new_tokens=2)


def test_a_mistyped_local_run_folder_names_what_is_there(tmp_path, monkeypatch):
    """runs/gpt2-chta could be a hub id: the hub is asked (offline here), then the error lists runs/;
    ./x, /x and a/b/c can only be folders: no hub lookup."""
    import huggingface_hub.constants

    from jaxgpt.weights import WeightsError, resolve

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "runs" / "gpt2-chat").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"^runs/gpt2-chta: no such folder \(in runs/: gpt2-chat\), and the "
                                          r"Hugging Face Hub could not provide it either"):
        resolve("runs/gpt2-chta")
    for path in ("./runs/gpt2-chta", str(tmp_path / "runs" / "x"), "runs/a/b"):
        with pytest.raises(WeightsError, match=r": no such folder"):
            resolve(path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/runs/gpt2-chat") == tmp_path / "runs" / "gpt2-chat"  # ~ is expanded
