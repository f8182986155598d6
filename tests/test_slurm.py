"""slurm/*.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.py), 2 CPU tasks per job.

One pipeline, as a user would run it: shard.sbatch's array of 2 tasks and its merge job write the
shard set; pretrain.sbatch trains on it with srun-started gloo ranks, is requeued after its first
checkpoint and resumes from it; probe.sbatch evaluates the result. A second pretrain.sbatch job is
warned twice as at a time limit and requeues itself each time. Jobs run one after another
(2 cores); each fixture is one step of the pipeline, so a failure names the step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from conftest import digests
from slurm_cluster import started
from test_pretrain import SMALL

from scgraph.train.checkpointer import Checkpointer
from sharding.cli import main as sharding_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# 2,000 real CBMC cells in 8 shards of 250: 4 shards per array task.
SELECT = ["--max-cells", "2000", "--cells-per-shard", "250", "--seed", "1"]
STEPS, CHECKPOINT_EVERY = 40, 10
#: Long enough that a start cannot finish between its first new checkpoint and the warning the test
#: then sends (at 25 steps/s, 24 steps once did: the job ended before its second requeue).
PREEMPT_STEPS, PREEMPT_CHECKPOINT_EVERY = 80, 4


@pytest.fixture(scope="module")
def cluster():
    with started() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


def logs(work: Path, prefix: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(work.glob(f"{prefix}*.out")))


@pytest.fixture(scope="module")
def sharded(cluster, cbmc_census, work):
    """shard.sbatch: an array of 2 write tasks, then the merge job that depends on it."""
    env = {"OUT": str(work / "shards")}
    array = cluster.sbatch("--array=0-1", "--output", f"{work}/shard-%A_%a.out", "slurm/shard.sbatch", "write",
                           "--census-uri", cbmc_census, "--obs-columns", "cell_type", *SELECT, env=env, cwd=ROOT)
    merge = cluster.sbatch(f"--dependency=afterok:{array}", "--output", f"{work}/merge-%j.out",
                           "slurm/shard.sbatch", "merge", env=env, cwd=ROOT)
    return cluster.wait(array, timeout=300) + cluster.wait(merge, timeout=120)


def test_shard_array_of_two_tasks_merges_into_the_single_process_shard_set(sharded, cbmc_census, work):
    assert [(j.state, j.exit_code) for j in sharded] == [("COMPLETED", "0:0")] * 3, logs(work, "")
    assert "(array task 0)" in logs(work, "shard-") and "(array task 1)" in logs(work, "shard-")
    single = work / "single"
    assert sharding_main(["write", "--quiet", "--census-uri", cbmc_census, "--out", str(single),
                          "--obs-columns", "cell_type", *SELECT]) == 0
    assert digests(work / "shards") == digests(single)  # the same 8 shards and manifest, byte for byte
    log = logs(work, "merge-")
    assert "merged 2 parts into 2,000 cells in 8 shards" in log and "OK, 8 shards, 2,000 cells" in log
    assert not (work / "shards.parts").exists()


def poll(condition, timeout: float, what: str, log: Path) -> None:
    """Wait until ``condition()`` holds; a TimeoutError says what did not happen, with the job log."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout} s\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pretrained(cluster, sharded, work):
    """pretrain.sbatch with 2 srun tasks, requeued once its first checkpoint is complete.

    The ranks are stopped (SIGSTOP) over the requeue and continued once SLURM has acted on it: the
    requeue's SIGTERM, however late slurmctld delivers it (seconds, on a loaded machine), finds them
    mid-run rather than past their last step."""
    env = {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "BACKBONE": "gnn", "SHARDS": str(work / "shards"),
           "DS_CONFIG": "ds_configs/cpu_zero2.json", "OUTPUT": str(work / "run"),
           "MLFLOW_URI": f"sqlite:///{work}/mlflow.db"}
    job = cluster.sbatch("--ntasks-per-node", "2", "--cpus-per-task", "1", "--output", f"{work}/pretrain-%j.out",
                         "slurm/pretrain.sbatch",
                         *SMALL, "--max-steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY),
                         "--experiment", "slurm", env=env, cwd=ROOT)
    first = work / "run" / "checkpoints" / f"step{CHECKPOINT_EVERY:08d}" / "scgraph.json"
    deadline = time.monotonic() + 300
    while not first.is_file() and cluster.state(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    state = cluster.state(job)
    ranks = [p for p in psutil.process_iter(["cmdline"])  # a zombie's cmdline is None
             if (p.info["cmdline"] or [])[1:2] == ["launchers/pretrain.py"] and str(work / "run") in p.info["cmdline"]]
    for rank in ranks:
        rank.send_signal(signal.SIGSTOP)
    cluster.scontrol("requeue", job)
    poll(lambda: "DUE TO JOB REQUEUE" in logs(work, "pretrain-"), 120, "the requeue", work / f"pretrain-{job}.out")
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.send_signal(signal.SIGCONT)
    (record,) = cluster.wait(job, timeout=300)
    return job, state, len(ranks), record


def test_pretrain_job_requeued_after_a_checkpoint_resumes_from_it_and_logs_one_mlflow_run(pretrained, work):
    job, state_at_requeue, stopped, record = pretrained
    log = logs(work, "pretrain-")
    assert state_at_requeue == "RUNNING", log[-3000:]  # requeued mid-run, not after it finished
    assert stopped == 2  # both ranks held over the requeue
    assert (record.state, record.exit_code, record.restarts) == ("COMPLETED", "0:0", 1), log[-3000:]
    assert "restart 0," in log and "restart 1," in log and "DUE TO JOB REQUEUE" in log
    assert "2 ranks on 1 node(s), rendezvous localhost:" in log
    # Stopped during checkpoint 10 or a few steps after it, the ranks take the requeue's SIGTERM when
    # continued: they save at their next step, and the job resumes there.
    ((tag, step),) = re.findall(r"resumed step(\d{8}) at step (\d+)", log)
    assert int(tag) == int(step) and CHECKPOINT_EVERY <= int(step) < STEPS
    assert f"gnn trained {STEPS} steps on 2 rank(s)" in log
    assert "rank 0/2 finished" in log and "rank 1/2 finished" in log
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["slurm"], output_format="list")  # continued, not a second
    assert run.info.status == "FINISHED" and run.info.run_name == f"scgraph-pretrain-{job}"
    assert run.data.tags["backbone"] == "gnn" and run.data.params["world_size"] == "2"
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def preempted(cluster, sharded, work):
    """pretrain.sbatch warned twice with USR1, as --signal does before a time limit (`scancel
    --signal=USR1 --batch`: to the batch script only, like --signal=B:), each time once a new
    complete checkpoint shows that this start's ranks are training."""
    env = {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "BACKBONE": "gnn", "SHARDS": str(work / "shards"),
           "DS_CONFIG": "ds_configs/cpu_zero2.json", "OUTPUT": str(work / "preempted"),
           "MLFLOW_URI": f"sqlite:///{work}/mlflow.db"}
    job = cluster.sbatch("--ntasks-per-node", "2", "--cpus-per-task", "1", "--output", f"{work}/preempt-%j.out",
                         "slurm/pretrain.sbatch", *SMALL, "--max-steps", str(PREEMPT_STEPS),
                         "--checkpoint-every", str(PREEMPT_CHECKPOINT_EVERY), "--experiment", "preempt",
                         env=env, cwd=ROOT)
    log, checkpoints = work / f"preempt-{job}.out", Checkpointer(work / "preempted")
    for restart in range(2):
        old = set(checkpoints.complete_tags())  # this start's ranks take seconds to start: none of theirs yet
        poll(lambda old=old: set(checkpoints.complete_tags()) - old, 300, f"a checkpoint of start {restart}", log)
        cluster.scancel("--signal=USR1", "--batch", job)
        poll(lambda n=restart: cluster.record(job)[0].restarts > n, 120, f"requeue {restart + 1}", log)
    (record,) = cluster.wait(job, timeout=300)
    return job, record, log.read_text(errors="replace")


