"""jaxgpt: fine-tune Hugging Face GPT-2 into a chat model with JAX / Flax NNX."""

from jaxgpt.model import GPT2, GPT2Config, init_cache
from jaxgpt.weights import WeightsError, load_pretrained, save_pretrained

__all__ = ["GPT2", "GPT2Config", "init_cache", "load_pretrained", "save_pretrained", "WeightsError"]
__version__ = "0.1.0"
