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
from conftest import moved_from_init, stored_artifacts

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
    port = free_port()
    if ranks > 1:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks),
               "--master_port", str(port), "launchers/pretrain.py", *args]
    else:
        cmd = [sys.executable, "launchers/pretrain.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if ranks > 1:  # finished or refused, no rank leaves its 66 MB all-reduce buffer in shared memory
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    return proc


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
    """GNN, ZeRO-2, 2 ranks, 6 steps, constant lr: the run every other test compares with."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(["--backbone", "gnn", "--max-steps", "6", "--run-name", "full", "--lr-schedule", "constant",
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
    for name in ("train/loss", "train/lr", "train/cells_per_s", "train/tokens_per_s", "train/grad_norm",
                 "cost/train_flops_per_cell", "cost/train_flops_per_cell_analytic", "cost/peak_memory_mib",
                 "cost/encoder_flops_per_cell", "cost/train_forward_flops_per_cell",
                 "cost/params_total", "cost/params_adjacency", "cost/params_embeddings", "cost/params_blocks",
                 "cost/memory_activations_mib", "cost/memory_gradients_mib", "cost/memory_optimizer_mib"):
        assert name in metrics, name
    # FLOPs of what trains (the default recipe, recon): the encoder, then the value head's forward and the gene
    # decoder scoring all 500 genes from the mean of the gene states, products the counter sees exactly
    n, d = 64, 32
    assert metrics["cost/train_forward_flops_per_cell"] - metrics["cost/encoder_flops_per_cell"] == \
        2 * n * d + 2 * d * d + 2 * d * 500
    assert metrics["cost/encoder_flops_per_cell"] == pytest.approx(metrics["cost/encoder_flops_per_cell_analytic"],
                                                                   rel=0.05)
    # the scores-once kernel recomputes the GNN's scores in backward: more than the formula's count
    assert metrics["cost/train_flops_per_cell"] > metrics["cost/train_flops_per_cell_analytic"]
    # the authors' adjacency per layer: F and F' (a row per gene, pad and CLS, of width r = 8) and the MLP on F'
    assert metrics["cost/params_adjacency"] == 2 * (2 * 502 * 8 + 2 * (8 * 8 + 8))
    # every cell shows its L = 64 genes but those that express fewer
    assert 56 < metrics["train/tokens_per_s"] / metrics["train/cells_per_s"] <= 64
    # ZeRO-2: each of the 2 ranks holds half the fp32 gradients (and its partition's alignment padding)
    assert metrics["cost/memory_gradients_mib"] * 2**20 == pytest.approx(metrics["cost/params_total"] * 4 / 2, rel=0.2)
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    _, artifacts = stored_artifacts(store, run.info.run_id)
    assert {"config", "loss_curve.png", "final_checkpoint.json", "model"} <= artifacts
    # the steps trained the encoder, the adjacency's F tables included; the authors' second adjacency term
    # M(F') starts near zero and barely moves in 6 steps (measured: 1e-6 to 7e-4 of its norm)
    moved = moved_from_init(out / "checkpoints" / "step00000006")
    encoder = {name: m for name, m in moved.items() if name.startswith(("embed.", "blocks."))
               and not name.endswith(("adjacency.f2.weight", "mlp.0.weight", "mlp.2.weight"))}
    assert len(encoder) == 7 and min(encoder.values()) > 0.02, encoder


@pytest.mark.parametrize("backbone", ["transformer", "gnn"])
def test_deepspeed_zero3_run_trains_each_backbone(backbone, shards, store, tmp_path):
    """Stage 3 partitions the parameters themselves, the GNN's G x r adjacency factors included."""
    proc = launch(["--backbone", backbone, "--max-steps", "3",
                   *common(shards, store, f"zero3-{backbone}", tmp_path / backbone, "cpu_zero3.json")])
    assert_ok(proc)
    (run,) = runs(store, f"zero3-{backbone}")
    assert run.data.tags["backbone"] == backbone
    assert run.data.params["deepspeed.zero_optimization.stage"] == "3"
    metrics = run.data.metrics
    assert np.isfinite(metrics["train/loss"])
    # ZeRO-3: each of the 2 ranks holds half of every parameter (fp32)
    assert metrics["cost/memory_params_mib"] * 2**20 == pytest.approx(metrics["cost/params_total"] * 4 / 2, rel=0.05)


def test_interrupted_and_resumed_run_matches_uninterrupted(uninterrupted, shards, store, tmp_path):
    """Stopped after 3 steps and resumed to 6, the run is the uninterrupted one bit for bit. (A
    decaying schedule is a function of --max-steps, so a run told to stop at 3 decays by then: the
    schedule is held constant here; its own restoration is tested in test_recipe.py.)"""
    full, _ = uninterrupted
    args = ["--backbone", "gnn", "--lr-schedule", "constant",
            *common(shards, store, "resumed", tmp_path / "run", "cpu_zero2.json")]
    assert_ok(launch([*args, "--max-steps", "3"]))
    resumed = launch([*args, "--max-steps", "6", "--resume"])
    assert_ok(resumed)
    assert "resumed step00000003 at step 3" in resumed.stdout
    final = re.compile(r"trained 6 steps on 2 rank\(s\), final loss ([\d.]+)")
    assert final.search(resumed.stdout).group(1) == final.search(full.stdout).group(1)
    (run,) = runs(store, "resumed")  # the same MLflow run continued
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    (reference,) = [r for r in runs(store, "zero2") if r.info.run_name == "full"]
    expected = mlflow.tracking.MlflowClient().get_metric_history(reference.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(m.step, m.value) for m in sorted(expected, key=lambda m: m.step)]


def test_zero2_partitions_optimizer_state_across_ranks(uninterrupted, shards, store, tmp_path):
    two = assert_ok(uninterrupted[0])
    one = assert_ok(launch(["--backbone", "gnn", "--max-steps", "1",
                            *common(shards, store, "one-rank", tmp_path / "one", "cpu_zero2.json")], ranks=1),
                    ranks=1)
    for size in two.values():
        assert 0.45 < size / one[0] < 0.55, (two, one)


def bf16_config(folder: Path, stage: int) -> str:
    """A CPU bf16 DeepSpeed config (no optimizer section: the trainer's fused AdamW) of one ZeRO stage."""
    import json

    path = folder / f"bf16_zero{stage}.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
                                "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}))
    return str(path)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_training_follows_fp32_at_every_zero_stage(stage, uninterrupted, shards, store, tmp_path):
    """bf16 weights and activations, fp32 master weights and Adam state, partitioned as in fp32. The
    loss of the same 6 steps stays within 1 % of the fp32 run's at every step (measured: within
    0.3 % at every stage)."""
    args = ["--backbone", "gnn", "--max-steps", "6", "--lr-schedule", "constant", "--shards", shards,
            "--output", str(tmp_path / "run"),
            "--deepspeed_config", bf16_config(tmp_path, stage), "--mlflow-uri", store, "--experiment",
            f"bf16-zero{stage}", *SMALL]
    two = assert_ok(launch(args))
    (run,) = runs(store, f"bf16-zero{stage}")
    assert run.data.params["precision"] == "bf16" and run.data.params["zero_stage"] == str(stage)
    client = mlflow.tracking.MlflowClient()
    (reference,) = [r for r in runs(store, "zero2") if r.info.run_name == "full"]
    fp32 = {m.step: m.value for m in client.get_metric_history(reference.info.run_id, "train/loss")}
    bf16 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(bf16) == sorted(fp32) == [1, 2, 3, 4, 5, 6]
    for step, value in fp32.items():
        assert bf16[step] == pytest.approx(value, rel=0.01), (step, bf16, fp32)
    if stage == 2:  # the optimizer state (fp32 master weights, Adam moments) is split across the ranks
        one = assert_ok(launch([*args[:-len(SMALL)], *SMALL, "--max-steps", "1", "--output", str(tmp_path / "one"),
                                "--experiment", "bf16-one-rank"], ranks=1), ranks=1)
        for size in two.values():
            assert 0.45 < size / one[0] < 0.55, (two, one)


@pytest.mark.parametrize(("config", "before", "after"), [("cpu_zero2.json", 2, 1), ("cpu_zero3.json", 1, 2)])
def test_a_run_resumes_on_another_number_of_ranks(config, before, after, shards, store, tmp_path):
    """A checkpoint of N ranks continues on M through DeepSpeed's universal checkpoint; the same
    MLflow run, each step logged once, the rest of the epoch planned for the new layout."""
    experiment = f"elastic-{before}-{after}"
    args = ["--backbone", "gnn", *common(shards, store, experiment, tmp_path / "run", config)]
    assert_ok(launch([*args, "--max-steps", "3"], ranks=before), ranks=before)
    resumed = launch([*args, "--max-steps", "6", "--resume"], ranks=after)
    assert_ok(resumed, ranks=after)
    assert f"written by {before} rank(s), resuming on {after}: through DeepSpeed's universal checkpoint" \
        in resumed.stdout
    assert "resumed step00000003_universal at step 3" in resumed.stdout
    assert "the data layout changed" in resumed.stdout
    (run,) = runs(store, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == "step00000003_universal"
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(m.value) and m.value < 10 for m in history)
    assert (tmp_path / "run" / "checkpoints" / "step00000006" / "scgraph.json").is_file()


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
    (["--output", "{file}/run"], "--output {file}/run: {file} is a file, not a folder"),
])
def test_bad_input_is_a_clear_error_before_training(args, message, shards, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").write_text("kept")
    paths = dict(empty=tmp_path / "empty", file=tmp_path / "notes")
    args = [a.format(**paths) for a in args]
    if "--shards" not in args:
        args += ["--shards", shards]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    proc = launch([*args, "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"], ranks=1, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(**paths) in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists() and (tmp_path / "notes").read_text() == "kept"


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
    from scgraph.data.loader import epoch_runs
    from scgraph.data.shards import ShardSet

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    # cut every shard but the epoch's first in half: setup (which counts FLOPs on the first micro-batch) reads
    # fine, and training fails once it reaches the second shard (1,000 cells in: step 63 of 16-cell steps)
    first = epoch_runs(ShardSet.open(str(broken)).shard_cells, 0, 0)[0][0]
    for index, shard in enumerate(sorted(broken.glob("*.tar"))):
        if index != first:
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    store = f"sqlite:///{tmp_path}/m.db"
    proc = launch(["--backbone", "gnn", "--max-steps", "200", "--recipe", "paper", "--no-verify-shards",
                   "--shuffle-buffer", "16",
                   *common(str(broken), store, "broken", tmp_path / "out", "cpu_zero2.json")], ranks=1)
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


def test_data_wait_is_near_zero_on_a_cheap_source_and_large_on_a_slow_one(shards, store, tmp_path, cbmc):
    """Step time spent waiting for batches, from real runs in one process: 2 page-cached cells per
    step, from 2 workers (through their rings), for a small model keep the steps fed; a set of
    one-cell shards, so every cell of a step is a file to open, map and parse (a source slowed on
    purpose; building the batch is the step's work, not the loader's), feeding a tiny model (no
    workers) makes them wait, and the run says to raise --num-workers."""
    from scgraph.data.shards.config import WriteOptions
    from scgraph.io.sources import SourceSpec
    from sharding.writer import write_shards

    cbmc[:512].write_h5ad(tmp_path / "cells.h5ad")
    write_shards(SourceSpec("h5ad", str(tmp_path / "cells.h5ad")), str(tmp_path / "one_cell"),
                 WriteOptions(cells_per_shard=1), progress=False)
    tiny = ["--hidden", "8", "--layers", "1", "--heads", "2", "--adjacency-rank", "4", "--log-every", "1",
            "--max-steps", "8", "--backbone", "gnn", "--recipe", "paper", "--mlflow-uri", store]
    fed = launch([*tiny, "--shards", shards, "--output", str(tmp_path / "fed"), "--experiment", "fed",
                  "--hidden", "64", "--layers", "2", "--heads", "4", "--seq-len", "64", "--batch-size", "2",
                  "--num-workers", "2"], ranks=1)
    slow = launch([*tiny, "--shards", str(tmp_path / "one_cell"), "--output", str(tmp_path / "slow"), "--experiment",
                   "slow", "--seq-len", "8", "--batch-size", "64", "--group-by-length", "1", "--shuffle-buffer", "64",
                   "--no-verify-shards"], ranks=1)
    client = mlflow.MlflowClient(store)
    waits = {}
    for name, proc in (("fed", fed), ("slow", slow)):
        assert_ok(proc, ranks=1)
        (run,) = runs(store, name)
        history = client.get_metric_history(run.info.run_id, "train/data_wait_frac")
        assert [m.step for m in history] == list(range(1, 9))
        waits[name] = float(np.median([m.value for m in history[1:]]))  # after the start
        assert len(client.get_metric_history(run.info.run_id, "train/data_wait_s")) == 8
    # (measured on 2 loaded cores: fed 0.01-0.13 of a step; slow 0.63)
    assert waits["fed"] < 0.3 and waits["slow"] > max(0.3, 3 * waits["fed"]), waits
    assert re.search(r"scgraph: loader: 2 stream\(s\) per rank, each a shuffle buffer of 4,096 cells \(at most \d+ MiB"
                     r".*; each worker hands batches over through 5 slots of shared memory", fed.stdout)
    assert "the input pipeline is the bottleneck; raise --num-workers (now 0)" in slow.stdout
