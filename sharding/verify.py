"""verify: check a shard set against its manifest (checksums, cell counts, every sample decodes).

Reads every byte once (sha256 and decoding share the read) and reports every bad shard, not just
the first, so one run tells the user everything that needs rewriting.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from scgraph.data.shards import MANIFEST_NAME, CorruptShardError, decode_cell, iter_shard, read_manifest
from scgraph.data.shards.config import VerifyConfig
from scgraph.data.shards.manifest import digest_problem, vocabulary_problem
from scgraph.io.counts import value_defect


@dataclass
class VerifyReport:
    directory: str
    shards: int = 0
    cells: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.directory}: OK, {self.shards} shards, {self.cells:,} cells match the manifest"
        return f"{self.directory}: {len(self.problems)} problem(s) in {self.shards} shards checked"


def _check_shard(path: str, record: dict[str, Any], vocab_size: int, seen: set[int]) -> str | None:
    """The first thing wrong with one shard, or None."""
    name = record["name"]
    if not os.path.isfile(path):
        return f"{name}: missing"
    with open(path, "rb") as f:
        data = f.read()
    problem = digest_problem(record, len(data), hashlib.sha256(data).hexdigest())
    if problem:
        return problem
    cells = 0
    try:
        for sample in iter_shard(io.BytesIO(data), where=name):
            cell = decode_cell(sample, name)
            if cell.soma_joinid in seen:
                return f"{name}: cell {cell.soma_joinid} appears more than once in the shard set"
            seen.add(cell.soma_joinid)
            if cell.genes.size and (cell.genes.min() < 0 or cell.genes.max() >= vocab_size):
                return f"{name}: cell {cell.soma_joinid} has gene indices outside the vocabulary"
            defect = value_defect(cell.counts)
            if defect is not None:
                return f"{name}: counts of cell {cell.soma_joinid} contain {defect[1]}"
            cells += 1
    except CorruptShardError as err:
        return str(err)
    if cells != record["cells"]:
        return f"{name}: {cells} cells, manifest says {record['cells']}"
    return None


def verify(directory: str, progress: bool = True) -> VerifyReport:
    """The ``verify`` command."""
    report = VerifyReport(directory)
    if not os.path.isdir(directory):
        raise (NotADirectoryError if os.path.exists(directory) else FileNotFoundError)(
            f"{directory}: not a folder; give the shard set's folder (python -m sharding write --out)")
    try:
        manifest = read_manifest(directory)
    except ValueError as err:
        report.problems.append(str(err))
        return report
    if not manifest["complete"]:
        report.problems.append(
            f"{MANIFEST_NAME}: incomplete ({len(manifest['shards'])} of "
            f"{manifest.get('plan', {}).get('shards', '?')} shards); re-run the write command"
        )
    edited = vocabulary_problem(manifest)
    if edited:
        report.problems.append(f"{MANIFEST_NAME}: {edited}; restore it or write the shard set again")
    vocab_size = len(manifest["vocabulary"]["feature_id"])
    listed = {s["name"] for s in manifest["shards"]}
    strays = {os.path.basename(p) for pattern in ("shard-*", "*.tar")
              for p in glob.glob(os.path.join(directory, pattern))}
    for stray in sorted(strays - listed):
        report.problems.append(f"{stray}: not listed in the manifest")
    seen: set[int] = set()
    for record in tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress):
        problem = _check_shard(os.path.join(directory, record["name"]), record, vocab_size, seen)
        report.shards += 1
        if problem:
            report.problems.append(problem)
        else:
            report.cells += record["cells"]
    stats = manifest.get("gene_stats")
    if stats is not None:
        path = os.path.join(directory, str(stats.get("file")))
        if not os.path.isfile(path):
            report.problems.append(f"{stats.get('file')}: the gene statistics the manifest names are missing")
        else:
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != stats.get("sha256"):
                    report.problems.append(f"{stats['file']}: sha256 mismatch with the manifest (rewrite the "
                                           f"statistics with python -m sharding stats {directory})")
    if manifest["complete"] and not report.problems and report.cells != manifest["totals"]["cells"]:
        report.problems.append(
            f"{MANIFEST_NAME}: totals.cells {manifest['totals']['cells']} but the shards hold {report.cells}"
        )
    return report


def verify_command(cfg: VerifyConfig) -> int:
    """``python -m sharding verify``: each problem on stderr as ``BAD ...``, a summary, exit 1 if any;
    a folder that holds no shard set is a one-line error (exit 2), like any bad input."""
    report = verify(cfg.directory, progress=not cfg.quiet)
    for problem in report.problems:
        print(f"BAD {problem}", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1
