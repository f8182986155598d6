"""merge: join the parts a job array wrote (``write --slice I/N``, one per task) into one shard set.

Each part holds its slice's shards under their global names and a manifest that records the whole
plan, so the merge needs no source access and no re-encoding: it checks that the parts come from
one command and cover every slice exactly once, moves the shard files (a rename on one file
system: no second copy of a census-sized set), writes the manifest a single process would have
written (``build_manifest``) and removes the emptied parts. The result is the single-process
shard set, byte for byte: the same shards, manifest and identity.

An interrupted merge is finished by running it again (shards already moved are found in --out);
once the merged manifest is written the parts are gone and there is nothing left to do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scgraph.data.shards import MANIFEST_NAME, build_manifest, differences, read_manifest, write_manifest
from scgraph.data.shards.config import MergeConfig, parse_slice
from scgraph.data.shards.stats import STATS_FILE, GeneStats, record_gene_stats
from scgraph.io.files import check_directory

#: Manifest fields every part of one job array must share (besides the command and plan).
_SHARED = ("format", "source", "obs_filter", "obs_columns", "vocabulary", "fingerprint")


@dataclass
class MergeReport:
    out: str
    parts: int
    cells: int
    shards: int
    bytes: int
    identity: str
    seconds: float
    left_behind: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kept = f"; not removed (not empty): {', '.join(self.left_behind)}" if self.left_behind else ""
        return (
            f"{self.out}: merged {self.parts} parts into {self.cells:,} cells in {self.shards} shards "
            f"({self.bytes / 1e6:.1f} MB, identity {self.identity}) in {self.seconds:.1f} s{kept}"
        )


def _without_slice(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "slice"}


def _read_parts(parts: Sequence[str]) -> list[dict[str, Any]]:
    """Each part's manifest, after checking that together they are one complete job array."""
    if not parts:
        raise ValueError("merge needs at least one part directory (written by write --slice I/N)")
    manifests = [read_manifest(p) for p in parts]
    by_index: dict[int, str] = {}
    counts = set()
    for part, manifest in zip(parts, manifests):
        text = manifest.get("plan", {}).get("slice")
        if text is None:
            raise ValueError(f"{part} is not a slice (written without --slice I/N); nothing to merge")
        if not manifest["complete"]:
            raise ValueError(
                f"{part}: slice {text} is incomplete ({len(manifest['shards'])} shards); re-run its write command"
            )
        index, count = parse_slice(text)
        counts.add(count)
        if index in by_index:
            raise ValueError(f"slice {text} given twice: {by_index[index]} and {part}")
        by_index[index] = part
    if len(counts) > 1:
        raise ValueError(f"the parts come from arrays of different sizes ({sorted(counts)} slices)")
    (count,) = counts
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ValueError(f"slice(s) {', '.join(f'{i}/{count}' for i in missing)} missing; got {len(parts)} parts")
    first = manifests[0]
    for part, manifest in zip(parts[1:], manifests[1:]):
        diffs = differences(_without_slice(first["command"]), _without_slice(manifest["command"]))
        diffs += differences(_without_slice(first["plan"]), _without_slice(manifest["plan"]))
        diffs += [k for k in _SHARED if first.get(k) != manifest.get(k)]
        if diffs:
            raise ValueError(
                f"{part} was written by a different command or from different cells than {parts[0]} "
                f"({'; '.join(diffs)}); only the parts of one job array merge"
            )
    return manifests


def _check_out(out: str, names: set[str]) -> None:
    """--out must be new, empty, or hold only shards an interrupted merge already moved."""
    check_directory("--out", out)
    entries = set(os.listdir(out)) if os.path.isdir(out) else set()
    if MANIFEST_NAME in entries:
        raise FileExistsError(f"--out {out} already holds a shard set; refusing to merge into it")
    foreign = sorted(entries - names)
    if foreign:
        raise FileExistsError(
            f"--out {out} holds files that are not shards of these parts ({', '.join(foreign[:3])}); "
            "choose an empty or new directory"
        )


def _move(record: dict[str, Any], part: str, out: str) -> None:
    """Move one shard into ``out``; a shard an interrupted merge moved already is accepted as is."""
    src, dst = os.path.join(part, record["name"]), os.path.join(out, record["name"])
    if os.path.isfile(src):
        if os.path.getsize(src) != record["bytes"]:
            raise ValueError(f"{src}: {os.path.getsize(src)} bytes, its manifest says {record['bytes']}")
        shutil.move(src, dst)  # os.rename on one file system, copy and delete across two
    elif not (os.path.isfile(dst) and os.path.getsize(dst) == record["bytes"]):
        raise FileNotFoundError(f"shard {record['name']} of {part} is neither in the part nor in {out}")


def merge_parts(out: str, parts: Sequence[str]) -> MergeReport:
    """The ``merge`` command: checks everything before moving anything."""
    started = time.perf_counter()
    out = os.path.abspath(out)
    parts = [os.path.abspath(p) for p in parts]
    manifests = _read_parts(parts)
    shards = {s["index"]: (s, part) for part, m in zip(parts, manifests) for s in m["shards"]}
    plan = _without_slice(manifests[0]["plan"])
    if sorted(shards) != list(range(plan["shards"])) or sum(len(m["shards"]) for m in manifests) != len(shards):
        raise ValueError(f"the parts' shards do not cover shards 0..{plan['shards'] - 1} exactly once")
    _check_out(out, {s["name"] for s, _ in shards.values()} | {STATS_FILE})
    os.makedirs(out, exist_ok=True)
    for record, part in shards.values():
        _move(record, part, out)
    first = manifests[0]
    command = {**first["command"], "slice": None}
    manifest = build_manifest(
        command, first["vocabulary"], plan, range(plan["shards"]), {i: s for i, (s, _) in shards.items()},
        first["fingerprint"],
    )
    if all("gene_stats" in m for m in manifests):  # sums and histograms add: what one writer records
        stats = sum((GeneStats.load(os.path.join(part, m["gene_stats"]["file"])) for part, m in
                     zip(parts, manifests)), GeneStats.empty(len(first["vocabulary"]["feature_id"])))
        manifest = record_gene_stats(out, manifest, stats)
    write_manifest(os.path.join(out, MANIFEST_NAME), manifest)
    left = []
    for part in parts:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(part, STATS_FILE))
        os.remove(os.path.join(part, MANIFEST_NAME))
        try:
            os.rmdir(part)
        except OSError:
            left.append(part)
    totals = manifest["totals"]
    return MergeReport(out, len(parts), totals["cells"], totals["shards"], totals["bytes"], manifest["identity"],
                       time.perf_counter() - started, left)


def merge_command(cfg: MergeConfig) -> None:
    """``python -m sharding merge``."""
    print(merge_parts(cfg.out, cfg.parts).summary())
