"""The ``write`` command: a source's selected cells into tar shards plus a manifest, resumably and
atomically.

The plan (which cells go to which shard) is a pure function of the command and the source: the
selected soma_joinids, sorted, cut into runs of ``cells_per_shard``. So a re-run after a kill
recomputes the same plan, skips the shards the manifest lists as complete and writes the rest.
A slice ``I/N`` (one task of a job array) writes only its contiguous share of the plan's shards,
under their global names: the N parts hold exactly the shards one process would write, and
``sharding.merge`` joins them into that same shard set.
A shard is written under a temporary name and renamed when complete; the manifest is replaced
atomically after every shard; so whatever the moment of a SIGKILL, the directory holds only
complete shards and a manifest that lists a subset of them.

Speed: a run of consecutive shards is one pass over the source, in blocks cut on the grid of X's
tiles along cells (TileDB decodes whole tiles, so a block that covered part of a band of tiles
would pay for all of it, and its neighbour again). Reading, encoding and writing overlap: a
thread reads the next block (TileDB releases the GIL) and another writes and hashes the previous
one while this thread encodes. Each stage holds at most one queued block, so memory stays a few
blocks whatever the number of cells.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from scgraph.data.shards import (
    MANIFEST_NAME,
    ShardSet,
    build_manifest,
    differences,
    read_manifest,
    write_manifest,
)
from scgraph.data.shards.config import ShardWriteConfig, StatsConfig, WriteOptions
from scgraph.data.shards.manifest import vocabulary_digest
from scgraph.data.shards.stats import compute_gene_stats, record_gene_stats
from scgraph.data.vocab import GeneMap, GeneVocab
from scgraph.io.files import TMP_SUFFIX, check_directory
from scgraph.io.sources import SourceSpec, open_source, resolve_obs_options
from sharding.plan import Plan, ShardJob, select_cells
from sharding.pool import consecutive, write_in_pool
from sharding.sink import write_run


@dataclass
class WriteReport:
    out: str
    cells: int
    shards: int
    bytes: int
    cells_written: int
    shards_written: int
    shards_resumed: int
    genes_dropped: int
    seconds: float
    identity: str

    def summary(self) -> str:
        rate = self.cells_written / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.shards_resumed} already complete" if self.shards_resumed else ""
        dropped = (
            f", {self.genes_dropped} source genes not in the vocabulary dropped" if self.genes_dropped else ""
        )
        return (
            f"{self.out}: {self.cells:,} cells in {self.shards} shards ({self.bytes / 1e6:.1f} MB, "
            f"{self.bytes / max(self.cells, 1):.0f} B/cell, identity {self.identity}); wrote "
            f"{self.shards_written} shards ({self.cells_written:,} cells) in {self.seconds:.1f} s "
            f"({rate:,.0f} cells/s){resumed}{dropped}"
        )


def gene_mapping(source_genes: GeneVocab, options: WriteOptions) -> tuple[GeneVocab, GeneMap | None]:
    """The output vocabulary, and how the source's genes map onto it (None: the source's own)."""
    if options.vocab_from is None:
        return source_genes, None
    target = ShardSet.open(options.vocab_from).vocab
    keys = source_genes.keys(options.match_genes_by)
    mapping = target.map_genes(keys, options.match_genes_by)
    if not mapping.matched:
        raise ValueError(
            f"no gene of the source is in the vocabulary of {options.vocab_from} "
            f"(matching by {options.match_genes_by}, e.g. {keys[0]!r}); nothing written"
        )
    return target, mapping


def changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two fingerprints of a source, in words."""
    said = []
    for key, what in (("genes_sha256", "its genes (var)"), ("cells", "its number of cells"),
                      ("genes", "its number of genes")):
        if old.get(key) != new.get(key):
            said.append(what + (f" ({old.get(key)} -> {new.get(key)})" if key != "genes_sha256" else ""))
    if not said:
        said = [", ".join(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)) + " (its content)"]
    return "; ".join(said)


def existing_shards(out: str, command: dict[str, Any], plan: Plan, fingerprint: dict[str, Any]) -> dict[int, Any]:
    """Complete shards a previous run of the same command on the same source left in ``out``;
    refuse anything else. Temporary files of a killed run are removed: they never hold a complete
    shard."""
    check_directory("--out", out)
    if not os.path.isdir(out):
        return {}
    for tmp in glob.glob(os.path.join(out, f"*{TMP_SUFFIX}")):
        os.unlink(tmp)
    entries = os.listdir(out)
    if not entries:
        return {}
    if MANIFEST_NAME not in entries:
        raise FileExistsError(
            f"--out {out} is not empty and holds no shard set; refusing to write into it "
            f"(choose an empty or new directory)"
        )
    manifest = read_manifest(out)
    diffs = differences(manifest.get("command", {}), command)
    if diffs:
        raise FileExistsError(
            f"--out {out} holds shards from a different command ({'; '.join(diffs)}); "
            f"refusing to overwrite (choose an empty or new directory)"
        )
    if manifest.get("fingerprint") != fingerprint:
        raise FileExistsError(
            f"--out {out} was written from another version of the source: {command['source']['location']} "
            f"changed in {changes(manifest.get('fingerprint') or {}, fingerprint)} since; refusing to mix them "
            f"(to start over, remove {out} or choose a new --out)"
        )
    if manifest.get("plan", {}).get("joinids_sha256") != plan.digest:
        raise FileExistsError(
            f"--out {out}: the source now selects different cells than when these shards "
            f"were written; refusing to mix them (choose an empty or new directory)"
        )
    return {s["index"]: s for s in manifest["shards"]}


