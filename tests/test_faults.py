"""Faults a user can cause, as a catalogue: each is refused with exit status 2 and one line on
stderr naming the file or field, and nothing already written changes (the output tree is hashed
before and after). Kills use real signals on real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import pytest
import tiledbsoma.io
from conftest import digests, generated_anndata, generated_counts, iter_cells

from scgraph.cli import run
from scgraph.data.shards import MANIFEST_NAME
from scgraph.train.trainer import COMMAND as PRETRAIN
from sharding.cli import main as sharding

ROOT = Path(__file__).resolve().parents[1]
#: A run small enough that, should a refusal under test not happen, it still ends in seconds.
TINY = ["--hidden", "8", "--layers", "1", "--heads", "2", "--adjacency-rank", "4", "--seq-len", "8",
        "--batch-size", "4", "--max-steps", "1"]


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def h5ad_with_nan(path: Path, row: int | None = 250, cells: int = 300, genes: int = 50) -> Path:
    """``cells`` generated cells, one of which (``row``, unless None) holds a NaN: with 100 cells
    per shard, ``row // 100`` complete shards come before the write stops."""
    counts = generated_counts(cells, genes, 10)
    if row is not None:
        counts.data[counts.indptr[row] + 3] = np.nan
    generated_anndata(counts).write_h5ad(path)
    return path


def write(*args: str) -> int:
    return sharding(["write", "--quiet", *args])


# --- 1. a resume never mixes two versions of the source ------------------------------------------


@pytest.mark.parametrize(("change", "said"), [("genes", "its genes (var)"), ("counts", "sha256")])
def test_resume_refuses_a_source_that_changed_since_and_keeps_what_was_written(tmp_path, capsys, change, said):
    source = h5ad_with_nan(tmp_path / "s.h5ad")
    out = tmp_path / "shards"
    assert write("--h5ad", str(source), "--out", str(out), "--cells-per-shard", "100") == 2
    capsys.readouterr()
    before = digests(out)
    assert len(before) == 3  # two complete shards and the manifest
    other = ad.read_h5ad(source)
    if change == "genes":
        other.var_names = [f"OTHER{i}" for i in range(other.n_vars)]
    else:
        other.X.data[0] += 1
    other.write_h5ad(source)
    err = one_line_error(capsys, write("--h5ad", str(source), "--out", str(out), "--cells-per-shard", "100"))
    assert f"--out {out} was written from another version of the source" in err and said in err
    assert f"remove {out} or choose a new --out" in err
    assert digests(out) == before


# --- 2. workers die with their parent; every interrupted state resumes ---------------------------


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killing_the_writer_kills_its_workers_and_the_same_command_finishes(cbmc_census, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["--census-uri", cbmc_census, "--out", str(out), "--cells-per-shard", "250", "--block-cells", "100",
            "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "sharding", "write", "--quiet", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not (len(children(proc.pid)) >= 2 and out.is_dir() and any(n.endswith(".tar") for n in os.listdir(out))):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the workers never wrote a shard"
        time.sleep(0.01)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if alive(w)], "a worker outlived the killed writer"
    assert write(*args) == 0
    assert sorted(c.soma_joinid for c in iter_cells(out)) == list(range(7839))
    assert sharding(["verify", "--quiet", str(out)]) == 0


# --- 3. bad input is one line, never a traceback -------------------------------------------------


def _truncated(tmp_path: Path) -> Path:
    path = h5ad_with_nan(tmp_path / "ok.h5ad", row=None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_hdf5(tmp_path: Path) -> Path:
    path = tmp_path / "text.h5ad"
    path.write_text("cell,gene,count\n")
    return path


def _duplicate_genes(tmp_path: Path) -> Path:
    adata = generated_anndata(generated_counts(20, 5, 2))
    adata.var_names = ["G1", "G2", "G1", "G4", "G5"]
    path = tmp_path / "dup.h5ad"
    adata.write_h5ad(path)
    return path


def _no_genes(tmp_path: Path) -> Path:
    adata = ad.AnnData(X=np.zeros((5, 0), dtype=np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]))
    path = tmp_path / "empty.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize(("make", "said"), [
    (_truncated, "is not a readable .h5ad file"),
    (_not_hdf5, "is not a readable .h5ad file"),
    (_duplicate_genes, "gene feature ids must be unique; 'G1' appears 2 times"),
    (_no_genes, "has no genes (its var is empty)"),
])
def test_an_h5ad_that_cannot_be_sharded_is_named_in_one_line(tmp_path, capsys, make, said):
    path = make(tmp_path)
    out = tmp_path / "shards"
    err = one_line_error(capsys, write("--h5ad", str(path), "--out", str(out)))
    assert said in err and str(path) in err
    assert not out.exists()


