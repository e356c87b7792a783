"""Bad input from users: non-finite or out-of-range numbers, bytes that are not UTF-8, an export
aimed at its own training run. Each is refused with one line naming the key, flag or folder (or,
for text, read with U+FFFD in place of the bad bytes), and nothing already saved is lost.

Tiny models: a random 2-layer GPT-2 saved as an HF folder, and one 2-step training run per module.
"""

from __future__ import annotations

import io
import re
import shutil
import sys
from pathlib import Path

import pytest
from flax import nnx

from jaxgpt.config import ConfigError, load_config, validate
from jaxgpt.data import DataConfig, DataError
from jaxgpt.inputs import SAMPLING, Range, readable, undecodable
from jaxgpt.model import GPT2, GPT2Config
from jaxgpt.sample import SampleError, generate
from jaxgpt.tokenizer import add_chat_template, load_tokenizer
from jaxgpt.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "jaxgpt" / "assets" / "demo_chat.jsonl")
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random tiny GPT-2 with the ChatML tokenizer, saved as an HF folder (nothing trained)."""
    tok = add_chat_template(load_tokenizer())
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return save_pretrained(GPT2(cfg, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("hf"), tok)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A training run folder: 2 steps of a tiny model, one checkpoint, metrics.jsonl."""
    from jaxgpt.config import from_dict
    from jaxgpt.train import train

    out = tmp_path_factory.mktemp("faults") / "run"
    train(from_dict({
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64},
        "data": {"sources": [DEMO], "seq_len": 64, "max_examples": 16},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 0, "output_dir": str(out)},
        "checkpoint": {"save_every": 2, "async_save": False},
        "logging": {"log_every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
    }))
    return out


