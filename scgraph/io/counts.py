"""Raw counts: the one validator every reader uses, and the one normalisation (log1p CP10k).

Shards store raw counts, the tokenizer normalises them, the probe's expression control uses the
same normalisation; a matrix that is not counts (NaN, negative, normalised values) would silently
corrupt all three, so each refuses it here, naming the first bad cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp


def value_defect(values: np.ndarray, *, integers: bool = True) -> tuple[int, str] | None:
    """(index, what) of the first value that is not a count, or None. ``integers``: also refuse
    non-integer values (raw counts; the tokenizer accepts already-normalised values)."""
    if not values.size:
        return None
    defects = [("NaN or infinite values", ~np.isfinite(values)), ("negative values", values < 0)]
    if integers:
        defects.append(("non-integer values (normalised data? raw counts are required)", values != np.rint(values)))
    for what, bad in defects:
        if bad.any():
            return int(np.argmax(bad)), what
    return None


def count_defect(matrix: sp.csr_matrix, *, integers: bool = True) -> tuple[int, str] | None:
    """(row, what) of the first cell of a CSR matrix whose values are not counts, or None."""
    defect = value_defect(matrix.data, integers=integers)
    if defect is None:
        return None
    return int(np.searchsorted(matrix.indptr, defect[0], side="right") - 1), defect[1]


def check_counts(matrix: sp.csr_matrix, cell_names: Sequence[Any] | None = None, *, integers: bool = True) -> None:
    """Raise a ValueError naming the first bad cell (by ``cell_names``, else by row) and its defect."""
    defect = count_defect(matrix, integers=integers)
    if defect is not None:
        row, what = defect
        cell = cell_names[row] if cell_names is not None else f"in row {row}"
        raise ValueError(f"counts of cell {cell} contain {what}")


def log1p_normalized(matrix: sp.csr_matrix, target_sum: float = 1e4) -> np.ndarray:
    """log1p of each stored value scaled to ``target_sum`` counts per cell (library size over ALL
    the cell's genes), in the order of ``matrix.data``: the host's normalisation (statistics, the
    mean profile); the tokenizer's torch one computes the same numbers on the model's device.
    ``matrix`` must be CSR. Two temporaries, not six: each fresh MiB costs page faults."""
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = np.repeat(scale, np.diff(matrix.indptr))
    out *= matrix.data
    return np.log1p(out, out=out).astype(np.float32)


def log1p_cp10k(counts: sp.spmatrix) -> sp.csr_matrix:
    """log1p of counts per 10,000 as a CSR matrix: the standard normalisation, and the tokenizer's."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    return sp.csr_matrix((log1p_normalized(counts), counts.indices, counts.indptr), shape=counts.shape,
                         dtype=np.float32)
