"""Masked-value pretraining with DeepSpeed: `deepspeed launchers/pretrain.py --help`."""

from __future__ import annotations

import sys

from scgraph.train.engine import run_pretraining
from scgraph.train.options import build_parser, config_from_args


def main() -> int:
    args = build_parser().parse_args()
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_pretraining(cfg)


if __name__ == "__main__":
    sys.exit(main())
