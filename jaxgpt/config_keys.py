"""The rules for a run config's keys, and how a raw YAML value becomes a typed one.

Each key's value is checked in one place, ``check_key`` (its choices, float range or integer
minimum), as ``build`` reads it into the section dataclasses of ``jaxgpt.config``; an unknown key
gets a did-you-mean. Every error is one line naming the key (``ConfigError``; ``DataError`` for the
data section, which ``jaxgpt.data`` reads too).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any

from jaxgpt.inputs import FINITE, Range, undecodable


class ConfigError(ValueError):
    """A configuration problem, as one line naming the file and key."""


class DataError(ValueError):
    """Bad data or data config; the message names the file and line, row or key."""


def help_field(default, help: str):
    """A dataclass field with a help string (shown by ``python -m jaxgpt.train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Every float key's range (jaxgpt.inputs: finite, and inside it); any other float must be finite.
FLOAT_RANGES = {
    "model.dropout": Range(0, 1, high_open=True),
    # AdamW moves every weight by about lr per step: past 1 no GPT-2 survives a step.
    "optimizer.lr": Range(0, 1, low_open=True),
    "optimizer.b1": Range(0, 1, high_open=True),
    "optimizer.b2": Range(0, 1, high_open=True),
    "optimizer.eps": Range(0, 1, low_open=True),
    "optimizer.weight_decay": Range(0),
    "optimizer.grad_clip": Range(0, note="0 or null = off"),
    "schedule.min_lr_ratio": Range(0, 1),
    "data.eval_fraction": Range(0, 1, high_open=True),
    "logging.peak_flops_per_device": Range(0, low_open=True, note="null = known TPUs/GPUs only"),
    "lora.alpha": Range(0, low_open=True, note="null = lora.rank"),
    "lora.dropout": Range(0, 1, high_open=True),
    "objective.beta": Range(0, low_open=True),
    "objective.label_smoothing": Range(0, 0.5, high_open=True),
}
FORMATS = ("auto", "messages", "sharegpt", "prompt_completion", "alpaca", "text")
# The string keys that take one of a few values.
CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.attention": ("auto", "einsum", "xla", "cudnn", "flash"),
    "model.kernels": ("auto", "xla", "pallas"),
    "schedule.name": ("cosine", "linear", "constant"),
    "data.format": FORMATS,
    "data.template": ("chatml", "plain", "tokenizer"),
    "data.loss_on": ("assistant", "all", "completion"),
    "data.truncation": ("truncate", "drop"),
    "lora.base_dtype": ("float32", "bfloat16"),
    "objective.name": ("sft", "dpo"),
    "objective.loss": ("sigmoid", "ipo", "hinge", "robust"),  # jaxgpt.objectives.DPO_LOSSES
}
# The integer keys with a lower bound: (bound, what the edge means).
MINIMUMS = {
    "train.steps": (1, ""), "train.batch_size": (1, ""), "train.grad_accum": (1, ""),
    "train.eval_every": (0, " (0 = never)"), "train.eval_batches": (1, " (null = the whole held-out set)"),
    "schedule.warmup_steps": (0, ""), "schedule.decay_steps": (1, " (null = train.steps)"),
    "checkpoint.save_every": (1, ""), "checkpoint.keep": (1, ""), "logging.log_every": (1, ""),
    "lora.rank": (0, " (0 = off)"),
}


def check_key(key: str, value, error=ConfigError):
    """``value`` if it is one of the key's choices, inside its float range and above its minimum."""
    if value is None:
        return value
    if key in CHOICES and value not in CHOICES[key]:
        raise error(f"{key}={value!r}: choose from {', '.join(CHOICES[key])}")
    if key in FLOAT_RANGES:
        return FLOAT_RANGES[key].check(key, value, error)
    if key in MINIMUMS and value < MINIMUMS[key][0]:
        low, note = MINIMUMS[key]
        raise error(f"{key}={value}: must be {'at least 1' if low == 1 else f'>= {low}'}{note}")
    return value


# ----------------------------------------------------------------------------- building sections from dicts

def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """``value`` checked against the annotation ``tp`` (ints accepted as floats, '3e-5' as a float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        kinds = [a for a in args if a is not type(None)]
        if kinds == [float] or (kinds == [int] and isinstance(value, int) and not isinstance(value, bool)):
            raise errors[0]  # a number of the right type out of range (inf, 0): say why, not just the types
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        if dataclasses.is_dataclass(arg) and isinstance(value, (str, dict)):
            value = [value]  # data.sources: one source may be given without a list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if dataclasses.is_dataclass(arg):  # strings or mappings, checked by their owner (DataConfig)
            return list(value)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return check_key(where, value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if where in FLOAT_RANGES:
                return check_key(where, value)
            return FINITE.check(where, value, ConfigError)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            if undecodable(value):
                raise ConfigError(f"{where}: {undecodable(value)}")
            return check_key(where, value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value  # other annotations (e.g. in DataConfig) are the owner's to check


def build(cls, raw: dict, where: str):
    hints = field_types(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            options = [f"{where}.{k}" if where else k for k in fields]
            raise ConfigError(f"unknown key {dotted!r}{suggest(dotted, options)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a section's own __post_init__ check
        raise ConfigError(f"{where}: {e}") from None


def suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    if not close:  # 'lrr' vs 'optimizer.lr': compare the last part too
        tail = key.rsplit(".", 1)[-1]
        by_tail = {o.rsplit(".", 1)[-1]: o for o in options}
        close = [by_tail[m] for m in difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)]
    return f" (did you mean {close[0]!r}?)" if close else ""
