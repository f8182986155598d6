"""A real one-node SLURM cluster on this machine, for the tests of slurm/*.sbatch.

Debian's slurmctld, slurmd, slurm-client and munge (installed with apt-get when missing), with the
settings that let them run in a container (../shared/DATA.md): linuxproc process tracking, no task
plugin, node ``localhost`` at 127.0.0.1 with 2 CPUs. Everything the cluster owns — config, state,
spool, logs, its own munged socket — lives in one temporary directory, and it listens on free
ports, so it touches no system SLURM and two test sessions do not collide. Jobs are polled with
``squeue`` (``sbatch --wait`` polls slowly) and their exit codes read from ``scontrol show job``
(there is no accounting database).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "shellcheck")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged", "shellcheck")

_CONFIG = """\
ClusterName=scgraphtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={dir}/munge/munge.socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# kill_invalid_depend: a job whose dependency failed is cancelled, not left pending forever.
SchedulerParameters=bf_interval=1,sched_interval=1,kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ReturnToService=2
MinJobAge=3600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# An impossible request fails at submission instead of pending forever.
EnforcePartLimits=ALL
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def unavailable() -> str | None:
    """Why no cluster can be installed here (then the tests skip with that reason), or None."""
    if os.geteuid() != 0:
        return "SLURM tests need root: they apt-get install slurmctld slurmd slurm-client munge and run the daemons"
    if shutil.which("apt-get") is None:
        return "SLURM tests need apt-get (Debian/Ubuntu) to install slurmctld slurmd slurm-client munge"
    return None


def install() -> None:
    """apt-get the packages when a binary is missing; a failure is an error, not a skip."""
    if all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}") for b in BINARIES):
        return
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")


def _free_port_pair() -> tuple[int, int]:
    """Two free ports for slurmctld and slurmd (checked free one at a time: good enough for tests)."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports[0], ports[1]


@dataclass
class Job:
    """One finished job (or array task) as ``scontrol show job`` reports it."""

    job_id: str
    state: str
    exit_code: str  # "status:signal", e.g. "0:0"
    restarts: int


class SlurmCluster:
    """Start with ``start()``, submit with ``sbatch``, ``wait`` for jobs, and ``stop()``."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="scgraph-slurm-"))
        self.dir.chmod(0o755)  # munged (user munge) must reach its socket directory
        self.conf = self.dir / "slurm.conf"
        self.env = os.environ | {"SLURM_CONF": str(self.conf)}
        self._munged_pid: int | None = None

    def _run(self, *cmd: str, timeout: float = 60) -> str:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}\n{self.logs()}")
        return done.stdout

    def logs(self) -> str:
        """The daemons' last log lines: what a failure report needs."""
        out = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log"):
            path = self.dir / name
            if path.is_file():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def start(self, timeout: float = 30) -> None:
        munge = self.dir / "munge"
        for sub in ("state", "spool", "munge"):
            (self.dir / sub).mkdir()
        shutil.chown(munge, "munge", "munge")
        munge.chmod(0o755)
        self._run("runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={munge}/munge.socket",
                  f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                  f"--seed-file={munge}/munged.seed")
        self._munged_pid = int((munge / "munged.pid").read_text())
        ctld_port, slurmd_port = _free_port_pair()
        self.conf.write_text(_CONFIG.format(dir=self.dir, ctld_port=ctld_port, slurmd_port=slurmd_port))
        self._run("/usr/sbin/slurmctld")
        self._run("/usr/sbin/slurmd", "-N", "localhost")
        deadline = time.monotonic() + timeout
        while self._run("sinfo", "-h", "-o", "%T").strip() != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node did not become idle in {timeout} s\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """``scontrol shutdown`` stops both daemons; munged is ours, ended by its pid."""
        if self.conf.is_file():
            pids = []
            for pid_file in ("slurmctld.pid", "slurmd.pid"):  # read first: the daemons remove them
                with contextlib.suppress(FileNotFoundError, ValueError):
                    pids.append(int((self.dir / pid_file).read_text()))
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=60)
            for pid in pids:
                _wait_exit(pid)
        if self._munged_pid is not None:
            with contextlib.suppress(ProcessLookupError):  # munged may be gone already
                os.kill(self._munged_pid, signal.SIGTERM)
            _wait_exit(self._munged_pid)  # it writes its seed file on the way out
        shutil.rmtree(self.dir, ignore_errors=True)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
        """Submit; returns the job id (of an array: the array's id)."""
        done = subprocess.run(["sbatch", "--parsable", *args], env=self.env | (env or {}), cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def scontrol(self, *args: str) -> str:
        return self._run("scontrol", *args)

    def state(self, job_id: str) -> str:
        """The job's state now (PENDING, RUNNING, ...); '' when it has left the queue."""
        return self._run("squeue", "-h", "-j", job_id, "-o", "%T").strip()

    def wait(self, job_id: str, timeout: float) -> list[Job]:
        """Poll until the job (every task of an array) has left the queue; its final records."""
        deadline = time.monotonic() + timeout
        while self.state(job_id):
            if time.monotonic() > deadline:
                self._run("scancel", job_id)
                raise TimeoutError(f"job {job_id} still queued or running after {timeout} s\n{self.logs()}")
            time.sleep(0.5)
        records = self.scontrol("show", "job", job_id).split("\n\n")
        return [
            Job(_field(r, "JobId"), _field(r, "JobState"), _field(r, "ExitCode"), int(_field(r, "Restarts")))
            for r in records if r.strip()
        ]


def _field(record: str, name: str) -> str:
    found = re.search(rf"\b{name}=(\S+)", record)
    if found is None:
        raise ValueError(f"no {name} in scontrol output: {record[:200]}")
    return found.group(1)


def _alive(pid: int) -> bool:
    """Running, not a zombie: a daemon's exit is reaped by init, which a container may not run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_exit(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
