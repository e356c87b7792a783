"""LoRA against PEFT + PyTorch: training parity, export to a PEFT folder and a merged model, PEFT-made
adapters loaded by jaxgpt, and the errors for what jaxgpt cannot apply.

Tiny GPT-2s (2 layers, width 32; an odd one of 5 heads, width 80, vocabulary 1003). Tolerances:
per-step losses 1e-3 relative and final adapters 1e-4 absolute (20 AdamW steps); logits 1e-4
(adapter folders) and 1e-5 (merged models) absolute.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgpt.config import ConfigError, from_dict
from tests.conftest import ROOT

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers import GPT2Config as HFConfig, GPT2LMHeadModel  # noqa: E402

DEMO = str(ROOT / "jaxgpt" / "assets" / "demo_chat.jsonl")
QUIET = {"progress_bar": False, "tensorboard": False, "plot": False, "log_every": 1}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch's tiny steps run 3x faster on one thread beside jax's on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny GPT-2 with GPT-2's vocabulary (the data goes through the real tokenizer)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "hf"
    GPT2LMHeadModel(HFConfig(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(folder)
    return folder


def lora_config(base, out, **sections):
    raw = {"model": {"name_or_path": str(base)},
           "data": {"sources": [DEMO], "seq_len": 32, "max_examples": 32},
           "optimizer": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": None},
           "schedule": {"name": "constant"}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
           "train": {"steps": 20, "batch_size": 2, "eval_every": 0, "output_dir": str(out)},
           "checkpoint": {"enabled": False}, "logging": dict(QUIET), "lora": {"rank": 4, "alpha": 8}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def torch_batch(b):
    """Torch inputs of a jaxgpt batch: packed rows attend within their own segment."""
    b = {k: torch.from_numpy(np.asarray(v)).long() for k, v in b.items()}
    seg = b["segment_ids"]
    causal = torch.tril(torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool))
    allowed = causal & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    allowed |= torch.eye(seg.shape[1], dtype=torch.bool)  # pad rows attend to themselves (never trained)
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return b, dict(input_ids=b["input_ids"], position_ids=b["positions"], attention_mask=bias[:, None])


def peft_model_of(base, tensors, config):
    """PEFT's LoRA on a transformers GPT-2, its adapters set to ``tensors`` (PEFT-named)."""
    model = GPT2LMHeadModel.from_pretrained(base, attn_implementation="eager").float()
    pcfg = peft.LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
                           fan_in_fan_out=True, lora_dropout=0.0)
    model = peft.get_peft_model(model, pcfg)
    result = peft.set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in tensors.items()})
    assert not result.unexpected_keys
    return model


# ----------------------------------------------------------------------------- training parity

def test_parity_with_peft_adamw(base_dir, tmp_path):
    """20 AdamW steps of jaxgpt's LoRA and of PEFT + PyTorch, from the same adapter init on the same
    batches: per-step losses within 1e-3 relative, final adapters within 1e-4. The optimizer state
    holds two moments of the adapters and nothing of the base."""
    from jaxgpt import sharding
    from jaxgpt.peft_io import to_peft
    from jaxgpt.setup import prepare
    from jaxgpt.step import make_train_step, place_batch

    cfg = lora_config(base_dir, tmp_path / "run", data={"template": "plain"})
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    s = prepare(cfg, mesh)
    params = s.state["params"]
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert names and all(n.split(".")[-1] in ("lora_a", "lora_b") for n in names), names
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    moments = sum(x.nbytes for x in jax.tree.leaves(s.state["opt_state"]) if x.ndim)
    assert moments == 2 * adapter_bytes  # AdamW's mu and nu, for the adapters only

    model = nnx.merge(s.graphdef, params, s.rest)
    for lin in (model.h[0].attn.c_attn, model.h[1].mlp.c_proj):  # PEFT's init: A kaiming-uniform, B zeros
        a, bound = np.asarray(lin.lora_a[...]), 1 / np.sqrt(lin.base.n_in)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound and not np.asarray(lin.lora_b[...]).any()
    tensors, config = to_peft(model)
    ref = peft_model_of(base_dir, tensors, config).train()
    trainable = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) * 4 == adapter_bytes
    o = cfg.optimizer
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)

    step = make_train_step(s.graphdef, s.rest, s.tx, objective=s.objective, mesh=mesh)
    state, rng = s.state, jax.random.wrap_key_data(s.rng)
    ours, theirs = [], []
    for i in range(20):
        batch = next(s.train_data)
        state, m = step(state, place_batch([batch], mesh, 2), jax.random.key_data(jax.random.fold_in(rng, i)))
        ours.append(float(m["loss"]))
        b, inputs = torch_batch(batch)
        logits = ref(**inputs).logits
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="none")
        mask = b["loss_mask"].float().flatten()
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)
    assert ours[-1] < ours[0] - 0.01  # it learned something, on both sides
    final, _ = to_peft(nnx.merge(s.graphdef, state["params"], s.rest))
    got = peft.get_peft_model_state_dict(ref, save_embedding_layers=False)
    for key, value in final.items():
        np.testing.assert_allclose(value, got[key].detach().numpy(), rtol=0, atol=1e-4, err_msg=key)
    assert any(np.abs(v).max() > 1e-3 for k, v in final.items() if "lora_B" in k)


