"""The manifest of a shard set, written by the sharding tool and read by everything else.

``manifest.json`` lists every complete shard (name, cells, bytes, sha256, first and last
soma_joinid), the gene vocabulary, the command and plan that wrote the set (a re-run must match
them to resume), and, once every planned shard is there, the set's identity: a hash of what a
model sees (vocabulary and shard contents), so copies share it and checkpoints can name it.
It is replaced atomically after every shard, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from scgraph import __version__
from scgraph.data.shards.codec import Cell, CorruptShardError, decode_cell, iter_shard
from scgraph.data.shards.config import parse_slice
from scgraph.data.shards.stats import GeneSummary
from scgraph.data.vocab import GeneVocab
from scgraph.io.files import file_sha256, write_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "scgraph-shards/1"


def shard_name(index: int) -> str:
    """The file name of shard ``index`` in a set (and in its manifest)."""
    return f"shard-{index:06d}.tar"

_REQUIRED_KEYS = ("format", "source", "obs_filter", "vocabulary", "shards", "totals", "complete", "tool")
_SHARD_KEYS = ("index", "name", "cells", "bytes", "sha256")
_TOTALS_KEYS = ("cells", "shards", "bytes")


def content_identity(vocabulary: dict[str, list[str]], shards: list[dict[str, Any]]) -> str:
    """Short hash of what a model sees (vocabulary, shard contents): equal shard sets, equal ids."""
    blob = json.dumps([vocabulary["feature_id"], [(s["name"], s["sha256"]) for s in shards]]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def vocabulary_digest(vocabulary: dict[str, list[str]]) -> str:
    """The gene fingerprint of a vocabulary (ids and names, in order): recorded in the manifest, so
    an edited gene list (names the identity does not hash) is caught; a source's ``genes_sha256``."""
    blob = json.dumps([list(vocabulary["feature_id"]), list(vocabulary["feature_name"])]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def vocabulary_problem(manifest: dict[str, Any]) -> str | None:
    """What shows that a manifest's gene list or shard list was edited after it was written, or
    None: its gene fingerprint (in a manifest older than that, the source's, when the set kept the
    source's genes) and its identity must still be those of what it lists."""
    vocabulary = manifest["vocabulary"]
    recorded = manifest.get("vocabulary_sha256")
    if recorded is None and not (manifest.get("command") or {}).get("vocab_from"):
        recorded = (manifest.get("fingerprint") or {}).get("genes_sha256")
    if recorded is not None and vocabulary_digest(vocabulary) != recorded:
        return "its gene list (vocabulary) is not the one it was written with (gene fingerprint mismatch)"
    if manifest.get("identity") and manifest["identity"] != content_identity(vocabulary, manifest["shards"]):
        return "its identity does not match its gene list and shards"
    return None


def _manifest_text(payload: dict[str, Any]) -> str:
    """One line per top-level key and per shard: readable, and written by the C JSON encoder
    (``indent`` falls back to the pure-Python one, slow for a 60k-gene vocabulary every shard)."""
    lines = []
    for key, value in payload.items():
        if key == "shards":
            text = "[\n  " + ",\n  ".join(json.dumps(s) for s in value) + "\n ]" if value else "[]"
        else:
            text = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_manifest(path: str, payload: dict[str, Any]) -> None:
    """Replace the manifest atomically: a reader (or a resumed run) never sees half of one."""
    write_atomic(path, _manifest_text(payload))


def build_manifest(
    command: dict[str, Any],
    vocabulary: dict[str, list[str]],
    plan: dict[str, Any],
    expected: range,
    shards: dict[int, dict[str, Any]],
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a shard set whose ``plan`` expects shards ``expected`` and that holds
    ``shards`` (index -> record): totals, and the identity once complete. ``fingerprint`` says
    which version of the source was read (a resume must read the same). Written by the writer
    after every shard and by ``merge`` for the joined parts."""
    listed = [shards[i] for i in sorted(shards)]
    complete = sorted(shards) == list(expected)
    return {
        "format": FORMAT,
        "tool": {"name": "scgraph.sharding", "version": __version__},
        "source": command["source"],
        "obs_filter": command["obs_filter"],
        "obs_columns": command["obs_columns"],
        "command": command,
        "fingerprint": fingerprint,
        "plan": plan,
        "complete": complete,
        "identity": content_identity(vocabulary, listed) if complete else None,
        "vocabulary_sha256": vocabulary_digest(vocabulary),
        "totals": {
            "cells": sum(s["cells"] for s in listed),
            "shards": len(listed),
            "bytes": sum(s["bytes"] for s in listed),
            "nnz": sum(s["nnz"] for s in listed),
        },
        "shards": listed,
        "vocabulary": vocabulary,
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old then, new now`` for each key whose value differs (two commands, two plans)."""
    return [
        f"{k}: {old.get(k)!r} then, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of ``directory``, with a one-line error if it is missing or not valid JSON."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no manifest; not a shard set (write one with python -m sharding write)"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: corrupt manifest (not valid JSON: {err})") from None
    missing = [k for k in _REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ValueError(f"{path}: corrupt manifest (missing {', '.join(missing)})")
    if manifest["format"] != FORMAT:
        raise ValueError(f"{path}: format {manifest['format']!r} is not {FORMAT!r}")
    for where, record, keys in [("totals", manifest["totals"], _TOTALS_KEYS),
                                ("vocabulary", manifest["vocabulary"], ("feature_id", "feature_name")),
                                *[(f"shard {i}", r, _SHARD_KEYS) for i, r in enumerate(manifest["shards"])]]:
        lacking = [k for k in keys if not isinstance(record, dict) or k not in record]
        if lacking:
            raise ValueError(f"{path}: corrupt manifest ({where} has no {', '.join(lacking)})")
    return manifest


def digest_problem(record: dict[str, Any], size: int, sha256: str) -> str | None:
    """What is wrong with a shard of ``size`` bytes and this ``sha256`` that the manifest lists as
    ``record``, or None."""
    if size != record["bytes"]:
        return f"{record['name']}: {size} bytes, manifest says {record['bytes']}"
    if sha256 != record["sha256"]:
        return f"{record['name']}: sha256 mismatch (manifest {record['sha256'][:12]}.., file {sha256[:12]}..)"
    return None


@dataclass
class ShardSet:
    """A complete, validated shard set on disk (the loader's only input)."""

    directory: str
    manifest: dict[str, Any]
    _checked: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, directory: str) -> ShardSet:
        directory = os.path.abspath(directory)
        manifest = read_manifest(directory)
        path = os.path.join(directory, MANIFEST_NAME)
        if not manifest["complete"]:
            plan = manifest.get("plan", {})
            raise ValueError(
                f"{path}: incomplete shard set ({len(manifest['shards'])} of "
                f"{plan.get('shards', '?')} shards); re-run the same write command to finish it"
            )
        vocab = manifest["vocabulary"]
        if len(vocab.get("feature_id", [])) != len(vocab.get("feature_name", [])) or not vocab["feature_id"]:
            raise ValueError(f"{path}: corrupt manifest (vocabulary feature_id/feature_name lengths differ)")
        problem = vocabulary_problem(manifest)
        if problem:
            raise ValueError(f"{path}: edited manifest: {problem}; restore it or write the shard set again")
        plan = manifest.get("plan") or {}
        if plan.get("slice") and parse_slice(plan["slice"])[1] > 1:
            raise ValueError(f"{path}: part {plan['slice']} of a sliced write ({len(manifest['shards'])} of "
                             f"{plan.get('shards', '?')} shards): join the parts first with python -m sharding "
                             "merge OUT PART...")
        if sum(s["cells"] for s in manifest["shards"]) != manifest["totals"]["cells"]:
            raise ValueError(f"{path}: corrupt manifest (shard cell counts do not add up to totals.cells)")
        for shard in manifest["shards"]:
            if not os.path.isfile(os.path.join(directory, shard["name"])):
                raise FileNotFoundError(
                    f"{directory}: shard {shard['name']} listed in the manifest is missing"
                )
        return cls(directory, manifest)

    @property
    def feature_ids(self) -> list[str]:
        return self.manifest["vocabulary"]["feature_id"]

    @property
    def feature_names(self) -> list[str]:
        return self.manifest["vocabulary"]["feature_name"]

    @property
    def vocab(self) -> GeneVocab:
        return GeneVocab(self.feature_ids, self.feature_names)

    @property
    def vocab_size(self) -> int:
        return len(self.feature_ids)

    @property
    def n_cells(self) -> int:
        return int(self.manifest["totals"]["cells"])

    @property
    def shard_cells(self) -> list[int]:
        return [int(s["cells"]) for s in self.manifest["shards"]]

    @property
    def shard_paths(self) -> list[str]:
        return [os.path.join(self.directory, s["name"]) for s in self.manifest["shards"]]

    @property
    def identity(self) -> str:
        return content_identity(self.manifest["vocabulary"], self.manifest["shards"])

    @property
    def gene_stats(self) -> GeneSummary | None:
        """The per-gene statistics the manifest records (of the whole set, validation shards split
        off included), or None for a set written before they were."""
        record = self.manifest.get("gene_stats")
        if record is None:
            return None
        return GeneSummary.from_record(record, self.vocab_size, os.path.join(self.directory, MANIFEST_NAME))

    def split(self, fraction: float, seed: int) -> tuple[ShardSet, ShardSet]:
        """(the rest, held out): ``fraction`` of the shards (at least one, never all), chosen by a
        permutation seeded with ``seed``, so the same arguments always hold out the same cells."""
        n = len(self.manifest["shards"])
        if n < 2:
            raise ValueError(f"{self.directory} has {n} shard: holding out a fraction of it for validation needs "
                             "at least 2 (write smaller shards, or give --val-shards)")
        held = set(np.random.default_rng([seed, 7]).permutation(n)[: min(n - 1, max(1, round(fraction * n)))])
        return self._subset([i for i in range(n) if i not in held]), self._subset(sorted(held))

    def _subset(self, indices: list[int]) -> ShardSet:
        shards = [self.manifest["shards"][i] for i in indices]
        totals = {k: sum(s[k] for s in shards) for k in ("cells", "bytes", "nnz") if all(k in s for s in shards)}
        manifest = self.manifest | {"shards": shards, "totals": totals | {"shards": len(shards)},
                                    "identity": content_identity(self.manifest["vocabulary"], shards)}
        return ShardSet(self.directory, manifest)

    def check_shard(self, index: int) -> None:
        """Refuse shard ``index`` if its bytes are not those the manifest lists (size, sha256),
        naming it: training must never read a damaged shard. Each is read once per ShardSet."""
        if index in self._checked:
            return
        record, path = self.manifest["shards"][index], self.shard_paths[index]
        problem = digest_problem(record, os.path.getsize(path), file_sha256(path))
        if problem:
            raise CorruptShardError(f"{self.directory}/{problem}: the shard is damaged; write it again (the same "
                                    "write command into a new --out) or find every bad one with "
                                    "python -m sharding verify")
        self._checked.add(index)

    def iter_cells(self) -> Iterator[Cell]:
        """Every cell once, in stored order, with its obs; no shuffling."""
        for path in self.shard_paths:
            for sample in iter_shard(path):
                yield decode_cell(sample, os.path.basename(path))

    def sample_counts(self, verify: bool, shards: int = 64, cells_per_shard: int = 64) -> sp.csr_matrix:
        """The first cells of up to ``shards`` shards spread evenly over the set, as cells x
        vocabulary CSR: a cheap look at the data's statistics that spans its sources (a Census
        shard set is ordered by dataset); ``verify`` checks each shard read first."""
        picks = np.unique(np.linspace(0, len(self.shard_paths) - 1, min(shards, len(self.shard_paths))).round())
        for i in picks.astype(int) if verify else ():
            self.check_shard(i)
        cells = [cell for i in picks.astype(int) for cell in itertools.islice(
            (decode_cell(s, os.path.basename(self.shard_paths[i])) for s in iter_shard(self.shard_paths[i])),
            cells_per_shard)]
        return _csr(cells, self.vocab_size)

    def read_all(self) -> tuple[list[int], sp.csr_matrix, list[dict[str, Any]]]:
        """(soma_joinids, counts as cells x vocabulary CSR, obs) of every cell: a small set (a probe's
        labelled cells) read whole, each shard checked against the manifest first (a damaged byte
        can still decode, into wrong counts)."""
        for index in range(len(self.shard_paths)):
            self.check_shard(index)
        cells = list(self.iter_cells())
        return [c.soma_joinid for c in cells], _csr(cells, self.vocab_size), [c.obs for c in cells]


def _csr(cells: list[Cell], vocab_size: int) -> sp.csr_matrix:
    """Decoded cells as one cells x vocabulary CSR matrix of counts."""
    indptr = np.concatenate(([0], np.cumsum([len(c.genes) for c in cells])))
    return sp.csr_matrix((np.concatenate([c.counts for c in cells]) if cells else np.zeros(0, np.float32),
                          np.concatenate([c.genes for c in cells]) if cells else np.zeros(0, np.int32), indptr),
                         shape=(len(cells), vocab_size))
