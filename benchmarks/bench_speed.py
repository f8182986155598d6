"""Training speed and cost of the backbones side by side: the paper's Table II settings and long cells.

    python benchmarks/bench_speed.py                         # CPU: scbenchmark at every setting, symmetric at 256/512
    python benchmarks/bench_speed.py --device cuda --dtype bf16 --batch 32

Per setting (hidden/L) it builds the fused Transformer (``transformer``), the Transformer forced onto
the non-fused math attention the paper used (``tf-math``, memory only), the softmax GNN (``gnn``,
scores computed once) and the linear GNN (``gnn_linear``), at the paper's 6 layers, G = 60,664,
r = 64, and measures, in one process with the same threads:

* a training step (forward + backward + fused AdamW) on ``--batch`` full-length cells: the models
  take turns, ``--rounds`` rounds, the median time of each (so load that comes and goes hits all
  alike); ms/step, cells/s, achieved GFLOP/s;
* forward+backward FLOPs per cell (FlopCounterMode, math attention for the Transformer) beside the
  analytic count, and the forward alone;
* peak training memory of the first step (parameters, gradients, optimizer state, activations;
  CUDA: max_memory_allocated);
* for the softmax GNN, the share of the step spent on its adjacency factors' gradients and update
  (the step timed again with the factors frozen).

Writes ``--out``/speed.{md,json}, prints the tables with the TF/GNN ratios beside the paper's, and
checks the targets (see ``TARGETS``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scgraph.config import CENSUS_VOCAB_SIZE, ModelConfig
from scgraph.data.batch import Batch
from scgraph.models.model import ADJACENCIES, build_model, mvp_loss
from scgraph.train.optim import param_groups
from scgraph.train.telemetry import full_length_batch, measure_flops, measure_training_step

# (hidden, L) -> the paper's Table II TF/GNN ratios (FLOPs, memory)
PAPER = {(256, 512): (2.01 / 0.76, 169.96 / 27.50), (128, 512): (0.70 / 0.41, 147.52 / 19.41),
         (512, 512): (6.44 / 1.77, 216.04 / 44.34), (256, 256): (0.81 / 0.24, 52.29 / 9.41),
         (256, 1024): (5.64 / 2.63, 588.14 / 76.63)}
LONG = ((256, 2048), (256, 4096))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# what is measured: (name, backbone, attention backend forced; None = the model's own kernels)
VARIANTS = [("transformer", "transformer", None), ("tf-math", "transformer", SDPBackend.MATH), ("gnn", "gnn", None)]
TIMED = ("transformer", "gnn", "gnn_linear")


@dataclass
class Result:
    preset: str
    hidden: int
    length: int
    model: str
    batch: int
    ms_per_step: float = float("nan")
    cells_per_s: float = float("nan")
    gflop_per_cell: float = float("nan")  # forward + backward, measured
    gflop_per_cell_analytic: float = float("nan")
    forward_gflop: float = float("nan")
    forward_gflop_analytic: float = float("nan")
    achieved_gflops: float = float("nan")
    peak_mib: float = float("nan")
    activations_mib: float = float("nan")
    adjacency_share: float = float("nan")  # of the step: the factors' gradients and optimizer update


def cells(cfg: ModelConfig, batch: int, length: int, seed: int = 1) -> Batch:
    """``batch`` cells of ``length`` distinct genes, with the CLS token where the model reads one."""
    out = full_length_batch(cfg, batch, length, seed=seed)
    if cfg.cell_embedding != "cls":
        return out
    return Batch(genes=torch.cat([torch.full((batch, 1), cfg.cls_id), out.genes], 1),
                 values=torch.cat([torch.zeros(batch, 1), out.values], 1),
                 masked=torch.cat([torch.zeros(batch, 1, dtype=torch.bool), out.masked], 1))


#: What the steps here train: the paper's masked value prediction alone.
PAPER_OBJECTIVE = {"mvp": 1.0}


class Stepper:
    """One model's training step (fused AdamW, weight decay on matrices), to time in turns."""

    def __init__(self, model: torch.nn.Module, batch: Batch) -> None:
        self.model, self.batch = model.train(), batch
        self.optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, fused=True)

    def step(self) -> float:
        device = next(self.model.parameters()).device
        start = time.perf_counter()
        b = self.batch
        mvp_loss(self.model(b.genes, b.values, b.masked), b.values, b.masked).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def freeze_adjacency(model: torch.nn.Module, frozen: bool) -> None:
    for module in model.modules():
        if isinstance(module, tuple(ADJACENCIES.values())):
            for table in (m for m in module.children() if isinstance(m, torch.nn.Embedding)):
                table.weight.requires_grad_(not frozen)


