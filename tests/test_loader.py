"""The streaming loader over real tar shards: coverage across ranks and workers, determinism, resume.
The loader yields ``SparseBatch``es (the shard's cells and the batch's key); the tokenized batches
built from them (``build_batch``) are compared too, where what the model sees is the point."""

from __future__ import annotations

import itertools
import threading
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import encode_npy, encode_sample, generated_anndata

from scgraph.config import TokenizerConfig
from scgraph.data import handoff
from scgraph.data import loader as loader_module
from scgraph.data.batch import Batch, SparseBatch
from scgraph.data.handoff import Ring, slot_bytes
from scgraph.data.loader import Layout, build_loader, epoch_runs, stream_part, without
from scgraph.data.shards import ShardSet
from scgraph.data.shards.config import WriteOptions
from scgraph.data.tokenize import build_batch
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


def cell_ids(batch: SparseBatch) -> list[int]:
    """Each cell's first gene: in these shard sets, which cell it is."""
    return batch.genes[batch.indptr[:-1]].tolist()


def load(shards, **kwargs) -> list[SparseBatch]:
    args = dict(batch_size=16, seed=3) | kwargs
    return list(build_loader(shards, TOK, **args))


def built(batches: list[SparseBatch], tok: TokenizerConfig = TOK, vocab_size: int = N_CELLS) -> list[Batch]:
    """What the trainer makes of them: tokenized, masked (ratio 0.15), with 4-draw profiles."""
    return [build_batch(b, tok, vocab_size, 0.15, recon_genes=4) for b in batches]


def same(a: list[SparseBatch], b: list[SparseBatch]) -> bool:
    """The same cells (byte for byte) with the same keys, so the same batches once built."""
    return len(a) == len(b) and all(
        x.key == y.key and torch.equal(x.indptr, y.indptr) and torch.equal(x.genes, y.genes)
        and torch.equal(x.counts, y.counts) for x, y in zip(a, b, strict=True)
    )


def same_built(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.genes, y.genes) and torch.equal(x.values, y.values) and torch.equal(x.masked, y.masked)
        and torch.equal(x.profile_genes, y.profile_genes) and torch.equal(x.profile_weight, y.profile_weight)
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


