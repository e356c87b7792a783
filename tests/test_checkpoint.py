"""jaxgpt.checkpoint on a tiny synthetic train state: round trip, keep-K, faults, other meshes, inference.

The reference is orbax itself: what ``Checkpointer.restore`` returns must be
bit-identical to what was saved, and the orbax files must read back with
orbax's plain ``StandardCheckpointer`` as well.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxgpt.checkpoint import CheckpointError, Checkpointer, abstract_like, checkpoint_dir
from jaxgpt.loader import load_for_inference
from jaxgpt.preemption import PreemptionGuard
from jaxgpt.model import GPT2, GPT2Config

from tests.conftest import ROOT, xla_flags
# Tests that make orbax fail to read leave a tensorstore callback that fires later on a closed
# asyncio loop ("Event loop is closed", reported by pytest at some later test): orbax noise.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")
CFG = GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2, vocab_multiple=8)


def make_state(cfg=CFG, seed=0):
    """(graphdef, rest, params, opt_state): random params and AdamW state after one update.

    Built without running the model (numpy init + one jitted elementwise
    update), so it costs a second even on a busy machine.
    """
    graphdef, abs_params, _ = nnx.split(nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    rs = np.random.RandomState(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rs.normal(0, 0.02, a.shape).astype(a.dtype)), abs_params)
    tx = optax.adamw(1e-2)

    @jax.jit
    def one_update(params):
        opt_state = tx.init(params)
        grads = jax.tree.map(lambda p: jnp.sin(100 * p), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = one_update(params)
    rest = jax.jit(lambda: nnx.split(GPT2(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2])()
    return graphdef, rest, params, opt_state


def run_config(cfg=CFG):
    return {"model": {"name": "tiny"}, "model_config": dict(vars(cfg)), "optimizer": {"lr": 1e-2}, "seed": 0}


@pytest.fixture(scope="module")
def tokenizer():
    from jaxgpt.tokenizer import add_chat_template, load_tokenizer

    return add_chat_template(load_tokenizer())


@pytest.fixture(scope="module")
def state():
    return make_state()


def host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def assert_bit_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))  # bit-exact, NaN-safe


def save(ckpt, step, state, *, tokenizer=None, force=True, data_state=None, rng=None):
    _, _, params, opt_state = state
    return ckpt.save(step, params=params, opt_state=opt_state, data_state=data_state or {"epoch": 0, "index": step * 4},
                     rng=rng if rng is not None else jax.random.key_data(jax.random.key(step)), config=run_config(),
                     tokenizer=tokenizer, force=force)


def test_round_trip_is_bit_exact_and_survives_donation(tmp_path, state, tokenizer):
    params, opt_state = jax.tree.map(jnp.copy, state[2:])  # private copies: deleted below
    saved_params, saved_opt = host(params), host(opt_state)
    rng = jax.random.key_data(jax.random.key(123))
    with Checkpointer(tmp_path, save_every=10, keep=2) as ckpt:
        assert ckpt.save(7, params=params, opt_state=opt_state, data_state={"epoch": 1, "index": 28},
                         rng=rng, config=run_config(), tokenizer=tokenizer, force=True)
        # The train step donates its state right after save returns: the async
        # save must already hold its own host copy.
        fresh_params, fresh_opt = state[2:]
        for x in jax.tree.leaves((params, opt_state)):
            x.delete()
        ckpt.wait()
        assert ckpt.latest_step() == 7
        out = ckpt.restore(abstract_params=abstract_like(fresh_params), abstract_opt_state=abstract_like(fresh_opt))
    assert out["step"] == 7
    assert isinstance(out["params"], nnx.State)
    assert_bit_equal(out["params"], saved_params)
    assert_bit_equal(out["opt_state"], saved_opt)
    assert out["data_state"] == {"epoch": 1, "index": 28}
    assert out["rng"].dtype == np.uint32 and np.array_equal(out["rng"], np.asarray(rng))
    assert out["config"] == json.loads(json.dumps(run_config()))
    # orbax's own reader, without jaxgpt, sees the same parameters (as a pure dict).
    plain = ocp.StandardCheckpointer().restore(tmp_path / "7" / "params", abstract_like(nnx.to_pure_dict(fresh_params)))
    assert_bit_equal(plain, nnx.to_pure_dict(saved_params))
    # Restoring into a pure-dict target gives a pure dict.
    with Checkpointer(tmp_path, save_every=10) as ckpt:
        out = ckpt.restore(abstract_params=abstract_like(nnx.to_pure_dict(fresh_params)), abstract_opt_state=None)
        tok = ckpt.restore_tokenizer(7)
    assert isinstance(out["params"], dict) and out["opt_state"] is None
    assert_bit_equal(out["params"], nnx.to_pure_dict(saved_params))
    text = "<|im_start|>user\nhello there<|im_end|>"
    assert tok.encode(text) == tokenizer.encode(text) and len(tok) == len(tokenizer)
    assert tok.chat_template == tokenizer.chat_template


def test_typed_key_rng_round_trips(tmp_path, state):
    key = jax.random.key(5)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        save(ckpt, 1, state, rng=key)
        ckpt.wait()
        out = ckpt.restore(abstract_params=abstract_like(state[2]), abstract_opt_state=None)
    assert np.array_equal(out["rng"], np.asarray(jax.random.key_data(key)))


def test_save_every_and_keep_last_k(tmp_path, state, caplog):
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        started = [step for step in range(1, 8) if save(ckpt, step, state, force=False)]
        assert started == [2, 4, 6]
        assert save(ckpt, 7, state, force=True)  # the end of the run
        assert not save(ckpt, 7, state, force=True)  # already there: not written twice
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    # A new run writing into this folder without resuming: told, not silently skipped.
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jaxgpt.checkpoint"):
            assert not save(ckpt, 2, state, force=False)
            assert not save(ckpt, 5, state, force=True)
        assert [r.getMessage().split(":")[0] for r in caplog.records] == ["checkpoint step 2 not saved",
                                                                         "checkpoint step 5 not saved"]
        assert ckpt.all_steps() == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["6", "7"]


def _truncate_array_files(item_dir: Path):
    files = [p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no orbax data files under {item_dir}"
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _half_written(step_dir: Path):
    # what a copy interrupted mid-way (rsync, gsutil) leaves: params only, no metadata
    import shutil
    for p in step_dir.iterdir():
        if p.name != "params":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.mark.parametrize("damage", ["truncated_params", "truncated_opt_state", "half_written", "missing_state"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, state, damage, caplog):
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        for step in (2, 4, 6):
            save(ckpt, step, state, data_state={"index": step})
    latest = tmp_path / "6"
    if damage == "truncated_params":
        _truncate_array_files(latest / "params")
    elif damage == "truncated_opt_state":
        _truncate_array_files(latest / "opt_state")
    elif damage == "half_written":
        _half_written(latest)
    else:
        import shutil
        shutil.rmtree(latest / "state")
    # a save killed before its commit leaves a temporary folder: never listed
    (tmp_path / "8.orbax-checkpoint-tmp-1234" / "params").mkdir(parents=True)

    _, _, params, opt_state = state
    with caplog.at_level(logging.WARNING, logger="jaxgpt.checkpoint"):
        with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
            out = ckpt.restore(abstract_params=abstract_like(params), abstract_opt_state=abstract_like(opt_state))
            assert out["step"] == 4 and out["data_state"] == {"index": 4}
            assert_bit_equal(out["params"], host(params))
            warned = [r.getMessage() for r in caplog.records if "incomplete or corrupt" in r.getMessage()]
            assert len(warned) == 1 and str(latest) in warned[0]
            # set aside, not deleted; training can save step 6 again
            aside = [p for p in tmp_path.iterdir() if p.name.startswith("6.corrupt-")]
            assert len(aside) == 1 and not latest.exists()
            assert save(ckpt, 6, state)
            ckpt.wait()
            assert ckpt.all_steps() == [2, 4, 6]


def test_explicit_step_that_is_corrupt_raises(tmp_path, state):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        save(ckpt, 1, state)
        save(ckpt, 2, state)
    _truncate_array_files(tmp_path / "1" / "params")
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match=str(tmp_path / "1")):
            ckpt.restore(abstract_params=abstract_like(state[2]), abstract_opt_state=None, step=1)
        assert (tmp_path / "1").exists()  # an explicit request never moves anything


def test_changed_model_config_is_an_error_not_a_fallback(tmp_path, state):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        save(ckpt, 1, state)
        save(ckpt, 2, state)
    _, _, other_params, _ = make_state(CFG.replace(n_embd=64))
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match=r"/2/params: .*shape .*did the config change"):
            ckpt.restore(abstract_params=abstract_like(other_params), abstract_opt_state=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing set aside



def test_checkpoint_with_the_old_parameter_names_is_refused_by_name(tmp_path, state):
    """Parameters saved as h.0.attn.c_attn_kernel (before the projections were Linear modules): one
    line naming the key and its new name, nothing set aside."""
    graphdef, rest, params, opt_state = state

    def old_names(tree):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for k, v in tree.items():
            if k in ("c_attn", "c_proj", "c_fc"):
                out.update({f"{k}_{leaf}": x for leaf, x in v.items()})
            else:
                out[k] = old_names(v)
        return out

    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, params=old_names(nnx.to_pure_dict(params)), opt_state=opt_state, data_state={"epoch": 0, "index": 4},
                  rng=jax.random.key_data(jax.random.key(1)), config=run_config(), force=True)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match=r"/1/params: h\.0\.attn\.c_attn_bias is a parameter name of an "
                                                  r"earlier jaxgpt \(now h\.0\.attn\.c_attn\.bias\)"):
            ckpt.restore(abstract_params=abstract_like(params), abstract_opt_state=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_changed_param_dtype_is_cast_with_a_warning(tmp_path, state, caplog):
    """Resuming after model.param_dtype changed: orbax casts the saved arrays, and the log says so."""
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        save(ckpt, 1, state)
    bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding)
                        if x.dtype == jnp.float32 else x, abstract_like(state[2]))
    with caplog.at_level(logging.WARNING, logger="jaxgpt.checkpoint"), Checkpointer(tmp_path, save_every=1) as ckpt:
        out = ckpt.restore(abstract_params=abstract_like(state[2]), abstract_opt_state=None)
        assert not [r for r in caplog.records if "cast on restore" in r.getMessage()]
        out = ckpt.restore(abstract_params=bf16, abstract_opt_state=None)
    warned = [r.getMessage() for r in caplog.records if "cast on restore" in r.getMessage()]
    assert len(warned) == 1 and "from float32 to bfloat16 (model.param_dtype changed" in warned[0]
    assert {x.dtype for x in jax.tree.leaves(out["params"])} == {jnp.dtype(jnp.bfloat16)}

def test_no_checkpoint_and_all_corrupt_errors(tmp_path, state):
    with Checkpointer(tmp_path / "empty", save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint to restore"):
            ckpt.restore(abstract_params=abstract_like(state[2]), abstract_opt_state=None)
    with Checkpointer(tmp_path / "bad", save_every=1) as ckpt:
        save(ckpt, 1, state)
    _truncate_array_files(tmp_path / "bad" / "1" / "params")
    with Checkpointer(tmp_path / "bad", save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match="every checkpoint is incomplete or corrupt"):
            ckpt.restore(abstract_params=abstract_like(state[2]), abstract_opt_state=None)


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=f"{blocker}/ckpt: checkpoint directory is not writable"):
        Checkpointer(blocker / "ckpt", save_every=1)
    with pytest.raises(CheckpointError, match="save_every must be >= 1"):
        Checkpointer(tmp_path / "x", save_every=0)


DISK_FULL = textwrap.dedent("""
    # A full disk, simulated with RLIMIT_FSIZE: writes past the limit fail with EFBIG.
    import resource, signal, sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_state, save
    from jaxgpt.checkpoint import Checkpointer, CheckpointError, abstract_like
    state = make_state()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for mode in ("async", "sync"):
        directory = {dir!r} + "/" + mode
        ckpt = Checkpointer(directory, save_every=1, keep=1, async_save=mode == "async")
        save(ckpt, 1, state)
        ckpt.wait()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
        try:
            save(ckpt, 2, state)
            ckpt.wait()
        except CheckpointError as e:
            print(mode, "ERROR:", e)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        out = Checkpointer(directory, save_every=1, keep=1).restore(abstract_params=abstract_like(state[2]),
                                                                    abstract_opt_state=abstract_like(state[3]))
        print(mode, "RESTORED", out["step"])
