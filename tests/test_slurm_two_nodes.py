"""Training across two real nodes: a two-node SLURM cluster on this machine (tests/slurm_cluster.py;
each node a network namespace with its own address, hostname and slurmd, joined by a bridge).

Two nodes of one rank must train exactly as one node of two ranks: the same cells reach the same
ranks and gloo sums the same two gradients, only now over the bridge. So every loss curve here —
slurm/pretrain.sbatch on two nodes, and the plain torchrun and deepspeed launchers started once
per node — is compared with a one-node two-rank job of the same config (seed, fp32, ZeRO-2,
ds_configs/cpu_zero2.json). Runs go one after another (2 cores).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from slurm_cluster import Job, SlurmCluster, started
from test_pretrain import SMALL

from scgraph.train.distributed import free_port
from sharding.cli import main as sharding_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 4
TRAIN = [*SMALL, "--seed", "0", "--max-steps", str(STEPS)]
# Tolerance: 1e-6 relative, a few fp32 roundings. Measured: 0.0 in every run of this file (bit-equal
# curves: gloo adds the same two gradients, in either order the same float, over the bridge as over
# loopback), and at most 6.0e-8 absolute (one rank's loss 1 ulp off) over 30 steps, from threads
# not from nodes: on two nodes each rank takes both cores (2 threads), on one node one each, and
# two nodes with one thread per rank were bit-equal for all 30 steps.
RTOL = 1e-6


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster, or a skip that says why none can start here."""
    with started(nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("two_nodes")


@pytest.fixture(scope="module")
def shards(cbmc, work) -> Path:
    """1,000 real CBMC cells in 4 shards, written by the sharding tool."""
    cbmc.write_h5ad(work / "cbmc.h5ad")
    assert sharding_main(["write", "--quiet", "--h5ad", str(work / "cbmc.h5ad"), "--out", str(work / "shards"),
                          "--max-cells", "1000", "--cells-per-shard", "250"]) == 0
    return work / "shards"


def store(work: Path) -> str:
    return f"sqlite:///{work}/mlflow.db"


def pretrain_job(cluster: SlurmCluster, work: Path, shards: Path, name: str, *shape: str) -> tuple[Job, str]:
    """slurm/pretrain.sbatch with the allocation ``shape``, in MLflow experiment ``name``: the
    finished job's record and its log."""
    env = {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "BACKBONE": "gnn", "SHARDS": str(shards),
           "DS_CONFIG": "ds_configs/cpu_zero2.json", "OUTPUT": str(work / name), "MLFLOW_URI": store(work)}
    job = cluster.sbatch(*shape, "--output", f"{work}/{name}-%j.out", "slurm/pretrain.sbatch", *TRAIN,
                         "--experiment", name, env=env, cwd=ROOT)
    (record,) = cluster.wait(job, timeout=300)
    return record, (work / f"{name}-{job}.out").read_text(errors="replace")


def finished_run(work: Path, experiment: str) -> tuple[str, list[tuple[int, float]]]:
    """The experiment's one MLflow run: its status and its train/loss history as (step, loss)."""
    mlflow.set_tracking_uri(store(work))
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    return run.info.status, sorted((m.step, m.value) for m in history)


def assert_same_losses(work: Path, experiment: str, reference: list[tuple[int, float]]) -> None:
    status, losses = finished_run(work, experiment)
    assert status == "FINISHED"
    assert [s for s, _ in losses] == [s for s, _ in reference] == list(range(1, STEPS + 1))
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference], rel=RTOL, abs=0)


@pytest.fixture(scope="module")
def one_node(cluster, shards, work) -> list[tuple[int, float]]:
    """The reference: the same job on one node with two ranks; its loss curve."""
    record, log = pretrain_job(cluster, work, shards, "one_node", "--nodes", "1", "--ntasks-per-node", "2")
    assert (record.state, record.exit_code) == ("COMPLETED", "0:0"), log[-3000:]
    assert "2 ranks on 1 node(s)" in log
    return finished_run(work, "one_node")[1]


def test_pretrain_job_on_two_nodes_trains_as_one_node_with_two_ranks(cluster, shards, work, one_node):
    record, log = pretrain_job(cluster, work, shards, "two_nodes", "--nodes", "2", "--ntasks-per-node", "1",
                               "--cpus-per-task", "1")  # both "nodes" share 2 cores: 1 thread per rank
    assert (record.state, record.exit_code, record.nodes) == ("COMPLETED", "0:0", "node[1-2]"), log[-3000:]
    assert "2 ranks on 2 node(s), rendezvous node1:" in log
    assert "rank 0/2 finished" in log and "rank 1/2 finished" in log
    assert_same_losses(work, "two_nodes", one_node)


def launcher(name: str, node_rank: int, port: int, hostfile: Path) -> list[str]:
    """The command line that starts ``name``'s share of a two-node job on node ``node_rank``,
    with rank 0's rendezvous on node1 and no ssh: each node runs its own launcher."""
    bin_dir = Path(sys.executable).parent
    if name == "torchrun":
        return [str(bin_dir / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
                "--master_addr", "node1", "--master_port", str(port)]
    return [str(bin_dir / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", "node1", "--master_port", str(port)]


@pytest.mark.parametrize("name", ["torchrun", "deepspeed"])
def test_launcher_started_on_each_node_trains_as_one_node_with_two_ranks(cluster, shards, work, one_node, name):
    hostfile = work / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")  # one rank per node (CPU: "slots" are ranks)
    port = free_port()
    args = ["launchers/pretrain.py", "--backbone", "gnn", "--shards", str(shards), "--deepspeed_config",
            "ds_configs/cpu_zero2.json", "--output", str(work / name), "--mlflow-uri", store(work),
            "--experiment", name, *TRAIN]
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    logs = [work / f"{name}-node{rank + 1}.log" for rank in range(2)]
    procs = []
    for rank, log in enumerate(logs):
        with log.open("w") as out:
            cmd = cluster.on_node(f"node{rank + 1}", *launcher(name, rank, port, hostfile), *args)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:  # whatever is left of the launcher and its ranks (their own process group)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in text)
    assert "scgraph: rank 0/2 finished" in text[0] and "scgraph: rank 1/2 finished" in text[1]
    assert_same_losses(work, name, one_node)
