"""DPO against TRL's ``DPOTrainer`` (1.16): the loss and every metric on one batch of pairs, for each
loss type, within 1e-5 (log-prob sums, |x| ~ 50: relative 1e-5); the gradients against PyTorch
autograd through TRL's loss within 1e-4; and 10 AdamW steps of training, per-step losses within
1e-3 relative. A tiny GPT-2 (2 layers, width 32, a byte-level vocabulary) both sides load from the same Hugging Face folder."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.config import DataConfig
from jaxgpt.data import build_preference_datasets
from jaxgpt.model import GPT2, GPT2Config
from jaxgpt.objectives import DPO
from jaxgpt.tokenizer import add_chat_template, load_tokenizer
from jaxgpt.weights import load_pretrained, save_pretrained, to_hf_tensors

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

QUESTIONS = ["Who are you?", "What is two plus two?", "Name a colour.", "Where do fish live?", "Say hello.",
             "What do cows drink?", "Is the sky green?", "Count to three.", "What is ice?", "Pick a number.",
             "Who wrote this?", "What day is it?", "Can birds fly?", "Is fire cold?", "What is a cat?",
             "Spell dog.", "How many legs has a spider?", "What is rain?", "Why sleep?", "Tell a joke."]


def _pairs() -> list[dict]:
    """20 pairs in TRL's three forms (replies of different lengths)."""
    out = []
    for i, q in enumerate(QUESTIONS):
        good, bad = f"A short true answer number {i}.", "No." if i % 2 else "Something long, wrong and rambling " * 2
        if i % 3 == 0:
            out.append({"prompt": q, "chosen": good, "rejected": bad})
        elif i % 3 == 1:
            out.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}]})
        else:
            turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": q}]
            out.append({"chosen": turns + [{"role": "assistant", "content": good}],
                        "rejected": turns + [{"role": "assistant", "content": bad}]})
    return out


def byte_tokenizer(folder):
    """GPT-2's byte-level tokenizer without merges (256 tokens + the chat tokens): GPT-2's 50k-row head
    would be most of the compute both sides."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir()
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": len(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return add_chat_template(load_tokenizer(str(folder)), "chatml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The pairs file, a policy and a (different) reference model as HF folders, the rows both read."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _pairs()))
    tok = byte_tokenizer(tmp / "tokenizer")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2)
    folders = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        folders[name] = save_pretrained(GPT2(cfg, rngs=nnx.Rngs(seed)), tmp / name, tok)
    ds, _ = build_preference_datasets(DataConfig(sources=[str(data)], seq_len=256, pack=False), tok)
    # The loss test's batch: 8 pairs packed several to a row (TRL pads each sequence to the longest).
    packed, _ = build_preference_datasets(DataConfig(sources=[str(data)], seq_len=512, max_examples=8), tok)
    return {"tmp": tmp, "data": data, "tok": tok, "ds": ds, "packed": packed, **folders}


def _trl_rows(ds):
    """Each pair (in file order) as TRL's (prompt_ids, chosen_ids, rejected_ids): the reply is the scored span (what
    follows it, ChatML's closing newline, changes no earlier log-prob)."""
    rows = []
    for k in range(ds.num_pairs):
        parts = []
        for ids, mask in (ds.segment(2 * k), ds.segment(2 * k + 1)):
            scored = np.flatnonzero(mask)
            assert (np.diff(scored) == 1).all()  # one reply: a contiguous span
            parts.append((ids[: scored[0]].tolist(), ids[scored[0]: scored[-1] + 1].tolist()))
        assert parts[0][0] == parts[1][0]
        rows.append({"prompt_ids": parts[0][0], "chosen_ids": parts[0][1], "rejected_ids": parts[1][1]})
    return rows


def _trainer(world, out, **kw):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):  # the same tokens as jaxgpt, in file order
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(world["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(world[kw.pop("reference", "reference")], dtype=torch.float32)
    args = DPOConfig(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, max_length=None,
                     logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_drop_last=False, **kw)
    return PreTokenized(model=model, ref_model=ref, args=args, processing_class=world["tok"],
                        train_dataset=Dataset.from_list(_trl_rows(world["ds"])))


@pytest.fixture(scope="module")
def trl_loss(world):
    trainer = _trainer(world, world["tmp"] / "trl")
    trainer.model.train()
    batch = trainer.data_collator(_trl_rows(world["packed"]))

    def run(loss_type: str, beta: float, label_smoothing: float = 0.0):
        trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
        trainer.beta, trainer.label_smoothing = beta, label_smoothing
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, batch, False)
        loss.backward()
        grads = {n: p.grad.detach().numpy().copy() for n, p in trainer.model.named_parameters()}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        return loss.item(), metrics, grads

    return run


@pytest.fixture(scope="module")
def jax_loss(world):
    policy, _ = load_pretrained(world["policy"])
    reference, _ = load_pretrained(world["reference"])
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    ref_params = nnx.state(reference, nnx.Param)
    ds = world["packed"]
    assert ds.num_rows < ds.num_pairs  # packed: several pairs a row
    batch = {k: jnp.asarray(v) for k, v in ds.batch(range(ds.num_rows)).items()}

    def mean_loss(params, objective):
        loss_sum, sums = objective.loss(nnx.merge(graphdef, params, rest), batch)
        return loss_sum / sums["pairs"], {k: v if k == "pairs" else v / sums["pairs"] for k, v in sums.items()}

    grad_fn = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))

    def run(loss_type: str, beta: float, label_smoothing: float = 0.0):
        (loss, metrics), grads = grad_fn(params, DPO(None, beta, loss_type, label_smoothing, reference=ref_params))
        hf = to_hf_tensors(nnx.merge(graphdef, grads, rest))
        return float(loss), {k: float(v) for k, v in metrics.items()}, hf

    return run


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0),
                                                       ("hinge", 0.3, 0.0), ("robust", 0.1, 0.2)])
