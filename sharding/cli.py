"""``python -m sharding {write,merge,verify,build-soma}``: parse, call the library, print one summary line.

Errors a user can fix (bad filter, missing column, empty query, non-count data, a foreign output
directory, a damaged shard) end the command with one line on stderr and exit status 2 (1 for a
failed verify), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scgraph.data.vocab import MATCH_KEYS
from sharding.layout import build_census_layout_from_h5ad
from sharding.merge import merge_parts
from sharding.sources import DEFAULT_OBS_COLUMNS, H5AD_MATRICES, PRIMARY_FILTER, SourceSpec
from sharding.verify import verify
from sharding.writer import WriteOptions, write_shards

_SOURCES = {"census_version": "census-version", "census_uri": "census-uri", "soma": "soma", "h5ad": "h5ad"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sharding",
        description="Stream single-cell counts (CELLxGENE Census, a SOMA experiment or an .h5ad) into "
        "WebDataset tar shards with a manifest, check them, or build a local census stand-in.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    write = commands.add_parser(
        "write",
        help="write shards from exactly one source",
        description="Select cells with an obs filter and stream their raw counts, block by block, into tar "
        "shards (one sample per cell: <soma_joinid>.genes.npy, .counts.npy, .obs.json) plus "
        "manifest.json. Re-running the same command after an interruption resumes after the "
        "last complete shard; a different command on a non-empty --out is refused.",
    )
    source = write.add_argument_group("source (exactly one)").add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--census-version",
        metavar="VERSION",
        help="the CELLxGENE Census release (e.g. 'stable' or '2025-01-30'), opened with "
        "cellxgene_census.open_soma; needs network access",
    )
    source.add_argument(
        "--census-uri",
        metavar="PATH",
        help="a census-layout collection at a path or URI (e.g. from build-soma), opened "
        "through the same cellxgene_census.open_soma code path",
    )
    source.add_argument(
        "--soma",
        metavar="URI",
        help="a bare SOMA experiment with the census schema (measurement RNA, X layer raw)",
    )
    source.add_argument("--h5ad", metavar="FILE", help="an AnnData file, read in backed mode")
    write.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory (new, empty, or a previous run of this same command to resume)",
    )
    write.add_argument(
        "--organism", default="homo_sapiens", help="census organism experiment (default: %(default)s)"
    )
    write.add_argument(
        "--obs-filter",
        metavar="EXPR",
        help=f"SOMA value_filter on obs, e.g. \"tissue == 'blood'\" (default: '{PRIMARY_FILTER}' "
        "where that column exists, else every cell; '' selects every cell)",
    )
    write.add_argument(
        "--obs-columns",
        metavar="A,B,..",
        help="comma-separated obs columns stored with each cell (default: those of "
        f"{','.join(DEFAULT_OBS_COLUMNS)} present in obs)",
    )
    write.add_argument(
        "--cells-per-shard",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="cells per shard (default: %(default)s)",
    )
    write.add_argument(
        "--max-cells",
        type=_positive_int,
        metavar="N",
        help="keep a uniform random sample of N of the selected cells (seeded by --seed)",
    )
    write.add_argument(
        "--seed", type=int, default=0, help="seed of the --max-cells sample (default: %(default)s)"
    )
    write.add_argument(
        "--vocab-from",
        metavar="DIR",
        help="write gene indices in the vocabulary of this existing shard set (e.g. data for a "
        "probe of a model pretrained on it); source genes it lacks are dropped",
    )
    write.add_argument(
        "--match-genes-by",
        choices=MATCH_KEYS,
        default="feature_id",
        help="how --vocab-from matches genes (default: %(default)s; feature_name for symbols)",
    )
    write.add_argument(
        "--h5ad-matrix",
        choices=H5AD_MATRICES,
        default="auto",
        help="which .h5ad matrix holds raw counts: raw (raw.X), X, or auto = raw.X when "
        "present else X (default: %(default)s)",
    )
    write.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="processes writing shards in parallel, each a contiguous part of them (default: %(default)s). "
        "One process already overlaps reading, encoding and file writing on threads, and a worker "
        "spends about 2 CPU-seconds starting (imports, opening the source): on 2 cores 2 workers were "
        "slower than 1; use more only with more cores",
    )
    write.add_argument(
        "--block-cells",
        type=_positive_int,
        metavar="N",
        help="cells read from the source per block, cut on a grid of N soma_joinids: memory is a few "
        "blocks (default: the X array's tile extent along cells, 2048 in the census, so no two blocks "
        "decode the same tiles; 2048 for an .h5ad)",
    )
    write.add_argument(
        "--slice",
        metavar="I/N",
        help="write only part I (0-based) of N of the selected cells' shards: task I of a job array of N "
        "(e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), each into its own --out; 'merge' joins "
        "the N parts into the shard set one process would write",
    )
    write.add_argument("--quiet", action="store_true", help="no progress bar")

    merge = commands.add_parser(
        "merge",
        help="join the parts of a job array (write --slice I/N) into one shard set",
        description="Check that the parts come from one write command and cover every slice once, move their "
        "shards into --out, write the merged manifest and remove the emptied parts. The result equals "
        "the shard set a single write would give (same shards, manifest and identity). Re-running an "
        "interrupted merge finishes it.",
    )
    merge.add_argument("--out", required=True, metavar="DIR", help="the merged shard set (new or empty)")
    merge.add_argument("parts", nargs="+", metavar="PART", help="the part directories, one per slice")

    check = commands.add_parser(
        "verify",
        help="check every shard against the manifest",
        description="Check every shard's size, sha256, cell count and that every sample decodes (no cell "
        "twice, gene indices inside the vocabulary, finite non-negative counts). Exits 1 and "
        "names each bad shard if anything is wrong.",
    )
    check.add_argument("directory", metavar="DIR", help="a shard set written by 'write'")
    check.add_argument("--quiet", action="store_true", help="no progress bar")

    build = commands.add_parser(
        "build-soma",
        help="write an .h5ad as a local census-layout collection",
        description="Write a collection with census_info and census_data/<organism> (measurement RNA, X "
        "layer raw, census obs/var columns) that cellxgene_census.open_soma(uri=PATH) opens like the "
        "real census: the offline stand-in for the demo and the tests.",
    )
    build.add_argument("--h5ad", required=True, metavar="FILE", help="input AnnData with raw integer counts")
    build.add_argument(
        "--out", required=True, metavar="PATH", help="new collection directory (must not exist or be empty)"
    )
    build.add_argument("--label-key", metavar="COL", help="obs column copied to cell_type (e.g. bulk_labels)")
    build.add_argument("--organism", default="homo_sapiens", help="experiment name (default: %(default)s)")
    build.add_argument(
        "--h5ad-matrix",
        choices=H5AD_MATRICES,
        default="auto",
        help="which matrix holds raw counts (default: %(default)s, raw.X when present)",
    )
    return parser


def _write(args: argparse.Namespace) -> int:
    kind, location = next((_SOURCES[k], v) for k, v in vars(args).items() if k in _SOURCES and v is not None)
    spec = SourceSpec(kind, location, organism=args.organism, h5ad_matrix=args.h5ad_matrix)
    columns = (
        None
        if args.obs_columns is None
        else tuple(c.strip() for c in args.obs_columns.split(",") if c.strip())
    )
    options = WriteOptions(
        obs_filter=args.obs_filter,
        obs_columns=columns,
        cells_per_shard=args.cells_per_shard,
        max_cells=args.max_cells,
        seed=args.seed,
        vocab_from=args.vocab_from,
        match_genes_by=args.match_genes_by,
        slice=args.slice,
    )
    report = write_shards(
        spec, args.out, options, workers=args.workers, block_cells=args.block_cells, progress=not args.quiet
    )
    print(report.summary())
    return 0


def _merge(args: argparse.Namespace) -> int:
    print(merge_parts(args.out, args.parts).summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.directory, progress=not args.quiet)
    for problem in report.problems:
        print(f"BAD {problem}", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


def _build_soma(args: argparse.Namespace) -> int:
    use_raw = {"auto": None, "X": False, "raw": True}[args.h5ad_matrix]
    uri = build_census_layout_from_h5ad(
        args.h5ad, args.out, label_key=args.label_key, organism=args.organism, use_raw=use_raw
    )
    print(f"{uri}: census layout written (open with cellxgene_census.open_soma(uri=...))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {"write": _write, "merge": _merge, "verify": _verify, "build-soma": _build_soma}[args.command]
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
