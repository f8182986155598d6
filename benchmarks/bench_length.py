"""Length scaling (the paper's Figure 4): training memory and cells/s of both backbones against L.

    python benchmarks/bench_length.py                       # CPU default: 2 layers, batch 2, a few minutes
    python benchmarks/bench_length.py --layers 6 --batch 8 --dtype bf16    # on a GPU: OOM points included

Sweeps L = 256 ... 8192 at d = 256 for three models: the Transformer with fused attention
(``transformer``), the Transformer forced onto the non-fused math attention the paper used
(``tf-math``), and the GNN (fused). Each point is one AdamW training step on ``--batch`` cells of
exactly L distinct genes (no CLS, no padding), measured by ``scgraph.train.telemetry``: peak
training memory (CPU: parameters + tensors saved for backward + gradients + Adam state, each
distinct storage counted once; CUDA: ``max_memory_allocated``), and cells/s over ``--steps`` more.

A model stops at the first L it cannot run: a CUDA out-of-memory error (the OOM point), or, where
running it would endanger the machine, when the next L is predicted to exceed ``--memory-cap-gb``
or ``--time-cap-s`` (see ``too_big``).
The point is recorded with why. Writes ``--out``/length_scaling.{md,json} and two PNG figures,
prints the table, and checks the targets: the GNN's memory grows linearly in L (constant
activation bytes per token), and at L = 4096 the GNN needs at most a quarter of the math-attention
Transformer's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bench_speed import DTYPES, VARIANTS
from torch.nn.attention import SDPBackend, sdpa_kernel

from scgraph.config import CENSUS_VOCAB_SIZE, ModelConfig
from scgraph.models.config import PRESETS
from scgraph.models.model import build_model
from scgraph.plots import line_plot
from scgraph.train.telemetry import full_length_batch, measure_training_step

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
TARGET_L = 4096


@dataclass
class Point:
    model: str
    length: int
    peak_bytes: float | None = None
    activation_bytes: float | None = None
    cells_per_s: float | None = None
    seconds_per_step: float | None = None
    stopped: str | None = None  # why this point was not measured


def measure(backbone: str, backend: SDPBackend | None, length: int, args: argparse.Namespace) -> Point:
    cfg = ModelConfig(backbone=backbone, preset=args.preset, vocab_size=args.vocab, hidden=args.hidden,
                      layers=args.layers, heads=8, adjacency_rank=64)
    torch.manual_seed(0)
    model = build_model(cfg).to(args.device, DTYPES[args.dtype])
    batch = full_length_batch(cfg, args.batch, length, seed=1)
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        cost = measure_training_step(model, batch, timed_steps=args.steps)
    return Point(model="", length=length, peak_bytes=cost.peak_memory_bytes,
                 activation_bytes=cost.memory.get("activations"), cells_per_s=cost.cells_per_s,
                 seconds_per_step=args.batch / cost.cells_per_s)


def too_big(measured: list[Point], length: int, args: argparse.Namespace) -> str | None:
    """Why the next point should not run on this machine. Memory is predicted quadratic from the
    last point (safe: never more than the L x L tensors can add); time grows as it did over the
    last doubling (at least linearly), since fixed costs (the optimizer) hide the quadratic term."""
    last = measured[-1]
    ratio = length / last.length
    memory = last.peak_bytes * ratio**2
    per_step = last.seconds_per_step * ratio
    if len(measured) >= 2:
        before = measured[-2]
        observed = (last.seconds_per_step / before.seconds_per_step) ** (1 / math.log2(last.length / before.length))
        per_step = last.seconds_per_step * max(observed, 2.0) ** math.log2(ratio)
    if memory > args.memory_cap_gb * 2**30:
        return f"predicted {memory / 2**30:.1f} GiB > cap {args.memory_cap_gb:g} GiB"
    if per_step * (args.steps + 1) > args.time_cap_s:
        return f"predicted {per_step * (args.steps + 1):.0f} s > cap {args.time_cap_s:g} s"
    return None


def sweep(args: argparse.Namespace) -> list[Point]:
    points = []
    for name, backbone, backend in VARIANTS:
        measured: list[Point] = []
        for length in args.lengths:
            reason = too_big(measured, length, args) if args.device == "cpu" and measured else None
            if reason is None:
                try:
                    point = measure(backbone, backend, length, args)
                except torch.OutOfMemoryError:
                    point, reason = None, "out of memory"
                finally:
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
            if reason is not None:
                points.append(Point(name, length, stopped=reason))
                print(f"{name:>12} L={length:<5} stopped: {reason}", flush=True)
                break
            point.model = name
            points.append(point)
            measured.append(point)
            print(f"{name:>12} L={length:<5} peak {point.peak_bytes / 2**20:9.1f} MiB, activations "
                  f"{(point.activation_bytes or 0) / 2**20:9.1f} MiB, {point.cells_per_s:8.2f} cells/s", flush=True)
    return points


def check_targets(points: list[Point]) -> list[tuple[str, bool | None, str]]:
    """(target, holds or None when it could not be measured, the numbers)."""
    gnn = [p for p in points if p.model == "gnn" and p.stopped is None]
    per_token = [p.activation_bytes / p.length for p in gnn if p.activation_bytes]
    if len(per_token) >= 2:
        spread = max(per_token) / min(per_token)
        linear = (spread <= 1.1, f"activation bytes per token {min(per_token) / 1024:.1f}-"
                  f"{max(per_token) / 1024:.1f} KiB over L = {gnn[0].length}..{gnn[-1].length} "
                  f"(max/min {spread:.3f}; linear means constant)")
    else:
        linear = (None, "fewer than two GNN points measured")
    at = {p.model: p for p in points if p.length == TARGET_L and p.stopped is None}
    if "gnn" in at and "tf-math" in at:
        ratio = at["gnn"].peak_bytes / at["tf-math"].peak_bytes
        activations = at["gnn"].activation_bytes / at["tf-math"].activation_bytes
        quarter = (ratio <= 0.25, f"GNN / math-attention TF peak memory at L = {TARGET_L}: {ratio:.3f} "
                   f"(activations alone: {activations:.3f})")
    else:
        quarter = (None, f"not both measured at L = {TARGET_L}")
    return [("GNN memory linear in L", *linear),
            (f"GNN <= 1/4 of the math-attention Transformer's memory at L = {TARGET_L}", *quarter)]


def table(points: list[Point]) -> str:
    rows = ["| model | L | peak MiB | activations MiB | activation KiB/token | cells/s |", "|---|---|---|---|---|---|"]
    for p in points:
        if p.stopped:
            rows.append(f"| {p.model} | {p.length} | stopped: {p.stopped} | | | |")
        else:
            act = p.activation_bytes
            rows.append(f"| {p.model} | {p.length} | {p.peak_bytes / 2**20:.1f} | "
                        f"{'' if act is None else f'{act / 2**20:.1f}'} | "
                        f"{'' if act is None else f'{act / p.length / 1024:.1f}'} | {p.cells_per_s:.2f} |")
    return "\n".join(rows)


def figures(points: list[Point], out: Path, setting: str) -> list[Path]:
    """Memory and throughput against L, one line per model (log y: the math attention's L^2)."""
    measured = [p for p in points if p.stopped is None]
    names = list(dict.fromkeys(p.model for p in measured))

    def curves(value) -> dict[str, tuple[list[int], list[float]]]:
        return {n: ([p.length for p in measured if p.model == n], [value(p) for p in measured if p.model == n])
                for n in names}

    return [line_plot(curves(lambda p: p.peak_bytes / 2**20), out / "length_memory.png", log_y=True,
                      title=f"Peak training memory ({setting})", xlabel="genes per cell L", ylabel="MiB"),
            line_plot(curves(lambda p: p.cells_per_s), out / "length_cells_per_s.png", log_y=True,
                      title=f"Training throughput ({setting})", xlabel="genes per cell L", ylabel="cells/s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="genes per cell L")
    parser.add_argument("--preset", choices=PRESETS, default="scbenchmark", help="architecture preset")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size d (paper: 256)")
    parser.add_argument("--layers", type=int, default=2, help="blocks (paper: 6; 2 keeps CPU runs short)")
    parser.add_argument("--batch", type=int, default=2, help="cells per measured training step")
    parser.add_argument("--steps", type=int, default=1, help="timed steps after the measured one")
    parser.add_argument("--vocab", type=int, default=CENSUS_VOCAB_SIZE, help="gene vocabulary size G")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="parameter dtype (bf16 on GPUs)")
    parser.add_argument("--memory-cap-gb", type=float, default=6.0,
                        help="CPU: do not run a point predicted to need more (GiB)")
    parser.add_argument("--time-cap-s", type=float, default=240.0,
                        help="CPU: do not run a point predicted to take longer (s)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_length"), help="output directory")
    args = parser.parse_args()
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    setting = f"{args.layers} layers, d = {args.hidden}, batch {args.batch}, {args.dtype}"
    description = f"{args.preset}, {setting}, r = 64, G = {args.vocab:,}"
    print(f"{description} on {machine}", flush=True)
    points = sweep(args)
    targets = check_targets(points)
    args.out.mkdir(parents=True, exist_ok=True)
    verdicts = "\n".join(f"- {name}: {'HOLDS' if ok else 'not measured' if ok is None else 'FAILS'} ({why})"
                         for name, ok, why in targets)
    report = f"{description} on {machine}\n\n{table(points)}\n\nTargets:\n{verdicts}\n"
    (args.out / "length_scaling.md").write_text(report)
    (args.out / "length_scaling.json").write_text(json.dumps(
        {"setting": description, "machine": machine, "points": [asdict(p) for p in points],
         "targets": [{"target": n, "holds": ok, "numbers": why} for n, ok, why in targets]}, indent=2))
    paths = figures(points, args.out, setting)
    print(f"\n{report}\nwrote {args.out / 'length_scaling.md'}, .json, {', '.join(p.name for p in paths)}")


if __name__ == "__main__":
    main()
