"""The foundation: jaxgpt's GPT-2 equals transformers' PyTorch GPT-2, and HF files round-trip.

References: transformers' GPT2LMHeadModel (PyTorch, float32, eval mode) and the
fixtures in ../shared/data made by transformers' own Flax GPT-2.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxgpt
from jaxgpt.weights import WeightsError

from conftest import shared_path

LOGIT_ATOL = 1e-4  # float32, max abs diff over all positions and the whole vocabulary

CONFIGS = {
    # name: HF config kwargs
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64),
    "odd": dict(n_layer=3, n_head=5, n_embd=80, vocab_size=1003, n_positions=96),
    "inner": dict(n_layer=2, n_head=4, n_embd=96, n_inner=200, vocab_size=517, n_positions=48, layer_norm_epsilon=1e-6),
}


def make_hf_model(seed=0, **kw) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Non-trivial LayerNorm / bias values so a swapped or transposed tensor cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    out = {}
    for name, kw in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        make_hf_model(**kw).save_pretrained(folder)
        out[name] = folder
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf_folders, name, monkeypatch):
    """Last, in chunks of at most 8 queries: the chunked attention of long sequences on a CPU."""
    from jaxgpt import model as model_lib

    folder = hf_folders[name]
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    model, cfg = jaxgpt.load_pretrained(folder)
    rng = np.random.default_rng(0)
    for batch, length, chunk in [(1, 1, None), (2, 7, None), (3, min(33, cfg.n_positions), None),
                                 (2, min(33, cfg.n_positions), 8)]:
        if chunk:
            monkeypatch.setattr(model_lib, "CHUNKED_FROM", chunk)
            monkeypatch.setattr(model_lib, "QUERY_CHUNK", chunk)
        ids = rng.integers(0, cfg.vocab_size, (batch, length))
        ours = np.asarray(model(jnp.asarray(ids)))
        assert ours.shape == (batch, length, cfg.vocab_size)
        np.testing.assert_allclose(ours, hf_logits(ref, ids), atol=LOGIT_ATOL, rtol=0)


def test_padded_vocab_matches_and_is_not_exported(hf_folders, tmp_path):
    folder = hf_folders["odd"]
    model, cfg = jaxgpt.load_pretrained(folder, vocab_multiple=128)
    assert model.wte.shape[0] == 1024 and cfg.vocab_size == 1003
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = np.arange(20).reshape(2, 10) * 37 % 1003
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(ref, ids), atol=LOGIT_ATOL, rtol=0)
    jaxgpt.save_pretrained(model, tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert tuple(back.transformer.wte.weight.shape) == (1003, 80)


def test_flax_fixture_reproduces_transformers_flax(shared_data):
    folder = shared_path("models", "tiny-random-gpt2-flax")
    ref = json.loads((folder / "reference.json").read_text())
    model, _ = jaxgpt.load_pretrained(folder)
    logits = np.asarray(model(jnp.asarray(ref["input_ids"])))
    np.testing.assert_allclose(logits, np.load(folder / "reference_logits.npy"), atol=LOGIT_ATOL, rtol=0)
    assert logits.argmax(-1).tolist() == ref["argmax_per_position"]


def test_real_hf_safetensors_checkpoint(shared_data):
    folder = shared_path("models", "tiny-random-gpt2")
    model, cfg = jaxgpt.load_pretrained(folder)
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = np.array([[15496, 995, 11, 314, 716], [464, 2068, 7586, 21831, 50256]])
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(ref, ids), atol=LOGIT_ATOL, rtol=0)


def _assert_round_trip(src_model, folder, tmp_path):
    model, _ = jaxgpt.load_pretrained(folder)
    out = jaxgpt.save_pretrained(model, tmp_path / "out")
    back, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), f"transformers reported loading problems: {info}"
    theirs, ours = src_model.state_dict(), back.state_dict()
    for key, value in theirs.items():
        assert torch.equal(value, ours[key]), f"{key} changed in the round trip"
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()  # still tied


def test_round_trip_safetensors_bit_identical(tmp_path):
    src = make_hf_model(**CONFIGS["odd"])
    src.save_pretrained(tmp_path / "src")
    _assert_round_trip(src, tmp_path / "src", tmp_path)


def test_round_trip_pytorch_bin_bit_identical(tmp_path):
    src = make_hf_model(seed=1, **CONFIGS["tiny"])
    (tmp_path / "src").mkdir()
    src.config.save_pretrained(tmp_path / "src")
    torch.save(src.state_dict(), tmp_path / "src" / "pytorch_model.bin")  # includes lm_head.weight
    _assert_round_trip(src, tmp_path / "src", tmp_path)


def test_round_trip_sharded_index_bit_identical(tmp_path):
    src = make_hf_model(seed=2, **CONFIGS["inner"])
    src.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    _assert_round_trip(src, tmp_path / "src", tmp_path)


def test_bfloat16_compute_close_to_float32(hf_folders):
    folder = hf_folders["odd"]
    m32, _ = jaxgpt.load_pretrained(folder)
    m16, cfg = jaxgpt.load_pretrained(folder, dtype="bfloat16")
    ids = jnp.asarray(np.arange(64).reshape(2, 32) * 31 % 1003)
    l32, l16 = np.asarray(m32(ids)), np.asarray(m16(ids))
    assert l16.dtype == np.float32  # logits stay float32 under bfloat16 compute
    # bfloat16 has an 8-bit mantissa: logits of size ~1 carry ~1e-2 error after 3 layers.
    assert np.abs(l16 - l32).max() < 5e-2
    assert (l16.argmax(-1) == l32.argmax(-1)).mean() > 0.95


# ----------------------------------------------------------------------------- bad input

def test_folder_without_weights(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match=r"no GPT-2 weights found \(looked for model.safetensors.index.json"):
        jaxgpt.load_pretrained(tmp_path)


def test_missing_folder():
    with pytest.raises(WeightsError, match="./no/such/folder: no such folder"):
        jaxgpt.load_pretrained("./no/such/folder")


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, no retries
    with pytest.raises(WeightsError, match="jaxgpt-tests/missing: not a local folder, and the Hugging Face Hub could not provide it"):
        jaxgpt.load_pretrained("jaxgpt-tests/missing")


def test_config_not_gpt2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(WeightsError, match=r"config.json: model_type is 'llama', but jaxgpt only loads GPT-2"):
        jaxgpt.load_pretrained(tmp_path)



@pytest.mark.parametrize("key, value", [
    ("scale_attn_weights", False), ("tie_word_embeddings", False),
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
])
def test_config_flags_jaxgpt_does_not_implement_are_refused(hf_folders, tmp_path, key, value):
    """Loading these as plain GPT-2 would quietly compute another model (the first two change
    this tiny model's logits in transformers, checked here), and export would write that model."""
    model = make_hf_model(**CONFIGS["tiny"], **{key: value})
    model.save_pretrained(tmp_path)
    if key in ("scale_attn_weights", "tie_word_embeddings"):
        ids = np.arange(12).reshape(1, 12)
        plain = transformers.GPT2LMHeadModel.from_pretrained(hf_folders["tiny"]).eval()
        assert np.abs(hf_logits(model, ids) - hf_logits(plain, ids)).max() > 1e-3
    with pytest.raises(WeightsError, match=rf"config.json: {key}={str(value).lower()} .*not supported by jaxgpt"):
        jaxgpt.load_pretrained(tmp_path)


def test_stored_head_that_differs_from_the_embedding_is_refused(hf_folders, tmp_path):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(hf_folders["tiny"], tmp_path, dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    wte = tensors["transformer.wte.weight"]
    save_file({**tensors, "lm_head.weight": wte.copy()}, str(tmp_path / "model.safetensors"))
    jaxgpt.load_pretrained(tmp_path)  # a stored copy of the tied head is fine
    save_file({**tensors, "lm_head.weight": wte + 1}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"lm_head.weight differs from wte.weight"):
        jaxgpt.load_pretrained(tmp_path)


def test_several_eos_ids_in_config(hf_folders, tmp_path):
    shutil.copytree(hf_folders["tiny"], tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = [7, 3]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, gcfg = jaxgpt.load_pretrained(tmp_path)
    assert gcfg.eos_token_id == 7

def test_wrong_shape_names_both_shapes(hf_folders, tmp_path):
    shutil.copytree(hf_folders["tiny"], tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_inner"] = 300  # the file holds 256-wide MLPs
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"tensor h.0.mlp.c_fc.weight has shape \(64, 256\), but the config expects \(64, 300\)"):
        jaxgpt.load_pretrained(tmp_path)


def test_missing_tensor(hf_folders, tmp_path):
    shutil.copytree(hf_folders["tiny"], tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layer"] = 3  # the file holds two layers
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"missing tensors: h.2.ln_1.weight"):
        jaxgpt.load_pretrained(tmp_path)


@pytest.mark.parametrize("fmt", ["model.safetensors", "flax_model.msgpack", "pytorch_model.bin"])
def test_truncated_file(hf_folders, tmp_path, fmt, shared_data):
    if fmt == "flax_model.msgpack":
        src = shared_path("models", "tiny-random-gpt2-flax")
        shutil.copy(src / "config.json", tmp_path)
        data = (src / fmt).read_bytes()
    elif fmt == "pytorch_model.bin":
        shutil.copy(hf_folders["tiny"] / "config.json", tmp_path)
        torch.save(transformers.GPT2LMHeadModel.from_pretrained(hf_folders["tiny"]).state_dict(), tmp_path / "full.bin")
        data = (tmp_path / "full.bin").read_bytes()
        (tmp_path / "full.bin").unlink()
    else:
        shutil.copy(hf_folders["tiny"] / "config.json", tmp_path)
        data = (hf_folders["tiny"] / fmt).read_bytes()
    (tmp_path / fmt).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=rf"{fmt}: cannot read .*\(truncated or corrupt"):
        jaxgpt.load_pretrained(tmp_path)


def test_last_only_logits_equal_full_forward(hf_folders):
    model, cfg = jaxgpt.load_pretrained(hf_folders["odd"])
    ids = jnp.asarray(np.arange(30).reshape(2, 15) * 13 % cfg.vocab_size)
    full, last = np.asarray(model(ids)), np.asarray(model(ids, last_only=True))
    assert last.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=0)


def test_input_longer_than_the_context_is_refused(hf_folders):
    """transformers raises on a position past n_positions; jax would clamp the lookup and reuse the last one."""
    model, cfg = jaxgpt.load_pretrained(hf_folders["tiny"])
    with pytest.raises(ValueError, match=r"input of 65 tokens is longer than the model's context, n_positions=64"):
        model(jnp.zeros((1, cfg.n_positions + 1), jnp.int32))
