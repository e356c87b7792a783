"""jaxgpt: fine-tune Hugging Face GPT-2 into a chat model with JAX / Flax NNX."""

import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load on first use (below)
    from jaxgpt.model import GPT2, GPT2Config, init_cache
    from jaxgpt.loader import load_pretrained
    from jaxgpt.weights import WeightsError, save_pretrained

# Loaded on first use, so that ``python -m jaxgpt.train`` starts without jax (jaxgpt.host_memory
# may restart that process first).
_EXPORTS = {"GPT2": "jaxgpt.model", "GPT2Config": "jaxgpt.model", "init_cache": "jaxgpt.model",
            "load_pretrained": "jaxgpt.loader", "save_pretrained": "jaxgpt.weights", "WeightsError": "jaxgpt.weights"}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def _not_the_torch_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


# transformers, imported without torch, logs "PyTorch was not found. Models won't be available...":
# jaxgpt's models are its own (JAX), and torch is only the test / export-check extra. Only that line
# is dropped, on the logger that emits it (set here, before any jaxgpt module imports transformers).
logging.getLogger("transformers").addFilter(_not_the_torch_notice)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
