"""Job-array sharding: ``write --slice I/N`` parts merged by ``merge`` equal one process's shard set."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import digests

from scgraph.data.shards import MANIFEST_NAME
from sharding.cli import main
from sharding.verify import verify

# 2,500 of the real CBMC cells in 7 shards: slices of 3 get 2, 2 and 3 shards; slices of 9 leave 2 empty.
SELECT = ["--max-cells", "2500", "--cells-per-shard", "400", "--seed", "3"]


def manifest(directory) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


def write_parts(census: str, base, count: int, *extra: str) -> list[str]:
    parts = [str(base / f"part{i}") for i in range(count)]
    for i, part in enumerate(parts):
        code = main(["write", "--quiet", "--census-uri", census, "--out", part, "--slice", f"{i}/{count}",
                     *SELECT, *extra])
        assert code == 0
    return parts


@pytest.fixture(scope="module")
def single(cbmc_census, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "shards"
    assert main(["write", "--quiet", "--census-uri", cbmc_census, "--out", str(out), *SELECT]) == 0
    return out


@pytest.mark.parametrize("count", [3, 9])
def test_merged_slices_equal_the_single_process_shard_set(count, single, cbmc_census, tmp_path, capsys):
    parts = write_parts(cbmc_census, tmp_path, count)
    sizes = [len(manifest(tmp_path / f"part{i}")["shards"]) for i in range(count)]
    assert sum(sizes) == 7 and max(sizes) - min(sizes) <= 1
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", "--out", str(out), *reversed(parts)]) == 0  # order of the parts does not matter
    assert f"merged {count} parts into 2,500 cells in 7 shards" in capsys.readouterr().out
    assert digests(out) == digests(single)  # byte for byte: the shards and the manifest
    assert verify(str(out), progress=False).ok
    assert not any(os.path.exists(p) for p in parts)


def test_interrupted_merge_finishes_when_run_again(single, cbmc_census, tmp_path):
    parts = write_parts(cbmc_census, tmp_path, 2)
    out = tmp_path / "merged"
    out.mkdir()
    moved = manifest(tmp_path / "part1")["shards"][0]["name"]  # the merge died after moving one shard
    os.replace(os.path.join(parts[1], moved), out / moved)
    assert main(["merge", "--out", str(out), *parts]) == 0
    assert digests(out) == digests(single)


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "slice(s) 2/3 missing"),
    ("duplicate", "slice 0/3 given twice"),
    ("other command", "was written by a different command or from different cells"),
    ("not a slice", "is not a slice (written without --slice I/N)"),
    ("incomplete", "slice 1/3 is incomplete"),
    ("out holds a shard set", "already holds a shard set"),
])
def test_merge_refuses_parts_that_are_not_one_complete_array_and_moves_nothing(
    case, message, single, cbmc_census, tmp_path, capsys
):
    parts = write_parts(cbmc_census, tmp_path, 3)
    out = tmp_path / "merged"
    if case == "missing":
        parts = parts[:2]
    elif case == "duplicate":
        shutil.copytree(parts[0], tmp_path / "copy")
        parts.append(str(tmp_path / "copy"))
    elif case == "other command":
        parts[2] = write_parts(cbmc_census, tmp_path / "other", 3, "--obs-columns", "cell_type")[2]
    elif case == "not a slice":
        parts[2] = str(single)
    elif case == "incomplete":
        record = manifest(tmp_path / "part1")
        record["shards"].pop()
        record["complete"] = False
        (tmp_path / "part1" / MANIFEST_NAME).write_text(json.dumps(record))
    else:
        shutil.copytree(single, out)
    before = {p: digests(Path(p)) for p in parts}
    assert main(["merge", "--out", str(out), *parts]) == 2
    assert message in capsys.readouterr().err
    assert {p: digests(Path(p)) for p in parts} == before


def test_slice_is_validated_and_part_of_the_resumable_command(cbmc_census, tmp_path, capsys):
    out = str(tmp_path / "part")
    assert main(["write", "--quiet", "--census-uri", cbmc_census, "--out", out, "--slice", "2/2", *SELECT]) == 2
    assert "--slice must be I/N with 0 <= I < N; got '2/2'" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main(["write", "--quiet", "--census-uri", cbmc_census, "--out", out, "--slice", "0/2", *SELECT]) == 0
    assert main(["write", "--quiet", "--census-uri", cbmc_census, "--out", out, "--slice", "1/2", *SELECT]) == 2
    assert "slice: '0/2' then, '1/2' now" in capsys.readouterr().err