# ----------------------------------------------------------------------------- a run: resume, export

@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
    """A 4-step LoRA chat run (ChatML tokens added to the base: their rows train) with dropout,
    checkpoints at 2 and 4; and a copy resumed from step 2."""
    from jaxgpt.train import train

    tmp = tmp_path_factory.mktemp("lora_run")
    cfg = lora_config(base_dir, tmp / "a", optimizer={"lr": 1e-2}, train={"steps": 4},
                      checkpoint={"enabled": True, "save_every": 2, "async_save": False},
                      lora={"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["c_attn", "c_proj", "c_fc"]})
    full = train(cfg)
    shutil.copytree(tmp / "a", tmp / "b")
    shutil.rmtree(tmp / "b" / "checkpoints" / "4")
    cfg_b = lora_config(base_dir, tmp / "b", optimizer={"lr": 1e-2}, train={"steps": 4},
                        checkpoint={"enabled": True, "save_every": 2, "async_save": False},
                        lora={"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["c_attn", "c_proj", "c_fc"]})
    resumed = train(cfg_b)
    return tmp, full, resumed


def test_resume_is_bit_identical_and_the_checkpoint_holds_the_adapter(lora_run, base_dir):
    tmp, full, resumed = lora_run
    assert [resumed.losses[k] for k in (3, 4)] == [full.losses[k] for k in (3, 4)]
    saved = json.loads((tmp / "a" / "config.json").read_text())["lora_base"]
    assert saved["path"] == str(base_dir.resolve()) and len(saved["fingerprint"]) == 64
    step_params = tmp / "a" / "checkpoints" / "4" / "params"
    size = sum(f.stat().st_size for f in step_params.rglob("*") if f.is_file())
    assert size < 200_000  # the adapters and two token rows, not the 1.7M-parameter base


def test_changed_base_is_refused(lora_run, base_dir, tmp_path):
    from jaxgpt.loader import load_model

    tmp, _, _ = lora_run
    moved = tmp_path / "base"
    shutil.copytree(base_dir, moved)
    run = tmp_path / "run"
    shutil.copytree(tmp / "a", run)
    config = run / "checkpoints" / "4" / "config"
    for f in config.rglob("*"):  # point the run at the copy, then change the copy
        if f.is_file() and str(base_dir.resolve()) in f.read_text():
            f.write_text(f.read_text().replace(str(base_dir.resolve()), str(moved)))
    load_model(run, decoding=False)
    cfg = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-6}))
    with pytest.raises(ValueError, match=r"base model .* changed since the run saved it"):
        load_model(run, decoding=False)


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
    from jaxgpt.export import export

    tmp, _, _ = lora_run
    out = tmp_path_factory.mktemp("exported")
    export(tmp / "a", out / "peft", log=lambda *_: None)
    export(tmp / "a", out / "merged", merge=True, verify_logits=False, log=lambda *_: None)  # compared below
    return tmp / "a", out / "peft", out / "merged"


def test_peft_folder_loads_in_peft_with_jaxgpt_logits(exported, base_dir):
    """The folder alone plus the public base, resized to the tokenizer: PeftModel's logits = jaxgpt's within 1e-4."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from jaxgpt.export import _jax_logits
    from jaxgpt.loader import load_model

    run, folder, _ = exported
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["trainable_token_indices"] == [50257, 50258]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and len(tok) == 50259
    base = GPT2LMHeadModel.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, folder).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    assert 50257 in ids
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    ours = _jax_logits(load_model(run, decoding=False).model)(ids)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert np.abs(ours - _base_logits(base_dir, ids)).max() > 1e-3  # the adapters do something


def _base_logits(base_dir, ids):
    with torch.no_grad():
        base = GPT2LMHeadModel.from_pretrained(base_dir).eval()
        base.resize_token_embeddings(50259)
        return base(torch.tensor([ids])).logits[0].numpy()


def test_merged_export_equals_merge_and_unload(exported, base_dir):
    from peft import PeftModel

    _, folder, merged_dir = exported
    base = GPT2LMHeadModel.from_pretrained(base_dir)
    base.resize_token_embeddings(50259)
    reference = PeftModel.from_pretrained(base, folder).merge_and_unload().eval()
    merged = GPT2LMHeadModel.from_pretrained(merged_dir).eval()
    ids = torch.tensor([[50257, 11, 50258, 318, 257, 1332, 13]])
    with torch.no_grad():
        np.testing.assert_allclose(merged(ids).logits.numpy(), reference(ids).logits.numpy(), rtol=0, atol=1e-5)


def test_export_check_catches_a_missing_prefix(exported, monkeypatch):
    """Keys without ``base_model.model.`` load in PEFT with a warning and zero adapters: the export's
    check fails, with torch (PEFT did not load the tensor) and without (jaxgpt's reader refuses the key)."""
    from safetensors.numpy import load_file, save_file

    from jaxgpt import export as ex
    from jaxgpt.loader import load_model
    from jaxgpt.lora import LoRAError

    run, folder, _ = exported
    loaded = load_model(run, decoding=False, merge=False)
    model, tok = loaded.model, loaded.tokenizer
    broken = folder.parent / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model.") if "lora_" in k else k: v for k, v in tensors.items()},
              str(broken / "adapter_model.safetensors"))
    with pytest.raises(ex.ExportError, match="PEFT did not load tensor transformer.h.0.attn.c_attn.lora_A.weight"):
        ex.verify_adapter(model, broken, tok)
    monkeypatch.setattr(ex, "torch_installed", lambda: False)
    with pytest.raises(LoRAError, match="tensor 'transformer.h.0.attn.c_attn.lora_A.weight' is not a GPT-2 LoRA"):
        ex.verify_adapter(model, broken, tok)
    from jaxgpt.lora import adapter_tensors
    from jaxgpt.peft_io import load_adapter
    from jaxgpt.weights import load_pretrained

    reread = adapter_tensors(load_adapter(load_pretrained(model.lora.base_path)[0], folder, model.config.vocab_size))
    for path, value in adapter_tensors(model).items():  # the good folder, as the check without torch reads it
        if path != "wte.added":
            np.testing.assert_array_equal(np.asarray(reread[path]), np.asarray(value), err_msg=path)


# ----------------------------------------------------------------------------- PEFT-made adapters

@pytest.fixture(scope="module")
def odd_adapter(tmp_path_factory):
    """PEFT's own adapter on a GPT-2 of odd sizes: 5 heads, width 80, vocabulary 1003 (+2 trainable
    tokens), two of the four projections, rank-stabilised scaling, random B."""
    tmp = tmp_path_factory.mktemp("odd")
    torch.manual_seed(1)
    base = GPT2LMHeadModel(HFConfig(vocab_size=1003, n_positions=32, n_embd=80, n_layer=2, n_head=5,
                                    bos_token_id=0, eos_token_id=0))
    base.save_pretrained(tmp / "base")
    base.resize_token_embeddings(1005, mean_resizing=False)
    pcfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                           use_rslora=True, trainable_token_indices=[1003, 1004])
    model = peft.get_peft_model(base, pcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp / "adapter")
    return tmp / "base", tmp / "adapter", model.eval()