def test_a_soma_uri_that_is_not_an_experiment_or_lacks_the_census_columns(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    err = one_line_error(capsys, write("--soma", str(plain), "--out", str(tmp_path / "a")))
    assert f"--soma {plain} is not a SOMA experiment" in err
    adata = generated_anndata(generated_counts(30, 8, 3))
    uri = str(tmp_path / "exp")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA", X_layer_name="raw")
    err = one_line_error(capsys, write("--soma", uri, "--out", str(tmp_path / "b")))
    assert "var has no column feature_id, feature_name" in err and uri in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture
def mounted(tmp_path):
    """A tmpfs of the given size and options at a new folder (skip where this machine cannot mount)."""
    points = []

    def mount(size: str, *options: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                               str(point)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=False)


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys, mounted):
    source = h5ad_with_nan(tmp_path / "s.h5ad", row=None)
    read_only = mounted("1m", "ro")
    err = one_line_error(capsys, write("--h5ad", str(source), "--out", str(read_only / "shards")))
    assert f"Read-only file system: {read_only / 'shards'}" in err and "writable file system" in err


def test_a_full_disk_stops_with_one_line_and_keeps_the_complete_shards(tmp_path, capsys, mounted):
    counts = generated_counts(3000, 2000, 400)
    generated_anndata(counts).write_h5ad(tmp_path / "big.h5ad")
    small = mounted("600k")
    out = small / "shards"
    err = one_line_error(capsys, write("--h5ad", str(tmp_path / "big.h5ad"), "--out", str(out),
                                       "--cells-per-shard", "20"))
    assert f"No space left on device: {out}/" in err and "run the same command again" in err
    manifest = json.loads((out / MANIFEST_NAME).read_text())  # the last complete one: replaced atomically
    assert manifest["shards"] and not manifest["complete"]
    assert {s["name"] for s in manifest["shards"]} <= {p.name for p in out.iterdir() if p.suffix == ".tar"}
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_verify_names_stray_tars_and_a_manifest_without_a_field(tmp_path, capsys):
    source = h5ad_with_nan(tmp_path / "s.h5ad", row=None, cells=200)
    out = tmp_path / "shards"
    assert write("--h5ad", str(source), "--out", str(out), "--cells-per-shard", "100", "--max-cells", "150") == 0
    capsys.readouterr()
    (out / "extra.tar").write_bytes(b"\0" * 1024)
    assert sharding(["verify", "--quiet", str(out)]) == 1
    assert "BAD extra.tar: not listed in the manifest" in capsys.readouterr().err
    (out / "extra.tar").unlink()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["shards"][1]["sha256"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert sharding(["verify", "--quiet", str(out)]) == 1
    assert "corrupt manifest (shard 1 has no sha256)" in capsys.readouterr().err


def test_verify_of_a_folder_that_holds_no_shard_set_is_bad_input(tmp_path, capsys):
    """A damaged shard set is a finding (exit 1); a wrong path is a one-line error (exit 2)."""
    err = one_line_error(capsys, sharding(["verify", "--quiet", str(tmp_path / "missing")]))
    assert f"{tmp_path / 'missing'}: not a folder" in err
    err = one_line_error(capsys, sharding(["verify", "--quiet", str(tmp_path)]))
    assert "no manifest; not a shard set" in err


@pytest.mark.parametrize(("argv", "said"), [
    (["--cells-per-shard", "0"], "--cells-per-shard must be >= 1; got 0"),
    (["--cells-per-shard", "many"], "argument --cells-per-shard: must be an integer; got 'many'"),
    (["--workers", "0"], "--workers must be >= 1; got 0"),
])
def test_bad_numbers_are_named_by_their_flag(tmp_path, capsys, argv, said):
    err = one_line_error(capsys, write("--h5ad", "x.h5ad", "--out", str(tmp_path / "o"), *argv))
    assert said in err and "_positive_int" not in err


# --- configuration files and stores --------------------------------------------------------------


@pytest.mark.parametrize(("text", "said"), [
    ("model:\n  hidden: 64\n   layers: 2\n", "is not valid YAML at line 3"),
    ("model:\n  hidden: wide\n", "model.hidden must be an integer; got 'wide'"),
    ("train: 3\n", "train must be a section of settings"),
])
def test_a_bad_yaml_config_is_one_line_naming_the_field(tmp_path, capsys, text, said):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    err = one_line_error(capsys, run(PRETRAIN, ["--config", str(path), "--shards", str(tmp_path), "--max-steps", "1"]))
    assert said in err and str(path) in err


@pytest.mark.parametrize(("ds", "said"), [
    ({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}},
     "zero_optimization.reduce_bucket_size is 'auto'"),
    ({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 4}},
     "zero_optimization.stage: Input should be 0, 1, 2, 3"),  # DeepSpeed's own model of the section says it
    ({"train_micro_batch_size_per_gpu": 4, "bf16": "yes"}, "bf16 must be an object; got 'yes'"),
])
def test_a_bad_deepspeed_config_is_one_line_naming_the_key(tmp_path, capsys, tiny_shards, ds, said):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    code = run(PRETRAIN, ["--shards", str(tiny_shards), "--deepspeed_config", str(path), "--output",
                          str(tmp_path / "out"), "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", *TINY])
    err = one_line_error(capsys, code)
    assert said in err and f"DeepSpeed config {path}" in err
    assert not (tmp_path / "out").exists()


