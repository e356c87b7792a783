"""Runs ``jaxgpt.train.train`` in a fresh process (own device count / jax.distributed) for
test_sharding.py and test_multihost.py; prints one JSON line per run.

    python tests/train_worker.py '<config dict as JSON>' '<list of [data, fsdp, tensor]>'
"""

import json
import sys


def describe(result) -> dict:
    import jax
    from flax import nnx

    params = {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(result.params)}
    return {
        "losses": [result.losses[s] for s in sorted(result.losses)],
        "params": {name: {"spec": str(x.sharding.spec), "devices": len(x.sharding.device_set),
                          "shape": list(x.shape),
                          "shard_shape": list(x.sharding.shard_shape(x.shape))}
                   for name, x in params.items()},
        "process": jax.process_index(),
    }


def main():
    raw = json.loads(sys.argv[1])
    meshes = json.loads(sys.argv[2])
    from jaxgpt.config import from_dict
    from jaxgpt.train import train

    for mesh in meshes:
        raw["mesh"] = dict(zip(("data", "fsdp", "tensor"), mesh))
        result = train(from_dict(raw))
        print("RESULT " + json.dumps({"mesh": mesh, **describe(result)}), flush=True)


if __name__ == "__main__":
    main()
