"""Export: a checkpoint trained by jaxgpt becomes an HF folder that transformers uses as is.

References are transformers' own: GPT2LMHeadModel logits, the exported tokenizer's
``apply_chat_template``, ``generate`` with the exported generation_config, and
``pipeline("text-generation")``. A tiny model (2 layers, width 64, GPT-2's real
tokenizer + ChatML tokens) is trained on the bundled demo chats long enough to
end its replies with ``<|im_end|>``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt.loader import load_for_inference  # noqa: E402
from jaxgpt.config import from_dict  # noqa: E402
from jaxgpt.data import DataConfig, build_dataset  # noqa: E402
from jaxgpt.export import ExportError, export, main as export_main  # noqa: E402
from jaxgpt.sample import generate, stop_ids_for  # noqa: E402
from jaxgpt.tokenizer import IM_END, add_chat_template, load_tokenizer  # noqa: E402
from jaxgpt.train import train  # noqa: E402
from tests.conftest import optimized_xla  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "jaxgpt" / "assets" / "demo_chat.jsonl"
SEQ = 64
LOGITS_ATOL = 1e-4  # float32 both sides; logits of this tiny model are O(10)


def tiny_run(out: Path, steps: int) -> dict:
    return {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, "init_seed": 0},
        "data": {"sources": [str(DEMO)], "seq_len": SEQ, "max_examples": 96},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 5},
        "train": {"steps": steps, "batch_size": 8, "eval_every": 0, "output_dir": str(out)},
        "checkpoint": {"save_every": steps, "async_save": False},
        "logging": {"log_every": steps, "progress_bar": False, "tensorboard": False, "plot": False},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    with optimized_xla():  # 40 steps: running them, not compiling, is most of the time
        train(from_dict(tiny_run(run, steps=40)))
    hf = export(run, root / "hf", log=lambda *_: None)
    return run, hf


def test_folder_contents(exported):
    run, hf = exported
    cfg = json.loads((hf / "config.json").read_text())
    gen = json.loads((hf / "generation_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    im_end = tok.convert_tokens_to_ids(IM_END)
    # Chat tokens kept (50257 + 2), padding rows (if any) stripped: vocab == tokenizer size.
    assert cfg["vocab_size"] == len(tok) == 50259
    assert im_end == 50258
    assert gen["eos_token_id"] == [im_end, tok.eos_token_id]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert cfg["dtype"] == "float32" and "torch_dtype" not in cfg  # transformers 5 warns on torch_dtype
    # every file as readable as the umask allows (safetensors itself writes its file owner-only)
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in hf.iterdir()} == {f.name: 0o666 & ~umask for f in hf.iterdir()}


def test_logits_match_transformers(exported):
    run, hf = exported
    model, tok = load_for_inference(str(run))
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(str(hf), dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "Who made you?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = list(ids) + tok("I was made by")["input_ids"]
    ours = np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]
    with torch.no_grad():
        theirs = torch_model(torch.tensor([ids])).logits[0].numpy()
    assert theirs.shape == ours.shape == (len(ids), 50259)
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_verify_compares_full_float32_logits(exported, monkeypatch):
    """The export check runs jaxgpt's side with float32 matmul precision. On a GPU jax's default
    runs float32 matmuls in TF32: on an H200 that put the demo's logits 2.9e-3 from PyTorch's,
    past the check's 1.1e-3 tolerance, for an export that was right. (On the CPU both precisions
    are the same; what this asserts is the setting in force while jaxgpt computes.)"""
    import jax

    from jaxgpt.export import verify
    from jaxgpt.model import GPT2

    run, hf = exported
    model, tok = load_for_inference(str(run))
    seen, call = [], GPT2.__call__

    def spy(self, *args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(GPT2, "__call__", spy)
    check = verify(model, hf, tok)
    assert seen and set(seen) == {"float32"}
    assert jax.config.jax_default_matmul_precision is None  # restored afterwards
    assert check.ok


def test_without_torch_the_written_file_is_read_back(exported, tmp_path, monkeypatch):
    """Without torch (a plain ``pip install jaxgpt``) export's check runs the written safetensors in
    jaxgpt itself, says so, and still refuses a file that does not hold the model."""
    import safetensors.numpy

    from jaxgpt import export as export_module

    run, hf = exported
    monkeypatch.setattr(export_module, "torch_installed", lambda: False)
    lines = []
    export(run, tmp_path / "bf16", dtype="bfloat16", log=lines.append)
    assert [line for line in lines if line.startswith("check vs the written safetensors re-read by jaxgpt (no torch)")]
    model, tok = load_for_inference(str(run))
    assert export_module.verify(model, hf, tok).ok
    bad = tmp_path / "bad"  # the final LayerNorm's scale not the model's
    shutil.copytree(hf, bad)
    tensors = safetensors.numpy.load_file(bad / "model.safetensors")
    (name,) = [n for n in tensors if n.endswith("ln_f.weight")]
    tensors[name] = tensors[name] * 1.5
    safetensors.numpy.save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    check = export_module.verify(model, bad, tok)
    assert check.reference.startswith("the written safetensors re-read by jaxgpt") and not check.ok


def test_chat_template_renders_what_jaxgpt_trained_on(exported):
    run, hf = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    jax_tok = add_chat_template(load_tokenizer())
    data = build_dataset(DataConfig(sources=[str(DEMO)], seq_len=256, max_examples=16), jax_tok)
    assert data.stats.truncated == 0
    lines = DEMO.read_text().splitlines()
    checked = 0
    for k in range(data.num_segments):
        ids, mask = data.segment(k)
        line = int(data.segment_sources[k].rsplit(":", 1)[1])
        messages = json.loads(lines[line - 1])["messages"]
        # The whole conversation: same tokens as the training segment.
        full = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert list(full) == ids.tolist()
        # The prompt a user sends at each turn: the trained reply starts right where it ends, and only
        # the replies are trained (the first one after an untrained prompt).
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for n, i in enumerate(replies):
            prompt = hf_tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            prompt_ids = hf_tok(prompt)["input_ids"]
            assert ids[: len(prompt_ids)].tolist() == prompt_ids
            assert mask[len(prompt_ids)] == 1
            if n == 0:
                assert not mask[: len(prompt_ids)].any()
        assert mask.sum() == sum(len(hf_tok(messages[i]["content"] + IM_END)["input_ids"]) for i in replies)
        checked += 1
    assert checked == data.num_segments >= 16


def test_generation_stops_at_end_of_turn(exported):
    run, hf = exported
    model, tok = load_for_inference(str(run))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(str(hf), dtype=torch.float32).eval()
    first = json.loads(DEMO.read_text().splitlines()[0])["messages"]
    msgs = [next(m for m in first if m["role"] == "user")]
    prompt = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    im_end = hf_tok.convert_tokens_to_ids(IM_END)

    # transformers generate with the exported generation_config: greedy, stops at <|im_end|>.
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([list(prompt)]), max_new_tokens=48, do_sample=False)
    new = out[0, len(prompt):].tolist()
    assert new[-1] == im_end and im_end not in new[:-1] and len(new) < 48
    # jaxgpt's sampler agrees token for token (greedy parity).
    ours = generate(model, [list(prompt)], max_new_tokens=48, stop_ids=stop_ids_for(tok, model))[0]
    assert ours == new

    pipe = transformers.pipeline("text-generation", model=str(hf), device="cpu")
    reply = pipe(msgs, max_new_tokens=48, do_sample=False)[0]["generated_text"]
    assert reply[-1]["role"] == "assistant"
    assert reply[-1]["content"] == hf_tok.decode(new[:-1], skip_special_tokens=True)


def test_sample_and_chat_read_the_training_run(exported, capsys):
    """``--model OUTPUT_DIR`` in the sample / chat CLIs (both load through ``load_model``): the
    output_dir holds train's own config.json beside checkpoints/, and is read as the run (its
    latest step), not as an HF folder."""
    from jaxgpt.sample import load_model, main

    run, _ = exported
    assert (run / "config.json").is_file() and (run / "checkpoints").is_dir()
    model, tok = load_model(str(run))
    ref, _ = load_for_inference(str(run))
    np.testing.assert_array_equal(np.asarray(model.wte[...]), np.asarray(ref.wte[...]))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert main(["--model", str(run), "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_bfloat16_export_and_reexport(exported, tmp_path):
    run, hf = exported
    bf = export(hf, tmp_path / "bf16", dtype="bfloat16", log=lambda *_: None)  # source: an HF folder
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(str(bf))
    assert torch_model.dtype == torch.bfloat16 and json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((bf / "generation_config.json").read_text())["eos_token_id"] == [50258, 50256]


def test_refuses_to_overwrite_and_names_missing_dir(exported, tmp_path, capsys):
    run, hf = exported
    with pytest.raises(ExportError, match="already exists"):
        export(run, hf)
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "nope: no such checkpoint directory" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_push_to_hub_uploads_the_verified_folder(exported, tmp_path, monkeypatch):
    """--push-to-hub creates the repo and uploads the final folder (not the staging one), with
    everything transformers needs. The hub is faked: this machine has no network."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir()), kw["folder_path"])))
    run, hf = exported
    out = export(hf, tmp_path / "pushed", push_to_hub="me/tiny-chat", log=lambda *_: None)
    assert calls[0] == ("create", "me/tiny-chat", {"exist_ok": True})
    (_, repo, files, folder), = calls[1:]
    assert repo == "me/tiny-chat" and folder == str(out)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)


