"""The sharding tool on real TileDB-SOMA stores and real tar files in temp dirs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma as soma
import tiledbsoma.io
from conftest import digests, encode_npy, encode_sample, generated_anndata, generated_counts, iter_cells

from scgraph.data.shards import MANIFEST_NAME, ShardSet, decode_npy, iter_shard
from sharding.blocks import cut_blocks, prefetch
from sharding.cli import build_parser, main
from sharding.verify import verify


def write(*args: str) -> int:
    return main(["write", "--quiet", *args])


def cells_by_joinid(directory: str) -> dict[int, tuple[np.ndarray, np.ndarray, dict]]:
    out = {}
    for cell in iter_cells(directory):
        assert cell.soma_joinid not in out, f"cell {cell.soma_joinid} written twice"
        out[cell.soma_joinid] = (cell.genes, cell.counts, cell.obs)
    return out


def assert_rows_equal(cells: dict, matrix: sp.csr_matrix) -> None:
    """Each cell's (genes, counts) is exactly its source row (soma_joinid = row number)."""
    for joinid, (genes, counts, _) in cells.items():
        row = matrix[joinid]
        order = np.argsort(row.indices)
        np.testing.assert_array_equal(genes, row.indices[order])
        np.testing.assert_array_equal(counts, row.data[order].astype(np.float32))


def test_census_uri_shards_hold_every_cell_row_for_row(cbmc, cbmc_census, tmp_path, capsys):
    out = str(tmp_path / "shards")
    assert (
        write(
            "--census-uri",
            cbmc_census,
            "--out",
            out,
            "--cells-per-shard",
            "3000",
            "--obs-columns",
            "cell_type,dataset_id",
        )
        == 0
    )
    assert "7,839 cells in 3 shards" in capsys.readouterr().out
    cells = cells_by_joinid(out)
    assert sorted(cells) == list(range(cbmc.n_obs))
    assert_rows_equal(cells, sp.csr_matrix(cbmc.X))
    labels = cbmc.obs["label"].astype(str).to_numpy()
    assert all(obs == {"cell_type": labels[j], "dataset_id": "local"} for j, (_, _, obs) in cells.items())

    shards = ShardSet.open(out)
    assert shards.vocab_size == 500 and shards.feature_ids[:2] == ["CBMC_G000", "CBMC_G001"]
    assert shards.n_cells == 7839 and [os.path.basename(p) for p in shards.shard_paths] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    manifest = shards.manifest
    assert manifest["source"] == {"kind": "census-uri", "location": cbmc_census, "organism": "homo_sapiens"}
    assert manifest["obs_filter"] == "is_primary_data == True"  # the default where the column exists
    assert manifest["totals"]["nnz"] == cbmc.X.nnz and manifest["identity"] == shards.identity
    assert [s["cells"] for s in manifest["shards"]] == [3000, 3000, 1839]
    assert main(["verify", "--quiet", out]) == 0
    _, stored, obs = shards.read_all()
    assert (np.array([o["cell_type"] for o in obs]) == labels).all() and (stored != sp.csr_matrix(cbmc.X)).nnz == 0


def test_obs_filter_selects_exactly_what_tiledbsoma_selects(cbmc_census, tmp_path):
    expr = "cell_type in ['B', 'NK', 'pDC'] and is_primary_data == True"
    out = str(tmp_path / "shards")
    assert write("--census-uri", cbmc_census, "--out", out, "--obs-filter", expr) == 0
    with soma.Experiment.open(os.path.join(cbmc_census, "census_data", "homo_sapiens")) as exp:
        expected = exp.obs.read(value_filter=expr, column_names=["soma_joinid"]).concat()["soma_joinid"]
    cells = cells_by_joinid(out)
    assert sorted(cells) == sorted(expected.to_pylist()) and len(cells) == 348 + 976 + 50
    assert {obs["cell_type"] for _, _, obs in cells.values()} == {"B", "NK", "pDC"}


def test_max_cells_is_a_seeded_sample(cbmc_census, tmp_path):
    runs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = str(tmp_path / name)
        assert write("--census-uri", cbmc_census, "--out", out, "--max-cells", "500", "--seed", seed) == 0
        runs.append(sorted(cells_by_joinid(out)))
    assert len(runs[0]) == 500 and runs[0] == runs[1] and runs[0] != runs[2]