def test_batches_are_full_and_build_tokenized_masked_batches(tagged):
    sparse = load(tagged, world_size=1)
    assert len(sparse) == N_CELLS // 16
    for s in sparse:
        assert len(s) == 16 and s.indptr.dtype == torch.int64 and s.counts.dtype == torch.float32
        assert s.key[:3] == (3, 0, 0)
    assert [s.key[3] for s in sparse] == list(range(N_CELLS // 16))  # (seed, epoch, stream, batch index)
    for b in built(sparse):
        assert (
            b.genes.dtype == torch.int64 and b.values.dtype == torch.float32 and b.masked.dtype == torch.bool
        )
        # one gene per cell: the batch is as long as its longest cell, not TOK.length
        assert b.genes.shape == b.values.shape == b.masked.shape == (16, 1) and TOK.length > 1
        assert b.masked[:, 0].all()
        raw = torch.tensor([i % 7 + 1.0 for i in b.genes[:, 0].tolist()])
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
    resumed = build_loader(tagged, TOK, batch_size=16, seed=3, num_workers=num_workers, skip_batches=skip)
    assert len(resumed) == 80 - skip
    resumed = list(resumed)
    assert same(resumed, full[skip:])
    assert same_built(built(resumed), built(full[skip:]))  # so the model sees the same batches


def test_stream_parts_cut_the_permuted_sequence_into_equal_runs():
    runs = epoch_runs([300, 300, 300, 300, 80], seed=0, epoch=2)
    parts = [stream_part(runs, Layout(5, 1, 16), s) for s in range(5)]
    assert [sum(hi - lo for _, lo, hi in part) for part in parts] == [256] * 5
    covered = Counter((shard, i) for part in parts for shard, lo, hi in part for i in range(lo, hi))
    assert set(covered.values()) == {1} and len(covered) == 1280
    assert without([(3, 0, 10)], {3: np.array([0, 4, 5, 9])}) == [(3, 1, 4), (3, 6, 9)]


def consumed(shards, layout: Layout, batches: int, segments=(), tok=TOK) -> list[int]:
    """The cells the first ``batches`` batches of every rank of ``layout`` hold."""
    loaders = [build_loader(shards, tok, batch_size=layout.batch_size, seed=3, rank=r,
                            world_size=layout.world_size, num_workers=0 if layout.streams == 1 else layout.streams,
                            shuffle_buffer=64, segments=segments, group_by_length=layout.group)
               for r in range(layout.world_size)]
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


@pytest.fixture(scope="module")
def ragged(tmp_path_factory) -> ShardSet:
    """Cell i expresses gene i (100 counts, so it is the cell's first token) and i % 12 of 12
    shared genes (1 count each): 1-12 tokens per cell, all within RAGGED_TOK's L."""
    extra = np.arange(N_CELLS) % 12
    rows = [np.concatenate(([i], N_CELLS + np.arange(k))) for i, k in enumerate(extra)]
    counts = sp.csr_matrix((np.concatenate([np.r_[100.0, np.ones(k)] for k in extra]), np.concatenate(rows),
                            np.concatenate(([0], np.cumsum(extra + 1)))), shape=(N_CELLS, N_CELLS + 12))
    folder = tmp_path_factory.mktemp("ragged")
    generated_anndata(counts).write_h5ad(folder / "ragged.h5ad")
    write_shards(SourceSpec("h5ad", str(folder / "ragged.h5ad")), str(folder / "shards"),
                 WriteOptions(cells_per_shard=300, obs_columns=("label",)), progress=False)
    return ShardSet.open(str(folder / "shards"))


RAGGED_TOK = TokenizerConfig(seq_len=16)


def ragged_load(shards, **kwargs) -> list[SparseBatch]:
    args = dict(batch_size=16, seed=3, shuffle_buffer=64) | kwargs
    return list(build_loader(shards, RAGGED_TOK, **args))


def padded_tokens(batches: list[SparseBatch]) -> int:
    return sum(b.genes.numel() for b in built(batches, RAGGED_TOK, N_CELLS + 12))


def test_grouping_by_length_pads_less_and_still_covers_every_cell_once(ragged):
    plain = ragged_load(ragged)
    per_rank = [ragged_load(ragged, rank=r, world_size=2, num_workers=2, group_by_length=4) for r in range(2)]
    seen = Counter(c for batches in per_rank for b in batches for c in cell_ids(b))
    assert sorted(seen) == list(range(N_CELLS)) and set(seen.values()) == {1}
    grouped = ragged_load(ragged, group_by_length=8)
    shown = sum(1 + i % 12 for i in range(N_CELLS))  # every token a cell shows: what no padding would cost
    assert padded_tokens(plain) > 1.5 * shown and padded_tokens(grouped) < 1.25 * shown
    # lengths still arrive in random order: not one ascending run per window
    widths = [b.genes.shape[1] for b in built(grouped[:8], RAGGED_TOK, N_CELLS + 12)]
    assert any(a > b for a, b in zip(widths[:8], widths[1:8]))
    assert not same(grouped, ragged_load(ragged, group_by_length=8, seed=4))


@pytest.mark.parametrize("num_workers, skip", [(0, 3), (0, 8), (2, 5), (2, 79)])
def test_a_grouped_stream_resumes_inside_a_window_on_the_same_batches(ragged, num_workers, skip):
    full = ragged_load(ragged, num_workers=num_workers, group_by_length=4)
    resumed = ragged_load(ragged, num_workers=num_workers, group_by_length=4, skip_batches=skip)
    assert len(full) == 80 and same(resumed, full[skip:])
    assert same_built(built(resumed, RAGGED_TOK, N_CELLS + 12), built(full[skip:], RAGGED_TOK, N_CELLS + 12))


def test_batches_too_large_for_a_workers_slot_arrive_the_same_the_usual_way(ragged, monkeypatch):
    through_slots = ragged_load(ragged, num_workers=2, group_by_length=4)
    monkeypatch.setattr(handoff, "HEADROOM", 1)  # slots of 6 genes per cell: the longer batches do not fit
    mixed = ragged_load(ragged, num_workers=2, group_by_length=4)
    sizes = [b.genes.numel() for b in mixed]
    assert min(sizes) <= 16 * 6 < max(sizes)
    assert same(mixed, through_slots) and same(through_slots, ragged_load(ragged, num_workers=2, group_by_length=4))


def test_a_worker_waits_for_a_free_slot_instead_of_overwriting_one():
    def batch(value: float) -> SparseBatch:
        return SparseBatch(torch.tensor([0, 2, 3]), torch.tensor([1, 4, 2], dtype=torch.int32),
                           torch.full((3,), value), (0, int(value)), 2)

    ring = Ring(1, slot_bytes(2, 2), torch.multiprocessing.get_context())
    held, put = ring.put(batch(1.0), worker=0), threading.Event()
    second = threading.Thread(target=lambda: (ring.put(batch(2.0), worker=0), put.set()))
    second.start()
    assert not put.wait(0.3)  # the only slot still holds the first batch
    assert same([ring.take(held, pin=False)], [batch(1.0)])
    assert put.wait(10)
    second.join()


def test_without_shared_memory_for_the_rings_batches_arrive_the_same_and_it_is_said(ragged, monkeypatch, capsys):
    through_slots = ragged_load(ragged, num_workers=2)
    monkeypatch.setattr(loader_module, "_free_shared_memory", lambda: 1000)  # /dev/shm nearly full
    assert same(ragged_load(ragged, num_workers=2), through_slots)
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "/dev/shm has 0 MiB free" in said[0] and "--shm-size" in said[0]


@pytest.mark.parametrize("num_workers, skip", [(0, 5), (2, 5), (2, 0)])
def test_an_endless_loader_runs_on_into_the_next_epochs_as_fresh_loaders_would(tagged, num_workers, skip):
    first = load(tagged, num_workers=num_workers, skip_batches=skip)
    following = [load(tagged, num_workers=num_workers, epoch=epoch) for epoch in (1, 2)]
    endless = build_loader(tagged, TOK, batch_size=16, seed=3, num_workers=num_workers, skip_batches=skip, endless=True)
    assert endless.dataset.batches_in(1) == len(following[0]) == 80
    taken = list(itertools.islice(endless, len(first) + 2 * 80))
    assert same(taken, first + following[0] + following[1]) and not same(following[0], following[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shard_damaged_after_it_was_written_is_refused_by_name(tagged, tmp_path, num_workers):
    import shutil

    from scgraph.data.shards import CorruptShardError

    shutil.copytree(tagged.directory, tmp_path / "shards")
    victim = tmp_path / "shards" / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, other bytes
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-000001\.tar: sha256 mismatch.*python -m sharding verify"):
        load(ShardSet.open(str(tmp_path / "shards")), num_workers=num_workers)


def test_a_grouped_layout_changed_inside_a_window_trains_the_rest_once(ragged):
    first, second = Layout(2, 1, 16, group=4), Layout(1, 2, 16, group=3)
    a = consumed(ragged, first, 9, tok=RAGGED_TOK)
    b = consumed(ragged, second, 10**6, segments=((first, 9),), tok=RAGGED_TOK)
    trained = Counter(a + b)
    assert len(a) == 2 * 9 * 16 and set(trained.values()) == {1} and N_CELLS - len(trained) < 2 * 16


def test_loader_reads_a_path_and_reports_too_small_sets(tagged):
    assert len(build_loader(tagged.directory, TOK, batch_size=640, seed=0)) == 2
    with pytest.raises(ValueError, match="fewer than one batch per stream"):
        build_loader(tagged, TOK, batch_size=256, seed=0, world_size=2, num_workers=3)
    with pytest.raises(ValueError, match="rank must be in"):
        build_loader(tagged, TOK, batch_size=16, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="group_by_length must be >= 1"):
        build_loader(tagged, TOK, batch_size=16, seed=0, group_by_length=0)


def test_shard_arrays_refuse_gene_indices_outside_the_vocabulary(tmp_path):
    from scgraph.data.shards import CorruptShardError, read_shard_arrays

    blob = encode_sample(5, np.array([1, 9], dtype=np.int32), np.array([2.0, 3.0], dtype=np.float32), {})
    (tmp_path / "shard-000000.tar").write_bytes(blob + b"\0" * 1024)
    arrays = read_shard_arrays(str(tmp_path / "shard-000000.tar"))
    np.testing.assert_array_equal(arrays.rows(np.array([0]), 10).toarray(), [[0, 2, 0, 0, 0, 0, 0, 0, 0, 3]])
    with pytest.raises(CorruptShardError, match="shard-000000.tar: gene index outside the vocabulary of 8 genes"):
        arrays.rows(np.array([0]), 8)


def test_batches_are_those_a_plain_webdataset_pipeline_makes_from_the_shards(tagged):
    """The shards stay WebDataset tars, and the array path changes no batch: WebDataset's own
    chain (tar samples -> shuffle -> np.load -> batched) over the epoch's shard order, keyed
    as the loader keys each batch, gives exactly the loader's batches."""
    import webdataset as wds

    from scgraph.data.loader import _seed

    order = [tagged.shard_paths[shard] for shard, _, _ in epoch_runs(tagged.shard_cells, seed=3, epoch=0)]
    chain = wds.DataPipeline(wds.SimpleShardList(order), wds.tarfile_to_samples(),
                             wds.shuffle(64, 64, seed=_seed(3, 0, 0)), wds.decode(),
                             wds.batched(16, collation_fn=list, partial=False))
    expected = []
    for index, samples in enumerate(chain):
        genes = [s["genes.npy"] for s in samples]
        counts = sp.csr_matrix((np.concatenate([s["counts.npy"] for s in samples]), np.concatenate(genes),
                                np.cumsum([0] + [len(g) for g in genes])), shape=(16, tagged.vocab_size))
        expected.append(SparseBatch.from_csr(counts, (3, 0, 0, index), tagged.vocab_size))
    assert len(expected) == N_CELLS // 16
    assert same(load(tagged, shuffle_buffer=64), expected)


@pytest.mark.parametrize("group", [1, 4])
def test_a_sparse_batch_holds_each_cells_stored_arrays_byte_for_byte(ragged, group):
    """What the loader hands the trainer is the shards' cells as stored: each cell's gene ids and
    counts are the bytes of its genes.npy and counts.npy (cells of 1-13 genes, several shards)."""
    from scgraph.data.shards import decode_cell, iter_shard

    stored = {}
    for path in ragged.shard_paths:
        for sample in iter_shard(path):
            cell = decode_cell(sample)
            stored[int(cell.genes[0])] = cell  # cell i's first gene is i
    batches = ragged_load(ragged, group_by_length=group)
    assert sum(map(len, batches)) == N_CELLS
    for batch in batches:
        assert batch.indptr.dtype == torch.int64 and batch.genes.dtype == torch.int32
        for row in range(len(batch)):
            lo, hi = batch.indptr[row].item(), batch.indptr[row + 1].item()
            cell = stored[batch.genes[lo].item()]
            assert batch.genes[lo:hi].numpy().tobytes() == cell.genes.astype("<i4").tobytes()
            assert batch.counts[lo:hi].numpy().tobytes() == cell.counts.astype("<f4").tobytes()
            assert cell.genes.dtype.itemsize == 4 and cell.counts.dtype == np.float32  # (no cast above)


def _rewrite(shard: str, change) -> None:
    """The shard written again by Python's tarfile, each sample passed through ``change`` (None: left out)."""
    import io
    import tarfile

    from scgraph.data.shards import iter_shard

    samples = [s for s in map(change, iter_shard(shard)) if s is not None]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for member in [m for m in sample if m != "__key__"]:
                info = tarfile.TarInfo(f"{sample['__key__']}.{member}")
                info.size = len(sample[member])
                tar.addfile(info, io.BytesIO(sample[member]))


def test_shard_arrays_read_what_iter_shard_reads_in_any_layout(tagged, tmp_path):
    """The vectorised header parse reads the writer's shards; a tar in another layout (another
    member order, .npy 2.0 headers) goes the per-member way, and both give iter_shard's cells."""
    import io
    import shutil

    from scgraph.data.shards import COUNTS, GENES, decode_cell, iter_shard, read_shard_arrays

    def npy2(sample):
        out = {"__key__": sample["__key__"], "obs.json": sample["obs.json"]}
        for member in (COUNTS, GENES):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.load(io.BytesIO(sample[member])), version=(2, 0))
            out[member] = buffer.getvalue()
        return out

    other = str(tmp_path / "other.tar")
    shutil.copy(tagged.shard_paths[4], other)
    _rewrite(other, npy2)
    cells = np.arange(80)[::-1]
    for path in (tagged.shard_paths[4], other):
        decoded = [decode_cell(sample) for sample in iter_shard(path)]
        expected = sp.csr_matrix((np.concatenate([c.counts for c in decoded]),
                                  np.concatenate([c.genes for c in decoded]),
                                  np.cumsum([0] + [len(c.genes) for c in decoded])), shape=(80, tagged.vocab_size))
        expected = expected[cells]
        got = read_shard_arrays(path).rows(cells, tagged.vocab_size)
        assert (got != expected).nnz == 0 and np.array_equal(got.indptr, expected.indptr)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("damage, said", [
    ("lengths", r"shard-000001\.tar: sample 300 has genes and counts of different lengths"),
    ("cells", r"shard-000001\.tar: holds 299 cells, the manifest says 300; find every bad shard with python -m "
              r"sharding verify"),
])
def test_a_shard_that_does_not_add_up_is_one_line_naming_it(tagged, tmp_path, num_workers, damage, said):
    """Bad input is one line naming the shard (what the command line prints), also when a
    DataLoader worker met it."""
    import shutil

    from scgraph.data.shards import CorruptShardError

    shutil.copytree(tagged.directory, tmp_path / "shards")
    shards = ShardSet.open(str(tmp_path / "shards"))

    def damaged(sample):
        if sample["__key__"] != "300":
            return sample
        return sample | {"counts.npy": encode_npy(np.ones(2, np.float32))} if damage == "lengths" else None

    _rewrite(shards.shard_paths[1], damaged)
    with pytest.raises(CorruptShardError, match=f"^{said}$"):
        load(shards, num_workers=num_workers, verify=False)


def test_batch_to_the_device_it_is_on_copies_no_tensor(tagged):
    import dataclasses

    cells = next(iter(build_loader(tagged, TOK, batch_size=16, seed=3)))
    moved = cells.to("cpu")
    for name in ("indptr", "genes", "counts"):
        assert getattr(moved, name).data_ptr() == getattr(cells, name).data_ptr(), name
    batch = built([cells])[0]
    moved = batch.to("cpu")
    for field in dataclasses.fields(Batch):
        assert getattr(moved, field.name).data_ptr() == getattr(batch, field.name).data_ptr(), field.name


def test_a_stream_maps_only_the_shard_it_reads_and_holds_at_most_twice_its_buffer(tagged):
    """The memory the pool states: shards read past are unmapped, the cells still waiting in the
    shuffle buffer copied out of them (never more than twice the buffer), and every cell served once."""
    from scgraph.data.loader import shuffled
    from scgraph.data.pool import CellPool

    runs = epoch_runs(tagged.shard_cells, seed=3, epoch=0)
    pool = CellPool(runs, tagged.shard_paths, tagged.shard_cells, tagged.vocab_size, np.zeros(0, np.int64))
    order, served = shuffled(N_CELLS, 64, 3, 0, 0, 0), []
    while len(positions := np.fromiter(itertools.islice(order, 16), np.int64)):
        served += pool.take(positions).indices.tolist()  # cell i expresses gene i
        assert sum(cells.mapped for cells in pool.open.values()) <= 1
        copies = [cells for cells in pool.open.values() if not cells.mapped]
        assert all(len(cells.arrays.lengths) <= 2 * cells.left for cells in copies)  # so at most twice the buffer:
        assert sum(len(cells.arrays.lengths) for cells in copies) <= 2 * 64
    assert sorted(served) == list(range(N_CELLS)) and not pool.open
