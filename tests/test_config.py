"""Config loading, overrides, --help and every validation message (acceptance 7, config part)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxgpt.config import Config, ConfigError, from_dict, help_text, load_config, shipped_configs, validate
from jaxgpt.train import main, train
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "jaxgpt" / "configs").glob("*.yaml"), key=lambda p: p.stem)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.data.sources


def test_no_config_means_demo():
    cfg = load_config()
    assert cfg.to_dict() == load_config(ROOT / "jaxgpt" / "configs" / "demo.yaml").to_dict()


def test_shipped_configs_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_configs() == sorted(p.stem for p in CONFIGS)
    assert {"demo", "gpt2-chat", "gpt2-xl-pod"} <= set(shipped_configs())
    for path in CONFIGS:
        assert load_config(path.stem).to_dict() == load_config(path).to_dict()
    assert load_config("gpt2-chat", ["train.steps=7"]).train.steps == 7
    with pytest.raises(ConfigError, match=r"^gpt2chat: config file not found \(did you mean 'gpt2-chat'\?\); "
                                          r"shipped configs, by name: demo, demo-dpo, demo-lora, gpt2-chat"):
        load_config("gpt2chat")
    with pytest.raises(ConfigError, match="demo.yaml: config file not found"):  # a path is only a path
        load_config("demo.yaml")
    (tmp_path / "demo").write_text("train:\n  steps: 3\n")  # a file of that name is the user's own
    assert load_config("demo").train.steps == 3


def test_overrides_are_typed():
    cfg = load_config(None, ["optimizer.lr=3e-5", "train.steps=200", "model.name_or_path=null",
                             "logging.sample_prompts=[hi, 'who are you?']", "optimizer.grad_clip=null",
                             "mesh.fsdp=-1", "checkpoint.async_save=false"])
    assert cfg.optimizer.lr == 3e-5 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.steps == 200 and cfg.model.name_or_path is None and cfg.optimizer.grad_clip is None
    assert cfg.logging.sample_prompts == ["hi", "who are you?"]
    assert cfg.checkpoint.async_save is False and cfg.mesh.fsdp == -1


def test_yaml_float_without_dot(tmp_path):
    # YAML 1.1 reads 3e-5 as a string; the config still gets a float.
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 3e-5\n")
    assert load_config(path).optimizer.lr == 3e-5


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.lrr' \(did you mean 'optimizer.lr'\?\)"):
        load_config(None, ["optimizer.lrr=1e-4"])


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  step: 10\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'train.step' \(did you mean 'train.steps'\?\)$"):
        load_config(path)


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"unknown section 'optimiser' \(did you mean 'optimizer'\?\)"):
        load_config(None, ["optimiser.lr=1e-4"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", r"train.steps: expected an integer, got 'abc'"),
    ("train.steps=1.5", r"train.steps: expected an integer, got 1.5"),
    ("optimizer.lr=fast", r"optimizer.lr: expected a number, got 'fast'"),
    ("checkpoint.async_save=maybe", r"checkpoint.async_save: expected true or false, got 'maybe'"),
    ("logging.sample_prompts=5", r"logging.sample_prompts: expected a list, got 5"),
    ("model.name_or_path=3", r"model.name_or_path: expected str \| None, got 3"),
])
def test_wrong_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["model.attention=splash"], r"model.attention='splash': choose from auto, einsum, xla, cudnn, flash"),
    (["model.attention=cudnn"], r"model.attention=cudnn needs model.dtype bfloat16"),
    (["model.attention=cudnn", "model.dtype=bfloat16", "model.dropout=0.1"], r"and model.dropout=0"),
    (["model.attention=flash", "model.dropout=0.1"], r"model.attention=flash has no attention-probability dropout"),
])
def test_attention_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides), num_devices=1)
    validate(load_config(None, ["model.attention=cudnn", "model.dtype=bfloat16"]), num_devices=1)


def test_remat_setting():
    with pytest.raises(ConfigError, match=r"model.remat='some': choose from auto, none, minimal, full \(or true / false\)"):
        validate(load_config(None, ["model.remat=some"]), num_devices=1)
    for value, want in (("true", True), ("minimal", "minimal"), ("none", "none")):
        cfg = load_config(None, [f"model.remat={value}"])
        validate(cfg, num_devices=1)
        assert cfg.model.remat == want
    assert load_config(None).model.remat == "auto"


def test_loss_chunks_must_divide_seq_len():
    with pytest.raises(ConfigError, match=r"model.loss_chunks=3: must be at least 1 and divide data.seq_len=128"):
        validate(load_config(None, ["model.loss_chunks=3", "data.seq_len=128"]), num_devices=1)
    with pytest.raises(ConfigError, match=r"model.loss_chunks=0"):
        validate(load_config(None, ["model.loss_chunks=0"]), num_devices=1)
    validate(load_config(None, ["model.loss_chunks=4"]), num_devices=1)


def test_data_section_checked_by_its_owner():
    with pytest.raises(ConfigError, match=r"data.seq_len must be an integer >= 2"):
        load_config(None, ["data.seq_len=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.seqlen' \(did you mean 'data.seq_len'\?\)"):
        load_config(None, ["data.seqlen=64"])


def test_not_an_override():
    with pytest.raises(ConfigError, match=r"'train.steps' is not a key=value override"):
        load_config(None, ["train.steps"])


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 10\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}: line \d+ invalid YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_mesh_must_match_devices():
    cfg = from_dict({"mesh": {"data": 2, "fsdp": 2, "tensor": 1}})
    with pytest.raises(ConfigError, match=r"^mesh: data\*fsdp\*tensor = 2\*2\*1 = 4 does not match the 8 devices$"):
        validate(cfg, 8)
    cfg = from_dict({"mesh": {"data": 3, "fsdp": -1, "tensor": 1}})
    with pytest.raises(ConfigError, match=r"mesh.fsdp=-1: the other axes \(3 devices\) do not divide the 8 devices"):
        validate(cfg, 8)
    cfg = from_dict({"mesh": {"data": -1, "fsdp": -1, "tensor": 1}})
    with pytest.raises(ConfigError, match=r"only one axis may be -1"):
        validate(cfg, 8)
    assert validate(from_dict({"mesh": {"data": 2, "fsdp": -1, "tensor": 2}, "train": {"batch_size": 8}}), 8) == (2, 2, 2)


def test_batch_must_divide_data_parallel():
    cfg = from_dict({"mesh": {"data": 2, "fsdp": 4, "tensor": 1}, "train": {"batch_size": 12}})
    with pytest.raises(ConfigError, match=r"train.batch_size=12: the micro-batch of 12 sequences \(batch_size / "
                                          r"grad_accum\) is not divisible by the data-parallel size data\*fsdp = 2\*4 = 8"):
        validate(cfg, 8)
    cfg = from_dict({"train": {"batch_size": 8, "grad_accum": 3}})
    with pytest.raises(ConfigError, match=r"train.batch_size=8 is not divisible by train.grad_accum=3"):
        validate(cfg, 1)


def test_schedule_name_checked():
    with pytest.raises(ConfigError, match=r"schedule.name='cosin': choose from cosine, linear, constant"):
        validate(from_dict({"schedule": {"name": "cosin"}}), 1)


def test_train_validates_before_compiling(tmp_path):
    # One CPU device here: a 2-device mesh is refused before any model or data is built.
    cfg = from_dict({"mesh": {"data": 2, "fsdp": 1, "tensor": 1}, "train": {"output_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"does not match the 1 devices"):
        train(cfg)
    cfg = load_config(None, ["data.seq_len=512", "model.n_positions=128", f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.seq_len=512 exceeds the model's n_positions=128"):
        train(cfg)


def test_help_lists_keys_and_defaults(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: python -m jaxgpt.train" in out
    for line in ("optimizer.lr: float = 0.0003", "train.steps: int = 1000", "mesh.fsdp: int = -1",
                 "data.seq_len: int = 1024", "schedule.name: str = 'cosine'"):
        assert line in out
    assert out.count("\n") > 50 and help_text() in out
    keys = [line for line in out.splitlines() if line.startswith("  ") and ": " in line and " = " in line]
    assert keys and all("  # " in line for line in keys), [k for k in keys if "  # " not in k]  # each says what it does


def test_cli_error_is_one_line(capsys):
    assert main(["optimizer.lrr=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'optimizer.lr'" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_cli_config_forms(tmp_path, capsys):
    assert main(["--config"]) == 2 and "--config needs a YAML file" in capsys.readouterr().err
    assert main(["--confg", "x.yaml"]) == 2 and "unknown option '--confg'" in capsys.readouterr().err
    assert main([f"--config={tmp_path / 'missing.yaml'}"]) == 1
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def test_section_with_every_key_commented_out(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\nlogging:\n  # log_every: 5\n")
    cfg = load_config(f)
    assert cfg.train.steps == 7 and cfg.logging.log_every == Config().logging.log_every


def test_one_data_source_without_a_list():
    cfg = load_config(None, ["data.sources=chats.jsonl", "data.eval_sources={path: held.jsonl, weight: 2}"])
    assert [s.path for s in cfg.data.sources] == ["chats.jsonl"]
    assert cfg.data.eval_sources[0].path == "held.jsonl" and cfg.data.eval_sources[0].weight == 2.0


@pytest.mark.parametrize("override, message", [
    ("checkpoint.keep=0", r"checkpoint.keep=0: must be at least 1"),
    ("train.eval_batches=0", r"train.eval_batches=0: must be at least 1 \(null = the whole held-out set\)"),
    ("train.eval_every=-1", r"train.eval_every=-1: must be >= 0"),
])
def test_counts_checked_before_anything_is_built(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [override]), 1)


def test_bundled_config_runs_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    decoy = tmp_path / "jaxgpt" / "assets" / "demo_chat.jsonl"  # another copy here (an older checkout)
    decoy.parent.mkdir(parents=True)
    decoy.write_text("")
    cfg = load_config()
    for src in cfg.data.sources + cfg.data.eval_sources:  # the installed package's own files
        assert Path(src.path).is_absolute() and Path(src.path).is_file()
        assert Path(src.path).parent == ROOT / "jaxgpt" / "assets"
    assert cfg.train.output_dir == "runs/demo"  # outputs stay relative to where the command runs
    own = tmp_path / "mine.yaml"  # the user's own config: paths stay as written
    own.write_text("data:\n  sources: [jaxgpt/assets/demo_chat.jsonl]\n")
    assert load_config(own).data.sources[0].path == "jaxgpt/assets/demo_chat.jsonl"


def test_the_defaults_fit_together(tmp_path):
    """A config naming only its data trains from scratch: data.seq_len's default fits model.n_positions'."""
    from jaxgpt.config import from_dict

    from jaxgpt.setup import model_config

    cfg = from_dict({"data": {"sources": ["x.jsonl"]}, "train": {"steps": 1}})
    assert cfg.data.seq_len <= model_config(cfg, 50257).n_positions == 1024


def test_architecture_keys_ignored_when_fine_tuning_are_named(shared_data, caplog):
    from jaxgpt.config import from_dict
    from jaxgpt.setup import model_config

    folder = str(shared_data / "models" / "tiny-random-gpt2")
    cfg = from_dict({"model": {"name_or_path": folder, "n_layer": 6, "n_embd": 128}})
    with caplog.at_level("WARNING", logger="jaxgpt.train"):
        arch = model_config(cfg, 50257)
    assert arch.n_layer != 6
    assert f"model.n_layer=6 ignored: fine-tuning {folder} keeps its own architecture" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxgpt.train"):
        model_config(from_dict({"model": {"name_or_path": folder}}), 50257)
    assert "ignored" not in caplog.text
