"""Pretraining with the real `deepspeed` launcher (2 CPU ranks over gloo), real shards, real MLflow.

Launches run one after another (2 cores); each gets its own port and a timeout. The first one may
JIT-compile DeepSpeed's shared-memory op (about a minute, then cached).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pytest
import scipy.sparse as sp

from scgraph.cli import parse
from scgraph.config import TrainConfig
from scgraph.train.distributed import free_port
from scgraph.train.dsconfig import resolve_ds_config
from scgraph.train.trainer import COMMAND

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "32", "--layers", "2", "--heads", "4", "--adjacency-rank", "8", "--seq-len", "64",
         "--batch-size", "16", "--micro-batch-size", "4", "--log-every", "1"]
pytestmark = pytest.mark.slow


def launch(args: list[str], ranks: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run launchers/pretrain.py under the deepspeed launcher (ranks > 1) or as plain python."""
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    if ranks > 1:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "launchers/pretrain.py", *args]
    else:
        cmd = [sys.executable, "launchers/pretrain.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def finished_ranks(proc: subprocess.CompletedProcess) -> dict[int, int]:
    """rank -> optimizer-state bytes, from each rank's success line."""
    found = re.findall(r"scgraph: rank (\d+)/\d+ finished \(optimizer state (\d+) bytes\)", proc.stdout)
    return {int(rank): int(size) for rank, size in found}


def assert_ok(proc: subprocess.CompletedProcess, ranks: int = 2) -> dict[int, int]:
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    done = finished_ranks(proc)
    assert sorted(done) == list(range(ranks)), tail
    return done


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cbmc) -> str:
    """The real CBMC cells as shards, written by the sharding tool."""
    folder = tmp_path_factory.mktemp("pretrain")
    cbmc.write_h5ad(folder / "cbmc.h5ad")
    out = folder / "shards"
    subprocess.run([sys.executable, "-m", "sharding", "write", "--h5ad", str(folder / "cbmc.h5ad"),
                    "--out", str(out), "--cells-per-shard", "1000", "--quiet"], cwd=ROOT, check=True,
                   timeout=300)
    return str(out)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def runs(store: str, experiment: str) -> list:
    mlflow.set_tracking_uri(store)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def common(shards: str, store: str, experiment: str, output: Path, config: str) -> list[str]:
    return ["--shards", shards, "--deepspeed_config", f"ds_configs/{config}", "--output", str(output),
            "--mlflow-uri", store, "--experiment", experiment, *SMALL]


@pytest.fixture(scope="module")
def uninterrupted(shards, store, tmp_path_factory):
    """GNN, ZeRO-2, 2 ranks, 6 steps: the run every other test compares with."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(["--backbone", "gnn", "--max-steps", "6", "--run-name", "full",
                   *common(shards, store, "zero2", out, "cpu_zero2.json")])
    return proc, out


def test_deepspeed_zero2_gnn_run_logs_metrics_and_telemetry_to_mlflow(uninterrupted, store):
    proc, out = uninterrupted
    assert_ok(proc)
    (run,) = [r for r in runs(store, "zero2") if r.info.run_name == "full"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["backbone"] == "gnn" and len(run.data.tags["shards_identity"]) >= 8
    assert run.data.params["run.model.backbone"] == "gnn"
    assert run.data.params["deepspeed.zero_optimization.stage"] == "2"
    assert run.data.params["deepspeed.gradient_accumulation_steps"] == "2"  # 16 = 4 x 2 ranks x 2
    metrics = run.data.metrics
    for name in ("loss", "lr", "cells_per_s", "tokens_per_s", "grad_norm", "flops_per_cell",
                 "flops_per_cell_analytic", "peak_memory_bytes", "params_total", "params_adjacency",
                 "params_embeddings", "params_blocks", "memory_activations_bytes",
                 "memory_gradients_bytes", "memory_optimizer_bytes"):
        assert name in metrics, name
    assert metrics["flops_per_cell"] >= metrics["flops_per_cell_analytic"] > 0
    assert metrics["params_adjacency"] > 0 and metrics["cells_per_s"] > 0
    assert metrics["memory_gradients_bytes"] > 0 and metrics["memory_activations_bytes"] > 0
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config", "loss_curve.png", "final_checkpoint.json"} <= artifacts
    assert (out / "checkpoints" / "step00000006" / "scgraph.json").is_file()


@pytest.mark.parametrize("backbone", ["transformer", "gnn"])
def test_deepspeed_zero3_run_trains_each_backbone(backbone, shards, store, tmp_path):
    """Stage 3 partitions the parameters themselves, the GNN's G x r adjacency factors included."""
    proc = launch(["--backbone", backbone, "--max-steps", "3",
                   *common(shards, store, f"zero3-{backbone}", tmp_path / backbone, "cpu_zero3.json")])
    assert_ok(proc)
    (run,) = runs(store, f"zero3-{backbone}")
    assert run.data.tags["backbone"] == backbone
    assert run.data.params["deepspeed.zero_optimization.stage"] == "3"
    assert run.data.metrics["loss"] > 0 and run.data.metrics["peak_memory_bytes"] > 0


