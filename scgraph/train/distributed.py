"""The process group: join it (or, as plain ``python``, create a group of one), and leave it cleanly.

Runs under the ``deepspeed`` launcher, ``torchrun``, SLURM's ``srun`` (``slurm/srun_rank.sh``) or
plain ``python``: all of them describe the rank through the env:// variables.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

#: The launcher variables a process training alone set for itself (``init_distributed``).
_ALONE_ENV: dict[str, str] = {}


def free_port() -> int:
    """A free TCP port on this host, for a rendezvous (MASTER_PORT / --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A C++ op builds in about a minute even on a loaded node; a build lock older than this was left by a
# build that was killed, and torch would wait on it forever.
STALE_BUILD_LOCK_S = 15 * 60
# A build still running after this long is hung, not slow.
BUILD_TIMEOUT_S = 10 * 60
SHM_OP, SHM_OP_NAME = "ShareMemCommBuilder", "deepspeed_shm_comm"


def build_root() -> Path:
    """Where torch JIT-builds C++ ops (``$TORCH_EXTENSIONS_DIR``, else its per-user default)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def check_build_locks() -> None:
    """Refuse to start when a JIT build lock of a C++ op (DeepSpeed builds ``deepspeed_shm_comm`` on
    every CPU start) was left behind by a killed build: torch's file baton has no owner to check,
    so every rank would wait on it without end. One line names the lock to delete."""
    now = time.time()
    root = build_root()
    for lock in sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock")):
        age = now - lock.stat().st_mtime
        if age > STALE_BUILD_LOCK_S:
            raise ValueError(f"stale build lock {lock} ({age / 60:.0f} min old, left by a killed build of a C++ "
                             "op); delete it if no build is running, then start again")


def shm_op_needs_build() -> bool:
    """Whether DeepSpeed will JIT-build its CPU shared-memory all-reduce at start: it uses the op
    where the op is compatible, and builds it unless it came prebuilt or its build is newer than
    each of its sources (ninja's own test)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(SHM_OP)
    if (builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False)
            or installed_ops.get(builder.NAME)):
        return False
    built = build_root() / builder.NAME / f"{builder.NAME}.so"
    return not (built.exists() and all(Path(builder.deepspeed_src_path(src)).stat().st_mtime <= built.stat().st_mtime
                                       for src in builder.sources()))


def build_shm_op(timeout_s: float = BUILD_TIMEOUT_S) -> None:
    """JIT-build DeepSpeed's CPU shared-memory all-reduce (``deepspeed_shm_comm``) in a child process
    that is killed after ``timeout_s``. Left to DeepSpeed, every rank builds it at start, together:
    such builds can hang for good on torch's file baton (DeepSpeed's own CI saw it; so did ours, for
    25 minutes), and nothing bounds the wait. One bounded builder per node turns that into one line,
    and the lock of a build killed here is removed, so that starting again builds afresh."""
    code = ("from deepspeed.accelerator import get_accelerator; "
            f"get_accelerator().create_op_builder({SHM_OP!r}).load(verbose=False)")
    what = f"building DeepSpeed's C++ op {SHM_OP_NAME} in {build_root()}"
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the compiler too, not only the python that started it
        proc.wait()
        lock = build_root() / SHM_OP_NAME / "lock"
        if lock.exists() and lock.stat().st_mtime < started:
            raise ValueError(f"{what} waited {timeout_s:.0f} s on {lock}, taken by another build; delete it if no "
                             "build is running, then start again") from None
        lock.unlink(missing_ok=True)  # taken by the build killed here
        raise ValueError(f"{what} did not finish in {timeout_s:.0f} s; start again to retry it") from None
    if proc.returncode:
        said = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        raise ValueError(f"{what} failed: {said[-1] if said else f'exit status {proc.returncode}'}")


def rank_device(env: Mapping[str, str], visible: int) -> torch.device:
    """This rank's device, from its launch environment and the number of CUDA devices it sees: the
    CPU without any; GPU LOCAL_RANK where each task sees all of the node's GPUs; GPU 0 where it sees
    one (SLURM's --gpus-per-task or gres binding: each task's own GPU is its device 0)."""
    if not visible:
        return torch.device("cpu")
    if env.get("DS_ACCELERATOR", "cuda") != "cuda":  # DeepSpeed would keep the model on the CPU, batches on the GPU
        raise ValueError(f"DS_ACCELERATOR={env['DS_ACCELERATOR']} but {visible} CUDA GPU(s) are visible: unset it to "
                         "train on the GPUs, or hide them (CUDA_VISIBLE_DEVICES=) to train on the CPU")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if visible > 1 and local_rank >= visible:
        raise ValueError(f"LOCAL_RANK {local_rank} but this task sees {visible} GPUs: give each task one GPU or all "
                         "of the node's")
    return torch.device("cuda", local_rank if visible > 1 else 0)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) after joining the group: NCCL on GPUs, gloo on CPU. On a CPU
    node each rank takes the cores SLURM gave its task (``--cpus-per-task``), else an equal share of
    the cores this process may run on (its affinity mask, which cgroups and ``taskset`` narrow), and
    the node's first rank builds DeepSpeed's C++ op while the others wait (``build_shm_op``)."""
    alone = "RANK" not in os.environ
    if alone:  # (taken back by ``leave``: a later launch from this process must not inherit them)
        _ALONE_ENV.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        os.environ.update(_ALONE_ENV)
    device = rank_device(os.environ, torch.cuda.device_count())
    cuda = device.type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        share = len(os.sched_getaffinity(0)) // local_world
        torch.set_num_threads(max(1, int(os.environ.get("SLURM_CPUS_PER_TASK") or share)))
    import deepspeed

    check_build_locks()
    if cuda:
        # DeepSpeed takes LOCAL_RANK for the GPU's number (its process group, engine, ZeRO-3 partitioning):
        # a task that sees only its own GPU is local rank 0 on it
        os.environ["LOCAL_RANK"] = str(device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not cuda:
            # DeepSpeed adopts this group, and builds nothing more. A process alone needs no port: a
            # free one found earlier may be taken by another process before a TCP store binds it
            store = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if alone else {}
            dist.init_process_group("gloo", **store)
            failure = None
            if local_rank == 0 and shm_op_needs_build():
                try:
                    build_shm_op()
                except ValueError as e:
                    failure = e
            if not all_ranks_agree(failure is None, torch.device("cpu")):
                raise failure or ValueError(f"building DeepSpeed's C++ op {SHM_OP_NAME} failed on another "
                                            "rank: its error says why")
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value averaged over every rank (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank (one all-reduce); the same answer on all of them."""
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not flag.item()