def test_a_build_lock_left_by_a_killed_build_is_named_instead_of_waited_on(tmp_path, capsys, tiny_shards,
                                                                          monkeypatch):
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600,) * 2)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    code = run(PRETRAIN, ["--shards", str(tiny_shards), "--output", str(tmp_path / "out"), "--mlflow-uri",
                          f"sqlite:///{tmp_path}/m.db", *TINY])
    err = one_line_error(capsys, code)
    assert f"stale build lock {lock} (60 min old" in err and "delete it" in err


def test_a_build_waiting_on_another_builds_lock_is_cut_off_with_one_line(tmp_path, monkeypatch):
    """A fresh lock, as another node's build in progress leaves it: torch's baton would wait on it
    without end; the bounded builder gives up, names it, and leaves it to its owner."""
    from scgraph.train.distributed import build_shm_op, shm_op_needs_build

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert shm_op_needs_build()
    with pytest.raises(ValueError, match=f"in {tmp_path} waited 3 s on {lock}, taken by another build; delete it"):
        build_shm_op(timeout_s=3)
    assert lock.exists()


def test_a_build_that_hangs_is_killed_with_its_compiler_and_its_lock_removed(tmp_path, monkeypatch):
    """A compiler that never returns (a real process, given as $CXX): the build is killed after the
    timeout with everything it started, and the lock it took is gone, so the next start builds again."""
    from scgraph.train.distributed import build_shm_op

    compiler = tmp_path / "cxx"
    compiler.write_text(f"#!/bin/sh\necho $$ >> {tmp_path / 'pids'}\nexec sleep 600\n")
    compiler.chmod(0o755)
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("CXX", str(compiler))
    with pytest.raises(ValueError, match=f"in {tmp_path / 'ext'} did not finish in 15 s; start again to retry it"):
        build_shm_op(timeout_s=15)  # the build reaches its compiler in about 4 s on the idle 2-core machine
    pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]  # the build reached the compiler
    assert pids and not lock.exists()
    for pid in pids:  # gone, or dead and waiting for init to reap it
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_the_op_is_rebuilt_only_when_missing_or_older_than_its_sources(tmp_path, monkeypatch):
    from scgraph.train.distributed import build_root, shm_op_needs_build

    built = build_root() / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"  # the suite's own build
    assert not shm_op_needs_build()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    copy = tmp_path / "deepspeed_shm_comm" / built.name
    copy.parent.mkdir()
    copy.write_bytes(built.read_bytes())
    assert not shm_op_needs_build()
    os.utime(copy, (0, 0))  # older than DeepSpeed's sources, as after an upgrade
    assert shm_op_needs_build()