def test_peft_made_adapter_loads_with_peft_logits(odd_adapter):
    import jaxgpt
    from jaxgpt.export import _jax_logits

    base, adapter, reference = odd_adapter
    model, cfg = jaxgpt.load_pretrained(base, adapter=adapter)
    assert model.lora.targets == ("attn.c_attn", "mlp.c_proj") and cfg.vocab_size == 1005
    assert model.lora.scaling == pytest.approx(5 / np.sqrt(3))
    ids = [1003, 7, 1004, 500, 1002, 3, 9]
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_jax_logits(model)(ids), theirs, rtol=0, atol=1e-4)
    from jaxgpt.lora import merged

    np.testing.assert_allclose(_jax_logits(merged(model))(ids), theirs, rtol=0, atol=1e-4)


def _edited(adapter, tmp_path, config=None, tensors=None):
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "edited"
    shutil.copytree(adapter, out)
    if config is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps(config(cfg)))
    if tensors is not None:
        save_file(tensors(load_file(str(out / "adapter_model.safetensors"))), str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("edit, message", [
    (dict(config=lambda c: {**c, "use_dora": True}), r"adapter_config.json: use_dora=True is not supported"),
    (dict(config=lambda c: {**c, "auto_mapping": {"base_model_class": "LlamaForCausalLM"}}),
     r"adapter_config.json: an adapter for LlamaForCausalLM; jaxgpt adapts GPT-2 only"),
    (dict(config=lambda c: {k: v for k, v in c.items() if k != "lora_alpha"}),
     r"adapter_config.json: lora_alpha is missing"),
    (dict(tensors=lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((3, 8))}),
     r"adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' is not"),
])
def test_unusable_adapters_are_refused_naming_file_and_key(odd_adapter, tmp_path, edit, message):
    import jaxgpt
    from jaxgpt.lora import LoRAError

    base, adapter, _ = odd_adapter
    with pytest.raises(LoRAError, match=message) as e:
        jaxgpt.load_pretrained(base, adapter=_edited(adapter, tmp_path, **edit))
    assert "\n" not in str(e.value)