def shm_buffer(rank: int) -> Path:
    """The all-reduce buffer (66 MB of shared memory) DeepSpeed's CPU shm op creates for ``rank``
    when it joins the group, named as its C++ source names it. DeepSpeed never unlinks it, so each
    run left one per rank in /dev/shm, that is in RAM, until the machine restarted: 20 GB after a
    day of tests on a 24 GB machine, and the next run was killed for memory."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{rank}")


def leave(clean: bool) -> None:
    """Leave the group. After a clean run every rank waits for the others first: without the
    barrier about one run in seven aborted at exit ("terminate called without an active
    exception") after training correctly. Through DeepSpeed when it joined the group: it keeps
    references to the group's handles, and a second run in the same process (a notebook, a test)
    would otherwise meet them ("Group ... is not registered"). Each rank removes its CPU all-reduce
    buffer (``shm_buffer``), after a failure too; a rank killed outright cannot."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            buffer = shm_buffer(dist.get_rank())
            deepspeed.comm.destroy_process_group()
            buffer.unlink(missing_ok=True)
        else:
            dist.destroy_process_group()
    for name, value in list(_ALONE_ENV.items()):  # what a process alone set for itself
        if os.environ.get(name) == value:
            del os.environ[name]
        del _ALONE_ENV[name]