def test_interrupted_and_resumed_run_matches_uninterrupted(uninterrupted, shards, store, tmp_path):
    full, _ = uninterrupted
    args = ["--backbone", "gnn", *common(shards, store, "resumed", tmp_path / "run", "cpu_zero2.json")]
    assert_ok(launch([*args, "--max-steps", "3"]))
    resumed = launch([*args, "--max-steps", "6", "--resume"])
    assert_ok(resumed)
    assert "resumed step00000003 at step 3" in resumed.stdout
    final = re.compile(r"trained 6 steps on 2 rank\(s\), final MVP loss ([\d.]+)")
    assert final.search(resumed.stdout).group(1) == final.search(full.stdout).group(1)
    (run,) = runs(store, "resumed")  # the same MLflow run continued
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss")
    (reference,) = [r for r in runs(store, "zero2") if r.info.run_name == "full"]
    expected = mlflow.tracking.MlflowClient().get_metric_history(reference.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(m.step, m.value) for m in sorted(expected, key=lambda m: m.step)]


def test_zero2_partitions_optimizer_state_across_ranks(uninterrupted, shards, store, tmp_path):
    two = assert_ok(uninterrupted[0])
    one = assert_ok(launch(["--backbone", "gnn", "--max-steps", "1",
                            *common(shards, store, "one-rank", tmp_path / "one", "cpu_zero2.json")], ranks=1),
                    ranks=1)
    for size in two.values():
        assert 0.45 < size / one[0] < 0.55, (two, one)


def test_resume_with_a_different_vocabulary_is_refused(uninterrupted, tmp_path, store):
    _, out = uninterrupted
    other = tmp_path / "other"
    counts = sp.random(300, 40, density=0.3, format="csr", random_state=0)
    counts.data = np.ceil(counts.data * 10).astype(np.float32)
    ad.AnnData(counts).write_h5ad(tmp_path / "small.h5ad")
    subprocess.run([sys.executable, "-m", "sharding", "write", "--h5ad", str(tmp_path / "small.h5ad"),
                    "--out", str(other), "--quiet"], cwd=ROOT, check=True, timeout=300)
    proc = launch(["--backbone", "gnn", "--resume", "--max-steps", "8",
                   *common(str(other), store, "bad", Path(out), "cpu_zero2.json")], ranks=1)
    assert proc.returncode == 2
    assert "the checkpoint's vocabulary has 500 genes but the shard set" in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--shards", "{empty}"], "manifest"),
    (["--backbone", "mamba"], "invalid choice: 'mamba'"),
    (["--batch-size", "10", "--micro-batch-size", "4"],
     "global batch 10 is not a multiple of micro-batch 4 x world size 1"),
])
def test_bad_input_is_a_clear_error_before_training(args, message, shards, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty") for a in args]
    if "--shards" not in args:
        args += ["--shards", shards]
    proc = launch([*args, "--output", str(tmp_path / "out"), "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"],
                  ranks=1, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_explicit_accumulation_that_disagrees_with_the_world_size_is_refused():
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}
    with pytest.raises(ValueError, match="sets gradient_accumulation_steps=4 but .* needs "
                                         "gradient_accumulation_steps=2"):
        resolve_ds_config(ds, TrainConfig(batch_size=32), world_size=2)
    resolved = resolve_ds_config(ds, TrainConfig(batch_size=64), world_size=2)
    assert resolved["train_batch_size"] == 64 and resolved["gradient_accumulation_steps"] == 4
    with pytest.raises(ValueError, match="fp16 is not supported by DeepSpeed on CPU"):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 8, "fp16": {"enabled": True}},
                          TrainConfig(batch_size=8), world_size=1, on_cpu=True)


def test_run_that_fails_midway_is_marked_failed_and_exits_nonzero(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    for shard in sorted(broken.glob("*.tar")):  # cut every shard in half: setup reads fine, training fails
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    store = f"sqlite:///{tmp_path}/m.db"
    proc = launch(["--backbone", "gnn", "--max-steps", "50", *common(str(broken), store, "broken", tmp_path / "out",
                                                                     "cpu_zero2.json")], ranks=1)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "shard" in proc.stderr
    (run,) = runs(store, "broken")
    assert run.info.status == "FAILED"


def test_yaml_config_is_overridden_by_flags_and_unknown_keys_are_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  backbone: gnn\n  hidden: 64\n  heads: 4\ntrain:\n  lr: 0.001\n"
                      "shards: /data/shards\ncheckpoint_every: 7\n")
    cfg = parse(COMMAND, ["--config", str(config), "--hidden", "32", "--seq-len", "128"])
    assert (cfg.run.model.backbone, cfg.run.model.hidden, cfg.run.tokenizer.seq_len) == ("gnn", 32, 128)
    assert (cfg.run.train.lr, cfg.shards, cfg.checkpoint_every) == (0.001, "/data/shards", 7)
    config.write_text("model:\n  hiden: 64\n")
    with pytest.raises(ValueError, match="unknown model field\\(s\\) hiden"):
        parse(COMMAND, ["--config", str(config)])
