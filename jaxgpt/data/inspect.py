"""``python -m jaxgpt.data inspect``: rendered examples with the trained tokens marked, and the statistics."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from jaxgpt.config import SECTIONS, DataError, config_path, from_dict, load_config
from jaxgpt.config_keys import CHOICES
from jaxgpt.data.build import StreamCursor, StreamingDataset, build_datasets, build_preference_datasets
from jaxgpt.data.preference import PreferenceDataset, detect_pair_form
from jaxgpt.data.read import read_records
from jaxgpt.tokenizer import load_tokenizer


def render_marked(tok, ids: np.ndarray, mask: np.ndarray, color: bool) -> str:
    """Decoded tokens with trained ones (targets with loss) marked: green, or between ⟦ ⟧."""
    trained = mask.astype(bool).copy()
    trained[0] = False  # the first token is never a target
    on, off = ("\033[1;32m", "\033[0m") if color else ("⟦", "⟧")
    parts, start = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or trained[j] != trained[start]:
            text = tok.decode(ids[start:j].tolist())
            parts.append(on + text + off if trained[start] else text)
            start = j
    return "".join(parts)


def inspect_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.data inspect",
                                description="Show rendered examples with the trained tokens marked, and statistics.")
    p.add_argument("--data", action="append", default=[], help="file, folder or hub id (repeatable)")
    p.add_argument("--config", help="YAML/JSON run config or a shipped config's name (demo); its `data:` section "
                                    "(or the whole file) is the DataConfig")
    p.add_argument("--format", choices=CHOICES["data.format"])
    p.add_argument("--template", choices=CHOICES["data.template"])
    p.add_argument("--seq-len", type=int)
    p.add_argument("--loss-on", choices=CHOICES["data.loss_on"])
    p.add_argument("--truncation", choices=CHOICES["data.truncation"])
    p.add_argument("--skip-invalid", action="store_true", default=None)
    p.add_argument("--no-pack", action="store_true", help="one conversation per row")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the vendored GPT-2 files)")
    p.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    args = p.parse_args(argv)
    try:
        d: dict[str, Any] = {}
        if args.config:
            d = _read_config(args.config)
        if args.data:
            d["sources"] = args.data
        for key in ("format", "template", "seq_len", "loss_on", "truncation", "skip_invalid"):
            if getattr(args, key) is not None:
                d[key] = getattr(args, key)
        if args.no_pack:
            d["pack"] = False
        cfg = from_dict({"data": d}, args.config or "command line").data
        if not cfg.sources:
            raise DataError(f"{args.config}: no data.sources (or give --data PATH)" if args.config
                            else "give --data PATH or --config FILE")
        tok = load_tokenizer(args.tokenizer)
        first = next(read_records(cfg.sources[0]), (None, None))[1]  # preference pairs are told by their keys
        train, evalset = (build_preference_datasets if detect_pair_form(first) else build_datasets)(cfg, tok)
        stats = train.stats
        if isinstance(train, StreamingDataset):  # show the first packing window
            cursor = StreamCursor(train, cfg.seed, cfg.shuffle)
            train = cursor.next_row()[0]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    mark = "green" if color else "⟦ ⟧"
    print(f"template={cfg.template} loss_on={cfg.loss_on} seq_len={cfg.seq_len} vocab={len(tok)}; "
          f"trained tokens shown in {mark}\n")
    if isinstance(train, PreferenceDataset):
        _show_pairs(train, tok, args.n, color)
    seen = set() if not isinstance(train, PreferenceDataset) else None
    for k in range(train.num_segments if seen is not None else 0):
        if len(seen) >= args.n:
            break
        where = train.segment_sources[k]
        if where in seen:
            continue
        seen.add(where)
        ids, mask = train.segment(k)
        print(f"── {where}  ({len(ids)} tokens, {int(mask[1:].sum())} trained)")
        print(render_marked(tok, ids, mask, color).rstrip("\n"))
        print()
    print("train (first streaming window):" if cfg.streaming else "train:")
    print(stats.summary())
    if evalset is not None:
        print("\neval:")
        print(evalset.stats.summary())
    return 0


def _show_pairs(ds: PreferenceDataset, tok, n: int, color: bool) -> None:
    """The first ``n`` pairs, chosen then rejected, their scored tokens marked."""
    for k in range(min(n, ds.num_pairs)):
        print(f"── {ds.segment_sources[2 * k]}  (pair {k + 1} of {ds.num_pairs})")
        for side, seg in (("chosen", 2 * k), ("rejected", 2 * k + 1)):
            ids, mask = ds.segment(seg)
            print(f"{side} ({len(ids)} tokens, {int(mask[1:].sum())} scored):")
            print(render_marked(tok, ids, mask, color).rstrip("\n"))
        print()


def _read_config(path: str) -> dict:
    p = config_path(path)  # a file, or the name of a shipped config
    import yaml

    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a mapping")
    if any(k in SECTIONS for k in d):  # a run config: read as `train` reads it (bundled paths, value types)
        return load_config(p).data.to_dict()
    return dict(d)  # a data section on its own


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect":
        argv = argv[1:]
    return inspect_main(argv)
