"""A real SLURM cluster on this machine, for the tests of slurm/*.sbatch: one node, or several.

Debian's slurmctld, slurmd, slurm-client and munge (installed with apt-get when missing), with the
settings that let them run in a container (../shared/DATA.md): linuxproc process tracking, no task
plugin, 2 CPUs per node. Everything the cluster owns — config, state, spool, logs, its own munged
socket — lives in one temporary directory, and it listens on free ports, so it touches no system
SLURM and two test sessions do not collide. Jobs are polled with ``squeue`` (``sbatch --wait``
polls slowly) and their exit codes read from ``scontrol show job`` (there is no accounting database).

One node is ``localhost`` at 127.0.0.1. Several nodes need distinct addresses and hostnames, which
one machine has only through network namespaces (``Network``): node i is a namespace with its own
address on a bridge, its own hostname (gloo binds the address the hostname resolves to) and
/etc/hosts, and its own slurmd; slurmctld and munged stay in the root namespace (munge's socket is
a file, shared by all). Jobs and their steps inherit their slurmd's namespaces, so srun's ranks on
two nodes really talk over the bridge. The nodes share this machine's cores.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "shellcheck")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged", "shellcheck")
#: What a cluster of several nodes needs besides SLURM: iproute2's namespaces, util-linux's nsenter and unshare.
NAMESPACE_TOOLS = ("ip", "nsenter", "unshare")

_CONFIG = """\
ClusterName=scgraphtest
# "localhost" is this host's controller name whatever gethostname() says; slurmd, srun and sbatch
# (in any namespace) connect to the address in parentheses.
SlurmctldHost=localhost({ctld_addr})
SlurmctldPort={ctld_port}
# One port for every slurmd: each of several listens in its own network namespace.
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
# %n, the node name: several slurmd on one file system keep separate files (the spool dirs must exist).
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ReturnToService=2
MinJobAge=3600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# An impossible request fails at submission instead of pending forever.
EnforcePartLimits=ALL
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


def unavailable(nodes: int = 1) -> str | None:
    """Why no cluster of ``nodes`` nodes can be installed here (then the tests skip with that
    reason), or None. Whether the kernel lets us make namespaces shows only when we try: see
    ``NamespacesUnavailable``."""
    if os.geteuid() != 0:
        return "SLURM tests need root: they apt-get install slurmctld slurmd slurm-client munge and run the daemons"
    if shutil.which("apt-get") is None:
        return "SLURM tests need apt-get (Debian/Ubuntu) to install slurmctld slurmd slurm-client munge"
    missing = [tool for tool in NAMESPACE_TOOLS if shutil.which(tool) is None]
    if nodes > 1 and missing:
        return f"a {nodes}-node SLURM cluster needs network namespaces: {', '.join(missing)} not found"
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


class NamespacesUnavailable(RuntimeError):
    """This kernel or container refuses to make network namespaces: multi-node tests skip."""


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> str:
    """A 10.77.X /24 that no address or route of this machine is in (another test session's
    cluster included)."""
    used = _ip("-4", "-o", "addr") + _ip("-4", "route")
    thirds = list(range(256))
    random.Random(os.getpid()).shuffle(thirds)
    for third in thirds:
        if f"10.77.{third}." not in used:
            return f"10.77.{third}"
    raise RuntimeError("every 10.77.X.0/24 is in use on this machine")


