"""What a run reports: metrics.jsonl, TensorBoard and the progress bar (process 0 only), the
loss plot, and the FLOPs behind MFU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from jaxgpt.config import Config, ConfigError
from jaxgpt.model import GPT2Config
from jaxgpt.paths import Appender, is_url

PEAK_BF16_FLOPS = {  # per chip, dense bf16
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def peak_flops(cfg: Config) -> float | None:
    if cfg.logging.peak_flops_per_device:
        return cfg.logging.peak_flops_per_device
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None  # CPUs: no meaningful peak


def flops_per_token(gcfg: GPT2Config, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention (PaLM appendix B)."""
    n = n_params - gcfg.n_positions * gcfg.n_embd  # position embeddings do no matmuls
    return 6 * n + 12 * gcfg.n_layer * gcfg.n_embd * seq_len


def _summary_writer():
    """tensorboardX's ``SummaryWriter``, imported with torch hidden unless torch is loaded already:
    tensorboardX imports torch whenever it is installed, only to accept torch tensors, which costs
    every run's start-up time and memory; jaxgpt logs floats."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # meanwhile `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:  # a dependency of jaxgpt, but an image may lack it
        raise ConfigError(f"logging.tensorboard=true needs tensorboardX ({e}): pip install tensorboardX, "
                          "or set logging.tensorboard=false") from None
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class _BucketEvents:
    """tensorboardX's writer factory for a run folder in a bucket (any epath / fsspec URL): an event
    file is an ``Appender``, rewritten whole at each of SummaryWriter's flushes (every 2 minutes and at
    close; event files of scalars stay small), where tensorboardX's own gs:// writer would need
    google-cloud-storage's client and its credentials besides gcsfs'."""

    def open(self, path):
        return Appender(path, interval=0.0, keep=False)

    def directory_check(self, path):
        pass  # buckets have no folders to create


def _tensorboard(logdir: Path):
    writer = _summary_writer()
    if is_url(logdir):
        from tensorboardX import record_writer

        record_writer.register_writer_factory(str(logdir).split("://")[0], _BucketEvents())
    return writer(str(logdir))


class MetricsLog:
    """metrics.jsonl + TensorBoard + the progress bar, on process 0 only."""

    def __init__(self, cfg: Config, out: Path, start_step: int):
        self.cfg, self.out = cfg, out
        self.main = jax.process_index() == 0
        self.file = self.tb = self.bar = None
        if not self.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = Appender(out / "metrics.jsonl")
        if cfg.logging.tensorboard:
            self.tb = _tensorboard(out / "tensorboard")
        if cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, record: dict, line: str | None = None):
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])
        if line:
            self.print(line)

    def flush(self):
        """Everything logged so far into the run folder now (a run folder in a bucket is otherwise
        rewritten every half minute): called with each checkpoint, so a resumed run's log has no gap."""
        if self.file is not None:
            self.file.flush(force=True)
        if self.tb is not None:
            self.tb.flush()

    def text(self, tag: str, text: str, step: int):
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def print(self, text: str):
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def progress(self, n: int, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def logged_losses(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss, eval loss) by step from ``out/metrics.jsonl``, every run of it (a step a resume
    logged again keeps its last value)."""
    losses, evals = {}, {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if "loss" in r:
            losses[r["step"]] = r["loss"]
        if "eval_loss" in r:
            evals[r["step"]] = r["eval_loss"]
    return dict(sorted(losses.items())), dict(sorted(evals.items()))


def plot_losses(out: Path, losses: dict[int, float], evals: dict[int, float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(losses), list(losses.values()), label="train", lw=1)
    if evals:
        ax.plot(list(evals), list(evals.values()), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    with path.open("wb") as f:  # a file object: matplotlib writes local paths only
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def report_data(logger: MetricsLog, out: Path, train_data, eval_set) -> None:
    """What training reads: one line per set in the start-up output (skips with their file:line),
    all of it in ``data_stats.json``."""
    stats = train_data.dataset.stats
    if streaming(train_data):
        logger.print(f"data: streaming; statistics are counted as it is read, into {out / 'data_stats.json'}")
    else:
        logger.print(f"data: {stats.brief()} ({out / 'data_stats.json'})")
    for reason in stats.skip_reasons[:3]:
        logger.print(f"  skipped {reason}")
    if eval_set is not None:
        logger.print(f"eval data: {eval_set.stats.brief()}")
    if jax.process_index() == 0:
        write_data_stats(out, train_data, eval_set)


def streaming(train_data) -> bool:
    from jaxgpt.data import StreamingDataset

    return isinstance(train_data.dataset, StreamingDataset)


def write_data_stats(out: Path, train_data, eval_set) -> None:
    stats = {"train": train_data.dataset.stats.to_dict()}
    if eval_set is not None:
        stats["eval"] = eval_set.stats.to_dict()
    (out / "data_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
