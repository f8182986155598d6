"""The writer as a real process: killed with SIGKILL and re-run; its peak memory as cells grow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import generated_anndata, generated_counts, iter_cells

from scgraph.data.shards import MANIFEST_NAME, ShardSet
from sharding.cli import main
from sharding.layout import build_census_layout
from sharding.verify import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sharding", "write", "--quiet", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every few ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"writer ended before the kill point: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _listed(out: str) -> int:
    try:
        with open(os.path.join(out, MANIFEST_NAME)) as f:
            return len(json.load(f)["shards"])
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_mid_write_then_rerun_holds_each_selected_cell_once(cbmc, cbmc_census, tmp_path, capsys):
    out = str(tmp_path / "shards")
    args = ["--census-uri", cbmc_census, "--out", out, "--cells-per-shard", "400", "--block-cells", "100"]
    # 1: killed while the first shard is half written (only its temporary file exists).
    _kill_when(
        _start(args), lambda: os.path.isdir(out) and any(n.endswith(".partial") for n in os.listdir(out))
    )
    assert _listed(out) == 0  # the manifest is written before the first shard, so this resumes too
    # 2: killed again, after some shards are complete (resuming what run 1 left).
    _kill_when(_start(args), lambda: _listed(out) >= 3)
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert not manifest["complete"] and len(manifest["shards"]) < manifest["plan"]["shards"] == 20
    with pytest.raises(ValueError, match="incomplete shard set"):
        ShardSet.open(out)
    # 3: the same command, to the end.
    assert main(["write", "--quiet", *args]) == 0
    summary = capsys.readouterr().out
    assert f"{len(manifest['shards'])} already complete" in summary or "already complete" in summary
    report = verify(out, progress=False)
    assert report.ok, report.problems
    joinids = [cell.soma_joinid for cell in iter_cells(out)]
    assert sorted(joinids) == list(range(cbmc.n_obs))
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]


# VmHWM, not getrusage: Linux carries ru_maxrss across exec, so a child forked from this (large)
# pytest process would report pytest's peak.
_PEAK_RSS = """
import sys
from sharding.cli import main
code = main(sys.argv[1:])
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sys.exit(code)
"""


def _peak_rss_kib(args: list[str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, "write", "--quiet", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_for_ten_times_more_cells_grows_less_than_20_percent(tmp_path):
    n_cells = 20_000
    census = build_census_layout(
        generated_anndata(generated_counts(n_cells, 1000, 40)), str(tmp_path / "census")
    )
    common = ["--census-uri", census, "--cells-per-shard", "5000"]
    small = _peak_rss_kib([*common, "--out", str(tmp_path / "small"), "--max-cells", str(n_cells // 10)])
    large = _peak_rss_kib([*common, "--out", str(tmp_path / "large")])
    assert ShardSet.open(str(tmp_path / "large")).n_cells == n_cells
    print(f"peak RSS: {small / 1024:.0f} MiB for {n_cells // 10} cells, {large / 1024:.0f} MiB for {n_cells}")
    assert large < 1.2 * small, (small, large)
