"""The configurations of the sharding tool's commands (``python -m sharding write | merge | verify |
stats | build-soma``). They live with the shard format, not in ``sharding/``, because every
manifest records its ``WriteOptions`` and the demo (in ``scgraph``, which never imports
``sharding``) builds these commands."""

from __future__ import annotations

from dataclasses import dataclass

from scgraph.cli import option
from scgraph.config import MATCH_KEYS, check_choice

#: Which matrix of an .h5ad holds raw counts: ``auto`` = raw.X when present (the CELLxGENE
#: convention for a normalised X), else X.
H5AD_MATRICES = ("auto", "X", "raw")
PRIMARY_FILTER = "is_primary_data == True"
DEFAULT_OBS_COLUMNS = ("cell_type", "cell_type_ontology_term_id", "tissue", "assay", "disease", "dataset_id",
                       "donor_id")


def parse_slice(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N: task I of N (e.g. $SLURM_ARRAY_TASK_ID of an array of N)."""
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--slice must be I/N with integers 0 <= I < N (e.g. 0/4); got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--slice must be I/N with 0 <= I < N; got {text!r}")
    return i, n


def _at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1; got {value}")


@dataclass(frozen=True)
class WriteOptions:
    """What, besides the source, decides the shards: a re-run must repeat these exactly."""

    obs_filter: str | None = option(None, f"SOMA value_filter on obs, e.g. \"tissue == 'blood'\" (default: "
                                    f"'{PRIMARY_FILTER}' where that column exists, else every cell; '' selects every "
                                    "cell)", metavar="EXPR")
    obs_columns: tuple[str, ...] | None = option(None, "comma-separated obs columns stored with each cell (default: "
                                                 f"those of {','.join(DEFAULT_OBS_COLUMNS)} present in obs)",
                                                 metavar="A,B,..")
    cells_per_shard: int = option(10_000, "cells per shard", metavar="N")
    max_cells: int | None = option(None, "keep a uniform random sample of N of the selected cells (seeded by --seed)",
                                   metavar="N")
    seed: int = option(0, "seed of the --max-cells sample")
    vocab_from: str | None = option(None, "write gene indices in the vocabulary of this existing shard set (e.g. data "
                                    "for a probe of a model pretrained on it); source genes it lacks are dropped",
                                    metavar="DIR")
    match_genes_by: str = option("feature_id", "how --vocab-from matches genes (feature_name for symbols)",
                                 choices=MATCH_KEYS)
    slice: str | None = option(None, "write only part I (0-based) of N of the selected cells' shards: task I of a job "
                               "array of N (e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), each into its own "
                               "--out; 'merge' joins the N parts into the shard set one process would write",
                               metavar="I/N")

    def __post_init__(self) -> None:
        _at_least_one("--cells-per-shard", self.cells_per_shard)
        _at_least_one("--max-cells", self.max_cells)
        check_choice("--match-genes-by", self.match_genes_by, MATCH_KEYS)
        if self.slice is not None:
            parse_slice(self.slice)


@dataclass(kw_only=True)
class ShardWriteConfig:
    """Select cells with an obs filter and stream their raw counts, block by block, into tar shards (one sample per
    cell: <soma_joinid>.genes.npy, .counts.npy, .obs.json) plus manifest.json. Re-running the same command after an
    interruption resumes after the last complete shard; a different command on a non-empty --out is refused."""

    census_version: str | None = option(None, "the CELLxGENE Census release (e.g. 'stable' or '2025-01-30'), opened "
                                        "with cellxgene_census.open_soma; needs network access", metavar="VERSION",
                                        group="source (exactly one)")
    census_uri: str | None = option(None, "a census-layout collection at a path or URI (e.g. from build-soma), "
                                    "opened through the same cellxgene_census.open_soma code path", metavar="PATH",
                                    group="source (exactly one)")
    soma: str | None = option(None, "a bare SOMA experiment with the census schema (measurement RNA, X layer raw)",
                              metavar="URI", group="source (exactly one)")
    h5ad: str | None = option(None, "an AnnData file, read in backed mode", metavar="FILE",
                              group="source (exactly one)")
    out: str = option(help="output directory (new, empty, or a previous run of this same command to resume)",
                      metavar="DIR")
    organism: str = option("homo_sapiens", "census organism experiment")
    h5ad_matrix: str = option("auto", "which .h5ad matrix holds raw counts: raw (raw.X), X, or auto = raw.X when "
                              "present else X", choices=H5AD_MATRICES)
    options: WriteOptions = option(help="what decides the shards", flatten=True, default_factory=WriteOptions)
    workers: int = option(1, "processes writing shards in parallel, each a contiguous part of them. One process "
                          "already overlaps reading, encoding and file writing on threads, and a worker spends about "
                          "2 CPU-seconds starting (imports, opening the source): on 2 cores 2 workers were slower "
                          "than 1; use more only with more cores", metavar="N")
    block_cells: int | None = option(None, "cells read from the source per block, cut on a grid of N soma_joinids: "
                                     "memory is a few blocks (default: the X array's tile extent along cells, 2048 in "
                                     "the census, so no two blocks decode the same tiles; 2048 for an .h5ad)",
                                     metavar="N")
    quiet: bool = option(False, "no progress bar")

    def __post_init__(self) -> None:
        given = [k for k in ("census_version", "census_uri", "soma", "h5ad") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one source: --census-version, --census-uri, --soma or --h5ad")
        check_choice("--h5ad-matrix", self.h5ad_matrix, H5AD_MATRICES)
        _at_least_one("--workers", self.workers)
        _at_least_one("--block-cells", self.block_cells)

    @property
    def source(self) -> tuple[str, str]:
        """(kind, location) of the one source given: kind is census-version, census-uri, soma or h5ad."""
        name = next(k for k in ("census_version", "census_uri", "soma", "h5ad") if getattr(self, k) is not None)
        return name.replace("_", "-"), getattr(self, name)


@dataclass
class MergeConfig:
    """Check that the parts come from one write command and cover every slice once, move their shards into --out,
    write the merged manifest and remove the emptied parts. The result equals the shard set a single write would
    give (same shards, manifest and identity). Re-running an interrupted merge finishes it."""

    out: str = option(help="the merged shard set (new or empty)", metavar="DIR")
    parts: tuple[str, ...] = option(help="the part directories, one per slice", positional=True, metavar="PART")


@dataclass
class VerifyConfig:
    """Check every shard's size, sha256, cell count and that every sample decodes (no cell twice, gene indices
    inside the vocabulary, finite non-negative counts). Exits 1 and names each bad shard if anything is wrong."""

    directory: str = option(help="a shard set written by 'write'", positional=True, metavar="DIR")
    quiet: bool = option(False, "no progress bar")


@dataclass
class StatsConfig:
    """Record the per-gene statistics (expressing cells, mean, median and variance of log1p CP10k) of a shard set
    written before `write` recorded them: one pass over its shards. Token selection by normalised rank or by
    variable genes, and the decoder's starting bias, read them."""

    directory: str = option(help="a complete shard set written by 'write'", positional=True, metavar="DIR")
    quiet: bool = option(False, "no progress bar")


@dataclass
class BuildSomaConfig:
    """Write a collection with census_info and census_data/<organism> (measurement RNA, X layer raw, census obs/var
    columns) that cellxgene_census.open_soma(uri=PATH) opens like the real census: the offline stand-in for the
    demo and the tests."""

    h5ad: str = option(help="input AnnData with raw integer counts", metavar="FILE")
    out: str = option(help="new collection directory (must not exist or be empty)", metavar="PATH")
    label_key: str | None = option(None, "obs column copied to cell_type (e.g. bulk_labels)", metavar="COL")
    organism: str = option("homo_sapiens", "experiment name")
    h5ad_matrix: str = option("auto", "which matrix holds raw counts (raw.X when present under auto)",
                              choices=H5AD_MATRICES)