def test_adapter_for_another_size_is_refused(odd_adapter, base_dir):
    import jaxgpt
    from jaxgpt.lora import LoRAError

    _, adapter, _ = odd_adapter
    with pytest.raises(LoRAError, match=r"adapter_model.safetensors: transformer.h.0.attn.c_attn: lora_A \(3, 80\)"
                                        r" / lora_B \(240, 3\), but this base needs \(3, 32\)"):
        jaxgpt.load_pretrained(base_dir, adapter=adapter)


# ----------------------------------------------------------------------------- config and model

@pytest.mark.parametrize("lora, message", [
    ({"rank": 0, "targets": ["c_attn"]}, r"lora.targets=\['c_attn'\] with lora.rank=0: set lora.rank > 0"),
    ({"rank": -1}, r"lora.rank=-1: must be >= 0"),
    ({"rank": 4, "targets": ["c_atn"]}, r"lora.targets: unknown target 'c_atn'; choose from c_attn, c_proj"),
    ({"rank": 4, "alpha": 0}, r"lora.alpha=0"),
    ({"rank": 4, "base_dtype": "int8"}, r"lora.base_dtype='int8': choose from float32, bfloat16"),
])
def test_config_errors_name_the_key(tmp_path, lora, message):
    with pytest.raises(ConfigError, match=message) as e:
        lora_config("gpt2", tmp_path, lora=lora)
    assert "\n" not in str(e.value)


def test_from_scratch_lora_is_refused(tmp_path):
    from jaxgpt import sharding
    from jaxgpt.setup import prepare

    cfg = lora_config("x", tmp_path, model={"name_or_path": None, "n_layer": 1, "n_head": 2, "n_embd": 16})
    with pytest.raises(ConfigError, match=r"lora.rank=4: LoRA adapts a pretrained model; set model.name_or_path"):
        prepare(cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))


def test_adapters_carry_the_axes_of_their_weights_and_a_bf16_base():
    import jax.numpy as jnp

    from jaxgpt.lora import Frozen, LoRASpec, apply
    from jaxgpt.model import GPT2, GPT2Config

    model = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 4, 16))
    before = np.asarray(x @ model.h[0].attn.c_attn.kernel[...].reshape(16, -1))
    apply(model, LoRASpec(2, 4.0, ("attn.c_attn", "attn.c_proj"), base_dtype="bfloat16"))
    attn = model.h[0].attn
    assert attn.c_attn.lora_a.get_metadata()["axes"] == ("embed", None)
    assert attn.c_attn.lora_b.get_metadata()["axes"] == (None, None, "heads", "head_dim")
    assert attn.c_proj.lora_a.get_metadata()["axes"] == ("heads", "head_dim", None)
    assert attn.c_proj.lora_b.get_metadata()["axes"] == (None, "embed")
    assert isinstance(attn.c_attn.base.kernel, Frozen) and attn.c_attn.base.kernel.dtype == jnp.bfloat16
    assert isinstance(model.wte, Frozen) and type(model.h[0].mlp.c_fc.kernel) is Frozen
    assert model.wte.dtype == jnp.bfloat16 and model.ln_f.scale.dtype == attn.c_attn.base.bias.dtype == jnp.float32
    after = model.h[0].attn.c_attn.product(x)  # B = 0: the base's product, its weights rounded to bfloat16
    np.testing.assert_allclose(np.asarray(after).reshape(before.shape), before, rtol=0.02, atol=0.02)


def test_resume_onto_another_base_is_refused():
    from types import SimpleNamespace

    from jaxgpt.setup import Setup

    here = {"name": "gpt2", "path": "/models/gpt2", "fingerprint": "a" * 64}
    s = SimpleNamespace(lora_base=here, cfg=SimpleNamespace(model=SimpleNamespace(name_or_path="gpt2")))
    for saved, why in (({**here, "fingerprint": "b" * 64}, "changed since the checkpoint was saved"),
                       ({**here, "path": "/models/other"}, r"is not the base the checkpoint's adapter was trained on")):
        with pytest.raises(ConfigError, match=f"model.name_or_path=gpt2: {why}"):
            Setup.resume(s, {"config": {"lora_base": saved}})
