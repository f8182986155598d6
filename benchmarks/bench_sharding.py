"""Sharding and loader throughput against a plain tiledbsoma read of the same experiment.

    python benchmarks/bench_sharding.py                   # small default (20k cells), about a minute
    python benchmarks/bench_sharding.py --cells 100000    # the issue's >= 100k-cell measurement
    python benchmarks/bench_sharding.py --cells 20000 --genes-per-cell 2000   # census density

Generates a census-schema experiment (build-soma layout; counts with ``--genes-per-cell`` random
genes per cell out of ``--genes``; the census averages about 2,000), then measures in one run: a
plain tiledbsoma read of X["raw"] (``tables()`` and ``blockwise(axis=0).scipy()``, as a user would
write them), ``python -m sharding write`` with 1 and 2 workers (in a subprocess, so its peak RSS is
its own), and the loader (batches of 256, L=512) with 0 and 2 workers, without and with the cell
recipe's expression profiles (1,024 genes per cell). Prints a markdown table and
the load average around each measurement (other jobs on the cores slow every row). Targets
(issue 3): write >= 0.5x the plain blockwise read; loader >= 10,000 cells/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_WRITE_CHILD = """
import json, sys, time
from sharding.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_kib": peak}))
sys.exit(code)
"""


def generate_store(path: str, n_cells: int, n_genes: int, genes_per_cell: int, seed: int = 0) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from sharding.layout import build_census_layout

    rng = np.random.default_rng(seed)
    cols = np.sort(rng.integers(0, n_genes, size=(n_cells, genes_per_cell)), axis=1)
    rows = np.repeat(np.arange(n_cells), genes_per_cell)
    counts = sp.csr_matrix(
        (rng.geometric(0.3, size=rows.size).astype(np.float32), (rows, cols.ravel())),
        shape=(n_cells, n_genes),
    )
    obs = pd.DataFrame(
        {"label": pd.Categorical(rng.choice([f"type{i}" for i in range(10)], n_cells))},
        index=[f"c{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(n_genes)]))
    build_census_layout(adata, path, label_key="label", dataset_id="generated")


def plain_reads(census: str) -> dict[str, float]:
    """cells/s of the two plain tiledbsoma reads (the census code path, bounded buffers)."""
    import cellxgene_census

    from scgraph.io.sources import READ_BUFFER_BYTES

    config = {"soma.init_buffer_bytes": READ_BUFFER_BYTES, "py.init_buffer_bytes": READ_BUFFER_BYTES}
    out = {}
    with cellxgene_census.open_soma(uri=census, tiledb_config=config) as opened:
        exp = opened["census_data"]["homo_sapiens"]
        n_cells = exp.obs.count
        start = time.perf_counter()
        nnz = sum(t.num_rows for t in exp.ms["RNA"].X["raw"].read().tables())
        out["tables"] = n_cells / (time.perf_counter() - start)
        start = time.perf_counter()
        with exp.axis_query("RNA") as query:
            for matrix, _ in query.X("raw").blockwise(axis=0, size=2048).scipy():
                nnz -= matrix.nnz
        out["blockwise"] = n_cells / (time.perf_counter() - start)
    assert nnz == 0
    return out


def write(census: str, out: str, workers: int) -> dict[str, float]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _WRITE_CHILD,
            "write",
            "--quiet",
            "--census-uri",
            census,
            "--out",
            out,
            "--workers",
            str(workers),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def loader_rate(shards: str, num_workers: int, batch_size: int = 256, seq_len: int = 512) -> float:
    """Cells/s of the loader's ``SparseBatch``es (the batch is tokenized by the trainer, on its device)."""
    from scgraph.config import TokenizerConfig
    from scgraph.data.loader import build_loader

    loader = build_loader(
        shards,
        TokenizerConfig(seq_len=seq_len),
        batch_size=batch_size,
        seed=0,
        num_workers=num_workers,
    )
    start, cells = time.perf_counter(), 0
    for batch in loader:
        cells += len(batch)
    return cells / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=20_000, help="cells in the generated experiment")
    parser.add_argument("--genes", type=int, default=20_000, help="genes in its vocabulary")
    parser.add_argument(
        "--genes-per-cell", type=int, default=300, help="non-zero genes per cell (the census: about 2,000)"
    )
    parser.add_argument("--store", help="keep the generated experiment here and reuse it next time")
    args = parser.parse_args()

    from scgraph.data.shards import ShardSet

    work = tempfile.mkdtemp(prefix="bench_sharding_")

    def load() -> str:
        return "/".join(f"{x:.1f}" for x in os.getloadavg()[:2])

    try:
        census = args.store or os.path.join(work, "census")
        if not os.path.isdir(census):
            start = time.perf_counter()
            generate_store(census, args.cells, args.genes, args.genes_per_cell)
            print(f"generated {census} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        before = load()
        plain = plain_reads(census)
        rows = [
            (f"tiledbsoma X.read().tables() (buffers {64} MiB)", plain["tables"], "", "", before),
            ("tiledbsoma axis_query blockwise(2048).scipy()", plain["blockwise"], "", "", before),
        ]
        writes = {}
        for workers in (1, 2):
            out = os.path.join(work, f"shards{workers}")
            before = load()
            result = write(census, out, workers)
            shards = ShardSet.open(out)
            n_cells, vocab, nnz = shards.n_cells, shards.vocab_size, shards.manifest["totals"]["nnz"]
            writes[workers] = shards.n_cells / result["seconds"]
            rows.append(
                (
                    f"sharding write --workers {workers}",
                    writes[workers],
                    f"{shards.manifest['totals']['bytes'] / shards.n_cells:,.0f}",
                    f"{result['peak_kib'] / 1024:,.0f}",
                    before,
                )
            )
            if workers == 2:
                shutil.rmtree(os.path.join(work, "shards1"))  # the same bytes; spare the disk
        # the loader's sparse batches: the same for every recipe (tokenizing is the trainer's, on its device)
        for workers in (0, 2):
            before = load()
            rows.append((f"loader B=256 num_workers={workers}", loader_rate(out, workers), "", "", before))
    finally:
        shutil.rmtree(work)
    print(f"\n{n_cells:,} cells, {vocab:,} genes, {nnz / n_cells:.0f} genes/cell, {os.cpu_count()} CPUs\n")
    print(
        "| what | cells/s | bytes/cell | peak RSS MiB (main process) | load avg 1/5 min before |\n"
        "|---|---:|---:|---:|---|"
    )
    for what, rate, size, rss, before in rows:
        print(f"| {what} | {rate:,.0f} | {size} | {rss} | {before} |")
    print()
    for workers, rate in writes.items():
        print(
            f"write --workers {workers} / plain read: {rate / plain['blockwise']:.2f}x blockwise, "
            f"{rate / plain['tables']:.2f}x tables()"
        )
    best = max(writes.values())
    loader = max(r[1] for r in rows if r[0].startswith("loader"))
    print(
        f"target write >= 0.5x the plain blockwise read: {'met' if best >= 0.5 * plain['blockwise'] else 'NOT met'} "
        f"({best / plain['blockwise']:.2f}x); loader >= 10,000 cells/s: "
        f"{'met' if loader >= 10_000 else 'NOT met'} ({loader:,.0f})"
    )


if __name__ == "__main__":
    main()
