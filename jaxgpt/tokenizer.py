"""The tokenizer and the chat template jaxgpt trains with.

GPT-2 has no chat format. ``add_chat_template`` gives it one, stored in the
tokenizer itself (``tokenizer.chat_template``), so that ``save_pretrained``
writes it and transformers' ``apply_chat_template(messages,
add_generation_prompt=True)`` renders exactly the text jaxgpt trained on.

Two templates:

``chatml`` (default)  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn.
    Adds two special tokens (vocab 50257 -> 50259): the model's embedding must
    grow to ``len(tokenizer)`` (``jaxgpt.weights.resize_token_embeddings``).
``plain``  ``User:\\n{content}\\n\\nAssistant:\\n{content}<|endoftext|>\\n\\n``.
    No new tokens: the end of an assistant turn is GPT-2's own ``<|endoftext|>``.

Both wrap each assistant reply *and its end-of-turn token* in
``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
marks exactly the tokens the model must learn to produce, including the token
that makes it stop. Message contents are ``trim``-med (as Llama 3's template
does): the newline after a role header then always stays its own token, so no
token straddles a prompt/reply boundary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import GPT2Tokenizer, PreTrainedTokenizerBase

VENDORED_GPT2 = Path(__file__).resolve().parent / "assets" / "gpt2-tokenizer"

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ROLES = ("system", "user", "assistant")

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] | trim + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize + ':\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + '<|endoftext|>' -}}{%- endgeneration -%}"
    "{{- '\\n\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] | trim + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:\\n' -}}{%- endif -%}"
)

TEMPLATES = {"chatml": CHATML_TEMPLATE, "plain": PLAIN_TEMPLATE}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether a model folder carries its own tokenizer (else jaxgpt uses the vendored GPT-2 one)."""
    from jaxgpt.paths import upath

    return any((upath(folder) / f).exists() for f in TOKENIZER_FILES)


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or set up."""


GPT2_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")  # one class in transformers 5


def from_pretrained(name_or_path: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained``, without importing it for a local folder of GPT-2's own class.

    Importing AutoTokenizer loads transformers' model configs, which import torch when it is
    installed: seconds of every command's start-up, for a class that GPT-2 folders name anyway.
    """
    config = Path(name_or_path) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") in GPT2_CLASSES:
        return GPT2Tokenizer.from_pretrained(name_or_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer: the vendored files (offline) for None, else a local folder or hub id.

    Never runs remote code. A tokenizer saved by jaxgpt keeps its chat template.
    """
    if name_or_path is None:
        # GPT2Tokenizer(vocab_file=, merges_file=) is silently empty in transformers 5; from_pretrained is not.
        tok = GPT2Tokenizer.from_pretrained(str(VENDORED_GPT2))
    else:
        from jaxgpt.paths import is_local_path, is_url, local_copy, missing_folder, upath

        local = upath(name_or_path)
        if is_url(local) and local.is_dir():  # transformers reads local files: a bucket folder's copy
            local = local_copy(local)
        if is_local_path(str(name_or_path)) and not local.exists():
            raise TokenizerError(missing_folder(str(name_or_path)))
        try:
            tok = from_pretrained(str(local if local.exists() else name_or_path))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot load a tokenizer from {name_or_path}: {e}") from e
    if len(tok) == 0:
        raise TokenizerError(f"tokenizer from {name_or_path or VENDORED_GPT2} is empty")
    if tok.pad_token is None:
        tok.pad_token = ENDOFTEXT if ENDOFTEXT in tok.get_vocab() else tok.eos_token
    return tok


def add_chat_template(tok: PreTrainedTokenizerBase, template: str = "chatml") -> PreTrainedTokenizerBase:
    """Give ``tok`` a chat template (in place, idempotent) and return it.

    ``chatml`` adds ``<|im_start|>``/``<|im_end|>`` as special tokens; ``plain``
    adds none. Either way the pad token is ``<|endoftext|>`` (padding is never
    trained, and GPT-2 has no other spare token).
    """
    if template not in TEMPLATES:
        raise TokenizerError(f"template={template!r}: choose from {sorted(TEMPLATES)}")
    if template == "chatml":
        missing = [t for t in (IM_START, IM_END) if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tok.chat_template = TEMPLATES[template]
    if ENDOFTEXT in tok.get_vocab():
        tok.pad_token = ENDOFTEXT
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def template_name(tok: PreTrainedTokenizerBase) -> str | None:
    """``"chatml"``/``"plain"`` when ``tok`` carries one of jaxgpt's templates, else None."""
    for name, text in TEMPLATES.items():
        if tok.chat_template == text:
            return name
    return None


def end_of_turn_id(tok: PreTrainedTokenizerBase) -> int:
    """The token that ends an assistant turn: ``<|im_end|>`` with ChatML, else EOS."""
    if template_name(tok) == "chatml" or (tok.chat_template and IM_END in tok.chat_template):
        return tok.convert_tokens_to_ids(IM_END)
    return tok.eos_token_id


def stop_token_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end generation (for ``generation_config.eos_token_id`` and samplers)."""
    ids = [end_of_turn_id(tok), tok.eos_token_id]
    return sorted(set(i for i in ids if i is not None))