def build(name: str, preset: str, hidden: int, args: argparse.Namespace) -> ModelConfig:
    backbone = "transformer" if name.startswith("tf") else name
    return ModelConfig(backbone=backbone, preset=preset, vocab_size=args.vocab, hidden=hidden, layers=args.layers,
                       heads=8, adjacency_rank=64)


def measure_setting(preset: str, hidden: int, length: int, args: argparse.Namespace) -> list[Result]:
    batch = max(1, args.batch * 512 // length) if length > 512 else args.batch
    results, steppers = {}, {}
    for name in ("transformer", "tf-math", "gnn", "gnn_linear"):
        cfg = build(name, preset, hidden, args)
        torch.manual_seed(0)
        model = build_model(cfg)
        r = results[name] = Result(preset, hidden, length, name, batch)
        if name != "tf-math" or length <= 1024:  # the math Transformer's FLOPs are the fused one's
            flops = measure_flops(model, cells(cfg, 1, length), PAPER_OBJECTIVE)
            r.gflop_per_cell = flops.forward_backward / 1e9
            r.gflop_per_cell_analytic = flops.analytic_forward_backward / 1e9
            r.forward_gflop, r.forward_gflop_analytic = flops.forward / 1e9, flops.analytic_forward / 1e9
        model = model.to(args.device, DTYPES[args.dtype])
        data = cells(cfg, batch, length).to(args.device)
        backend = SDPBackend.MATH if name == "tf-math" else None
        with sdpa_kernel(backend) if backend else contextlib.nullcontext():
            cost = measure_training_step(model, data, timed_steps=0)  # the first step: memory
        r.peak_mib = cost.peak_memory_bytes / 2**20
        r.activations_mib = cost.memory.get("activations", float("nan")) / 2**20
        if name in TIMED:
            steppers[name] = Stepper(model, data)
            steppers[name].step()  # warm
    times: dict[str, list[float]] = {name: [] for name in steppers}
    frozen: list[float] = []
    for _ in range(args.rounds):  # in turns, so passing load falls on every model alike
        for name, stepper in steppers.items():
            times[name].append(stepper.step())
        freeze_adjacency(steppers["gnn"].model, True)
        frozen.append(steppers["gnn"].step())
        freeze_adjacency(steppers["gnn"].model, False)
    for name, spent in times.items():
        r = results[name]
        seconds = statistics.median(spent)
        r.ms_per_step, r.cells_per_s = 1000 * seconds, batch / seconds
        r.achieved_gflops = r.gflop_per_cell * batch / seconds
    gnn = results["gnn"]
    gnn.adjacency_share = max(0.0, 1 - statistics.median(frozen) / (gnn.ms_per_step / 1000))
    return list(results.values())


def table(results: list[Result]) -> str:
    header = ("| preset | hidden/L | model | batch | ms/step | cells/s | GFLOP/cell (fwd+bwd) | analytic | fwd | "
              "fwd analytic | GFLOP/s | peak MiB | activ. MiB | adjacency share |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        lines.append(f"| {r.preset} | {r.hidden}/{r.length} | {r.model} | {r.batch} | {r.ms_per_step:.0f} | "
                     f"{r.cells_per_s:.2f} | {r.gflop_per_cell:.2f} | {r.gflop_per_cell_analytic:.2f} | "
                     f"{r.forward_gflop:.2f} | {r.forward_gflop_analytic:.2f} | {r.achieved_gflops:.1f} | "
                     f"{r.peak_mib:.0f} | {r.activations_mib:.0f} | "
                     + ("" if r.adjacency_share != r.adjacency_share else f"{100 * r.adjacency_share:.0f}%") + " |")
    return "\n".join(lines)


def ratios(results: list[Result]) -> str:
    """TF / GNN per setting beside the paper's (FLOPs and memory) and the speed-ups."""
    find = {(r.preset, r.hidden, r.length, r.model): r for r in results}
    header = ("| preset | hidden/L | FLOPs TF/GNN | paper | peak mem TF/GNN | activ. tf-math/GNN | paper mem | "
              "GNN speed-up | linear speed-up | linear / GNN step |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for preset, hidden, length in dict.fromkeys((r.preset, r.hidden, r.length) for r in results):
        tf, math, gnn, lin = (find[preset, hidden, length, m] for m in ("transformer", "tf-math", "gnn", "gnn_linear"))
        paper = PAPER.get((hidden, length), (float("nan"), float("nan")))
        lines.append(f"| {preset} | {hidden}/{length} | {tf.gflop_per_cell / gnn.gflop_per_cell:.2f} | "
                     f"{paper[0]:.2f} | {tf.peak_mib / gnn.peak_mib:.2f} | "
                     f"{math.activations_mib / gnn.activations_mib:.2f} | {paper[1]:.2f} | "
                     f"{gnn.cells_per_s / tf.cells_per_s:.2f}x | {lin.cells_per_s / tf.cells_per_s:.2f}x | "
                     f"{lin.ms_per_step / gnn.ms_per_step:.2f} |")
    return "\n".join(lines)


def targets(results: list[Result]) -> list[str]:
    """The performance issue's targets, met or missed, with the numbers."""
    find = {(r.preset, r.hidden, r.length, r.model): r for r in results}
    lines = []
    key = ("scbenchmark", 256, 512)
    if (*key, "gnn") in find:
        tf, gnn = find[(*key, "transformer")], find[(*key, "gnn")]
        speed = gnn.cells_per_s / tf.cells_per_s
        lines.append(f"GNN cells/s >= 2.5x the fused Transformer's at 256/512: {speed:.2f}x "
                     f"{'met' if speed >= 2.5 else 'MISSED'}")
        gap = gnn.forward_gflop / gnn.forward_gflop_analytic - 1
        lines.append(f"GNN measured forward FLOPs within 5% of analytic: {100 * gap:+.1f}% "
                     f"{'met' if abs(gap) <= 0.05 else 'MISSED'}")
        memory = gnn.peak_mib / tf.peak_mib
        lines.append(f"GNN peak memory <= 1/2 the fused Transformer's: {memory:.2f} "
                     f"{'met' if memory <= 0.5 else 'MISSED'}")
        lines.append(f"adjacency factors' gradients + update: {100 * gnn.adjacency_share:.0f}% of the GNN's step "
                     f"({'over' if gnn.adjacency_share > 0.2 else 'under'} the 20% threshold)")
    long = ("scbenchmark", 256, 4096)
    if (*long, "gnn_linear") in find:
        tf, gnn, lin = (find[(*long, m)] for m in ("transformer", "gnn", "gnn_linear"))
        speed, step = lin.cells_per_s / tf.cells_per_s, lin.ms_per_step / gnn.ms_per_step
        lines.append(f"L = 4096: linear GNN >= 4x the Transformer's cells/s: {speed:.2f}x "
                     f"{'met' if speed >= 4 else 'MISSED'}")
        lines.append(f"L = 4096: linear GNN step <= 1/4 the softmax GNN's: {step:.2f} "
                     f"{'met' if step <= 0.25 else 'MISSED'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="scbenchmark,symmetric", help="comma-separated presets; symmetric "
                        "runs at 256/512 only")
    parser.add_argument("--layers", type=int, default=6, help="blocks (paper: 6)")
    parser.add_argument("--vocab", type=int, default=CENSUS_VOCAB_SIZE, help="gene vocabulary size G")
    parser.add_argument("--batch", type=int, default=8, help="cells per step at L <= 512 (scaled down as 512/L "
                        "beyond: one batch's tokens stay the same); 32 on a GPU")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each model, taken in turns")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="parameter dtype (bf16 on GPUs)")
    parser.add_argument("--settings", default="all", help="'all', or hidden/L pairs like 256/512,256/4096")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_speed"), help="output directory")
    args = parser.parse_args()
    settings = [*PAPER, *LONG] if args.settings == "all" else [tuple(map(int, s.split("/")))
                                                                for s in args.settings.split(",")]
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    started, load = time.time(), os.getloadavg()[0]
    print(f"{args.layers} layers, G = {args.vocab:,}, r = 64, {args.dtype} on {machine}; load {load:.1f}", flush=True)
    results = []
    for preset in args.presets.split(","):
        for hidden, length in settings if preset == "scbenchmark" else [s for s in settings if s == (256, 512)]:
            results += measure_setting(preset, hidden, length, args)
            print(f"  {preset} {hidden}/{length} done (load {os.getloadavg()[0]:.1f})", flush=True)
    report = (f"{args.layers} layers, G = {args.vocab:,}, r = 64, {args.dtype} on {machine}; load {load:.1f} at the "
              f"start, {os.getloadavg()[0]:.1f} at the end; {time.time() - started:.0f} s\n\n" + table(results) +
              "\n\n" + ratios(results) + "\n\n" + "\n".join(f"- {line}" for line in targets(results)) + "\n")
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.md").write_text(report)
    (args.out / "speed.json").write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
