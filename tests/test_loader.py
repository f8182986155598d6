"""The streaming loader over real tar shards: coverage across ranks and workers, determinism, resume."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import encode_sample, generated_anndata

from scgraph.config import TokenizerConfig, WriteOptions
from scgraph.data.batch import Batch
from scgraph.data.loader import Layout, build_loader, epoch_runs, stream_part, without
from scgraph.data.shards import ShardSet
from scgraph.io.sources import SourceSpec
from sharding.writer import write_shards

N_CELLS = 1280
TOK = TokenizerConfig(seq_len=8)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> ShardSet:
    """Cell i expresses only gene i, so a batch says which cells it holds; shards of uneven size."""
    counts = sp.csr_matrix(
        (np.arange(N_CELLS) % 7 + 1.0, np.arange(N_CELLS), np.arange(N_CELLS + 1)), shape=(N_CELLS, N_CELLS)
    )
    folder = tmp_path_factory.mktemp("tagged")
    generated_anndata(counts).write_h5ad(folder / "tagged.h5ad")
    write_shards(
        SourceSpec("h5ad", str(folder / "tagged.h5ad")),
        str(folder / "shards"),
        WriteOptions(cells_per_shard=300, obs_columns=("label",)),
        progress=False,
    )
    shards = ShardSet.open(str(folder / "shards"))
    assert shards.shard_cells == [300, 300, 300, 300, 80]
    return shards


def cell_ids(batch: Batch) -> list[int]:
    return batch.genes[:, 0].tolist()


def load(shards, **kwargs) -> list[Batch]:
    args = dict(batch_size=16, mask_ratio=0.15, seed=3) | kwargs
    return list(build_loader(shards, TOK, **args))


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.genes, y.genes) and torch.equal(x.values, y.values) and torch.equal(x.masked, y.masked)
        for x, y in zip(a, b, strict=True)
    )


def test_two_ranks_with_two_workers_each_cover_every_cell_exactly_once(tagged):
    per_rank = [load(tagged, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert [len(batches) for batches in per_rank] == [40, 40]  # 1280 / (2 ranks x 16)
    seen = Counter(c for batches in per_rank for b in batches for c in cell_ids(b))
    assert sorted(seen) == list(range(N_CELLS)) and set(seen.values()) == {1}


def test_uneven_split_gives_every_rank_the_same_batches_and_no_cell_twice(tagged):
    per_rank = [load(tagged, batch_size=24, rank=r, world_size=3) for r in range(3)]
    assert [len(b) for b in per_rank] == [17, 17, 17]  # floor(1280 / (3 x 24))
    seen = Counter(c for batches in per_rank for b in batches for c in cell_ids(b))
    assert set(seen.values()) == {1} and N_CELLS - len(seen) < 3 * 24


def test_batches_are_full_tokenized_and_masked(tagged):
    batches = load(tagged, world_size=1)
    assert len(batches) == N_CELLS // 16
    for b in batches:
        assert (
            b.genes.dtype == torch.int64 and b.values.dtype == torch.float32 and b.masked.dtype == torch.bool
        )
        assert b.genes.shape == b.values.shape == b.masked.shape == (16, TOK.length)
        assert (b.genes[:, 1:] == tagged.vocab_size).all()  # one gene per cell, the rest is padding
        assert b.masked[:, 0].all() and not b.masked[:, 1:].any()
        raw = torch.tensor([i % 7 + 1.0 for i in cell_ids(b)])
        assert torch.allclose(b.values[:, 0], torch.log1p(raw * 1e4 / raw))  # library-size normalised


def test_same_seed_and_epoch_give_the_same_batches_a_new_epoch_a_new_order(tagged):
    first, again = load(tagged), load(tagged)
    assert same(first, again)
    other = load(tagged, epoch=1)
    assert not same(first, other)
    assert sorted(c for b in other for c in cell_ids(b)) == list(range(N_CELLS))
    assert not same(first, load(tagged, seed=4))


@pytest.mark.parametrize("num_workers, skip", [(0, 1), (0, 79), (2, 1), (2, 7), (2, 80)])
def test_skip_batches_resumes_exactly_where_an_uninterrupted_run_would_be(tagged, num_workers, skip):
    full = load(tagged, num_workers=num_workers)
    assert len(full) == 80
    resumed = build_loader(
        tagged, TOK, batch_size=16, mask_ratio=0.15, seed=3, num_workers=num_workers, skip_batches=skip
    )
    assert len(resumed) == 80 - skip
    assert same(list(resumed), full[skip:])


def test_stream_parts_cut_the_permuted_sequence_into_equal_runs():
    runs = epoch_runs([300, 300, 300, 300, 80], seed=0, epoch=2)
    parts = [stream_part(runs, Layout(5, 1, 16), s) for s in range(5)]
    assert [sum(hi - lo for _, lo, hi in part) for part in parts] == [256] * 5
    covered = Counter((shard, i) for part in parts for shard, lo, hi in part for i in range(lo, hi))
    assert set(covered.values()) == {1} and len(covered) == 1280
    assert without([(3, 0, 10)], {3: np.array([0, 4, 5, 9])}) == [(3, 1, 4), (3, 6, 9)]


def consumed(shards, layout: Layout, batches: int, segments=()) -> list[int]:
    """The cells the first ``batches`` batches of every rank of ``layout`` hold."""
    loaders = [build_loader(shards, TOK, batch_size=layout.batch_size, mask_ratio=0.15, seed=3, rank=r,
                            world_size=layout.world_size, num_workers=0 if layout.streams == 1 else layout.streams,
                            shuffle_buffer=64, segments=segments) for r in range(layout.world_size)]
    return [c for loader in loaders for b in itertools.islice(loader, batches) for c in cell_ids(b)]


def test_a_changed_layout_trains_the_rest_of_the_epoch_once(tagged):
    """2 ranks x 16 for 9 batches, then 3 ranks x 24 for 5, then 1 rank with 2 workers x 16 to the
    end: no cell twice, and only the last layout's remainder (< ranks x streams x batch) left out
    (what an earlier layout left over is planned into the next)."""
    first, second, third = Layout(2, 1, 16), Layout(3, 1, 24), Layout(1, 2, 16)
    a = consumed(tagged, first, 9)
    b = consumed(tagged, second, 5, segments=((first, 9),))
    c = consumed(tagged, third, 10**6, segments=((first, 9), (second, 5)))
    assert (len(a), len(b)) == (2 * 9 * 16, 3 * 5 * 24)
    trained = Counter(a + b + c)
    assert set(trained.values()) == {1}
    assert N_CELLS - len(trained) < 2 * 16
    # an unchanged layout is the ordinary resume: the same batches as the uninterrupted epoch
    assert consumed(tagged, first, 9) == a


def test_loader_reads_a_path_and_reports_too_small_sets(tagged):
    assert len(build_loader(tagged.directory, TOK, batch_size=640, mask_ratio=0.15, seed=0)) == 2
    with pytest.raises(ValueError, match="fewer than one batch per stream"):
        build_loader(tagged, TOK, batch_size=256, mask_ratio=0.15, seed=0, world_size=2, num_workers=3)
    with pytest.raises(ValueError, match="rank must be in"):
        build_loader(tagged, TOK, batch_size=16, mask_ratio=0.15, seed=0, rank=2, world_size=2)


def test_decode_rows_refuses_gene_indices_outside_the_vocabulary():
    import io

    from scgraph.data.shards import CorruptShardError, decode_rows, iter_shard

    blob = encode_sample(5, np.array([1, 9], dtype=np.int32), np.array([2.0, 3.0], dtype=np.float32), {})
    samples = list(iter_shard(io.BytesIO(blob + b"\0" * 1024)))
    np.testing.assert_array_equal(decode_rows(samples, 10).toarray(), [[0, 2, 0, 0, 0, 0, 0, 0, 0, 3]])
    with pytest.raises(CorruptShardError, match="outside the vocabulary of 8 genes"):
        decode_rows(samples, 8)
