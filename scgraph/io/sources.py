"""Open a source of cells, select cells with an obs filter, and read raw counts a block at a time.

Used by the sharding tool (census -> shards) and by evaluation (labelled cells for the probe).

Every source answers the same three questions: which genes (var, in index order), which cells (the
sorted soma_joinids the filter selects) and, for a block of those cells, their counts and obs. The
census, a census-layout copy and a bare SOMA experiment share one implementation (the census is a
SOMA experiment); an .h5ad is read in backed mode so its matrix is never loaded whole.
"""

from __future__ import annotations

import ast
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgraph.data.shards.config import DEFAULT_OBS_COLUMNS, H5AD_MATRICES, PRIMARY_FILTER
from scgraph.io.files import file_sha256

#: Where the cells come from.
SOURCE_KINDS = ("census-version", "census-uri", "soma", "h5ad")
#: Bounds every TileDB read: without it one call may return a whole query as one table (measured:
#: 3.5 GB peak for a 50k-cell read without it).
READ_BUFFER_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class SourceSpec:
    """Everything needed to (re)open a source, also in a worker process: so it is plain data."""

    kind: str
    location: str
    organism: str = "homo_sapiens"
    h5ad_matrix: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source kind must be one of {', '.join(SOURCE_KINDS)}; got {self.kind!r}")
        if self.h5ad_matrix not in H5AD_MATRICES:
            raise ValueError(
                f"h5ad matrix must be one of {', '.join(H5AD_MATRICES)}; got {self.h5ad_matrix!r}"
            )

    @property
    def resolved_location(self) -> str:
        """Local paths made absolute, so a manifest names the same data from any working directory."""
        if self.kind == "census-version" or "://" in self.location:
            return self.location
        return os.path.abspath(self.location)

    def describe(self) -> dict[str, str]:
        out = {"kind": self.kind, "location": self.resolved_location}
        if self.kind != "h5ad":
            out["organism"] = self.organism
        else:
            out["h5ad_matrix"] = self.h5ad_matrix
        return out


@dataclass
class Genes:
    """The source's var in index order: the shard set's gene vocabulary unless mapped onto another."""

    feature_ids: list[str]
    feature_names: list[str]


def filter_columns(expr: str) -> set[str]:
    """Column names an obs filter refers to (SOMA value_filter syntax is a Python expression)."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"obs filter {expr!r} is not a valid expression: {err.msg}") from None
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def resolve_obs_options(
    available: Sequence[str], obs_filter: str | None, obs_columns: Sequence[str] | None
) -> tuple[str | None, list[str]]:
    """Apply the defaults (primary cells, the usual label columns where present) and check that
    every column the user named exists, before anything is read or written."""
    if obs_filter is None:
        obs_filter = PRIMARY_FILTER if "is_primary_data" in available else None
    elif not obs_filter.strip():
        obs_filter = None
    if obs_filter is not None:
        missing = sorted(filter_columns(obs_filter) - set(available))
        if missing:
            raise ValueError(
                f"obs filter {obs_filter!r} uses column(s) not in obs: {', '.join(missing)} "
                f"(obs has: {', '.join(available)})"
            )
    if obs_columns is None:
        columns = [c for c in DEFAULT_OBS_COLUMNS if c in available]
    else:
        columns = list(dict.fromkeys(obs_columns))
        missing = [c for c in columns if c not in available]
        if missing:
            raise ValueError(
                f"--obs-columns names column(s) not in obs: {', '.join(missing)} "
                f"(obs has: {', '.join(available)})"
            )
    return obs_filter, [c for c in columns if c != "soma_joinid"]


#: A block's kept obs columns, one list of Python values per column.
ObsColumns = dict[str, list[Any]]


def _python_values(column: Any) -> list[Any]:
    """An Arrow column as Python values; census columns are dictionary-encoded, and mapping codes
    through the (small) dictionary is far faster than ``to_pylist`` per cell."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        codes = column.indices.to_numpy(zero_copy_only=False)
        return np.asarray(column.dictionary.to_pylist() + [None], dtype=object)[
            np.where(column.indices.is_null().to_numpy(zero_copy_only=False), -1, codes)
        ].tolist()
    return column.to_numpy(zero_copy_only=False).tolist()


