"""A block of cells as shard bytes: headers built for the whole block with numpy, payloads copied
into one preallocated buffer.

The bytes are exactly those of ``scgraph.data.shards.encode_block`` (the format's reference
encoder; a test compares the two): per cell a 512-byte ustar header and a member padded to 512
bytes for each of ``genes.npy``, ``counts.npy`` and ``obs.json``. Every member starts on a
512-byte boundary and every .npy header is 128 bytes, so the block's layout is a cumulative sum
of member sizes, the zeroed buffer is already the padding, and per cell only three slice copies
stay in Python. Measured on the 2-core machine: 1.3x faster than ``encode_block`` at 300 genes
per cell, 1.7x at census density (2,000); it is the writer's main-thread cost.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence

import numpy as np

from scgraph.data.shards import MEMBERS, npy_header

_BLOCK = 512
_NPY_HEADER_BYTES = 128


def _template() -> np.ndarray:
    """A regular file's ustar header with the reference encoder's fixed fields (mode 644, mtime 0,
    no owner); name, size and checksum are filled per member."""
    info = tarfile.TarInfo("")
    info.mtime, info.mode = 0, 0o644
    header = np.frombuffer(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), dtype=np.uint8).copy()
    header[148:156] = ord(" ")  # the checksum field counts as spaces
    return header


_TEMPLATE = _template()
_SUFFIXES = [np.frombuffer(f".{m}".encode(), dtype=np.uint8) for m in MEMBERS]
# the checksum of a header is this plus the bytes of its name and size fields
_CHECKSUM_BASE = int(_TEMPLATE.sum()) - int(_TEMPLATE[:100].sum()) - int(_TEMPLATE[124:135].sum())


def _octal(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) ASCII octal digits, zero-padded, as tar header fields hold numbers."""
    return (48 + (values[:, None] >> (3 * np.arange(width - 1, -1, -1))) % 8).astype(np.uint8)


def _names(keys: np.ndarray) -> np.ndarray:
    """(n, 3, 100) name fields ``<key>.genes.npy``, ``<key>.counts.npy``, ``<key>.obs.json``."""
    digits = keys.astype("S20").view(np.uint8).reshape(len(keys), 20)  # decimal, NUL-padded
    n_digits = np.count_nonzero(digits, axis=1)
    names = np.zeros((len(keys), 3, 100), dtype=np.uint8)
    names[:, :, :20] = digits[:, None, :]
    for m, suffix in enumerate(_SUFFIXES):
        at = n_digits[:, None] + np.arange(len(suffix))
        np.put_along_axis(names[:, m], at, np.broadcast_to(suffix, at.shape), axis=1)
    return names


def _npy_headers(lengths: np.ndarray, dtype: str) -> np.ndarray | None:
    """(n, 128) .npy headers of 1-D arrays of ``lengths``; None if one is not 128 bytes."""
    unique, inverse = np.unique(lengths, return_inverse=True)
    table = [npy_header(dtype, int(k)) for k in unique]
    if any(len(h) != _NPY_HEADER_BYTES for h in table):
        return None
    return np.frombuffer(b"".join(table), dtype=np.uint8).reshape(len(unique), _NPY_HEADER_BYTES)[inverse]


def encode_cells(
    keys: np.ndarray, indptr: np.ndarray, genes: np.ndarray, counts: np.ndarray, obs: Sequence[bytes]
) -> np.ndarray:
    """The tar bytes (uint8 array) of cells given as CSR rows, each with its obs JSON; byte for
    byte ``scgraph.data.shards.encode_block(keys, indptr, genes, counts, obs)``."""
    keys = np.asarray(keys, dtype=np.int64)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    indptr = np.asarray(indptr, dtype=np.int64)
    lengths = np.diff(indptr)
    genes, counts = genes[indptr[0] : indptr[-1]], counts[indptr[0] : indptr[-1]]
    gene_npy, count_npy = _npy_headers(lengths, "<i4"), _npy_headers(lengths, "<f4")
    if keys.min() < 0 or gene_npy is None or count_npy is None:  # never with shard data; stay exact
        from scgraph.data.shards import encode_block

        block = encode_block(keys.tolist(), indptr - indptr[0], genes, counts, obs)
        return np.frombuffer(block, dtype=np.uint8)
    obs_lengths = np.fromiter(map(len, obs), dtype=np.int64, count=n)
    sizes = np.empty((n, 3), dtype=np.int64)
    sizes[:, 0] = sizes[:, 1] = _NPY_HEADER_BYTES + 4 * lengths
    sizes[:, 2] = obs_lengths
    blocks = 1 + -(-sizes // _BLOCK)  # header + padded payload, in 512-byte blocks, per member
    member_block = (np.cumsum(blocks.ravel()) - blocks.ravel()).reshape(n, 3)
    out = np.zeros(int(blocks.sum()) * _BLOCK, dtype=np.uint8)

    names, size_fields = _names(keys), _octal(sizes.ravel(), 11).reshape(n, 3, 11)
    checksums = _CHECKSUM_BASE + names.sum(axis=2, dtype=np.int64) + size_fields.sum(axis=2, dtype=np.int64)
    headers = np.broadcast_to(_TEMPLATE, (n, 3, _BLOCK)).copy()
    headers[:, :, :100] = names
    headers[:, :, 124:135] = size_fields
    headers[:, :, 148:154] = _octal(checksums.ravel(), 6).reshape(n, 3, 6)
    headers[:, :, 154] = 0  # checksum field: 6 octal digits, NUL, space
    rows = out.reshape(-1, _BLOCK)
    rows[member_block.ravel()] = headers.reshape(-1, _BLOCK)
    rows[member_block[:, 0] + 1, :_NPY_HEADER_BYTES] = gene_npy
    rows[member_block[:, 1] + 1, :_NPY_HEADER_BYTES] = count_npy

    # payloads: one memcpy each, by slice assignment (faster than an index scatter at census density)
    view = memoryview(out)
    gene_bytes = memoryview(np.ascontiguousarray(genes, dtype="<i4")).cast("B")
    count_bytes = memoryview(np.ascontiguousarray(counts, dtype="<f4")).cast("B")
    bounds = (4 * (indptr - indptr[0])).tolist()
    starts = (member_block + 1) * _BLOCK
    starts[:, :2] += _NPY_HEADER_BYTES
    g_at, c_at, o_at = starts.T.tolist()
    for g, c, o, a, b, text in zip(g_at, c_at, o_at, bounds[:-1], bounds[1:], obs, strict=True):
        view[g : g + b - a] = gene_bytes[a:b]
        view[c : c + b - a] = count_bytes[a:b]
        view[o : o + len(text)] = text
    return out
