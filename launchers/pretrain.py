"""Masked-value pretraining with DeepSpeed: `deepspeed launchers/pretrain.py --help`."""

import sys

from scgraph.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