def test_a_build_that_fails_is_one_line_before_training(tmp_path, capsys, tiny_shards, monkeypatch):
    (tmp_path / "file").write_text("not a directory\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "file" / "ext"))
    code = run(PRETRAIN, ["--shards", str(tiny_shards), "--output", str(tmp_path / "out"), "--mlflow-uri",
                          f"sqlite:///{tmp_path}/m.db", *TINY])
    err = one_line_error(capsys, code)
    assert f"building DeepSpeed's C++ op deepspeed_shm_comm in {tmp_path}/file/ext failed: " in err
    assert "Not a directory" in err
    assert not (tmp_path / "out").exists()


def test_stores_that_are_not_databases_and_mistyped_paths_are_refused(tmp_path, capsys, tiny_shards):
    from scgraph.eval.compare import main as compare

    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    for uri, said in ((f"sqlite:///{text}", "is not an SQLite database"), (str(tmp_path), "is a plain path"),
                      (f"sqlite:///{tmp_path}/no/such/m.db", "does not exist")):
        code = run(PRETRAIN, ["--shards", str(tiny_shards), "--output", str(tmp_path / "out"), "--mlflow-uri", uri,
                              *TINY])
        assert said in one_line_error(capsys, code)
    err = one_line_error(capsys, compare(["--experiment", "x", "--mlflow-uri", f"sqlite:///{tmp_path}/typo.db"]))
    assert "no MLflow store at" in err and not (tmp_path / "typo.db").exists()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    h5ad_with_nan(folder / "s.h5ad", row=None, cells=200)
    assert write("--h5ad", str(folder / "s.h5ad"), "--out", str(folder / "shards"), "--max-cells", "150") == 0
    return folder / "shards"


# --- 4-5. pretraining: corrupt shards and checkpoints, signals, honest MLflow states ---------------


def pretrain(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """launchers/pretrain.py as one plain python process (world size 1) on a tiny model."""
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "launchers/pretrain.py", *TINY, "--backbone", "gnn", "--log-every", "1",
                           "--micro-batch-size", "4", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def mlflow_run(store: str, experiment: str):
    import mlflow

    (found,) = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name(experiment).experiment_id])
    return found


def loss_steps(store: str, run_id: str) -> list[int]:
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient(store).get_metric_history(run_id, "train/loss"))


@pytest.fixture(scope="module")
def finished(tiny_shards, tmp_path_factory):
    """A 6-step run that checkpointed at steps 2, 4 and 6, and its MLflow store."""
    folder = tmp_path_factory.mktemp("finished")
    store = f"sqlite:///{folder}/mlflow.db"
    done = pretrain(["--shards", str(tiny_shards), "--output", str(folder / "run"), "--max-steps", "6",
                     "--checkpoint-every", "2", "--mlflow-uri", store, "--experiment", "e"])
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run", store


