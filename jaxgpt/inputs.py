"""The rules for what users hand jaxgpt: numbers and text, from a config, a CLI or the Python API.

A number must be a number (not a bool, not a string), finite (NaN passes every ``>=`` test
it fails, and an infinite learning rate or epsilon trains garbage or nothing), and inside
its own ``Range``. The error is one line naming the key or flag::

    Range(0, 1, low_open=True).check("optimizer.lr", float("inf"), ConfigError)
    # ConfigError: optimizer.lr=inf: must be finite and in (0, 1]

Text holds no undecodable bytes. Python hands bytes that are not UTF-8 over as lone
surrogates (``'\\udcff'``: ``sys.argv``, a stdin read with ``surrogateescape``, a JSON
``"\\udcff"`` escape), which tokenizers refuse with a TypeError; ``readable`` turns each into
U+FFFD, as ``bytes.decode(errors="replace")`` does, and ``undecodable`` says where one is.

No jax here: the config, the CLIs, the sampler and the server all check with it.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The allowed values: bounds included unless ``low_open`` / ``high_open``; ``integer`` for counts."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    note: str = ""  # what special values mean, e.g. "0 = greedy"

    def __str__(self) -> str:
        low, high = math.isfinite(self.low), math.isfinite(self.high)
        if low and high:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if low:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if high:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def check(self, name: str, value, error: type[Exception] = ValueError):
        """``value`` (a float, or an int for ``integer``) if it obeys the rule, else ``error`` naming ``name``."""
        note = f" ({self.note})" if self.note else ""
        kind = "an integer" if self.integer else "a number"
        wanted = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise error(f"{name}={value!r}: must be {kind}{' ' + str(self) if str(self) else ''}{note}")
        try:
            x = int(value) if self.integer else float(value)
        except OverflowError:  # an int beyond float's range, e.g. a YAML 1e400 written as digits
            x = math.inf
        if not math.isfinite(x):
            raise error(f"{name}={x}: must be finite{' and ' + str(self) if str(self) else ''}{note}")
        too_low = x <= self.low if self.low_open else x < self.low
        too_high = x >= self.high if self.high_open else x > self.high
        if too_low or too_high:
            raise error(f"{name}={value}: must be {self}{note}")
        return x


FINITE = Range()

# Generation settings, as in transformers' generate (``jaxgpt.sample.check_sampling``).
SAMPLING = {
    "max_new_tokens": Range(1, integer=True),
    "temperature": Range(0, note="0 = greedy"),
    "top_k": Range(0, integer=True, note="0 = off"),
    "top_p": Range(0, 1, low_open=True, note="1 = off"),
}


_SURROGATE = re.compile("[\ud800-\udfff]")


def undecodable(text: str) -> str | None:
    """None for clean text, else a line saying where its first undecodable byte is."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    code = ord(m.group())
    byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X} (a lone surrogate)"
    return f"not valid UTF-8 text ({byte} at character {m.start() + 1})"


def readable(text: str) -> str:
    """``text`` with every undecodable byte (lone surrogate) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)
