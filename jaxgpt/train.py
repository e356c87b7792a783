"""Train GPT-2 (SFT or from scratch): ``python -m jaxgpt.train --config gpt2-chat key=value ...``.

Composes a run from its parts, top to bottom:

  config -> (multi-host init) -> mesh -> jaxgpt.setup (tokenizer, data, model created or loaded
  into its shards, optax AdamW, the objective) -> resume from the latest checkpoint ->
  jaxgpt.loop { jitted train step (jaxgpt.step), logs, eval; hooks: samples, checkpoints } -> plots.

A step whose loss, gradient or new parameters are not finite is not applied;
``train.max_nonfinite`` of them in a row stop the run.

The library entry point is ``train(cfg) -> TrainResult``; ``main(argv)`` is the CLI.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the CLI on a CPU host restarts once, before jax loads, with malloc settings
    from jaxgpt.host_memory import reexec_with_cpu_malloc  # that make XLA:CPU's steps faster

    reexec_with_cpu_malloc()

import jax
from flax import nnx

from jaxgpt import compile_cache, host_memory, metrics, sharding
from jaxgpt.backend import Policy
from jaxgpt.checkpoint import (CheckpointError, Checkpointer, checkpoint_dir, nonfinite_tensor, saved_steps,
                               set_aside_steps)
from jaxgpt.config import Config, ConfigError, help_text, load_config, shipped_configs, validate
from jaxgpt.loop import Hook, TrainingError, TrainResult, eval_due, run
from jaxgpt.paths import check_remote, upath
from jaxgpt.preemption import PreemptionGuard
from jaxgpt.runlock import RunLock
from jaxgpt.setup import Setup, init_distributed, prepare

log = logging.getLogger("jaxgpt.train")

__all__ = ["TrainResult", "TrainingError", "main", "train"]


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring."""
    cache_dir = compile_cache.enable()  # before anything compiles: a rerun loads the compiled step
    init_distributed(cfg.distributed)
    mesh_shape = validate(cfg, jax.device_count(), jax.process_count())
    out = upath(cfg.train.output_dir)  # a local folder, or gs://bucket/folder
    check_remote(out)
    with RunLock(out):  # a second training into the same folder is refused, naming the first
        return _train(cfg, out, sharding.make_mesh(mesh_shape), cache_dir)


def _train(cfg: Config, out: Path, mesh, cache_dir) -> TrainResult:
    t = cfg.train
    if cfg.checkpoint.enabled and not cfg.checkpoint.resume:
        _refuse_old_checkpoints(out)
    if cfg.checkpoint.enabled and cfg.checkpoint.resume:
        _refuse_only_set_aside(out)
    if not cfg.checkpoint.resume:
        _keep_old_metrics_apart(out)
    s = prepare(cfg, mesh)
    ckpt = _checkpointer(cfg, out)
    if ckpt is not None and cfg.checkpoint.resume and ckpt.latest_step() is not None:
        abstract = s.abstract_state()
        try:
            s.resume(ckpt.restore(abstract_params=abstract["params"], abstract_opt_state=abstract["opt_state"]))
        except CheckpointError:
            _refuse_only_set_aside(out)  # every step was just set aside: say what to do next
            raise
        if s.start >= t.steps:
            log.warning("train.steps=%d, and %s is already at step %d: nothing to train (raise train.steps to "
                        "continue; the schedule then stretches to the new length)", t.steps, out, s.start)
    # Every applied update keeps the parameters finite (jaxgpt.step); so must the start.
    bad = nonfinite_tensor(s.state["params"])
    if bad is not None:
        source = (f"checkpoint step {s.start} in {checkpoint_dir(out)}" if s.start else
                  f"model.name_or_path={cfg.model.name_or_path}" if cfg.model.name_or_path else "the initialisation")
        hint = " (move that step folder away to resume from an earlier one)" if s.start else ""
        raise TrainingError(f"{source}: parameter {bad} holds NaN or infinity; training from it would only save "
                            f"more of it{hint}")
    if cfg.schedule.warmup_steps >= t.steps:
        log.warning("schedule.warmup_steps=%d is not shorter than train.steps=%d: the learning rate rises by "
                    "lr / warmup_steps a step and does not reach optimizer.lr=%g in this run",
                    cfg.schedule.warmup_steps, t.steps, cfg.optimizer.lr)

    logger = metrics.MetricsLog(cfg, out, s.start)
    _announce(s, out, logger, cache_dir)
    hooks = [Hook(lambda step, state, final: _samples(s, logger, state["params"], step), due=eval_due(s))]
    if ckpt is not None:
        def save(step, state, final):
            if ckpt.save(step, params=state["params"], opt_state=state["opt_state"], data_state=s.train_data.state(),
                         rng=s.rng, config=s.run_config(), tokenizer=s.tokenizer, force=final):
                logger.flush()
        hooks.append(Hook(save, due=ckpt.should_save, every_step=True, close=ckpt.close))

    def saved() -> str:
        last = ckpt.latest_step() if ckpt is not None else None
        return f"last checkpoint: {'step ' + str(last) if last is not None else 'none'} in {out}"

    result = run(s, out, logger, hooks, PreemptionGuard(), saved)
    if jax.process_index() == 0 and cfg.logging.plot and result.losses:
        # the whole run across resumes: earlier runs' logged steps, then every step of this one
        before, before_evals = metrics.logged_losses(out)
        evals = {**before_evals, **{k: e["eval_loss"] for k, e in result.evals.items()}}
        metrics.plot_losses(out, dict(sorted({**before, **result.losses}.items())), dict(sorted(evals.items())))
    return result