@pytest.mark.slow
def test_a_damaged_checkpoint_names_its_file_and_the_previous_one_and_leaves_the_run_finished(tiny_shards, tmp_path):
    # a run of its own: a copy of another run's folder may not resume (it would write into that run)
    out, store = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    done = pretrain(["--shards", str(tiny_shards), "--output", str(out), "--max-steps", "6", "--checkpoint-every", "2",
                     "--mlflow-uri", store, "--experiment", "e"])
    assert done.returncode == 0, done.stderr[-3000:]
    damaged = next(p for p in sorted((out / "checkpoints" / "step00000006").glob("*.pt")))
    damaged.write_bytes(damaged.read_bytes()[:100])
    before = digests(out)
    run_id = mlflow_run(store, "e").info.run_id
    failed = pretrain(["--shards", str(tiny_shards), "--output", str(out), "--resume", "--max-steps", "8",
                       "--mlflow-uri", store, "--experiment", "e"])
    assert failed.returncode == 2, failed.stderr[-2000:]
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint file {damaged} has 100 bytes") and "when it was written" in line
    assert line.endswith("resume from the previous complete checkpoint with --resume-from step00000004")
    assert digests(out) == before
    assert mlflow_run(store, "e").info.status == "FINISHED"  # a refused resume touches no run
    resumed = pretrain(["--shards", str(tiny_shards), "--output", str(out), "--resume-from", "step00000004",
                        "--max-steps", "8", "--mlflow-uri", store, "--experiment", "e"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = mlflow_run(store, "e")
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert again.data.tags["resumed_from"] == "step00000004"
    assert loss_steps(store, run_id) == list(range(1, 9))  # steps 5 and 6 were logged once


@pytest.mark.slow
def test_sigterm_checkpoints_marks_the_run_killed_and_resume_finishes_it(tiny_shards, tmp_path):
    store, out = f"sqlite:///{tmp_path}/m.db", tmp_path / "run"
    args = ["--shards", str(tiny_shards), "--output", str(out), "--checkpoint-every", "3", "--mlflow-uri", store,
            "--experiment", "e"]
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "launchers/pretrain.py", *TINY, "--backbone", "gnn", "--log-every", "1",
                             "--micro-batch-size", "4", *args, "--max-steps", "100000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("checkpoints/*/scgraph.files.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step{stopped:08d}" / "scgraph.files.json").is_file()
    killed = mlflow_run(store, "e")
    assert killed.info.status == "KILLED"
    resumed = pretrain([*args, "--resume", "--max-steps", str(stopped + 2)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed step{stopped:08d} at step {stopped}" in resumed.stdout
    assert mlflow_run(store, "e").info.status == "FINISHED"
    assert loss_steps(store, killed.info.run_id) == list(range(1, stopped + 3))


@pytest.mark.slow
def test_a_run_with_workers_stopped_at_an_epochs_end_resumes_into_the_next_as_if_never_stopped(tiny_shards, tmp_path):
    """Two workers, 36 micro-batches of 4 an epoch (150 cells), one loader (and its workers) for a
    whole run: stopped at the first epoch's last step and resumed to step 44, the run is the
    uninterrupted one loss for loss (a Transformer with dropout: its masks are the batch's, not the
    state of a generator that a resume starts afresh), and it counts its place in the second epoch."""
    import mlflow
    import torch

    store = f"sqlite:///{tmp_path}/m.db"

    def train(name: str, steps: int, *extra: str) -> subprocess.CompletedProcess:
        done = pretrain(["--shards", str(tiny_shards), "--output", str(tmp_path / name), "--num-workers", "2",
                         "--backbone", "transformer", "--dropout", "0.1", "--lr-schedule", "constant",
                         "--mlflow-uri", store, "--experiment", name, "--max-steps", str(steps), *extra])
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    train("full", 44)
    train("stopped", 36)
    assert "resumed step00000036 at step 36 (epoch 0, 36 batches into it)" in train("stopped", 44, "--resume").stdout
    saved = torch.load(tmp_path / "stopped" / "checkpoints" / "step00000044" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)  # DeepSpeed keeps the trainer's state in it
    assert (saved["epoch"], saved["consumed"]) == (1, 8)
    client = mlflow.MlflowClient(store)
    losses = {name: [(m.step, m.value) for m in sorted(client.get_metric_history(mlflow_run(store, name).info.run_id,
                                                                                   "train/loss"), key=lambda m: m.step)]
              for name in ("full", "stopped")}
    assert [step for step, _ in losses["full"]] == list(range(1, 45)) and losses["stopped"] == losses["full"]


@pytest.mark.slow
def test_training_and_the_probe_refuse_a_shard_whose_bytes_changed(tiny_shards, tmp_path):
    import shutil

    from scgraph.data.shards import CorruptShardError
    from scgraph.eval.cells import read_cells

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = sorted(shards.glob("*.tar"))[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    store = f"sqlite:///{tmp_path}/m.db"
    done = pretrain(["--shards", str(shards), "--output", str(tmp_path / "run"), "--max-steps", "3", "--mlflow-uri",
                     store, "--experiment", "e"])
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {shards}/{victim.name}: sha256 mismatch") and "python -m sharding verify" in line
    with pytest.raises(CorruptShardError, match=f"{victim.name}: sha256 mismatch.*python -m sharding verify"):
        read_cells(str(shards))  # the probe's labelled cells: the flipped byte may well decode, into wrong counts
    skipped = pretrain(["--shards", str(shards), "--output", str(tmp_path / "run2"), "--max-steps", "1",
                        "--no-verify-shards", "--mlflow-uri", store, "--experiment", "e2"])
    assert "sha256 mismatch" not in skipped.stderr  # not checked: trusted as verified already


@pytest.mark.slow
def test_the_probe_names_a_damaged_checkpoint(finished, tmp_path, capsys):
    import shutil

    from scgraph.eval.evaluate import main as probe

    original, _ = finished
    out = tmp_path / "run"
    shutil.copytree(original, out)
    damaged = next(p for p in sorted((out / "checkpoints" / "step00000006").glob("*.pt")))
    damaged.write_bytes(damaged.read_bytes()[:100])
    cells = tmp_path / "cells.h5ad"
    h5ad_with_nan(cells, row=None, cells=60)
    err = one_line_error(capsys, probe(["--checkpoint", str(out), "--data", str(cells), "--label-key", "label",
                                        "--out", str(tmp_path / "probe"), "--quiet"]))
    assert f"checkpoint {out / 'checkpoints' / 'step00000006'} cannot be read" in err
    assert "has 100 bytes" in err and not (tmp_path / "probe").exists()