class Network:
    """Nodes ``node1`` .. ``nodeN`` as network namespaces, each with a veth pair into one bridge
    in the root namespace: node i has address SUBNET.i, the root namespace (slurmctld) SUBNET.254.
    The names carry this process's id, so two test sessions can each have a network; ``down``
    removes all that ``up`` made."""

    def __init__(self, nodes: int) -> None:
        tag = f"sg{os.getpid()}"
        self.names = [f"node{i}" for i in range(1, nodes + 1)]
        self.namespaces = [f"{tag}n{i}" for i in range(1, nodes + 1)]
        self.veths = [f"{tag}h{i}" for i in range(1, nodes + 1)]  # the root namespace's ends
        self.bridge = f"{tag}br"
        self.subnet = _free_subnet()
        self.host_address = f"{self.subnet}.254"

    def address(self, name: str) -> str:
        return f"{self.subnet}.{self.names.index(name) + 1}"

    def up(self) -> None:
        """Make the namespaces, bridge and links, and each node's /etc/hosts (every node by name)."""
        try:
            _ip("netns", "add", self.namespaces[0])
        except RuntimeError as err:
            raise NamespacesUnavailable(f"cannot make a network namespace here: {err}") from None
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            hosts = "127.0.0.1 localhost\n" + "".join(f"{self.address(n)} {n}\n" for n in self.names)
            for i, (name, ns, veth) in enumerate(zip(self.names, self.namespaces, self.veths)):
                if i:
                    _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("link", "set", f"{veth}p", "netns", ns)
                _ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", f"{veth}p")
                _ip("-n", ns, "link", "set", f"{veth}p", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
                Path(f"/etc/netns/{ns}/hosts").write_text(hosts)
        except BaseException:
            self.down()
            raise

    def run_as(self, name: str, *cmd: str) -> list[str]:
        """The command line that runs ``cmd`` as node ``name``: its network, and its own hostname
        and /etc/hosts in private UTS and mount namespaces. Not ``ip netns exec``: that remounts
        /sys, hiding /sys/fs/cgroup, and slurmd 22.05 then fails to start."""
        ns = self.namespaces[self.names.index(name)]
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$1" && shift && exec "$@"',
                ns, name, *cmd]

    def down(self) -> None:
        """Kill what still runs in the namespaces (only the cluster's processes can be there), then
        delete them, the links and the bridge. Safe to call on a network that is only partly up."""
        for ns, veth in zip(self.namespaces, self.veths):
            if Path(f"/run/netns/{ns}").exists():
                pids = [int(p) for p in _ip("netns", "pids", ns, check=False).split()]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                for pid in pids:
                    _wait_exit(pid)
                _ip("netns", "del", ns, check=False)
            _ip("link", "del", veth, check=False)  # and its peer
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only when empty: another session's namespaces keep it


@dataclass
class Job:
    """One finished job (or array task) as ``scontrol show job`` reports it."""

    job_id: str
    state: str
    exit_code: str  # "status:signal", e.g. "0:0"
    restarts: int
    nodes: str  # where it runs or ran, e.g. "node[1-2]"; "" while pending