def test_h5ad_and_build_soma_paths_give_the_same_cells(pbmc, pbmc_h5ad, tmp_path):
    census = str(tmp_path / "census")
    assert main(["build-soma", "--h5ad", pbmc_h5ad, "--out", census, "--label-key", "bulk_labels"]) == 0
    import cellxgene_census

    with cellxgene_census.open_soma(uri=census) as opened:  # the real census entry point, offline
        exp = opened["census_data"]["homo_sapiens"]
        assert "raw" in exp.ms["RNA"].X
        var = exp.ms["RNA"].var.read(column_names=["feature_name"]).concat()
        assert var["feature_name"].to_pylist()[:2] == list(pbmc.var_names[:2])
    via_census, via_h5ad = str(tmp_path / "via_census"), str(tmp_path / "via_h5ad")
    assert write("--census-uri", census, "--out", via_census, "--cells-per-shard", "256") == 0
    assert write("--h5ad", pbmc_h5ad, "--out", via_h5ad, "--obs-columns", "bulk_labels") == 0
    a, b = cells_by_joinid(via_census), cells_by_joinid(via_h5ad)
    assert sorted(a) == sorted(b) == list(range(700))
    assert_rows_equal(b, sp.csr_matrix(pbmc.X))
    for joinid in a:
        np.testing.assert_array_equal(a[joinid][0], b[joinid][0])
        assert (
            a[joinid][2]["cell_type"] == b[joinid][2]["bulk_labels"] == pbmc.obs["bulk_labels"].iloc[joinid]
        )
    assert ShardSet.open(via_census).feature_names == list(pbmc.var_names)
    assert verify(via_census, progress=False).ok and verify(via_h5ad, progress=False).ok


def test_vocab_from_writes_gene_indices_in_another_shard_sets_vocabulary(pbmc, pbmc_h5ad, tmp_path, capsys):
    # A "pretraining" vocabulary that orders genes differently, lacks 65 of pbmc68k's and has extras.
    rng = np.random.default_rng(0)
    symbols = list(pbmc.var_names[:700]) + [f"EXTRA{i}" for i in range(300)]
    symbols = [symbols[i] for i in rng.permutation(len(symbols))]
    pretrain = generated_anndata(generated_counts(64, len(symbols), 20))
    pretrain.var.index = symbols
    pre_h5ad, pre_out = str(tmp_path / "pre.h5ad"), str(tmp_path / "pre")
    pretrain.write_h5ad(pre_h5ad)
    assert write("--h5ad", pre_h5ad, "--out", pre_out) == 0
    out = str(tmp_path / "probe")
    assert (
        write("--h5ad", pbmc_h5ad, "--out", out, "--vocab-from", pre_out, "--match-genes-by", "feature_name")
        == 0
    )
    assert "65 source genes not in the vocabulary dropped" in capsys.readouterr().out
    shards = ShardSet.open(out)
    assert shards.feature_names == symbols
    source = sp.csr_matrix(pbmc.X)
    for cell in iter_cells(shards):
        row = source[cell.soma_joinid]
        kept = {pbmc.var_names[g]: c for g, c in zip(row.indices, row.data, strict=True) if g < 700}
        assert {symbols[g]: c for g, c in zip(cell.genes, cell.counts, strict=True)} == kept
    unrelated_h5ad, unrelated = str(tmp_path / "unrelated.h5ad"), str(tmp_path / "unrelated")
    generated_anndata(generated_counts(64, 30, 5)).write_h5ad(unrelated_h5ad)
    assert write("--h5ad", unrelated_h5ad, "--out", unrelated) == 0
    assert write("--h5ad", pbmc_h5ad, "--out", str(tmp_path / "none"), "--vocab-from", unrelated) == 2
    assert "no gene of the source is in the vocabulary" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.slow
