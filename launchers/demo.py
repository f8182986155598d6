"""`make demo`: the whole pipeline on real CBMC cells, offline, in one command; see --help."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from scgraph.demo import DemoSettings, StepFailed, run_demo


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="launchers/demo.py",
        description="Build a census-layout SOMA collection from the real CBMC cells, shard it through the census "
                    "path, pretrain the Transformer and the GNN with deepspeed, probe both on held-out cells, and "
                    "print the Table II comparison. A second run reuses every finished step.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(DemoSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f.metadata["help"])
    try:
        run_demo(DemoSettings(**vars(parser.parse_args())))
    except (ValueError, StepFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
