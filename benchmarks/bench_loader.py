"""Loader throughput per core, and the cores one GPU needs to be fed.

    python benchmarks/bench_loader.py                 # about two minutes on 2 cores
    python benchmarks/bench_loader.py --cells 60000   # longer, steadier numbers

Writes two shard sets with a 60,664-gene vocabulary (the census's) whose cells express about 300
and about 2,000 genes (the census averages about 2,000), then reads each in batches of 256 with 0,
1 and 2 DataLoader workers, each in a fresh process (its peak RSS, and its workers', are its own).
The loader yields ``SparseBatch``es (the cells as stored, and their key): tokenizing, masking and
the recon profile are the trainer's, on its device, so the loader's rate is the same for every
recipe. Also times each stage of one stream in process (gather the cells from the shards, then
``build_batch`` on the CPU at L = 512 for the paper's recipe (MVP: tokenize and mask) and the
default one (plus the recon objective's profile of 1,024 unexpressed genes per cell)), follows the
RSS of one stream over an epoch of 100 shards (is it flat?) and, with ``--demo``, the trainer's
data wait at the demo's settings.

cells/s per core divides by the processes doing loader work (the main process with 0 workers,
else the workers). The planner's line: an H100 at 40 % MFU (989 dense bf16 TFLOP/s) trains
0.4 x 989e12 / FLOPs-per-cell-step cells/s at the paper's setting (6 layers, d 256, L 512, r 64:
5.61 GFLOP for the GNN, 12.32 for the Transformer, measured by FlopCounterMode); divided by the
per-core rate that is the loader cores each GPU needs. Targets (issue 30): default recipe at census
density >= 15,000 cells/s per core, MVP >= 25,000 (both now the loader's one rate: the batch is
built on the GPU); 2 workers no slower than 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 60_664
RECON_GENES = 1024
FLOPS_PER_CELL_STEP = {"GNN": 5.61e9, "Transformer": 12.32e9}
H100_PEAK, MFU = 989e12, 0.40

_CHILD = """
import json, resource, sys, time
from scgraph.config import TokenizerConfig
from scgraph.data.loader import build_loader
shards, workers = sys.argv[1], int(sys.argv[2])
loader = build_loader(shards, TokenizerConfig(seq_len=512), batch_size=256, seed=0, num_workers=workers,
                      verify=False)
start = time.perf_counter()
batches = iter(loader)
next(batches)
first, cells = time.perf_counter(), 0
for batch in batches:
    cells += len(batch)