def test_loss_metrics_and_gradients_equal_trl(trl_loss, jax_loss, loss_type, beta, smoothing):
    t_loss, t_metrics, t_grads = trl_loss(loss_type, beta, smoothing)
    j_loss, j_metrics, j_grads = jax_loss(loss_type, beta, smoothing)
    assert j_metrics["pairs"] == 8
    assert abs(j_loss - t_loss) <= 1e-5, (j_loss, t_loss)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert j_metrics[name] == pytest.approx(t_metrics[name], rel=1e-5, abs=1e-5), name
    assert abs(t_metrics["rewards/margins"]) > 1e-3  # the two models disagree: the rewards are not trivial
    for name, g in t_grads.items():
        key = "transformer.wte.weight" if name == "lm_head.weight" else name
        np.testing.assert_allclose(j_grads[key].reshape(g.shape), g, atol=1e-4, err_msg=name)
    assert max(np.abs(g).max() for g in t_grads.values()) > 1e-3  # gradients that could differ


def _dpo_config(world, out, **sections):
    from jaxgpt.config import from_dict

    base = {
        "model": {"name_or_path": str(world["policy"])},
        "data": {"sources": [str(world["data"])], "seq_len": 256, "pack": False, "shuffle": False},
        "objective": {"name": "dpo"},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"name": "linear", "warmup_steps": 0, "min_lr_ratio": 0.0},
        "train": {"steps": 10, "batch_size": 2, "eval_every": 0, "output_dir": str(out)},
        "checkpoint": {"enabled": False},
        "logging": {"log_every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
    }
    for name, keys in sections.items():
        base[name] = {**base[name], **keys}
    return from_dict(base)


def test_training_matches_trl(world, tmp_path):
    """10 AdamW steps (lr 1e-3, linear decay, grad clip 1, no weight decay), 2 pairs a step in file
    order, the reference the starting weights, from the same tiny GPT-2."""
    from jaxgpt.train import train

    trainer = _trainer(world, tmp_path / "trl", reference="policy", learning_rate=1e-3, lr_scheduler_type="linear",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=2,
                       max_steps=10)
    trainer.train()
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = train(_dpo_config(world, tmp_path / "jax"))
    jax_losses = [result.losses[s] for s in range(1, 11)]
    assert len(trl_losses) == 10
    np.testing.assert_allclose(jax_losses, trl_losses, rtol=1e-3)
    assert jax_losses[-1] < jax_losses[0] - 0.01  # it learnt something both sides agree on


def test_resume_is_bit_identical_with_stored_reference(world, tmp_path):
    """4 steps straight, or 2 and a resume from the step-2 checkpoint: the same parameters, bit for
    bit; the resumed run reads the reference log-probs stored with the run instead of recomputing."""
    import shutil

    from jaxgpt.checkpoint import checkpoint_dir
    from jaxgpt.reference import REFERENCE_FILE
    from jaxgpt.train import train

    keys = dict(objective={"precompute_reference": True}, train={"steps": 4},
                checkpoint={"enabled": True, "save_every": 2, "keep": 2, "async_save": False})
    straight = train(_dpo_config(world, tmp_path / "a", **keys))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(checkpoint_dir(tmp_path / "b") / "4")
    stored = np.load(tmp_path / "b" / REFERENCE_FILE)["train"]
    before = (tmp_path / "b" / REFERENCE_FILE).stat().st_mtime_ns
    resumed = train(_dpo_config(world, tmp_path / "b", **keys))
    assert resumed.step == 4 and sorted(resumed.losses) == [3, 4]
    assert (tmp_path / "b" / REFERENCE_FILE).stat().st_mtime_ns == before  # read back, not recomputed
    assert np.array_equal(np.load(tmp_path / "b" / REFERENCE_FILE)["train"], stored)
    assert [straight.losses[s] for s in (3, 4)] == [resumed.losses[s] for s in (3, 4)]
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_reference_under_lora_is_the_base_with_adapters_off(world):
    """Under LoRA the trained parameters are the adapters, so DPO's frozen copy of them (what
    ``reference.dpo_objective`` holds) scores as the base alone, TRL's reference with PEFT, however
    far the adapters have moved: within 1e-5 of the base model's log-probs."""
    from jaxgpt import lora
    from jaxgpt.objectives import sequence_logps

    ds = world["packed"]
    batch = {k: jnp.asarray(v) for k, v in ds.batch(range(ds.num_rows)).items()}
    base, _ = load_pretrained(world["policy"])
    want = sequence_logps(base, batch)[0]
    spec = lora.LoRASpec(rank=4, alpha=8.0, targets=lora.resolve_targets(["c_attn", "c_proj", "c_fc"]))
    model = lora.apply(load_pretrained(world["policy"])[0], spec)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    reference = jax.tree.map(jnp.copy, params)  # the starting adapters: lora_b is zero
    moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
    policy = nnx.merge(graphdef, moved, rest)
    got = DPO(None, reference=reference).reference_logps(policy, batch)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(sequence_logps(policy, batch)[0] - want))) > 1e-2  # the policy did move