def _fragments(uri: str) -> list[str] | None:
    """The TileDB fragment names of a local array (their names hold their write timestamps), or
    None where the array is not on a local disk."""
    path = uri.removeprefix("file://")
    if "://" in path or not os.path.isdir(os.path.join(path, "__fragments")):
        return None
    return sorted(os.listdir(os.path.join(path, "__fragments")))


class SomaSource:
    """A SOMA experiment with the census schema: measurement "RNA", X layer "raw"."""

    def __init__(self, experiment: Any, name: str, release: dict[str, str] | None = None) -> None:
        if "RNA" not in experiment.ms:
            raise ValueError(f"{name} has no measurement 'RNA' (has: {', '.join(experiment.ms.keys())})")
        ms = experiment.ms["RNA"]
        if "raw" not in ms.X:
            raise ValueError(
                f"{name} has no X layer 'raw' in measurement 'RNA' "
                f"(layers: {', '.join(ms.X.keys()) or 'none'})"
            )
        self.name = name
        self.counts_name = f"{name} (X layer 'raw')"  # where the counts are, for error messages
        self._obs = experiment.obs
        self._var = ms.var
        self._X = ms.X["raw"]
        self.obs_columns: list[str] = list(self._obs.schema.names)
        self._var_joinids: np.ndarray | None = None
        self._release = release or {}

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this version of the data: sizes, the genes, the census release, and each
        array's TileDB fragments (a write adds one, so any change of a local store changes them)."""
        out: dict[str, Any] = {"cells": int(self._obs.count), "genes": int(self._var.count), "nnz": int(self._X.nnz),
                               **self._release}
        fragments = {name: _fragments(array.uri) for name, array in
                     (("obs", self._obs), ("var", self._var), ("X", self._X))}
        if all(f is not None for f in fragments.values()):
            out["fragments"] = fragments
        return out

    def genes(self) -> Genes:
        missing = [c for c in ("feature_id", "feature_name") if c not in self._var.schema.names]
        if missing:
            raise ValueError(f"{self.name}: var has no column {', '.join(missing)} (var columns: "
                             f"{', '.join(self._var.schema.names)}); the census schema needs feature_id and "
                             "feature_name")
        var = self._var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat()
        var = var.sort_by("soma_joinid")
        self._var_joinids = var["soma_joinid"].to_numpy()
        self._var_is_range = bool(np.array_equal(self._var_joinids, np.arange(len(self._var_joinids))))
        return Genes(
            [str(x) for x in var["feature_id"].to_pylist()], [str(x) for x in var["feature_name"].to_pylist()]
        )

    def select(self, obs_filter: str | None) -> np.ndarray:
        table = self._obs.read(column_names=["soma_joinid"], value_filter=obs_filter).concat()
        return np.sort(table["soma_joinid"].to_numpy())

    @property
    def tile_rows(self) -> int | None:
        """X's tile extent along cells. TileDB decodes whole tiles: a read of part of a band of
        this many cells costs as much as the whole band, so the writer's blocks follow this grid."""
        try:
            dims = json.loads(self._X.schema_config_options().dims)
            return int(dims["soma_dim_0"]["tile"])
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def _coords(joinids: np.ndarray) -> tuple[Any, bool]:
        """A contiguous run of joinids (the common case) is read as one range and needs no lookup."""
        first, last = int(joinids[0]), int(joinids[-1])
        contiguous = last - first + 1 == len(joinids)
        return ((slice(first, last),) if contiguous else (joinids,)), contiguous

    def read_counts(self, joinids: np.ndarray) -> sp.csr_matrix:
        """Counts of sorted ``joinids``: cells in ``joinids`` order x var positions."""
        if self._var_joinids is None:
            self.genes()
        coords, contiguous = self._coords(joinids)
        table = self._X.read(coords=coords).tables().concat()
        data, dim0, dim1 = (table[c].to_numpy() for c in ("soma_data", "soma_dim_0", "soma_dim_1"))
        del table  # each column's buffer is freed with its array: int32 positions replace them
        rows = (dim0 - joinids[0] if contiguous else np.searchsorted(joinids, dim0)).astype(np.int32)
        del dim0
        cols = (dim1 if self._var_is_range else np.searchsorted(self._var_joinids, dim1)).astype(np.int32)
        del dim1
        return sp.csr_matrix((data, (rows, cols)), shape=(len(joinids), len(self._var_joinids)))

    def read_obs(self, joinids: np.ndarray, obs_columns: Sequence[str]) -> ObsColumns:
        """The ``obs_columns`` of sorted ``joinids``, one list of Python values per column."""
        coords, _ = self._coords(joinids)
        obs = self._obs.read(coords=coords, column_names=["soma_joinid", *obs_columns]).concat()
        obs = obs.sort_by("soma_joinid")
        if not np.array_equal(obs["soma_joinid"].to_numpy(), joinids):
            raise ValueError(f"{self.name}: obs has no row for some selected soma_joinid")
        return {c: _python_values(obs[c]) for c in obs_columns}