def test_push_to_hub_failure_keeps_the_folder(exported, tmp_path, monkeypatch, capsys):
    """Found on this offline machine: huggingface_hub raises httpx's ConnectError (not an OSError),
    which escaped as a traceback. Any upload failure is one line naming the saved folder."""
    import huggingface_hub

    class ConnectError(Exception):  # what huggingface_hub >= 1 raises without a network
        pass

    def offline(self, *a, **kw):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    run, hf = exported
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(hf), "--out", str(tmp_path / "o"), "--push-to-hub", "me/x", "--no-verify"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "upload failed (ConnectError" in err and f"saved at {tmp_path / 'o'}" in err and "Traceback" not in err
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_pushed_folder_comes_back_from_the_hub_whole(exported, tmp_path, monkeypatch):
    """``load_model("user/repo")`` downloads every file export writes, the chat template
    (transformers 5 keeps it in chat_template.jinja) included. The hub is faked: no network here."""
    import fnmatch
    import importlib
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import RemoteEntryNotFoundError, Response

    http = importlib.import_module(Response.__module__.split(".")[0])  # huggingface_hub's HTTP client

    from jaxgpt.chat import ChatSession
    from jaxgpt.sample import load_model

    run, hf = exported
    cache = tmp_path / "cache"

    def hf_hub_download(repo_id, filename, **kw):
        if not (hf / filename).is_file():
            url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
            raise RemoteEntryNotFoundError(f"{filename} is not in {repo_id}",
                                           response=http.Response(404, request=http.Request("GET", url)))
        return str(hf / filename)

    def snapshot_download(repo_id, allow_patterns, **kw):
        cache.mkdir()
        for f in hf.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, cache / f.name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, tok = load_model("me/tiny-chat")
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in hf.iterdir())
    assert ChatSession(model, tok).template_note is None  # the ChatML template, not the plain fallback