def test_workers_write_byte_identical_shards(cbmc_census, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ("--census-uri", cbmc_census, "--cells-per-shard", "2000", "--max-cells", "6000")
    assert write(*args, "--out", one) == 0
    assert write(*args, "--out", two, "--workers", "2") == 0
    assert digests(one) == digests(two)
    assert ShardSet.open(one).identity == ShardSet.open(two).identity


@pytest.mark.parametrize("block_cells", ["7", "100", "2048"])
def test_block_size_and_tile_grid_do_not_change_the_shards(cbmc_census, tmp_path, block_cells):
    """Blocks straddle shards (read once, split between them) and, with a filter, join sparse
    bands; the bytes written are the same whatever the cut."""
    args = ("--census-uri", cbmc_census, "--cells-per-shard", "700", "--obs-filter", "cell_type != 'B'")
    reference, other = str(tmp_path / "reference"), str(tmp_path / "other")
    assert write(*args, "--out", reference, "--block-cells", "1000000") == 0
    assert write(*args, "--out", other, "--block-cells", block_cells) == 0
    assert digests(reference) == digests(other)


def test_blocks_follow_the_tile_grid_and_join_sparse_bands():
    contiguous = np.arange(1000, 6000)
    assert [(contiguous[b][0], contiguous[b][-1]) for b in cut_blocks(contiguous, 2048)] == [
        (1000, 2047),
        (2048, 4095),
        (4096, 5999),
    ]
    sparse = np.arange(0, 200_000, 50)  # 41 cells per band of 2048 soma_joinids
    blocks = cut_blocks(sparse, 2048)
    assert all(b.stop - b.start <= 2048 for b in blocks) and sum(b.stop - b.start for b in blocks) == 4000
    assert len(blocks) == 2 and sparse[blocks[1].start] % 2048 < 50  # joined bands, cut at a band edge


def _tarfile_reference(keys, indptr, genes, counts, obs) -> bytes:
    """The same cells written by the standard library: tarfile members of np.save'd arrays."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(keys):
            a, b = indptr[i], indptr[i + 1]
            payloads = []
            for array in (genes[a:b].astype("<i4"), counts[a:b].astype("<f4")):
                npy = io.BytesIO()
                np.save(npy, array)
                payloads.append(npy.getvalue())
            for member, payload in zip(("genes.npy", "counts.npy", "obs.json"), (*payloads, obs[i])):
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
        body = buffer.tell()  # before the end-of-archive marker and record padding
    return buffer.getvalue()[:body]


def test_encode_block_is_byte_for_byte_what_tarfile_and_np_save_write():
    from scgraph.data.shards import encode_block

    rng = np.random.default_rng(0)
    matrix = sp.random(300, 5000, density=0.02, format="csr", random_state=1, dtype=np.float32)
    matrix.data = np.rint(matrix.data * 50)
    matrix.indptr[1:4] = matrix.indptr[0]  # cells without any count
    matrix = sp.csr_matrix((matrix.data[matrix.indptr[0] :], matrix.indices, matrix.indptr), shape=matrix.shape)
    keys = np.sort(rng.choice(10**15, size=300, replace=False))
    keys[:3] = [0, 9, 10]
    obs = [b'{"cell_type":"%d"}' % i * (i % 60) for i in range(300)]  # empty, short and > 512 bytes
    expected = _tarfile_reference(keys.tolist(), matrix.indptr, matrix.indices, matrix.data, obs)
    assert encode_block(keys, matrix.indptr, matrix.indices, matrix.data, obs).tobytes() == expected
    pieces = [  # rows of a block split between two shards
        encode_block(keys[a:b], matrix.indptr[a : b + 1], matrix.indices, matrix.data, obs[a:b]).tobytes()
        for a, b in ((0, 117), (117, 300))
    ]
    assert b"".join(pieces) == expected


def test_reader_thread_errors_reach_the_writer_and_closing_stops_it():
    def failing():
        yield 1
        raise ValueError("counts of cell soma_joinid=3 contain NaN")

    with pytest.raises(ValueError, match="soma_joinid=3"):
        list(prefetch(failing()))
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    items = prefetch(endless(), depth=2)
    assert next(items) == 0
    items.close()  # joins the thread: it no longer produces
    count = len(produced)
    assert count <= 5 and len(produced) == count


def test_rerun_of_a_complete_set_writes_nothing_and_keeps_it(cbmc_census, tmp_path, capsys):
    out = str(tmp_path / "shards")
    args = ("--census-uri", cbmc_census, "--out", out, "--max-cells", "1000", "--cells-per-shard", "400")
    assert write(*args) == 0
    before = digests(out)
    capsys.readouterr()
    assert write(*args) == 0
    assert "wrote 0 shards" in capsys.readouterr().out and digests(out) == before


# --- verify ----------------------------------------------------------------------------------------


def test_verify_names_each_truncated_or_altered_shard(cbmc_census, tmp_path, capsys):
    out = str(tmp_path / "shards")
    assert (
        write("--census-uri", cbmc_census, "--out", out, "--max-cells", "900", "--cells-per-shard", "300")
        == 0
    )
    truncated, altered = os.path.join(out, "shard-000000.tar"), os.path.join(out, "shard-000002.tar")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    with open(altered, "r+b") as f:
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert main(["verify", "--quiet", out]) == 1
    err = capsys.readouterr().err
    assert "BAD shard-000000.tar" in err and "BAD shard-000002.tar: sha256 mismatch" in err
    assert "shard-000001.tar" not in err


def test_iter_shard_reports_damage_by_shard_name(tmp_path):
    path = str(tmp_path / "shard-000007.tar")
    payload = b"".join(_sample(i) for i in range(3))
    with open(path, "wb") as f:
        f.write(payload[: len(payload) - 100])
    with pytest.raises(ValueError, match="shard-000007.tar: truncated"):
        list(iter_shard(path))
    with open(path, "wb") as f:
        f.write(b"garbage" * 200)
    with pytest.raises(ValueError, match="shard-000007.tar: damaged tar header"):
        list(iter_shard(path))


def _sample(joinid: int) -> bytes:
    return encode_sample(joinid, np.arange(3, dtype=np.int32), np.ones(3, dtype=np.float32), {"x": joinid})


def test_npy_members_round_trip_through_numpy():
    import io

    for array in (
        np.arange(0, dtype=np.int32),
        np.arange(1000, dtype=np.int32),
        np.linspace(0, 5, 77).astype(np.float32),
    ):
        data = encode_npy(array)
        np.testing.assert_array_equal(np.load(io.BytesIO(data)), array)
        decoded = decode_npy(data)
        assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    other = io.BytesIO()
    np.save(other, np.arange(4, dtype=np.int64))  # a layout the fast path does not take
    np.testing.assert_array_equal(decode_npy(other.getvalue()), np.arange(4))


# --- bad input: a clear one-line error and nothing written ------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--obs-filter", "donor_age > 30"], "uses column(s) not in obs: donor_age"),
        (["--obs-filter", "cell_type == 'Neuron'"], "the query selected no cells"),
        (["--obs-filter", "cell_type =="], "is not a valid expression"),
        (["--obs-columns", "cell_type,batch"], "--obs-columns names column(s) not in obs: batch"),
    ],
)
def test_bad_query_is_one_line_error_and_writes_nothing(cbmc_census, tmp_path, capsys, extra, message):
    out = str(tmp_path / "shards")
    assert write("--census-uri", cbmc_census, "--out", out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not os.path.exists(out)


def test_experiment_without_raw_layer_is_refused(tmp_path, capsys):
    uri = str(tmp_path / "exp")
    tiledbsoma.io.from_anndata(uri, generated_anndata(generated_counts(50, 40, 5)), measurement_name="RNA")
    out = str(tmp_path / "shards")
    assert write("--soma", uri, "--out", out) == 2
    assert "has no X layer 'raw' in measurement 'RNA' (layers: data)" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "matrix, message",
    [
        ("raw", "non-integer values"),  # pbmc68k's raw.X is log1p(counts per 10k)
        ("X", "negative values"),  # its X is scaled
    ],
)
def test_h5ad_without_raw_counts_is_refused(tmp_path, capsys, matrix, message):
    import scanpy as sc

    path = str(tmp_path / "normalised.h5ad")
    sc.datasets.pbmc68k_reduced().write_h5ad(path)
    out = str(tmp_path / "shards")
    assert write("--h5ad", path, "--h5ad-matrix", matrix, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"counts of cell soma_joinid=0 contain {message}" in err
    assert not os.path.exists(out)


def _h5ad_with_nan_in_cell_250(tmp_path) -> str:
    """300 cells, cell 250 holding a NaN count: with 100 cells per shard, two shards come before it."""
    counts = generated_counts(300, 50, 10)
    counts.data[counts.indptr[250] + 3] = np.nan
    path = str(tmp_path / "nan.h5ad")
    generated_anndata(counts).write_h5ad(path)
    return path


def test_nan_counts_are_refused_and_complete_shards_are_kept(tmp_path, capsys):
    path = _h5ad_with_nan_in_cell_250(tmp_path)
    out = str(tmp_path / "shards")
    assert write("--h5ad", path, "--out", out, "--cells-per-shard", "100") == 2
    assert f"{path} (X): counts of cell soma_joinid=250 contain NaN" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [MANIFEST_NAME, "shard-000000.tar", "shard-000001.tar"]
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert not manifest["complete"] and [s["cells"] for s in manifest["shards"]] == [100, 100]
    with pytest.raises(ValueError, match="incomplete shard set"):
        ShardSet.open(out)


@pytest.mark.slow
def test_a_workers_error_is_one_line_and_the_other_workers_shards_are_kept(tmp_path, capsys):
    path = _h5ad_with_nan_in_cell_250(tmp_path)
    out = str(tmp_path / "shards")
    assert write("--h5ad", path, "--out", out, "--cells-per-shard", "100", "--workers", "2") == 2
    err = capsys.readouterr().err
    assert err == f"error: {path} (X): counts of cell soma_joinid=250 contain NaN or infinite values\n"
    assert sorted(os.listdir(out)) == [MANIFEST_NAME, "shard-000000.tar", "shard-000001.tar"]
    assert [s["cells"] for s in json.load(open(os.path.join(out, MANIFEST_NAME)))["shards"]] == [100, 100]


def test_non_empty_output_of_a_different_command_is_refused_and_kept(cbmc_census, tmp_path, capsys):
    out = str(tmp_path / "shards")
    assert write("--census-uri", cbmc_census, "--out", out, "--max-cells", "300") == 0
    before = digests(out)
    assert write("--census-uri", cbmc_census, "--out", out, "--max-cells", "300", "--obs-filter", "") == 2
    err = capsys.readouterr().err
    assert (
        "holds shards from a different command (obs_filter: 'is_primary_data == True' then, None now)" in err
    )
    assert digests(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert write("--census-uri", cbmc_census, "--out", str(foreign)) == 2
    assert "is not empty and holds no shard set" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]


def test_manifest_problems_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        ShardSet.open(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path}/{MANIFEST_NAME}: corrupt manifest"):
        ShardSet.open(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ValueError, match="corrupt manifest \\(missing format"):
        ShardSet.open(str(tmp_path))
    assert not verify(str(tmp_path), progress=False).ok


def test_build_soma_refuses_non_count_data_and_existing_output(tmp_path, capsys, pbmc_h5ad):
    import scanpy as sc

    path = str(tmp_path / "normalised.h5ad")
    sc.datasets.pbmc68k_reduced().write_h5ad(path)
    assert main(["build-soma", "--h5ad", path, "--out", str(tmp_path / "c")]) == 2
    assert "non-integer values" in capsys.readouterr().err and not os.path.exists(tmp_path / "c")
    assert (
        main(["build-soma", "--h5ad", pbmc_h5ad, "--out", str(tmp_path / "c2"), "--label-key", "nope"]) == 2
    )
    assert "--label-key 'nope' is not an obs column" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("x")
    assert main(["build-soma", "--h5ad", pbmc_h5ad, "--out", str(existing)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_every_option_of_every_command_is_explained():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"write", "merge", "verify", "stats", "build-soma"}
    for name, sub in commands.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings or action.dest}"
        text = sub.format_help()
        assert all(opt in text for action in sub._actions for opt in action.option_strings)


def test_python_m_sharding_help_runs():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sharding", "write", "--help"], capture_output=True, text=True, check=True
    )
    assert "--census-version" in done.stdout and "--cells-per-shard" in done.stdout


def test_copied_shard_set_keeps_its_identity(cbmc_census, tmp_path):
    out = str(tmp_path / "shards")
    assert write("--census-uri", cbmc_census, "--out", out, "--max-cells", "200") == 0
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    assert ShardSet.open(copy).identity == ShardSet.open(out).identity