class H5adSource:
    """An .h5ad opened with h5py: obs and var are read whole (small), X one block of rows at a time.

    A cell's soma_joinid is its row number, as ``tiledbsoma.io.from_h5ad`` would assign.
    """

    def __init__(self, path: str, matrix: str) -> None:
        import h5py
        from anndata.io import read_elem, sparse_dataset

        if not os.path.isfile(path):
            raise FileNotFoundError(f"--h5ad {path}: no such file")
        self.name = path
        try:
            self._file = h5py.File(path, "r")
        except OSError as err:  # not HDF5, or truncated
            raise ValueError(f"--h5ad {path} is not a readable .h5ad file ({err})") from None
        try:
            use_raw = matrix == "raw" or (matrix == "auto" and "raw" in self._file)
            if use_raw and "raw" not in self._file:
                raise ValueError(f"{path} has no raw matrix (raw.X); use --h5ad-matrix X")
            group = self._file["raw"] if use_raw else self._file
            self.counts_name = f"{path} ({'raw.X' if use_raw else 'X'})"  # where the counts are, for error messages
            for key, where in (("X", group), ("var", group), ("obs", self._file)):
                if key not in where:
                    raise ValueError(f"--h5ad {path} has no {key!r} in {where.name}: not an AnnData file")
            x = group["X"]
            self._X = sparse_dataset(x) if isinstance(x, h5py.Group) else x
            with quiet_anndata():
                self._obs: pd.DataFrame = read_elem(self._file["obs"])
                self._var: pd.DataFrame = read_elem(group["var"])
            if not isinstance(self._obs, pd.DataFrame) or not isinstance(self._var, pd.DataFrame):
                self._obs, self._var = _legacy_frames(path, use_raw)
        except (OSError, KeyError) as err:  # damaged inside
            self._file.close()
            raise ValueError(f"--h5ad {path} is damaged and cannot be read ({err})") from None
        except ValueError:
            self._file.close()
            raise
        self.obs_columns: list[str] = list(self._obs.columns)

    def close(self) -> None:
        self._file.close()

    def genes(self) -> Genes:
        names = [str(x) for x in self._var.index]
        ids = [str(x) for x in self._var["feature_id"]] if "feature_id" in self._var else names
        if "feature_name" in self._var:
            names = [str(x) for x in self._var["feature_name"]]
        return Genes(ids, names)

    def select(self, obs_filter: str | None) -> np.ndarray:
        if obs_filter is None:
            return np.arange(len(self._obs), dtype=np.int64)
        mask = self._obs.reset_index(drop=True).eval(obs_filter, engine="python")
        return np.flatnonzero(np.asarray(mask, dtype=bool)).astype(np.int64)

    tile_rows = None  # backed rows cost the same however a read is cut

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this file's content: its size and sha256 (read once, about 1 s per GB),
        and the number of cells."""
        return {"cells": len(self._obs), "genes": len(self._var), "bytes": os.path.getsize(self.name),
                "sha256": file_sha256(self.name)}

    def read_counts(self, joinids: np.ndarray) -> sp.csr_matrix:
        try:
            return sp.csr_matrix(self._X[joinids])
        except OSError as err:  # h5py: a damaged or truncated dataset
            raise ValueError(f"--h5ad {self.name}: cannot read X rows {joinids[0]}..{joinids[-1]} ({err}); "
                             "the file is damaged") from None

    def read_obs(self, joinids: np.ndarray, obs_columns: Sequence[str]) -> ObsColumns:
        obs = self._obs.iloc[joinids]
        return {c: obs[c].astype(object).tolist() for c in obs_columns}


@contextmanager
def quiet_anndata() -> Iterator[None]:
    """Without anndata's warnings about a file's age (a file it reads is used as it is) or its
    duplicate gene names: what matters in the file (duplicate genes, counts that are not counts) is
    checked by this project, in one line that names the file and the field."""
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ad.OldFormatWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="anndata")
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        yield


def read_anndata(path: str, backed: str | None = None) -> Any:
    """``anndata.read_h5ad`` under :func:`quiet_anndata`."""
    import anndata as ad

    with quiet_anndata():
        return ad.read_h5ad(path, backed=backed)


def _legacy_frames(path: str, use_raw: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """obs and var of an .h5ad in anndata's legacy layout (before 0.7: compound datasets, which
    ``read_elem`` returns as record arrays), through anndata's own reader of that layout."""
    adata = read_anndata(path, backed="r")
    try:
        return adata.obs, (adata.raw.var if use_raw else adata.var)
    finally:
        adata.file.close()