def _announce(s: Setup, out: Path, logger: metrics.MetricsLog, cache_dir) -> None:
    """The start-up lines: what trains where, the model's numerics and the data; config.json."""
    cfg, t, gcfg = s.cfg, s.cfg.train, s.model_config
    logger.print(f"jaxgpt: {s.n_params / 1e6:.2f}M params, mesh {dict(s.mesh.shape)}, {jax.process_count()} process(es), "
                 f"global batch {t.batch_size} x {cfg.data.seq_len} tokens ({t.grad_accum} micro-batches), "
                 f"steps {s.start}->{t.steps}, output {out}, compilation cache {cache_dir or 'off'}")
    if cfg.lora.rank:
        logger.print(f"lora: rank {cfg.lora.rank} on {s.model_config.n_layer} x {', '.join(cfg.lora.targets or ['all'])}, "
                     f"{s.n_trainable / 1e6:.2f}M trainable parameters, the base frozen in {cfg.lora.base_dtype}")
    rows = t.batch_size // t.grad_accum * cfg.data.seq_len  # one micro-batch's positions (what the model sees)
    logger.print(f"model: {gcfg.dtype} compute, {gcfg.param_dtype} weights, "
                 f"{Policy.resolve(gcfg).describe(rows, cfg.data.seq_len)}"
                 + (f", host malloc: {host_memory.describe()}" if jax.default_backend() == "cpu" else ""))
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(s.run_config(), indent=2) + "\n")
    metrics.report_data(logger, out, s.train_data, s.eval_set)


def _samples(s: Setup, logger: metrics.MetricsLog, params, step: int) -> None:
    """A reply to each ``logging.sample_prompts`` from the parameters at ``step``, in the log."""
    prompts, tokenizer = s.cfg.logging.sample_prompts, s.tokenizer
    if not prompts or importlib.util.find_spec("jaxgpt.sample") is None:
        return
    from jaxgpt.sample import generate
    from jaxgpt.tokenizer import stop_token_ids

    model = nnx.merge(s.graphdef, params, s.rest)
    if tokenizer.chat_template:  # a chat model: each prompt is a user turn
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True) for p in prompts]
        ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    else:  # plain-text training (no template): each prompt is text to continue
        ids = [tokenizer.encode(p) for p in prompts]
    outs = generate(model, ids, max_new_tokens=s.cfg.logging.sample_max_new_tokens, stop_ids=stop_token_ids(tokenizer))
    for i, (p, o) in enumerate(zip(prompts, outs)):
        reply = tokenizer.decode(o, skip_special_tokens=True)
        logger.print(f"step {step} sample | {p!r} -> {reply!r}")
        logger.text(f"sample_{i}", f"**{p}**\n\n{reply}", step)


def _checkpointer(cfg: Config, out: Path):
    if not cfg.checkpoint.enabled:
        return None
    c = cfg.checkpoint
    return Checkpointer(checkpoint_dir(out), save_every=c.save_every, keep=c.keep, async_save=c.async_save,
                        log_file=out / "checkpoint.log")


