"""The training loop: jitted steps back to back, each one's metrics read back one step behind
dispatch (so the host never idles the device), eval on its schedule, and the hooks the composing
module gives it (samples, checkpoints) on theirs. It knows nothing of checkpoints or sampling.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt import metrics, step as steps
from jaxgpt.data import eval_batches
from jaxgpt.model import GPT2, GPT2Config
from jaxgpt.setup import Setup


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps); the message says why."""


@dataclass(eq=False)  # hooks compare by identity
class Hook:
    """``fn(step, state, final)`` after the steps ``due`` picks (``final``: the last step, or a stop
    was asked for); the loop reads that step's metrics back first, so a hook never acts on an
    unchecked step.
    ``every_step``: called after every step (the hook decides itself), read back only when due.
    ``close``: called when the loop ends, unless a second Ctrl-C stops it at once."""

    fn: Callable[[int, dict, bool], Any]
    due: Callable[[int], bool]
    every_step: bool = False
    close: Callable[[], None] | None = None


@dataclass
class TrainResult:
    graphdef: Any
    params: nnx.State
    rest: nnx.State
    model_config: GPT2Config
    tokenizer: Any
    step: int  # optimizer steps done (incl. skipped non-finite ones)
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss (this process's run)
    evals: dict[int, dict] = field(default_factory=dict)  # step -> the objective's eval summary
    skipped: list[int] = field(default_factory=list)  # steps whose update was not applied
    preempted: bool = False  # stopped early by SIGTERM or Ctrl-C, after saving
    interrupted: bool = False  # ... by Ctrl-C
    output_dir: Path | None = None

    @property
    def model(self) -> GPT2:
        return nnx.merge(self.graphdef, self.params, self.rest)


def eval_due(s: Setup) -> Callable[[int], bool]:
    """The steps that evaluate (and sample): every ``train.eval_every`` and the last, with held-out data."""
    t = s.cfg.train
    return lambda step: s.eval_set is not None and bool(t.eval_every) and (step % t.eval_every == 0
                                                                           or step == t.steps)


def run(s: Setup, out: Path, logger: metrics.MetricsLog, hooks: list[Hook], guard, saved: Callable[[], str]
        ) -> TrainResult:
    """Train from ``s.start`` to ``train.steps``. ``guard``: a jaxgpt.preemption.PreemptionGuard-like
    context (``should_stop(step)``, ``received``); ``saved``: where the last save is, for errors."""
    cfg, t = s.cfg, s.cfg.train
    micro = t.batch_size // t.grad_accum
    dropout = s.model_config.dropout > 0 or s.cfg.lora.dropout > 0
    step_fn = steps.make_train_step(s.graphdef, s.rest, s.tx, objective=s.objective, mesh=s.mesh,
                                    dropout=dropout, state_shardings=s.state_shardings)
    evaluate_at = eval_due(s)
    eval_fn = steps.make_eval_step(s.graphdef, s.rest, objective=s.objective, mesh=s.mesh)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    fpt = metrics.flops_per_token(s.model_config, s.n_params, cfg.data.seq_len)
    peak = metrics.peak_flops(cfg)
    result = TrainResult(s.graphdef, s.state["params"], s.rest, s.model_config, s.tokenizer, s.start,
                         output_dir=out)
    key = jax.random.wrap_key_data(jnp.asarray(s.rng))
    state, bad_in_a_row, pending = s.state, 0, None
    window_t0, window_tokens = time.perf_counter(), 0

    def finish(step, m) -> None:
        """Read one step's metrics back: waits for the step to finish."""
        nonlocal bad_in_a_row, window_t0, window_tokens
        m = jax.device_get(m)
        now = time.perf_counter()  # windows tile wall time: logging below belongs to the next window
        loss, ok = float(m["loss"]), bool(m["ok"])
        result.losses[step] = loss
        window_tokens += tokens_per_step
        if not ok:
            bad_in_a_row += 1
            result.skipped.append(step)
            grad_norm = float(m["grad_norm"])
            what = ("non-finite loss/gradient" if not (math.isfinite(loss) and math.isfinite(grad_norm))
                    else "the update would make parameters non-finite")
            logger.print(f"step {step}: {what} (loss={loss}, grad_norm={grad_norm}); update skipped "
                         f"({bad_in_a_row} in a row)")
            if bad_in_a_row >= t.max_nonfinite:
                # Every applied update was checked finite: so is every checkpoint (not necessarily good).
                raise TrainingError(
                    f"stopping at step {step}: {bad_in_a_row} non-finite steps in a row (train.max_nonfinite="
                    f"{t.max_nonfinite}); parameters are those of the last applied step (finite); {saved()}. "
                    f"Lower optimizer.lr or check the data.")
        else:
            bad_in_a_row = 0
        logger.progress(1)
        if step % cfg.logging.log_every == 0 or step == t.steps:
            dt = now - window_t0
            tps = window_tokens / dt if dt > 0 else 0.0
            mfu = (tps * fpt / (peak * jax.device_count())) if peak else None
            record = {"step": step, "loss": loss, "lr": float(s.schedule(int(m["lr_step"]))),
                      "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tps, "mfu": mfu,
                      **{k: float(m[k]) for k in s.objective.metrics}}
            logger.write(record, f"step {step:>6} | loss {loss:.4f} | lr {record['lr']:.2e} | "
                                 f"grad_norm {record['grad_norm']:.3f} | {tps:,.0f} tok/s"
                         + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""))
            if logger.bar is not None:
                shown = {k.split("/")[-1]: f"{record[k]:.3f}" for k in getattr(s.objective, "progress", ())}
                logger.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", **shown, refresh=False)
            window_t0, window_tokens = now, 0

    closing = True
    try:
        with guard:
            for step in range(s.start + 1, t.steps + 1):
                batch = steps.place_batch([next(s.train_data) for _ in range(t.grad_accum)], s.mesh, micro)
                step_key = jax.random.key_data(jax.random.fold_in(key, step))
                state, m = step_fn(state, batch, step_key)
                if pending is not None:
                    finish(*pending)
                pending = (step, m)
                result.step = step
                evaluate = evaluate_at(step)
                stop = guard.should_stop(step)
                final = stop or step == t.steps
                due = [h for h in hooks if h.due(step)]
                if evaluate or final or due:
                    finish(*pending)  # never evaluate or save past an unchecked step
                    pending = None
                if evaluate:
                    e = result.evals[step] = evaluate_set(s, eval_fn, state["params"], micro)
                    logger.write({"step": step, **e}, f"step {step:>6} | "
                                 + " | ".join(f"{k} {v:.{2 if k.endswith('ppl') else 4}f}" for k, v in e.items()))
                for h in hooks:
                    if h.every_step or h in due:
                        h.fn(step, state, final)
                if stop:
                    result.preempted = True
                    result.interrupted = guard.received == signal.SIGINT
                    if not result.interrupted:
                        logger.print(f"preempted: saved step {step}, exiting")
                    break
            if pending is not None:
                finish(*pending)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; a save in flight is never committed
        closing = False
        raise
    finally:
        for h in hooks:
            if closing and h.close is not None:
                h.close()
        logger.close()
        if jax.process_index() == 0 and metrics.streaming(s.train_data):
            metrics.write_data_stats(out, s.train_data, s.eval_set)  # streaming: what was read by now
    result.params = state["params"]
    return result


def evaluate_set(s: Setup, eval_fn, params, micro: int) -> dict:
    """The objective's summary of the first ``train.eval_batches`` held-out batches (the same each time)."""
    loss_sum, sums = 0.0, {k: 0.0 for k in s.objective.metrics}
    batches = eval_batches(s.eval_set, micro, process_index=jax.process_index(), process_count=jax.process_count())
    for i, local in enumerate(batches):
        if s.cfg.train.eval_batches is not None and i >= s.cfg.train.eval_batches:
            break
        batch = {k: v[0] for k, v in steps.place_batch([local], s.mesh, micro).items()}
        l, m = jax.device_get(eval_fn(params, batch))
        loss_sum = loss_sum + float(l)
        sums = {k: sums[k] + float(m[k]) for k in sums}
    return s.objective.eval_summary(loss_sum, sums)
