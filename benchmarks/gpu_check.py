"""The GPU check: what the backbones cost on one CUDA GPU, through the real trainer, in bf16.

    python benchmarks/gpu_check.py --out runs/gpu_check          # one CUDA GPU, under 8 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/check       # the same steps, tiny, on CPU

1. Census-like shards: ``--cells`` generated cells with ``--genes-per-cell`` expressed genes of a
   60,664-gene vocabulary, written by ``python -m sharding write``.
2. For the Transformer, the GNN and the linear GNN (scbenchmark preset, 6 layers, d = 256, L = 512,
   r = 64): ``launchers/pretrain.py`` as one process, bf16, ZeRO-2, micro-batch ``--batch``, for
   ``--steps`` steps; cells/s, achieved TFLOP/s, MFU (peak from the GPU table or ``--peak-tflops``),
   peak memory and the GNN kernel chosen, read back from the run's MLflow store.
3. The largest L before the GPU runs out of memory, for each model: one training step on
   ``--batch`` full-length cells at L = 512, 1024, ... up to ``--max-length`` (capped by time).
4. Which attention path the GNN gets: the SDPA backends that accept queries/keys of width 64 or
   128 with 256-wide values and a padding mask, and the forward+backward time of each path.

Writes ``gpu_check.json`` and ``gpu_check.md`` in ``--out`` (and prints the markdown), ready for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("transformer", "gnn", "gnn_linear")


def shards(out: Path, cells: int, genes: int, per_cell: int, seed: int = 0) -> Path:
    """Generated raw counts written to shards by the sharding tool (reused when already there)."""
    target = out / "shards"
    if (target / "manifest.json").is_file():
        return target
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(genes, per_cell, replace=False) for _ in range(cells)]).ravel()
    data = rng.integers(1, 20, size=cells * per_cell).astype(np.float32)
    counts = sp.csr_matrix((data, indices, np.arange(cells + 1) * per_cell), shape=(cells, genes))
    adata = ad.AnnData(counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(cells)]),
                       var=pd.DataFrame(index=[f"G{i:05d}" for i in range(genes)]))
    out.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out / "cells.h5ad")
    subprocess.run([sys.executable, "-m", "sharding", "write", "--h5ad", str(out / "cells.h5ad"), "--out",
                    str(target), "--cells-per-shard", "2000", "--quiet"], cwd=ROOT, check=True)
    return target


def train(model: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """One pretraining run through launchers/pretrain.py; its metrics and params from MLflow."""
    import mlflow

    ds = out / "ds_bf16_zero2.json"  # no optimizer block: the trainer's fused torch AdamW (no JIT build)
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": args.batch, "bf16": {"enabled": not args.smoke},
                              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}))
    store = f"sqlite:///{out / 'mlflow.db'}"
    cmd = [sys.executable, "launchers/pretrain.py", "--backbone", model, "--shards", str(data), "--output",
           str(out / model), "--deepspeed_config", str(ds), "--batch-size", str(args.batch), "--max-steps",
           str(args.steps), "--log-every", str(max(1, args.steps // 2)), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--seq-len", str(args.length), "--mlflow-uri", store,
           "--experiment", "gpu-check", "--run-name", model, "--no-system-metrics", "--checkpoint-every",
           str(10**6)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"})
    if done.returncode:
        return {"model": model, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    client = mlflow.MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("gpu-check").experiment_id],
                             f"attributes.run_name = '{model}'", order_by=["attributes.start_time DESC"])[0]
    m, p = run.data.metrics, run.data.params
    return {"model": model, "seconds": time.perf_counter() - started, "cells_per_s": m.get("train/cells_per_s"),
            "tflops": m.get("train/tflops"), "mfu": m.get("train/mfu"),
            "peak_memory_mib": m.get("cost/peak_memory_mib"),
            "train_gflop_per_cell": m.get("cost/train_flops_per_cell", float("nan")) / 1e9,
            "graph_kernel": p.get("graph_kernel"), "peak_tflops": p.get("peak_tflops")}


def largest_length(model: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Double L from 512 until a training step no longer fits (or ``--max-length``, or time)."""
    from scgraph.config import ModelConfig
    from scgraph.models import build_model
    from scgraph.train.telemetry import full_length_batch, measure_training_step

    dtype = torch.float32 if args.smoke else torch.bfloat16
    fits, length, started = None, 512 if not args.smoke else args.length, time.perf_counter()
    while length <= args.max_length and time.perf_counter() - started < args.length_seconds:
        cfg = ModelConfig(backbone=model, vocab_size=60_664 if not args.smoke else 2_000, hidden=args.hidden,
                          layers=args.layers, adjacency_rank=64)
        try:
            net = build_model(cfg).to(device, dtype)
            cost = measure_training_step(net, full_length_batch(cfg, args.batch, min(length, cfg.vocab_size)),
                                         timed_steps=1)
            fits = {"length": length, "peak_memory_gib": cost.peak_memory_bytes / 2**30,
                    "cells_per_s": cost.cells_per_s}
        except torch.cuda.OutOfMemoryError:
            return {"model": model, "largest_fitting": fits, "out_of_memory_at": length}
        finally:
            net = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        length *= 2
    return {"model": model, "largest_fitting": fits, "out_of_memory_at": None,
            "stopped": f"reached {args.max_length} or {args.length_seconds} s"}


