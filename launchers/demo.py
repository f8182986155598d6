"""`make demo`: train both backbones on real CBMC cells and print their MVP losses side by side."""

from __future__ import annotations

import argparse
import dataclasses

from scgraph.demo import DemoSettings, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for f in dataclasses.fields(DemoSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"(default: {f.default})")
    run_demo(DemoSettings(**vars(parser.parse_args())))


if __name__ == "__main__":
    main()