Source = SomaSource | H5adSource


def soma_context() -> Any:
    import tiledbsoma as soma

    return soma.SOMATileDBContext(
        tiledb_config={"soma.init_buffer_bytes": READ_BUFFER_BYTES, "py.init_buffer_bytes": READ_BUFFER_BYTES}
    )


def _release(census: Any) -> dict[str, str]:
    """The census's own description of its release (census_info/summary), when it has one."""
    try:
        table = census["census_info"]["summary"].read().concat().to_pydict()
    except (KeyError, AttributeError):
        return {}
    wanted = ("census_schema_version", "census_build_date")
    return {f"census.{k}": str(v) for k, v in zip(table["label"], table["value"]) if k in wanted}


@contextmanager
def open_source(spec: SourceSpec) -> Iterator[Source]:
    """Open ``spec`` read-only; the census paths go through ``cellxgene_census.open_soma``. What
    cannot be opened as such is one ValueError naming the location."""
    if spec.kind == "h5ad":
        source = H5adSource(spec.location, spec.h5ad_matrix)
        try:
            yield source
        finally:
            source.close()
        return
    flag = f"--{spec.kind}"
    if spec.kind != "census-version" and "://" not in spec.location and not os.path.exists(spec.location):
        raise FileNotFoundError(f"{flag} {spec.location}: no such "
                                f"{'experiment' if spec.kind == 'soma' else 'collection'}")
    import tiledbsoma as soma

    try:
        if spec.kind == "soma":
            opened = soma.Experiment.open(spec.resolved_location, context=soma_context())
        else:
            import cellxgene_census

            context = cellxgene_census.get_default_soma_context(tiledb_config={
                "soma.init_buffer_bytes": READ_BUFFER_BYTES, "py.init_buffer_bytes": READ_BUFFER_BYTES})
            if spec.kind == "census-uri":
                opened = cellxgene_census.open_soma(uri=spec.resolved_location, context=context)
            else:
                opened = cellxgene_census.open_soma(census_version=spec.location, context=context)
    except (soma.SOMAError, TypeError, KeyError) as err:
        what = "a SOMA experiment" if spec.kind == "soma" else "a census (a SOMA collection with census_data)"
        raise ValueError(f"{flag} {spec.location} is not {what}: {err}") from None
    with opened:
        if spec.kind == "soma":
            yield SomaSource(opened, spec.resolved_location)
            return
        if "census_data" not in opened:
            raise ValueError(f"{flag} {spec.location} is not a census: it has no census_data collection")
        data = opened["census_data"]
        if spec.organism not in data:
            raise ValueError(f"census has no organism {spec.organism!r} (has: {', '.join(data.keys())})")
        yield SomaSource(data[spec.organism], f"census {spec.resolved_location} ({spec.organism})", _release(opened))
