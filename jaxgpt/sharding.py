"""Device mesh, the logical-axis rules, and placing parameters and batches on it.

Mesh axes: ``data`` (replicas), ``fsdp`` (data parallel, parameters and optimizer state sharded)
and ``tensor`` (attention heads, MLP hidden units and vocab rows). Every parameter of
``jaxgpt.model`` names its dimensions; ``RULES`` is the only place that maps each name to a mesh
axis. A dimension the mesh axis does not divide is replicated (e.g. GPT-2's 50257 vocab rows
unless ``model.vocab_multiple`` pads them).
"""

from __future__ import annotations

import zlib
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}


def make_mesh(shape: tuple[int, int, int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices, ordered by process so that
    each host's devices hold a contiguous block of the batch."""
    devices = jax.devices() if devices is None else devices
    n = int(np.prod(shape))
    if n != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {n} devices, have {len(devices)}")
    by_process = np.array(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)
    if devices[0].platform == "cpu":
        devs = by_process
    else:  # topology-aware order on TPU / GPU slices (ICI rings inside each axis)
        from jax.experimental import mesh_utils

        devs = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        if not _rows_contiguous_per_process(devs):
            # On multi-host slices the physical order can interleave hosts along the batch axes
            # (seen for v4 / v5e pods), but each process feeds one contiguous block of batch rows.
            devs = by_process
    return Mesh(devs, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _rows_contiguous_per_process(devs: np.ndarray) -> bool:
    """Whether each process's devices hold one contiguous block of the (data, fsdp) batch rows."""
    rows: dict[int, set[int]] = {}
    for r, row in enumerate(devs.reshape(-1, devs.shape[-1])):  # one row per (data, fsdp) position
        for d in row:
            rows.setdefault(d.process_index, set()).add(r)
    return all(max(s) - min(s) + 1 == len(s) for s in rows.values())


def logical_to_spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for a value whose dimensions carry logical ``axes``."""
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        target = RULES.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if mesh.shape[a] > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if not names or dim % size:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return P(*spec)


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for a State of ``nnx.Param`` from each parameter's ``axes`` metadata."""

    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh)))

    return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def flat_shardings(abstract_params: nnx.State, mesh: Mesh) -> dict[str, NamedSharding]:
    """{"h.0.attn.c_attn.kernel": NamedSharding} for every parameter."""
    out = {}
    for path, var in nnx.to_flat_state(param_shardings(abstract_params, mesh)):
        out[".".join(str(p) for p in path)] = var.get_value()
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def from_host(tree, sharding: NamedSharding):
    """``tree`` (small arrays: e.g. the dropout streams' keys and counts) placed by ``sharding`` from
    this host's copy, by a jit without arguments that every process of a pod runs alike
    (``device_put`` refuses a sharding over other processes' devices)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = [jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves]
    host = [np.asarray(jax.random.key_data(x) if k else x) for x, k in zip(leaves, keys)]
    impls = [jax.random.key_impl(x) if k else None for x, k in zip(leaves, keys)]

    def build():
        return jax.tree.unflatten(treedef, [jax.random.wrap_key_data(h, impl=i) if i is not None
                                            else jax.numpy.asarray(h) for h, i in zip(host, impls)])

    return jax.jit(build, out_shardings=sharding)()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays: rows split over (data, fsdp), sequence whole."""
    return NamedSharding(mesh, P(RULES["batch"], None))


def make_place(abstract_params: nnx.State, mesh: Mesh) -> Callable[[str, np.ndarray], jax.Array]:
    """``place(path, host_array)`` for ``weights.load_pretrained``: each device
    receives only its own shard, read from the host array (no full on-device copy)."""
    shardings = flat_shardings(abstract_params, mesh)

    def place(path: str, value: np.ndarray) -> jax.Array:
        sharding = shardings[path]
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return place


def init_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh):
    """(graphdef, params, rest) of a freshly initialised model, each parameter
    created directly in its shards by a jitted init with ``out_shardings``."""
    abstract = nnx.eval_shape(make_model)
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    p_shard = param_shardings(abs_params, mesh)
    r_shard = jax.tree.map(lambda _: replicated(mesh), abs_rest)

    def init():
        return tuple(nnx.split(make_model(), nnx.Param, ...)[1:])

    params, rest = jax.jit(init, out_shardings=(p_shard, r_shard))()
    return graphdef, params, rest


def opt_state_shardings(tx, abstract_opt_state, params_shardings, mesh: Mesh):
    """Optimizer moments are sharded like their parameters; step counters replicated."""
    import optax

    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, params_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, (nnx.Variable, NamedSharding)),
    )


def process_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(start, stop) rows of the global batch this process must supply.

    With the mesh ordered by process the rows form one contiguous block; a
    layout where they do not (e.g. ``tensor`` spanning hosts) is refused.
    """
    sharding = batch_sharding(mesh)
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch, 1)).values():
        sl = index[0]
        rows.update(range(*sl.indices(global_batch)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(f"this process's batch rows are not contiguous for mesh {dict(mesh.shape)}")
    return start, stop


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, global_rows: int, rows_axis: int = 0
                 ) -> dict[str, jax.Array]:
    """Process-local numpy arrays -> global arrays, their rows (axis ``rows_axis``; one before it
    counts micro-batches) sharded on (data, fsdp), every other axis whole."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        spec = P(*[None] * rows_axis, RULES["batch"], *[None] * (v.ndim - rows_axis - 1))
        shape = v.shape[:rows_axis] + (global_rows,) + v.shape[rows_axis + 1:]
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v, shape)
    return out


def constrain(x: jax.Array, mesh: Mesh, *logical_axes) -> jax.Array:
    """Pin an activation's layout inside a jitted function."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh)))


def path_seed(path) -> int:
    """A stable integer for a module path (per-layer dropout streams)."""
    return zlib.crc32(".".join(str(p) for p in path).encode())
