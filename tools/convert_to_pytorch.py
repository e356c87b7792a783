"""Thin wrapper: ``python tools/convert_to_pytorch.py CHECKPOINT OUT [--dtype bfloat16] ...``.

Same as ``python -m jaxgpt.export --checkpoint CHECKPOINT --out OUT ...`` (see jaxgpt/export.py).
"""

import sys

from jaxgpt.export import main

if __name__ == "__main__":
    args = sys.argv[1:]
    positional = [a for a in args if not a.startswith("-")][:2]
    if len(positional) == 2 and args[:2] == positional:
        args = ["--checkpoint", positional[0], "--out", positional[1], *args[2:]]
    main(args)