def run_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=.inf", "optimizer.lr=inf: must be finite and in (0, 1]"),
    ("optimizer.lr=1e38", "optimizer.lr=1e+38: must be in (0, 1]"),  # finite, and every weight ~1e38 after a step
    ("optimizer.lr=0", "optimizer.lr=0: must be in (0, 1]"),  # trains nothing
    ("optimizer.eps=.inf", "optimizer.eps=inf: must be finite and in (0, 1]"),
    ("optimizer.weight_decay=.inf", "optimizer.weight_decay=inf: must be finite and >= 0"),
    ("optimizer.grad_clip=.inf", "optimizer.grad_clip=inf: must be finite and >= 0 (0 or null = off)"),
    ("logging.peak_flops_per_device=.nan", "logging.peak_flops_per_device=nan: must be finite and > 0"),
    ("data.sources={path: a.jsonl, weight: .nan}", "a.jsonl: weight=nan: must be finite and > 0"),
])
def test_every_float_in_the_config_is_finite_and_in_range(override, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, [override]), 1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_train_cli_refuses_an_infinite_lr_in_one_line(tmp_path, capsys):
    from jaxgpt.train import main

    assert main(["optimizer.lr=.inf", "train.steps=1", f"train.output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("optimizer.lr=inf: must be finite and in (0, 1]") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_the_rule_names_the_key_for_every_kind_of_bad_number():
    lr = Range(0, 1, low_open=True)
    for value, message in ((NAN, "lr=nan: must be finite and in (0, 1]"), (-INF, "lr=-inf: must be finite"),
                           (10 ** 400, "lr=inf: must be finite"), (True, "lr=True: must be a number"),
                           ("0.1", "lr='0.1': must be a number"), (2, "lr=2: must be in (0, 1]")):
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            lr.check("lr", value)
    assert lr.check("lr", 1) == 1.0 and SAMPLING["top_k"].check("top_k", 40) == 40
    with pytest.raises(ValueError, match=r"^top_k=1.5: must be an integer >= 0 \(0 = off\)$"):
        SAMPLING["top_k"].check("top_k", 1.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": NAN}, "temperature=nan: must be finite and >= 0 (0 = greedy)"),
    ({"temperature": INF}, "temperature=inf: must be finite and >= 0 (0 = greedy)"),
    ({"temperature": 1.0, "top_p": NAN}, "top_p=nan: must be finite and in (0, 1] (1 = off)"),
    ({"max_new_tokens": NAN}, "max_new_tokens=nan: must be an integer >= 1"),
    ({"temperature": 1.0, "top_k": 2.5}, "top_k=2.5: must be an integer >= 0 (0 = off)"),
])
def test_generate_refuses_nan_sampling_settings(hf_folder, kwargs, message):
    """On a model in hand: no compile, no garbage tokens, one line naming the argument."""
    from jaxgpt.sample import load_model

    model, _ = load_model(str(hf_folder))
    with pytest.raises(SampleError) as e:
        generate(model, [[1, 2, 3]], **{"max_new_tokens": 4, **kwargs})
    assert str(e.value) == message


@pytest.mark.parametrize("cli", ["sample", "chat"])
def test_the_clis_refuse_nan_sampling_flags_before_loading(cli, capsys):
    import importlib

    main = importlib.import_module(f"jaxgpt.{cli}").main
    for flags, message in ((["--temperature", "nan"], "--temperature=nan: must be finite and >= 0 (0 = greedy)"),
                           (["--top-p", "nan"], "--top-p=nan: must be finite and in (0, 1] (1 = off)")):
        assert main(["--model", "/nonexistent/never/loaded", *flags]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"


def test_data_config_refuses_a_nan_weight_and_eval_fraction():
    with pytest.raises(DataError, match=r"^a.jsonl: weight=inf: must be finite and > 0$"):
        DataConfig(sources=[{"path": "a.jsonl", "weight": INF}])
    with pytest.raises(DataError, match=r"^data.eval_fraction=nan: must be finite and in \[0, 1\)$"):
        DataConfig(sources=["a.jsonl"], eval_fraction=NAN)


# ----------------------------------------------------------------------------- text

@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])  # a pipe in the C locale; a UTF-8 terminal
def test_chat_reads_undecodable_bytes_and_goes_on(hf_folder, monkeypatch, capsys, errors):
    from jaxgpt.chat import main

    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\nhello\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["--model", str(hf_folder), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "you> caf\ufffd \ufffd\n" in out and "you> hello\n" in out and out.count("bot> ") == 2


def test_sample_prompt_with_undecodable_bytes(hf_folder, capsys):
    """``sys.argv`` hands bytes that are not UTF-8 over as lone surrogates ('\\udce9')."""
    from jaxgpt.sample import main

    assert main(["--model", str(hf_folder), "--prompt", "caf\udce9", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("caf\ufffd")


def test_chat_session_api_and_config_text(hf_folder):
    from jaxgpt.chat import ChatSession
    from jaxgpt.sample import load_model

    model, tok = load_model(str(hf_folder))
    session = ChatSession(model, tok, max_new_tokens=4, temperature=0.0, system="be \udcff brief")
    session.reply("hi \ud800")  # a JSON "\ud800" escape
    assert [m["content"] for m in session.messages[:2]] == ["be \ufffd brief", "hi \ufffd"]
    # Sample prompts in a config are refused at load, not at the first evaluation mid-training.
    with pytest.raises(ConfigError, match=r"logging.sample_prompts\[1\]: not valid UTF-8 text \(byte 0xff at "
                                          r"character 3\)$"):
        load_config(None, ['logging.sample_prompts=["ok", "ab\\udcff"]'])
    assert undecodable("fine") is None and readable("a\udcffb") == "a\ufffdb"


# ----------------------------------------------------------------------------- export's --out

@pytest.mark.parametrize("where, how", [(".", "is"), ("..", "holds"), ("checkpoints", "lies among the checkpoints of"),
                                        ("checkpoints/2", "lies among the checkpoints of")])
def test_export_never_writes_into_or_over_its_source_run(run, where, how, capsys):
    """`--out RUN --overwrite` used to delete the run it read (checkpoints, metrics) and exit 0."""
    from jaxgpt.export import main

    before = run_files(run)
    out = (run / where).resolve()
    for source in (run, run / "checkpoints" / "2"):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(source), "--out", str(out), "--overwrite", "--no-verify"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and "\n" not in err
        assert f"{out} {how} the source {run}; export into a new folder, e.g. {run}-hf" in err
        assert run_files(run) == before


def test_overwrite_replaces_only_an_earlier_export(run, hf_folder, tmp_path):
    from jaxgpt.export import ExportError, export

    out = export(run, tmp_path / "hf", verify_logits=False, log=lambda *_: None)
    assert export(run, out, overwrite=True, verify_logits=False, log=lambda *_: None) == out  # an earlier export
    inner = export(run, run / "hf", verify_logits=False, log=lambda *_: None)  # beside the checkpoints, as the demo
    assert (inner / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    shutil.rmtree(inner)  # the module's run as it was
    other = tmp_path / "other-run"  # another training run: checkpoints and metrics
    (other / "checkpoints" / "7").mkdir(parents=True)
    (other / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    with pytest.raises(ExportError, match=r"other-run: is not a Hugging Face model or PEFT adapter folder; --overwrite replaces "
                                          r"only an earlier export"):
        export(run, other, overwrite=True, verify_logits=False)
    (out / "metrics.jsonl").write_text("{}\n")  # an export someone kept metrics in
    with pytest.raises(ExportError, match=r"holds training output \(.*metrics.jsonl\); --overwrite never deletes"):
        export(run, out, overwrite=True, verify_logits=False)
    assert (other / "metrics.jsonl").exists() and (other / "checkpoints" / "7").is_dir()
    assert (out / "metrics.jsonl").exists()
    with pytest.raises(ExportError, match=r"^--atol=nan: must be finite and >= 0$"):
        export(run, tmp_path / "x", atol=NAN)


def test_export_out_dot_is_refused_in_one_line(run, tmp_path, monkeypatch, capsys):
    """`--out .` said "PosixPath('.') has an empty name"."""
    from jaxgpt.export import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(run), "--out", ".", "--no-verify"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1
    assert err == ("error: --out .: is the current folder; export writes a new folder and moves it into place: "
                   "name one, e.g. --out hf")
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / f"{tmp_path.name}.partial").exists()