def write_shards(
    spec: SourceSpec,
    out: str,
    options: WriteOptions | None = None,
    *,
    workers: int = 1,
    block_cells: int | None = None,
    progress: bool = True,
) -> WriteReport:
    """The ``write`` command. Checks everything it can (columns, filter, vocabulary, the output
    directory) before creating anything, so bad input leaves no trace."""
    options = options or WriteOptions()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1; got {workers}")
    started = time.perf_counter()
    out = os.path.abspath(out)
    with open_source(spec) as source:
        obs_filter, obs_columns = resolve_obs_options(
            source.obs_columns, options.obs_filter, options.obs_columns
        )
        genes = source.genes()
        if not genes.feature_ids:
            raise ValueError(f"{source.name} has no genes (its var is empty): nothing to write")
        try:
            source_vocab = GeneVocab(genes.feature_ids, genes.feature_names)
        except ValueError as err:
            raise ValueError(f"{source.name}: {err}") from None
        vocab, gene_map = gene_mapping(source_vocab, options)
        fingerprint = source.fingerprint() | {"genes_sha256": vocabulary_digest(
            {"feature_id": genes.feature_ids, "feature_name": genes.feature_names})}
        plan = Plan(
            select_cells(source, obs_filter, options.max_cells, options.seed),
            options.cells_per_shard,
            options.slice,
        )
        command = {
            "source": spec.describe(),
            "obs_filter": obs_filter,
            "obs_columns": obs_columns,
            **{k: v for k, v in asdict(options).items() if k not in ("obs_filter", "obs_columns")},
        }
        if options.vocab_from is not None:
            command["vocab_from"] = ShardSet.open(options.vocab_from).identity
        done = existing_shards(out, command, plan, fingerprint)
        created = not os.path.isdir(out)
        os.makedirs(out, exist_ok=True)
        jobs = [
            ShardJob(i, plan.shard(i), out, obs_columns, gene_map, block_cells)
            for i in plan.shard_indices
            if i not in done
        ]
        resumed = len(done)
        vocabulary = {"feature_id": vocab.feature_ids, "feature_name": vocab.feature_names}
        manifest_path = os.path.join(out, MANIFEST_NAME)

        def save_manifest() -> None:
            write_manifest(
                manifest_path,
                build_manifest(command, vocabulary, plan.record(), plan.shard_indices, done, fingerprint),
            )

        # at once, before any shard: a run killed from here on leaves a directory it can resume
        # (and a slice with no shard, more tasks than shards, says it is done)
        save_manifest()
        bar = tqdm(
            total=sum(len(plan.shard(i)) for i in plan.shard_indices),
            initial=sum(s["cells"] for s in done.values()),
            unit="cell",
            unit_scale=True,
            desc="write",
            disable=not progress,
            dynamic_ncols=True,
        )

        def finished(record: dict[str, Any]) -> None:
            done[record["index"]] = record
            save_manifest()

        try:
            if workers == 1 or len(jobs) <= 1:
                for run in consecutive(jobs):
                    write_run(source, run, finished, bar.update)
            else:

                def finished_in_pool(record: dict[str, Any]) -> None:
                    finished(record)
                    bar.update(record["cells"])

                write_in_pool(spec, jobs, workers, finished_in_pool)
        except BaseException:
            if created and not done:  # nothing written: leave no trace
                _remove_new_directory(out)
            raise
        finally:
            bar.close()
        manifest = read_manifest(out)
        if manifest["complete"] and "gene_stats" not in manifest:
            add_gene_stats(out, manifest, progress)
    manifest = read_manifest(out)
    return WriteReport(
        out=out,
        cells=manifest["totals"]["cells"],
        shards=manifest["totals"]["shards"],
        bytes=manifest["totals"]["bytes"],
        cells_written=sum(j.joinids.size for j in jobs),
        shards_written=len(jobs),
        shards_resumed=resumed,
        genes_dropped=gene_map.dropped if gene_map is not None else 0,
        seconds=time.perf_counter() - started,
        identity=manifest["identity"],
    )


def add_gene_stats(directory: str, manifest: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Record the per-gene statistics of a complete set (one more pass over its shards, read back
    from disk so a resumed run counts every shard alike) and replace the manifest."""
    manifest = record_gene_stats(directory, manifest, compute_gene_stats(directory, manifest, progress))
    write_manifest(os.path.join(directory, MANIFEST_NAME), manifest)
    return manifest


def stats_command(cfg: StatsConfig) -> None:
    """``python -m sharding stats``: add the per-gene statistics to a set written without them."""
    manifest = read_manifest(cfg.directory)
    if not manifest["complete"]:
        raise ValueError(f"{cfg.directory}: incomplete shard set; finish it with its write command first")
    stats = add_gene_stats(cfg.directory, manifest, not cfg.quiet)["gene_stats"]
    print(f"{cfg.directory}: gene statistics of {stats['cells']:,} cells recorded in {MANIFEST_NAME} and "
          f"{stats['file']}")


def _remove_new_directory(path: str) -> None:
    """Remove a directory this run created that holds no shard (only its first manifest)."""
    manifest = os.path.join(path, MANIFEST_NAME)
    if os.path.isfile(manifest):
        os.unlink(manifest)
    try:
        os.rmdir(path)
    except OSError:
        pass


def write_command(cfg: ShardWriteConfig) -> None:
    """``python -m sharding write``: the config's one source, written; one summary line."""
    kind, location = cfg.source
    spec = SourceSpec(kind, location, organism=cfg.organism, h5ad_matrix=cfg.h5ad_matrix)
    report = write_shards(spec, cfg.out, cfg.options, workers=cfg.workers, block_cells=cfg.block_cells,
                          progress=not cfg.quiet)
    print(report.summary())
