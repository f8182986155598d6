"""Which synthetic generator can reproduce the paper's Table I: each one's error-floor quotient
(static adjacency / positional weights, the GNN/TF ratio of two models at their floors) on the
paper's grid, against the paper's ratios.

    python benchmarks/bench_generators.py          # under a minute on one core

Prints a markdown table for benchmarks/RESULTS.md: row averages per beta, the worst row's relative
error (the issue's target: within 30 %) and the RMS log distance over the 30 cells.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from tqdm.auto import tqdm

from scgraph.synthetic.calibration import calibrate, format_calibration
from scgraph.synthetic.generators import GENERATORS, static_coefficients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40_000, help="fresh samples per floor")
    parser.add_argument("--w-seed", type=int, default=0, help="seed of the static coefficients (the study's)")
    args = parser.parse_args()
    started, load = time.time(), os.getloadavg()[0]
    w = static_coefficients(args.w_seed)
    results = [calibrate(g, w=w, samples=args.samples) for g in tqdm(GENERATORS, desc="generators")]
    print(format_calibration(results))
    print(f"\n{platform.machine()} CPU, load {load:.1f} at the start; {args.samples} samples per floor; "
          f"{time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
