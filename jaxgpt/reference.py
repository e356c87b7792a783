"""DPO's reference: where its log-probs come from is decided here, in ``dpo_objective``, and nowhere else.

- a frozen copy of the starting weights, held in the objective (an input of the jitted step);
- or, with ``objective.precompute_reference``, every pair scored once by the starting weights before
  training, the numbers stored with the run (``reference_logps.npz``) and read back on resume, so a
  full-model run holds one model.

Under LoRA the trained parameters are the adapters, which start at zero (``lora_B``): a frozen copy
of them is the base with the adapters off, TRL's reference with PEFT, and costs only the adapters.
"""

from __future__ import annotations

import logging
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxgpt.config import Config
from jaxgpt.data import eval_batches
from jaxgpt.objectives import DPO, sequence_logps
from jaxgpt.paths import upath
from jaxgpt.step import place_batch

log = logging.getLogger("jaxgpt.train")

REFERENCE_FILE = "reference_logps.npz"


def dpo_objective(cfg: Config, mesh, graphdef, rest, params, train_set, eval_set) -> DPO:
    """The DPO objective of a run at its starting weights ``params``."""
    o = cfg.objective
    if not o.precompute_reference:
        # A copy: the train step donates (overwrites) the parameters it is given.
        frozen = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)
        return DPO(mesh, o.beta, o.loss, o.label_smoothing, reference=frozen)
    path = upath(cfg.train.output_dir) / REFERENCE_FILE  # a local folder or a bucket
    sets = {"train": train_set, "eval": eval_set}
    stored = _read(path, sets)
    for name, ds in sets.items():
        if ds is None:
            continue
        if name in stored:
            ds.reference = stored[name]
        else:
            ds.reference = precompute(graphdef, rest, params, ds, mesh, cfg.train.batch_size // cfg.train.grad_accum)
    if not stored and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, **{name: ds.reference for name, ds in sets.items() if ds is not None},
                     **{f"{name}_fingerprint": ds.fingerprint for name, ds in sets.items() if ds is not None})
    return DPO(mesh, o.beta, o.loss, o.label_smoothing)


def _read(path, sets: dict) -> dict[str, np.ndarray]:
    """The stored reference log-probs, if they were computed for these very datasets."""
    if not path.exists():
        return {}
    with path.open("rb") as fh, np.load(fh) as f:
        for name, ds in sets.items():
            if ds is not None and (f"{name}_fingerprint" not in f or str(f[f"{name}_fingerprint"]) != ds.fingerprint):
                log.warning("%s: computed for other data; computing the reference log-probs again", path)
                return {}
        return {name: f[name] for name, ds in sets.items() if ds is not None}


def precompute(graphdef, rest, params, ds, mesh, micro: int) -> np.ndarray:
    """Each segment's summed scored-token log-prob under ``params``, float32 [num_segments]."""

    def score(params, batch):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return sequence_logps(model, batch, mesh)[0]

    fn = jax.jit(score, out_shardings=NamedSharding(mesh, PartitionSpec()))  # every process reads all rows
    out = np.zeros(ds.num_segments, np.float32)
    pc = jax.process_count()
    for start, local in zip(range(0, ds.num_rows, micro), eval_batches(ds, micro, process_index=jax.process_index(),
                                                                      process_count=pc)):
        local.pop("ref_logps", None)
        sums = np.asarray(jax.device_get(fn(params, {k: v[0] for k, v in place_batch([local], mesh, micro).items()})))
        for i, r in enumerate(range(start, min(start + micro, ds.num_rows))):
            for s, k in enumerate(ds.row_segment_ids(r), 1):
                out[k] = sums[i, s]
    return out
