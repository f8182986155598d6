"""The GPU check: what the backbones cost on one CUDA GPU, measured on what training runs.

    timeout 270 python benchmarks/gpu_check.py --out runs/gpu_check   # one CUDA GPU: 210 s budget
    python benchmarks/gpu_check.py --smoke --out /tmp/check            # the same stages, tiny, on CPU

Stages, each saved to ``gpu_check.json`` and ``gpu_check.md`` in ``--out`` as soon as it ends; an
error in one is that stage's result, and the others still run:

1. ``shards``: census-like shards (generated cells, 1,000 expressed genes each of a 60,664-gene
   vocabulary), written by ``python -m sharding write``; reused on a rerun.
2. ``train MODEL`` for the Transformer, the GNN and the linear GNN (scbenchmark preset, 6 layers,
   d = 256, L = 512, r = 64): ``launchers/pretrain.py`` as one process with the shipped
   ``ds_configs/zero2_bf16.json`` (bf16, ZeRO-2, torch AdamW), micro-batch ``--batch``, ``--steps``
   steps, ``--workers`` loader workers (their batches handed over in page-locked memory); cells/s,
   TFLOP/s, MFU, peak memory, the GNN kernel the trainer chose and the share of step time spent
   waiting for batches, from its MLflow store.
3. ``length MODEL``: the largest L that fits. One masked-value training step of the real DeepSpeed
   engine (the same config: bf16 with fp32 master weights and AdamW state; kernels chosen as the
   trainer chooses them) on ``--batch`` cells of L distinct genes, L = 512, 1024, ..., until the
   first out-of-memory, ``--max-length`` or the vocabulary, or until the next L (2-4x the last
   step's time) would pass the stage's share of the time.
4. ``attention``: which SDPA backends take the GNN's narrow queries and keys (w = 64, 128) with
   256-wide values and a padding mask, and each path's forward + backward time.

Time: ``--budget`` seconds in all; each stage after the shards gets its share of what is left
(what is left / stages not yet run), so one slow stage cannot starve the rest. A rerun into the
same ``--out`` reuses the shards and measures everything again (each model's run folder is the
check's own and is replaced); a folder the check did not make is refused.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
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
REPORT = "gpu_check.json"
#: The budget on a GPU, and the command a lent GPU runs: twice (a rerun) and the machine's start
#: fit a 15-minute device budget.
BUDGET_S = 210
GPU_COMMAND = f"timeout {BUDGET_S + 60} python benchmarks/gpu_check.py --out runs/gpu_check"


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def release() -> None:
    """Give freed GPU memory back to the driver. Call it only once the exception that ended a
    measurement is gone: until then its traceback holds the step's tensors."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shards(out: Path, cells: int, genes: int, per_cell: int, seconds: float, seed: int = 0) -> dict:
    """Generated raw counts written to shards by the sharding tool (reused when already there)."""
    target = out / "shards"
    if not (target / "manifest.json").is_file():
        rng = np.random.default_rng(seed)
        indices = np.stack([rng.choice(genes, per_cell, replace=False) for _ in range(cells)]).ravel()
        data = rng.integers(1, 20, size=cells * per_cell).astype(np.float32)
        counts = sp.csr_matrix((data, indices, np.arange(cells + 1) * per_cell), shape=(cells, genes))
        adata = ad.AnnData(counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(cells)]),
                           var=pd.DataFrame(index=[f"G{i:05d}" for i in range(genes)]))
        adata.write_h5ad(out / "cells.h5ad")
        shutil.rmtree(target, ignore_errors=True)  # what a killed earlier write left
        subprocess.run([sys.executable, "-m", "sharding", "write", "--h5ad", str(out / "cells.h5ad"), "--out",
                        str(target), "--cells-per-shard", "2000", "--quiet"], cwd=ROOT, check=True, timeout=seconds)
    return {"path": str(target), "cells": cells, "genes_per_cell": per_cell}