def test_pretrain_job_warned_before_its_time_limit_requeues_itself_and_finishes_in_one_mlflow_run(preempted, work):
    job, record, log = preempted
    assert (record.state, record.exit_code, record.restarts) == ("COMPLETED", "0:0", 2), log[-3000:]
    stops = [int(s) for s in re.findall(r"scgraph: stopped by SIGUSR1 at step (\d+)", log)]
    assert len(stops) == 2 and stops[0] < stops[1] < PREEMPT_STEPS, log[-3000:]  # two stops, both mid-run
    assert log.count(f"requeueing job {job} to resume") == 2
    for stop in stops:
        assert f"resumed step{stop:08d} at step {stop}" in log
    assert f"gnn trained {PREEMPT_STEPS} steps on 2 rank(s)" in log
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["preempt"], output_format="list")  # continued twice, not three
    assert run.info.status == "FINISHED" and run.info.run_name == f"scgraph-pretrain-{job}"
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, PREEMPT_STEPS + 1))  # each step once


def test_probe_job_evaluates_the_pretrained_checkpoint(cluster, pretrained, work):
    env = {"CHECKPOINT": str(work / "run"), "DATA": str(work / "shards"), "REPEATS": "1",
           "OUT": str(work / "probe"), "MLFLOW_URI": f"sqlite:///{work}/mlflow.db"}
    job = cluster.sbatch("--output", f"{work}/probe-%j.out", "slurm/probe.sbatch", "--epochs", "3",
                         "--tsne-cells", "100", "--quiet", env=env, cwd=ROOT)
    (record,) = cluster.wait(job, timeout=300)
    assert (record.state, record.exit_code) == ("COMPLETED", "0:0"), logs(work, "probe-")[-3000:]
    result = json.loads((work / "probe" / "probe.json").read_text())
    # the job probed the checkpoint the pretrain job finished with, linked to its MLflow run
    final = Checkpointer(work / "run").latest()
    assert final == f"step{STEPS:08d}" and Path(result["checkpoint"]).name == final
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["slurm"], filter_string="tags.`scgraph.kind` = 'pretrain'",
                                output_format="list")
    assert result["pretraining_run_id"] == run.info.run_id
    assert result["n_cells"] == 2000 and result["n_classes"] == 11
    # 40 tiny steps are not known to beat the random-init twin (tests/test_train.py checks what training does);
    # the control known to hold on CBMC is: expression separates its types (DATA.md: 0.94)
    assert result["controls"]["logistic_regression"]["accuracy_mean"] > 0.8


def test_scripts_are_shellcheck_clean(cluster):  # the cluster fixture installs shellcheck with SLURM
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm").iterdir() if p.suffix in (".sbatch", ".sh"))
    assert len(scripts) >= 5
    done = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=os.environ)
    assert done.returncode == 0, done.stdout + done.stderr