def _refuse_old_checkpoints(out: Path) -> None:
    """checkpoint.resume=false where checkpoints exist: the new run would skip saving every step the
    old run already has, and export / chat would then load the old model. Refuse, touching nothing."""
    folder = checkpoint_dir(out)
    steps = saved_steps(folder)  # an old run's, complete or not
    if steps:
        raise ConfigError(f"checkpoint.resume=false, but {folder.absolute()} already holds checkpoints (steps "
                          f"{', '.join(map(str, steps))}): set train.output_dir to a new folder, "
                          f"or move that one away, to start a fresh run")


def _refuse_only_set_aside(out: Path) -> None:
    """Every checkpoint was set aside as corrupt: resuming would silently start over at step 0 and
    append a second series to metrics.jsonl. Refuse, with the ways forward."""
    folder = checkpoint_dir(out)
    aside = set_aside_steps(folder)
    if aside and not saved_steps(folder):
        raise CheckpointError(f"{folder.absolute()}: every checkpoint was set aside as incomplete or corrupt "
                              f"({', '.join(aside)}; details in {out / 'checkpoint.log'}): nothing to resume from. "
                              f"Set checkpoint.resume=false to start over (the old metrics are kept apart), or "
                              f"rename a step folder you trust back to its step number")


def _keep_old_metrics_apart(out: Path) -> None:
    """checkpoint.resume=false starts a new series: an earlier run's metrics (and TensorBoard) move to
    ``metrics.<time>.jsonl`` (``tensorboard.<time>``) instead of mixing with it."""
    if jax.process_index() != 0:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, moved in (("metrics.jsonl", f"metrics.{stamp}.jsonl"), ("tensorboard", f"tensorboard.{stamp}")):
        if (out / name).exists():
            (out / name).rename(out / moved)
            log.warning("checkpoint.resume=false: starting over; the earlier %s is kept as %s", name, out / moved)


# ----------------------------------------------------------------------------- CLI

USAGE = """usage: python -m jaxgpt.train [--config FILE.yaml | NAME] [section.key=value ...]

Train GPT-2 with JAX. --config takes a YAML file or the name of a shipped config
({configs}; in jaxgpt/configs/);
without it, runs demo. Overrides are read as YAML values, e.g.:
optimizer.lr=3e-5 train.steps=200 mesh.fsdp=-1
On a CPU host the command restarts itself once, before jax loads, with glibc malloc
settings that make XLA:CPU's steps faster (JAXGPT_MALLOC=default: it does not;
docs/training.md, "Host memory on a CPU").

keys (type = default):
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE.format(configs=", ".join(shipped_configs())) + help_text())
        return 0
    path, overrides = None, []
    while argv:
        arg = argv.pop(0)
        if arg == "--config":
            if not argv:
                print("error: --config needs a YAML file or a shipped config's name", file=sys.stderr)
                return 2
            path = argv.pop(0)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            print(f"error: unknown option {arg!r} (see --help)", file=sys.stderr)
            return 2
        else:
            overrides.append(arg)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # orbax/absl: warnings only
    logging.getLogger("jaxgpt").setLevel(logging.INFO)
    cfg = None
    try:
        cfg = load_config(path, overrides)
        result = train(cfg)
    except (ValueError, TrainingError) as e:  # ConfigError, WeightsError, CheckpointError, data errors
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C twice, or once before the loop: stop now, keep what is committed
        print(f"interrupted: stopped at once; {_committed(cfg)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # not waiting for a save in flight (never committed; the next run removes it)
    if result.interrupted:
        print(f"interrupted at step {result.step}: {_committed(cfg)}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    if result.preempted:
        print(f"preempted at step {result.step}; rerun the same command to resume", file=sys.stderr)
    return 0


def _committed(cfg: Config | None) -> str:
    """Which checkpoint a rerun resumes from, read from the folder."""
    if cfg is None or not cfg.checkpoint.enabled:
        return "nothing saved (checkpoint.enabled=false)" if cfg is not None else "nothing saved"
    folder = checkpoint_dir(cfg.train.output_dir)
    steps = saved_steps(folder)
    return f"last checkpoint step {steps[-1]} in {folder}" if steps else f"no checkpoint in {folder}"


if __name__ == "__main__":
    sys.exit(main())