""")


def test_disk_full_on_save_keeps_previous_checkpoint(tmp_path):
    code = DISK_FULL.format(tests=str(ROOT / "tests"), dir=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for mode in ("async", "sync"):
        err = [line for line in r.stdout.splitlines() if line.startswith(f"{mode} ERROR:")]
        assert len(err) == 1, r.stdout + r.stderr[-3000:]
        assert f"{tmp_path / mode / '2'}: saving checkpoint failed" in err[0]
        assert "File too large" in err[0] and "earlier checkpoints are kept: [1]" in err[0]
        # keep=1, yet step 1 was not deleted for the failed step 2, and it restores
        assert f"{mode} RESTORED 1" in r.stdout
        assert (tmp_path / mode / "1").is_dir() and not (tmp_path / mode / "2").exists()


def test_load_for_inference_from_output_dir_and_step_dir(tmp_path, state, tokenizer, caplog, monkeypatch):
    graphdef, rest, params, _ = state
    out_dir = tmp_path / "run"
    with Checkpointer(checkpoint_dir(out_dir), save_every=1, keep=3) as ckpt:
        save(ckpt, 3, state, tokenizer=tokenizer)
        save(ckpt, 5, state, tokenizer=tokenizer)
    ids = jnp.array([[1, 5, 9, 50, 95, 3]])
    forward = jax.jit(lambda m, x: m(x))
    want = np.asarray(forward(nnx.merge(graphdef, params, rest), ids))
    for path in (out_dir, checkpoint_dir(out_dir), checkpoint_dir(out_dir) / "3"):
        model, tok = load_for_inference(path)
        assert isinstance(model, GPT2) and model.config == CFG
        np.testing.assert_array_equal(np.asarray(forward(model, ids)), want)  # same params, same maths: exact
        assert tok.convert_tokens_to_ids("<|im_end|>") == tokenizer.convert_tokens_to_ids("<|im_end|>")
        chat = [{"role": "user", "content": "hi"}]
        assert tok.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    monkeypatch.chdir(tmp_path)  # a relative path, as users type it (orbax itself needs absolute ones)
    np.testing.assert_array_equal(np.asarray(forward(load_for_inference("run")[0], ids)), want)
    model, _ = load_for_inference(out_dir, dtype="bfloat16")
    assert model.wte[...].dtype == jnp.bfloat16 and model.config.dtype == "bfloat16"
    np.testing.assert_allclose(np.asarray(forward(model, ids)), want, atol=0.05)
    # a corrupt latest step: reported, the previous one is loaded; asked for by name, it is an error
    _truncate_array_files(checkpoint_dir(out_dir) / "5" / "params")
    with caplog.at_level(logging.WARNING, logger="jaxgpt.loader"):
        model, tok = load_for_inference(out_dir)
    assert tok.name_or_path == str(checkpoint_dir(out_dir) / "3")
    assert any(str(checkpoint_dir(out_dir) / "5") in r.getMessage() and "corrupt" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(CheckpointError, match=f"{checkpoint_dir(out_dir) / '5'}: cannot read parameter"):
        load_for_inference(checkpoint_dir(out_dir) / "5")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: no such checkpoint directory"):
        load_for_inference(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no jaxgpt checkpoint found") as e:
        load_for_inference(tmp_path / "empty")
    assert "Hugging Face" not in str(e.value)
    (tmp_path / "empty" / "config.json").write_text("{}")  # an HF folder without its weights file
    from jaxgpt.loader import load_model  # which says why the folder is neither

    with pytest.raises(CheckpointError, match="nor a Hugging Face model folder .config.json, but none of model.safetensors"):
        load_model(tmp_path / "empty")


def test_preemption_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: only a flag is set
        assert guard.requested and guard.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is before


OTHER_MESH = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
    from flax import nnx
    from test_checkpoint import make_state, save, assert_bit_equal, host
    from jaxgpt.checkpoint import Checkpointer, abstract_like, checkpoint_dir
    from jaxgpt.loader import load_for_inference

    def spec(x, axis):
        # shard the largest dimension that divides over the fsdp axis (what FSDP does)
        dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % 8 == 0]
        parts = [None] * x.ndim
        if dims:
            parts[dims[0]] = axis
        return P(*parts)

    def place(tree, mesh, axis):
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x, axis))), tree)

    assert jax.device_count() == 8
    graphdef, rest, params, opt_state = make_state()
    want_p, want_o = host(params), host(opt_state)
    mesh8 = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    params, opt_state = place(params, mesh8, "fsdp"), place(opt_state, mesh8, "fsdp")
    assert params["wte"][...].sharding.spec == P("fsdp", None)
    assert len({{str(s.index) for s in params["wte"][...].addressable_shards}}) == 8
    ckpt = Checkpointer(checkpoint_dir({dir!r}), save_every=1)
    save(ckpt, 3, (graphdef, rest, params, opt_state))
    ckpt.close()

    mesh2x4 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    abs_p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh2x4, spec(x, "fsdp"))), want_p)
    abs_o = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh2x4, spec(x, "fsdp"))), want_o)
    out = Checkpointer(checkpoint_dir({dir!r}), save_every=1).restore(abstract_params=abs_p, abstract_opt_state=abs_o)
    assert_bit_equal(out["params"], want_p)
    assert_bit_equal(out["opt_state"], want_o)
    for got, a in zip(jax.tree.leaves((out["params"], out["opt_state"])), jax.tree.leaves((abs_p, abs_o))):
        assert got.sharding == a.sharding, (got.sharding, a.sharding)
    wte = out["params"]["wte"][...]
    assert wte.sharding.mesh.shape == {{"data": 2, "fsdp": 4}} and wte.sharding.spec == P("fsdp", None)
    assert len({{str(s.index) for s in wte.addressable_shards}}) == 4  # 4 distinct shards, replicated over data
    print("MESH 2x4 OK")

    one = SingleDeviceSharding(jax.devices()[0])
    out = Checkpointer(checkpoint_dir({dir!r}), save_every=1).restore(
        abstract_params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), want_p),
        abstract_opt_state=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), want_o))
    assert_bit_equal(out["params"], want_p)
    assert_bit_equal(out["opt_state"], want_o)
    assert all(x.sharding == one for x in jax.tree.leaves((out["params"], out["opt_state"])))
    print("ONE DEVICE OK")

    model, _ = load_for_inference({dir!r})
    assert all(x.sharding.device_set == {{jax.devices()[0]}} for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert_bit_equal(nnx.state(model, nnx.Param), want_p)
    print("INFERENCE OK")
""")