seconds = time.perf_counter() - first
print(json.dumps({"cells_per_s": cells / seconds, "first_batch_s": first - start,
                  "rss_main_mib": next(int(line.split()[1]) for line in open("/proc/self/status")
                                       if line.startswith("VmHWM:")) / 1024,
                  "rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

#: RSS (anonymous and mapped) after each batch of one stream over an epoch: is it flat?
_RSS_CHILD = """
import json, sys
from scgraph.config import TokenizerConfig
from scgraph.data.loader import build_loader
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
loader = build_loader(sys.argv[1], TokenizerConfig(seq_len=512), batch_size=256, seed=0, verify=False)
print(json.dumps([rss() for batch in loader]))
"""


def write_set(folder: str, n_cells: int, genes_per_cell: int, seed: int = 0, cells_per_shard: int = 1000) -> str:
    """A shard set of ``n_cells`` cells, each expressing ``genes_per_cell`` random genes of VOCAB."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from scgraph.data.shards.config import WriteOptions
    from scgraph.io.sources import SourceSpec
    from sharding.writer import write_shards

    rng = np.random.default_rng(seed)
    genes = np.concatenate([np.sort(rng.choice(VOCAB, genes_per_cell, replace=False)) for _ in range(n_cells)])
    counts = sp.csr_matrix((rng.geometric(0.3, genes.size).astype(np.float32), genes,
                            np.arange(n_cells + 1) * genes_per_cell), shape=(n_cells, VOCAB))
    obs = pd.DataFrame({"label": pd.Categorical(["x"] * n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    h5ad = os.path.join(folder, f"g{genes_per_cell}.h5ad")
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(VOCAB)])).write_h5ad(h5ad)
    out = os.path.join(folder, f"shards{genes_per_cell}_{cells_per_shard}")
    write_shards(SourceSpec("h5ad", h5ad), out, WriteOptions(cells_per_shard=cells_per_shard, obs_columns=("label",)),
                 progress=False)
    os.remove(h5ad)
    return out


def loader_run(shards: str, workers: int) -> dict[str, float]:
    """One full pass of the loader in a fresh process: cells/s after the first batch (the rate an
    epoch runs at), the seconds to the first batch (once per epoch: workers start) and peak RSS
    (MiB; the process's own high-water mark: ``ru_maxrss`` would carry this one's over exec)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, shards, str(workers)], cwd=ROOT,
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": ROOT})
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_times(shards: str, batches: int = 8) -> dict[str, float]:
    """Microseconds per cell of each stage of one stream, in this process (after one warm batch):
    the loader's (shuffle, gather: the cells as a ``SparseBatch``) and the trainer's on the CPU
    (``build_batch`` for MVP, and for the default recipe with its profile)."""
    from scgraph.config import TokenizerConfig
    from scgraph.data.batch import SparseBatch
    from scgraph.data.loader import DEFAULT_SHUFFLE_BUFFER, Layout, epoch_runs, shuffled, stream_part
    from scgraph.data.pool import CellPool
    from scgraph.data.shards import ShardSet
    from scgraph.data.tokenize import build_batch

    shard_set = ShardSet.open(shards)
    runs = stream_part(epoch_runs(shard_set.shard_cells, 0, 0), Layout(1, 1, 256), 0)
    n = sum(stop - start for _, start, stop in runs)
    order = shuffled(n, DEFAULT_SHUFFLE_BUFFER, 0, 0, 0, 0)
    batches = min(batches, n // 256 - 1)
    pool = CellPool(runs, shard_set.shard_paths, shard_set.shard_cells, VOCAB, np.zeros(0, np.int64))
    tok, total = TokenizerConfig(seq_len=512), dict.fromkeys(("shuffle", "gather", "build mvp (cpu)",
                                                                 "build recon (cpu)"), 0.0)
    for index in range(batches + 1):
        marks = [time.perf_counter()]
        positions = np.fromiter(itertools.islice(order, 256), np.int64, 256)
        marks.append(time.perf_counter())
        cells = SparseBatch.from_csr(pool.take(positions), (0, 0, 0, index), VOCAB)
        marks.append(time.perf_counter())
        build_batch(cells, tok, VOCAB, 0.15)
        marks.append(time.perf_counter())
        build_batch(cells, tok, VOCAB, 0.15, RECON_GENES)
        marks.append(time.perf_counter())
        if index:  # the first batch maps its shards and warms the allocator
            for name, a, b in zip(total, marks[:-1], marks[1:]):
                total[name] += (b - a) / (256 * batches) * 1e6
    return total


def demo_data_wait(folder: str) -> float:
    """Mean train/data_wait_frac over steps 11-40 of a GNN run at the demo's settings (scbenchmark
    preset, hidden 128, 2 layers, L 128, micro-batch 16, default recipe, no workers) on the real
    CBMC cells, one rank in plain python (the demo runs two)."""
    import anndata as ad
    import mlflow
    import pandas as pd

    from scgraph.data.datasets import load_cbmc
    from scgraph.data.shards.config import WriteOptions
    from scgraph.io.sources import SourceSpec
    from sharding.writer import write_shards

    cbmc = load_cbmc()
    obs = pd.DataFrame({"label": pd.Categorical(cbmc.labels)}, index=[f"c{i}" for i in range(len(cbmc.labels))])
    ad.AnnData(X=cbmc.counts, obs=obs, var=pd.DataFrame(index=cbmc.gene_ids)).write_h5ad(f"{folder}/cbmc.h5ad")
    write_shards(SourceSpec("h5ad", f"{folder}/cbmc.h5ad"), f"{folder}/cbmc", WriteOptions(cells_per_shard=1000),
                 progress=False)
    store = f"sqlite:///{folder}/mlflow.db"
    args = ["--backbone", "gnn", "--preset", "scbenchmark", "--hidden", "128", "--layers", "2", "--heads", "4",
            "--adjacency-rank", "16", "--seq-len", "128", "--batch-size", "16", "--micro-batch-size", "16",
            "--max-steps", "40", "--log-every", "10", "--shards", f"{folder}/cbmc", "--output", f"{folder}/run",
            "--mlflow-uri", store, "--experiment", "demo-wait", "--no-system-metrics"]
    done = subprocess.run([sys.executable, "launchers/pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"})
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("demo-wait").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/data_wait_frac")
    return float(np.mean([m.value for m in history if m.step > 10]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=20000, help="cells in each generated shard set")
    parser.add_argument("--demo", action="store_true", help="also the trainer's data wait at the demo's settings")
    parser.add_argument("--shard-cells", type=int, default=150,
                        help="cells per shard of the 100-shard set whose epoch's RSS is followed")
    args = parser.parse_args()

    def load() -> str:
        return "/".join(f"{x:.1f}" for x in os.getloadavg()[:2])

    rows, stages, rates = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as work:
        for density in (300, 2000):
            start = time.perf_counter()
            shards = write_set(work, args.cells, density)
            print(f"wrote {args.cells:,} cells x {density:,} genes in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
            stages[density] = stage_times(shards)
            for workers in (0, 1, 2):
                before = load()
                result = loader_run(shards, workers)
                per_core = result["cells_per_s"] / max(1, workers)
                rates[density, workers] = per_core
                rows.append((density, workers, result, per_core, before))
        wait = demo_data_wait(work) if args.demo else None
        many = write_set(work, 100 * args.shard_cells, 2000, cells_per_shard=args.shard_cells)
        done = subprocess.run([sys.executable, "-c", _RSS_CHILD, many], cwd=ROOT, capture_output=True, text=True,
                              env=os.environ | {"PYTHONPATH": ROOT}, check=True)
        rss = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{args.cells:,} cells per set, vocabulary {VOCAB:,}, batches of 256, {os.cpu_count()} CPUs\n")
    print("| genes/cell | workers | sparse cells/s | cells/s per core | first batch s | peak RSS MiB main / worker | "
          "load 1/5 min before |\n|---:|---:|---:|---:|---:|---|---|")
    for density, workers, result, per_core, before in rows:
        worker = f"{result['rss_worker_mib']:,.0f}" if workers else "-"
        print(f"| {density:,} | {workers} | {result['cells_per_s']:,.0f} | {per_core:,.0f} | "
              f"{result['first_batch_s']:.2f} | {result['rss_main_mib']:,.0f} / {worker} | {before} |")
    print("\nus per cell by stage, one stream in process:\n")
    print("| genes/cell | " + " | ".join(stages[300]) + " |\n|---:|" + "---:|" * len(stages[300]))
    for density, times in stages.items():
        print(f"| {density:,} | " + " | ".join(f"{t:.1f}" for t in times.values()) + " |")
    for density, times in stages.items():
        for recipe in ("mvp", "recon"):
            print(f"{density:,} genes/cell: build_batch ({recipe}, L 512) on the CPU "
                  f"{1e6 / times[f'build {recipe} (cpu)']:,.0f} cells/s on one core (on a GPU: the trainer's)")
    print()
    for density in (300, 2000):
        best = max(rates[density, w] for w in (0, 1, 2))
        need = ", ".join(f"{name} {MFU * H100_PEAK / flops / best:.1f}" for name, flops in FLOPS_PER_CELL_STEP.items())
        print(f"{density:,} genes/cell: {best:,.0f} cells/s per core -> loader cores per H100 at 40 % MFU: {need}")
    census = max(rates[2000, w] for w in (0, 1, 2))
    checks = [("default recipe at census density >= 15,000 cells/s per core", census >= 15_000, f"{census:,.0f}"),
              ("MVP at census density >= 25,000 cells/s per core", census >= 25_000, f"{census:,.0f}")]
    for density in (300, 2000):
        whole = [rates[density, w] * max(1, w) for w in (0, 2)]
        checks.append((f"2 workers no slower than 0 ({density:,} genes)", whole[1] >= whole[0],
                       f"{whole[1]:,.0f} vs {whole[0]:,.0f} cells/s"))
    quarter = max(1, len(rss) // 4)
    print(f"RSS over an epoch of 100 shards ({args.shard_cells} cells each, 2,000 genes, 0 workers, "
          f"{len(rss)} batches): max {max(rss[:quarter]):,.0f} MiB in its first quarter, "
          f"{max(rss[-quarter:]):,.0f} MiB in its last, {max(rss):,.0f} MiB peak")
    if wait is not None:
        checks.append(("data wait <= 5 % of step time at the demo's settings", wait <= 0.05, f"{wait:.1%}"))
    for what, met, value in checks:
        print(f"target {what}: {'met' if met else 'NOT met'} ({value})")


if __name__ == "__main__":
    main()