class SlurmCluster:
    """Start with ``start()``, submit with ``sbatch``, ``wait`` for jobs, and ``stop()``.

    ``nodes=1``: node ``localhost`` at 127.0.0.1. More: nodes ``node1`` .. ``nodeN`` on a ``Network``
    (``start`` raises ``NamespacesUnavailable`` where namespaces cannot be made)."""

    def __init__(self, nodes: int = 1) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="scgraph-slurm-"))
        self.dir.chmod(0o755)  # munged (user munge) must reach its socket directory
        self.conf = self.dir / "slurm.conf"
        self.env = os.environ | {"SLURM_CONF": str(self.conf)}
        self.network = Network(nodes) if nodes > 1 else None
        self.nodes = self.network.names if self.network else ["localhost"]
        self._munged_pid: int | None = None

    def _run(self, *cmd: str, timeout: float = 60) -> str:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}\n{self.logs()}")
        return done.stdout

    def logs(self) -> str:
        """The daemons' last log lines: what a failure report needs."""
        out = []
        for path in [self.dir / "munge/munged.log", self.dir / "slurmctld.log", *sorted(self.dir.glob("slurmd-*.log"))]:
            if path.is_file():
                out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def on_node(self, name: str, *cmd: str) -> list[str]:
        """The command line that runs ``cmd`` on node ``name`` (as is on the one-node cluster)."""
        return self.network.run_as(name, *cmd) if self.network else list(cmd)

    def start(self, timeout: float = 30) -> None:
        if self.network:
            self.network.up()
        munge = self.dir / "munge"
        for sub in ("state", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.dir / sub).mkdir(parents=True)
        shutil.chown(munge, "munge", "munge")
        munge.chmod(0o755)
        self._run("runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={munge}/munge.socket",
                  f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                  f"--seed-file={munge}/munged.seed")
        self._munged_pid = int((munge / "munged.pid").read_text())
        ctld_port, slurmd_port = _free_port_pair()
        if self.network:
            ctld_addr = self.network.host_address
            nodes = "\n".join(f"NodeName={n} NodeAddr={self.network.address(n)} NodeHostname={n} CPUs=2 State=UNKNOWN"
                              for n in self.nodes)
        else:
            ctld_addr, nodes = "127.0.0.1", "NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN"
        self.conf.write_text(_CONFIG.format(dir=self.dir, ctld_addr=ctld_addr, ctld_port=ctld_port,
                                            slurmd_port=slurmd_port, nodes=nodes, node_list=",".join(self.nodes)))
        self._run("/usr/sbin/slurmctld")
        for name in self.nodes:
            self._run(*self.on_node(name, "/usr/sbin/slurmd", "-N", name))
        deadline = time.monotonic() + timeout
        while self._run("sinfo", "-h", "-N", "-o", "%T").split() != ["idle"] * len(self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes did not become idle in {timeout} s\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel what is still queued, stop the daemons (``scontrol shutdown``; munged, ours, by
        its pid) and take the network down: nothing of the cluster outlives it."""
        if self.conf.is_file():
            pids = []  # read first: the daemons remove their pid files
            for pid_file in ("slurmctld.pid", *(f"slurmd-{n}.pid" for n in self.nodes)):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    pids.append(int((self.dir / pid_file).read_text()))
            self._cancel_all()
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=60)
            for pid in pids:
                _wait_exit(pid)
        if self._munged_pid is not None:
            with contextlib.suppress(ProcessLookupError):  # munged may be gone already
                os.kill(self._munged_pid, signal.SIGTERM)
            _wait_exit(self._munged_pid)  # it writes its seed file on the way out
        if self.network:
            self.network.down()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _cancel_all(self, timeout: float = 45) -> None:
        """scancel every job left (a failed test's), and wait until SLURM has ended them (it sends
        SIGKILL KillWait = 30 s after SIGTERM), so no job outlives the daemons."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            jobs = self._run("squeue", "-h", "-o", "%i").split()
            if jobs:
                self.scancel(*jobs)
            deadline = time.monotonic() + timeout
            while jobs and self._run("squeue", "-h", "-o", "%i").strip() and time.monotonic() < deadline:
                time.sleep(0.5)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
        """Submit; returns the job id (of an array: the array's id)."""
        done = subprocess.run(["sbatch", "--parsable", *args], env=self.env | (env or {}), cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def scontrol(self, *args: str) -> str:
        return self._run("scontrol", *args)

    def scancel(self, *args: str) -> str:
        return self._run("scancel", *args)

    def state(self, job_id: str) -> str:
        """The job's state now (PENDING, RUNNING, ...); '' when it has left the queue."""
        return self._run("squeue", "-h", "-j", job_id, "-o", "%T").strip()

    def record(self, job_id: str) -> list[Job]:
        """The job's records now (of an array: one per task)."""
        records = self.scontrol("show", "job", job_id).split("\n\n")
        return [
            Job(_field(r, "JobId"), _field(r, "JobState"), _field(r, "ExitCode"), int(_field(r, "Restarts")),
                _field(r, "NodeList"))
            for r in records if r.strip()
        ]

    def wait(self, job_id: str, timeout: float) -> list[Job]:
        """Poll until the job (every task of an array) has left the queue; its final records."""
        deadline = time.monotonic() + timeout
        while self.state(job_id):
            if time.monotonic() > deadline:
                self.scancel(job_id)
                raise TimeoutError(f"job {job_id} still queued or running after {timeout} s\n{self.logs()}")
            time.sleep(0.5)
        return self.record(job_id)


def _field(record: str, name: str) -> str:
    found = re.search(rf"\b{name}=(\S*)", record)
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


@contextlib.contextmanager
def started(nodes: int = 1) -> Iterator[SlurmCluster]:
    """A running cluster of ``nodes`` nodes, stopped on exit; a pytest skip that says why where none
    can start here (no SLURM packages, not root, no network namespaces)."""
    reason = unavailable(nodes=nodes)
    if reason:
        pytest.skip(reason)
    install()
    cluster = SlurmCluster(nodes=nodes)
    try:
        try:
            cluster.start()
        except NamespacesUnavailable as err:
            pytest.skip(str(err))
        yield cluster
    finally:
        cluster.stop()