def test_restore_on_another_mesh(tmp_path):
    code = OTHER_MESH.format(tests=str(ROOT / "tests"), dir=str(tmp_path / "run"))
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    for line in ("MESH 2x4 OK", "ONE DEVICE OK", "INFERENCE OK"):
        assert line in r.stdout


TWO_PROCESSES = textwrap.dedent("""
    import sys
    import jax
    pid = int(sys.argv[1])
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    sys.path.insert(0, {tests!r})
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from test_checkpoint import make_state, save, assert_bit_equal, host
    from jaxgpt.checkpoint import Checkpointer, abstract_like

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    graphdef, rest, params, opt_state = make_state()   # same values on both processes (numpy init, seed 0)
    want_p = host(params)

    def spec(x):
        dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % 8 == 0]
        return P(*[("fsdp" if d == dims[0] else None) for d in range(x.ndim)]) if dims else P()

    def put(tree, mesh):
        # each process supplies only its own shards, as in a real multi-host run
        def one(x):
            s = NamedSharding(mesh, spec(x))
            host_x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda idx: host_x[idx])
        return jax.tree.map(one, tree)

    mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    sharded = (graphdef, rest, put(params, mesh), put(opt_state, mesh))
    assert not sharded[2]["wte"][...].is_fully_addressable
    ckpt = Checkpointer({dir!r}, save_every=1)
    save(ckpt, 1, sharded, data_state={{"index": 4}})
    from jaxgpt.checkpoint import CheckpointError
    try:  # a per-process data state cannot be kept in one JSON copy: refused on both processes
        save(ckpt, 2, sharded, data_state={{"index": pid}})
        raise AssertionError("differing data_state was saved")
    except CheckpointError as e:
        assert "data_state/rng differ between processes" in str(e), e
    ckpt.close()

    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    abs_p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh2, spec(x))), want_p)
    out = Checkpointer({dir!r}, save_every=1).restore(abstract_params=abs_p, abstract_opt_state=None)
    assert out["data_state"] == {{"index": 4}} and out["step"] == 1
    from jax.experimental import multihost_utils
    gathered = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), out["params"])
    assert_bit_equal(host(gathered), want_p)
    print("PROCESS", pid, "OK")

    # Preemption: SIGTERM reaches only process 1; JAX's preemption service makes
    # both processes stop at the same step (and the guard leaves SIGTERM to JAX).
    # The checkpointer is asked as train() asks it: orbax's PreemptionCheckpointingPolicy
    # asks the same sync point again for the same step, and must agree with the guard.
    import os, signal, time
    from jaxgpt.preemption import PreemptionGuard
    before = signal.getsignal(signal.SIGTERM)
    ckpt = Checkpointer({dir!r} + "-preempted", save_every=1000)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGTERM) is before
        for step in range(1, 400):
            multihost_utils.sync_global_devices(f"step{{step}}")  # stands in for the train step
            if pid == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            stop = guard.should_stop(step)
            assert ckpt.should_save(step) == stop, step
            assert save(ckpt, step, sharded, force=stop) == stop, step
            if stop:
                print("PROCESS", pid, "STOPPED AT", step)
                break
            time.sleep(0.02)
    ckpt.close()
""")


def test_two_processes_save_restore_and_preempt_together(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = TWO_PROCESSES.format(port=port, tests=str(ROOT / "tests"), dir=str(tmp_path / "ckpt"))
    env = {**os.environ, "XLA_FLAGS": xla_flags()}  # no forced device count
    procs = [subprocess.Popen(["timeout", "240", sys.executable, "-c", code, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
        assert f"PROCESS {i} OK" in out
    stops = [[line for line in out.splitlines() if "STOPPED AT" in line] for out in outs]
    assert len(stops[0]) == len(stops[1]) == 1, outs
    assert stops[0][0].split()[-1] == stops[1][0].split()[-1]  # the same step on both
    assert int(stops[0][0].split()[-1]) >= 3
    # the preempted step, and only it, was saved (save_every=1000), by both processes
    step_dirs = [p.name for p in (tmp_path / "ckpt-preempted").iterdir() if p.name.isdigit()]
    assert step_dirs == [stops[0][0].split()[-1]], step_dirs
    # both processes wrote their own array shards into one checkpoint
    assert sorted(p.name for p in (tmp_path / "ckpt" / "1" / "params").glob("ocdbt.process_*")) == \
        ["ocdbt.process_0", "ocdbt.process_1"]
