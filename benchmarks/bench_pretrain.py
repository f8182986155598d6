"""Training cost of both backbones at the paper's five Table II settings, beside the paper's ratios.

    python benchmarks/bench_pretrain.py [--preset scbenchmark] [--device cpu|cuda] [--dtype fp32|bf16]

Prints, per setting (hidden/L) and backbone: forward+backward FLOPs per cell (FlopCounterMode under
the math attention backend, and the analytic count), peak training memory of one AdamW step
(parameters, gradients, optimizer state, activations; CUDA: max_memory_allocated), activation
memory alone, and training cells/s on this device; then the TF/GNN ratios beside the paper's.
"""

from __future__ import annotations

import argparse
import contextlib
import platform

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scgraph.config import CENSUS_VOCAB_SIZE, PRESETS, ModelConfig
from scgraph.data.batch import Batch
from scgraph.models import build_model
from scgraph.train.telemetry import full_length_batch, measure_flops, measure_training_step

# (hidden, L) -> the paper's Table II TF/GNN ratios (FLOPs, memory)
PAPER = {(256, 512): (2.01 / 0.76, 169.96 / 27.50), (128, 512): (0.70 / 0.41, 147.52 / 19.41),
         (512, 512): (6.44 / 1.77, 216.04 / 44.34), (256, 256): (0.81 / 0.24, 52.29 / 9.41),
         (256, 1024): (5.64 / 2.63, 588.14 / 76.63)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# what is measured: (name, backbone, attention backend forced for training; None = fused where available)
VARIANTS = [("transformer", "transformer", None), ("tf-math", "transformer", SDPBackend.MATH), ("gnn", "gnn", None)]


def measure(backbone: str, hidden: int, length: int, backend: SDPBackend | None,
            args: argparse.Namespace) -> dict[str, float]:
    cfg = ModelConfig(backbone=backbone, preset=args.preset, vocab_size=args.vocab, hidden=hidden,
                      layers=args.layers, heads=8, adjacency_rank=64)
    torch.manual_seed(0)
    model = build_model(cfg)
    flops = measure_flops(model, full_length_batch(cfg, 1, length))
    batch = full_length_batch(cfg, args.batch, length, seed=1)
    if cfg.cell_embedding == "cls":  # L genes plus the CLS token, as in training
        batch = Batch(genes=torch.cat([torch.full((args.batch, 1), cfg.cls_id), batch.genes], 1),
                      values=torch.cat([torch.zeros(args.batch, 1), batch.values], 1),
                      masked=torch.cat([torch.zeros(args.batch, 1, dtype=torch.bool), batch.masked], 1))
    model = model.to(args.device, DTYPES[args.dtype])
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        cost = measure_training_step(model, batch, timed_steps=args.steps)
    return {"flops": flops.forward_backward, "flops_analytic": flops.analytic_forward_backward,
            "peak": cost.peak_memory_bytes, "activations": cost.memory.get("memory_activations_bytes", float("nan")),
            "cells_per_s": cost.cells_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="scbenchmark", help="architecture preset")
    parser.add_argument("--layers", type=int, default=6, help="blocks (paper: 6)")
    parser.add_argument("--vocab", type=int, default=CENSUS_VOCAB_SIZE, help="gene vocabulary size G")
    parser.add_argument("--batch", type=int, default=4, help="cells per training step measured")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="parameter dtype (bf16 on GPUs)")
    args = parser.parse_args()
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"preset {args.preset}, {args.layers} layers, G = {args.vocab:,}, r = 64, batch {args.batch}, "
          f"{args.dtype} on {machine}")
    header = (f"{'hidden/L':>9} {'backbone':>12} {'GFLOP/cell':>11} {'analytic':>9} {'peak MB':>9} "
              f"{'activ. MB':>10} {'cells/s':>8}")
    print(header + "\n" + "-" * len(header))
    results: dict[tuple[int, int, str], dict[str, float]] = {}
    for hidden, length in PAPER:
        for name, backbone, backend in VARIANTS:
            r = results[hidden, length, name] = measure(backbone, hidden, length, backend, args)
            print(f"{hidden:>4}/{length:<4} {name:>12} {r['flops'] / 1e9:>11.2f} "
                  f"{r['flops_analytic'] / 1e9:>9.2f} {r['peak'] / 2**20:>9.1f} {r['activations'] / 2**20:>10.1f} "
                  f"{r['cells_per_s']:>8.1f}", flush=True)
    print("\nTF / GNN ratios (ours vs the paper's Table II); math = the Transformer with non-fused attention")
    header = (f"{'hidden/L':>9} {'FLOPs':>7} {'paper':>7} {'peak mem':>9} {'activ.':>7} {'activ. math':>12} "
              f"{'paper mem':>10} {'speed':>7}")
    print(header + "\n" + "-" * len(header))
    for (hidden, length), (paper_flops, paper_mem) in PAPER.items():
        tf, math, gnn = (results[hidden, length, n] for n in ("transformer", "tf-math", "gnn"))
        print(f"{hidden:>4}/{length:<4} {tf['flops'] / gnn['flops']:>7.2f} {paper_flops:>7.2f} "
              f"{tf['peak'] / gnn['peak']:>9.2f} {tf['activations'] / gnn['activations']:>7.2f} "
              f"{math['activations'] / gnn['activations']:>12.2f} {paper_mem:>10.2f} "
              f"{gnn['cells_per_s'] / tf['cells_per_s']:>7.2f}")
    print("\nspeed = GNN cells/s / TF cells/s (fused). Peak memory includes parameters, gradients and Adam state, "
          "where the GNN's G x r factors weigh; the paper's memory column tracks activations.")


if __name__ == "__main__":
    main()