def train(model: str, args: argparse.Namespace, seconds: float) -> dict:
    """One pretraining run through launchers/pretrain.py; its metrics and params from MLflow."""
    import mlflow

    store, name = f"sqlite:///{args.out / 'mlflow.db'}", f"{model}-{args.stamp}"
    shutil.rmtree(args.out / model, ignore_errors=True)  # this check's run of an earlier check
    cmd = [sys.executable, "launchers/pretrain.py", "--backbone", model, "--shards", str(args.out / "shards"),
           "--output", str(args.out / model), "--deepspeed_config", args.ds_config, "--batch-size", str(args.batch),
           "--micro-batch-size", str(args.batch), "--max-steps", str(args.steps), "--log-every",
           str(max(1, args.steps // 2)), "--hidden", str(args.hidden), "--layers", str(args.layers), "--seq-len",
           str(args.length), "--mlflow-uri", store, "--experiment", "gpu-check", "--run-name", name,
           "--no-system-metrics", "--checkpoint-every", str(10**6), "--num-workers", str(args.workers)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds,
                              env=args.child_env | {"PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"training ran past the stage's {seconds:.0f} s") from None
    if done.returncode:
        said = done.stderr.strip().splitlines()
        raise RuntimeError(f"pretrain.py exited {done.returncode}: {said[-1] if said else 'no message'}")
    client = mlflow.MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("gpu-check").experiment_id],
                             f"attributes.run_name = '{name}'")[0]
    m, p = run.data.metrics, run.data.params
    return {"cells_per_s": m.get("train/cells_per_s"), "tflops": m.get("train/tflops"), "mfu": m.get("train/mfu"),
            "peak_memory_mib": m.get("cost/peak_memory_mib"), "data_wait_frac": m.get("train/data_wait_frac"),
            "train_gflop_per_cell": m.get("cost/train_flops_per_cell", float("nan")) / 1e9,
            "graph_kernel": p.get("graph_kernel"), "peak_tflops": p.get("peak_tflops")}


@functools.cache
def engine_device() -> torch.device:
    """This process's device, in a process group of one joined as the trainer joins it (once; inside
    a stage, so that a failure to join is that stage's result)."""
    from scgraph.train.distributed import init_distributed

    return init_distributed()[2]


def engine_step(model: str, length: int, args: argparse.Namespace, device: torch.device) -> dict:
    """One training step of the real engine on ``--batch`` cells of ``length`` genes: peak memory
    (model states, fp32 master weights and AdamW state included) and time."""
    from scgraph.config import ModelConfig, TrainConfig
    from scgraph.models.model import build_model
    from scgraph.train.dsconfig import load_ds_config, precision, resolve_ds_config
    from scgraph.train.objectives import pretraining_loss
    from scgraph.train.optim import deepspeed_engine
    from scgraph.train.telemetry import full_length_batch

    started = time.perf_counter()
    cfg = ModelConfig(backbone=model, vocab_size=args.genes, hidden=args.hidden, layers=args.layers, adjacency_rank=64)
    train_cfg = TrainConfig(batch_size=args.batch)
    ds = resolve_ds_config(load_ds_config(args.ds_config), train_cfg, 1, micro_batch_size=args.batch,
                           on_cpu=device.type == "cpu")
    net = build_model(cfg)
    net.choose_kernels("auto", device, torch.bfloat16 if precision(ds) == "bf16" else torch.float32)
    engine = deepspeed_engine(net, ds, train_cfg, total_steps=1)
    try:
        batch = full_length_batch(cfg, args.batch, length).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = time.perf_counter()
        engine.backward(pretraining_loss(engine, batch, {"mvp": 1.0})[0])
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"length": length, "peak_memory_gib": peak, "step_s": time.perf_counter() - step,
                "seconds": time.perf_counter() - started}
    finally:
        engine.destroy()


def largest_length(model: str, args: argparse.Namespace, seconds: float) -> dict:
    """Double L from ``--length`` until a training step no longer fits, or the limits or time."""
    device = engine_device()
    end = time.perf_counter() + seconds
    longest = min(args.max_length, args.genes)
    result: dict = {"largest_fitting": None, "out_of_memory_at": None}
    length, last = args.length, 0.0
    while True:
        if length > longest:
            result["stopped"] = f"reached L = {longest}"
            break
        if 4 * last > end - time.perf_counter():  # attention's cost grows up to 4x with each doubling
            result["stopped"] = f"L = {length} would not end within the stage's {seconds:.0f} s"
            break
        try:
            fits = engine_step(model, length, args, device)
        except torch.cuda.OutOfMemoryError:
            result["out_of_memory_at"] = length
            break
        result["largest_fitting"], last = fits, fits["seconds"]
        release()
        length *= 2
    return result


def attention_paths(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """Which kernels take the GNN's attention (w = 64, 128; dv = 256; padding) and how fast each is."""
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_efficient_attention

    from scgraph.models.kernels import choose_kernel, static_attention

    rows = []
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
                for repeat in range(7):  # 2 to warm up, 5 timed
                    if repeat == 2:
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                    static_attention(q, k, v, keep, 1.0, kernel).sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row[f"{kernel}_ms"] = 1000 * (time.perf_counter() - start) / 5
            except RuntimeError as err:
                row[f"{kernel}_ms"] = f"refused: {str(err).splitlines()[0][:80]}"
        rows.append(row)
    return {"rows": rows}


def _number(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def _train_row(r: dict) -> list[str]:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "–"
    wait = f"{100 * r['data_wait_frac']:.1f}%" if r.get("data_wait_frac") is not None else "–"
    return [_number(r["cells_per_s"], ".1f"), _number(r["tflops"], ".2f"), mfu, _number(r["peak_memory_mib"], ".0f"),
            _number(r["train_gflop_per_cell"], ".2f"), r["graph_kernel"] or "–", wait]


def _length_row(r: dict) -> list[str]:
    fits = r["largest_fitting"] or {}
    return [str(fits.get("length", "–")), _number(fits.get("peak_memory_gib"), ".1f"),
            _number(fits.get("step_s"), ".2f"), str(r["out_of_memory_at"] or r.get("stopped", "–"))]


def markdown(report: dict) -> str:
    stages = report["stages"]
    lines = [f"GPU check on {report['device']} (torch {report['torch']}), {report['seconds']:.0f} s "
             f"(budget {report['budget']:.0f} s)"]
    tables = (("train", ["cells/s", "TFLOP/s", "MFU", "peak memory MiB", "GFLOP/cell", "GNN kernel",
                         "data wait (last window)"], _train_row),
              ("length", ["largest L that fits", "peak GiB there", "step s there", "out of memory at"], _length_row))
    for stage, columns, row in tables:
        lines += ["", "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for model in MODELS:
            r = stages.get(f"{stage} {model}", {"error": "not run"})
            cells = [f"failed: {r['error']}"] + [""] * (len(columns) - 1) if "error" in r else row(r)
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    attention = stages.get("attention", {"error": "not run"})
    if "error" in attention:
        return "\n".join([*lines, "", f"attention paths: failed: {attention['error']}"]) + "\n"
    columns = [k for k in attention["rows"][0] if k not in ("w", "auto")]
    lines += ["", "| w | auto picks | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in attention["rows"]:
        lines.append(f"| {r['w']} | {r['auto']} | " + " | ".join(
            f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in columns) + " |")
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path, started: float) -> None:
    report["seconds"] = time.perf_counter() - started
    (out / REPORT).write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (on CPU where there is no GPU): checks "
                                                              "that every stage runs")
    parser.add_argument("--budget", type=float, help=f"seconds for the whole check (default {BUDGET_S}; "
                                                     "--smoke: 900)")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch (cells)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per model")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of each training run")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak, when not in the table")
    parser.add_argument("--max-length", type=int, default=65_536, help="longest L tried for the OOM point")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        refuse("no CUDA GPU here; --smoke runs the same stages tiny on CPU")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / REPORT).is_file():
        refuse(f"--out {args.out} holds files this check did not write: choose another folder")
    if args.smoke:
        args.batch, args.steps, args.max_length = 4, 2, 64
        args.hidden, args.layers, args.length, args.genes, cells, per_cell = 32, 1, 32, 2_000, 64, 60
    else:
        args.hidden, args.layers, args.length, args.genes, cells, per_cell = 256, 6, 512, 60_664, 8_000, 1_000
    budget = args.budget or (900.0 if args.smoke else BUDGET_S)
    args.ds_config = "ds_configs/zero2_bf16.json" if cuda else "ds_configs/cpu_zero2.json"
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # one process, not a rank of an outer launcher's group
    args.child_env = dict(os.environ)  # before this process joins its own group of one (engine_device)
    args.out.mkdir(parents=True, exist_ok=True)
    started, end = time.perf_counter(), time.perf_counter() + budget
    report = {"device": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__,
              "budget": budget, "config": args.ds_config, "stages": {}}
    save(report, args.out, started)
    stages = [("shards", lambda s: shards(args.out, cells, args.genes, per_cell, s))]
    stages += [(f"train {m}", lambda s, m=m: train(m, args, s)) for m in MODELS]
    stages += [(f"length {m}", lambda s, m=m: largest_length(m, args, s)) for m in MODELS]
    stages += [("attention", lambda s: attention_paths(torch.device("cuda" if cuda else "cpu"),
                                                       torch.bfloat16 if cuda else torch.float32, args.smoke))]
    for done, (name, measure) in enumerate(stages):
        left = end - time.perf_counter()
        share = left if name == "shards" else left / (len(stages) - done)
        stage_start = time.perf_counter()
        try:
            result = measure(share) if share > 0 else {"error": "no time left in --budget"}
        except Exception as err:  # one stage's failure is its result: the others still run
            said = str(err).strip().splitlines()
            result = {"error": f"{type(err).__name__}: {said[0][:200] if said else ''}"}
        release()  # only here, where the exception and the frames holding its tensors are gone
        result["stage_s"] = time.perf_counter() - stage_start
        report["stages"][name] = result
        save(report, args.out, started)
        print(f"gpu_check: {name}: {result.get('error', 'done')} ({result['stage_s']:.0f} s)", flush=True)
    print(markdown(report))
    print(f"on one CUDA GPU: {GPU_COMMAND}   (device call timeout {BUDGET_S + 90} s: a run and a rerun fit "
          "15 minutes of device time with the machine's start)")


if __name__ == "__main__":
    main()
