"""jaxgpt.loader: which source a name means, and what load_model gives for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jaxgpt.checkpoint import CheckpointError, checkpoint_dir
from jaxgpt.loader import LoadError, load_model, locate
from jaxgpt.model import GPT2, GPT2Config
from jaxgpt.paths import WeightsError
from jaxgpt.tokenizer import IM_END, add_chat_template, load_tokenizer
from jaxgpt.weights import save_pretrained


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    tok = add_chat_template(load_tokenizer())
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return save_pretrained(GPT2(cfg, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("hf") / "m", tok)


def test_each_name_is_told_apart_once(hf_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    checkpoint_dir(run).mkdir(parents=True)
    (run / "config.json").write_text("{}")  # a training run's own config.json, beside its checkpoints
    assert locate(hf_folder) == ("hf", hf_folder)
    assert locate(str(run)) == ("checkpoint", run)
    monkeypatch.chdir(tmp_path)
    assert locate("user/not-here", hub=False) == ("checkpoint", Path("user/not-here"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(WeightsError, match=r"file.txt: expected a folder holding config.json and weights, got a file"):
        locate("file.txt")
    with pytest.raises(WeightsError, match=r"^\./nope: no such folder"):
        locate("./nope")  # a path, never looked up on the hub
    with pytest.raises(CheckpointError, match=r"nope: no such checkpoint directory"):
        load_model("nope", hub=False)  # export's sources are local


def test_an_hf_folder_loads_with_its_tokenizer_and_stop_ids(hf_folder):
    loaded = load_model(hf_folder, decoding=False)
    assert loaded.kind == "hf" and loaded.folder == hf_folder and loaded.model.decoding_layout is None
    assert loaded.tokenizer.chat_template  # the folder's own, not the vendored tokenizer
    im_end = loaded.tokenizer.convert_tokens_to_ids(IM_END)
    assert loaded.stop_ids == sorted({im_end, loaded.model.config.eos_token_id})
    ref = load_model(hf_folder, param_dtype="bfloat16")
    assert ref.model.decoding_layout == "bfloat16" and ref.stop_ids == loaded.stop_ids
    np.testing.assert_allclose(np.asarray(ref.model.wpe[...], np.float32), np.asarray(loaded.model.wpe[...]),
                               atol=1e-2)
    with pytest.raises(LoadError, match=r"param_dtype 'int8': choose from float32, bfloat16"):
        load_model(hf_folder, param_dtype="int8", decoding=False)  # int8 is a decoding layout only