def attention_paths(device: torch.device, smoke: bool) -> list[dict]:
    """Which kernels take the GNN's attention (w = 64, 128; dv = 256; padding) and how fast each is."""
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_efficient_attention

    from scgraph.models.kernels import choose_kernel, static_attention

    rows = []
    dtype = torch.float32 if smoke else torch.bfloat16
    b, n = (2, 64) if smoke else (32, 512)
    for w in (64, 128):
        q, k = (torch.randn(b, 1, n, w, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(b, 1, n, 256, device=device, dtype=dtype, requires_grad=True)
        keep = torch.ones(b, n, dtype=torch.bool, device=device)
        keep[:, int(0.9 * n):] = False
        row = {"w": w, "auto": choose_kernel("auto", device, dtype, w, 256)}
        if device.type == "cuda":
            params = SDPAParams(q, k, v, keep[:, None, None, :], 0.0, False, False)
            row["efficient_accepts"] = bool(can_use_efficient_attention(params))
            row["cudnn_accepts"] = bool(can_use_cudnn_attention(params))
        for kernel in ("scores_once", "subheads", "sdpa"):
            try:
                for _ in range(2):
                    static_attention(q, k, v, keep, 1.0, kernel).sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(5):
                    static_attention(q, k, v, keep, 1.0, kernel).sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row[f"{kernel}_ms"] = 1000 * (time.perf_counter() - start) / 5
            except RuntimeError as err:
                row[f"{kernel}_ms"] = f"refused: {str(err).splitlines()[0][:80]}"
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = [f"GPU check on {report['device']} ({report['torch']}), {report['seconds']:.0f} s", "",
             "| model | cells/s | TFLOP/s | MFU | peak memory MiB | GFLOP/cell | GNN kernel |",
             "|---|---|---|---|---|---|---|"]
    for r in report["training"]:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "–"
        lines.append(f"| {r['model']} | {r['cells_per_s']:.1f} | {r['tflops']:.2f} | {mfu} | "
                     f"{r['peak_memory_mib']:.0f} | {r['train_gflop_per_cell']:.2f} | {r['graph_kernel'] or '–'} |")
    lines += ["", "| model | largest L that fits | peak GiB there | out of memory at |", "|---|---|---|---|"]
    for r in report["lengths"]:
        fits = r["largest_fitting"] or {}
        lines.append(f"| {r['model']} | {fits.get('length', '–')} | {fits.get('peak_memory_gib', float('nan')):.1f} | "
                     f"{r['out_of_memory_at'] or r.get('stopped', '–')} |")
    columns = [k for k in report["attention"][0] if k not in ("w", "auto")]
    lines += ["", "| w | auto picks | " + " | ".join(columns) + " |"]
    lines.append("|" + "---|" * (len(report["attention"][0])))
    for r in report["attention"]:
        lines.append(f"| {r['w']} | {r['auto']} | " + " | ".join(
            f"{v:.2f}" if isinstance(v, float) else str(v) for k, v in r.items() if k not in ("w", "auto")) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that every step runs")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch (cells)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per model")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak, when not in the table")
    parser.add_argument("--max-length", type=int, default=65_536, help="longest L tried for the OOM point")
    parser.add_argument("--length-seconds", type=float, default=60.0, help="time for each model's L sweep")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.max_length, args.length_seconds = 4, 2, 64, 30.0
        args.hidden, args.layers, args.length, cells, genes, per_cell = 32, 1, 32, 64, 2_000, 60
    else:
        args.hidden, args.layers, args.length, cells, genes, per_cell = 256, 6, 512, 16_000, 60_664, 1_000
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("error: no CUDA GPU here; --smoke runs the same steps tiny on CPU")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data = shards(args.out, cells, genes, per_cell)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "training": [train(m, data, args.out, args) for m in MODELS],
              "lengths": [largest_length(m, args, device) for m in MODELS], "attention": attention_paths(device,
                                                                                                       args.smoke)}
    report["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
