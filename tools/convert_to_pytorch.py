"""Thin wrapper: ``python tools/convert_to_pytorch.py CHECKPOINT OUT [--dtype bfloat16] ...``.

Same as ``python -m jaxgpt.export --checkpoint CHECKPOINT --out OUT ...`` (see jaxgpt/export.py);
the options may come before or after the two paths.
"""

import sys

from jaxgpt.export import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="tools/convert_to_pytorch.py", positional=True)
