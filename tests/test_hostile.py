"""What a hostile new user still found (round 3): each case ends in exit status 2 and one line naming
the problem and the file or field, or in the right result, with nothing already written changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import generated_anndata, generated_counts

from scgraph.data.shards import MANIFEST_NAME, ShardSet
from sharding.cli import main as sharding


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def write_h5ad(path: Path, cells: int = 120, genes: int = 40, per_cell: int = 10) -> Path:
    generated_anndata(generated_counts(cells, genes, per_cell)).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    write_h5ad(folder / "s.h5ad")
    assert sharding(["write", "--quiet", "--h5ad", str(folder / "s.h5ad"), "--out", str(folder / "shards"),
                     "--cells-per-shard", "50"]) == 0
    return folder / "shards"


def edited_copy(shards: Path, tmp_path: Path, edit) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    edit(manifest)
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


def _reverse_genes(m: dict) -> None:
    m["vocabulary"] = {k: v[::-1] for k, v in m["vocabulary"].items()}


def _swap_two_names(m: dict) -> None:
    names = m["vocabulary"]["feature_name"]
    names[0], names[1] = names[1], names[0]


def _swap_names_in_an_older_manifest(m: dict) -> None:  # written before vocabulary_sha256: the source's genes_sha256
    _swap_two_names(m)
    del m["vocabulary_sha256"]


@pytest.mark.parametrize("edit", [_reverse_genes, _swap_two_names, _swap_names_in_an_older_manifest])
def test_a_manifest_whose_gene_list_was_edited_is_refused_by_verify_and_by_every_reader(small_shards, tmp_path,
                                                                                       capsys, edit):
    edited = edited_copy(small_shards, tmp_path, edit)
    assert sharding(["verify", "--quiet", str(edited)]) == 1
    assert "BAD manifest.json: its gene list (vocabulary) is not the one it was written with" in capsys.readouterr().err
    with pytest.raises(ValueError, match="edited manifest: its gene list"):
        ShardSet.open(str(edited))
    assert sharding(["verify", "--quiet", str(small_shards)]) == 0  # the original is fine


def test_shards_of_one_unmerged_slice_are_refused(tmp_path):
    write_h5ad(tmp_path / "s.h5ad")
    part = tmp_path / "part0"
    assert sharding(["write", "--quiet", "--h5ad", str(tmp_path / "s.h5ad"), "--out", str(part), "--cells-per-shard",
                     "50", "--slice", "0/2"]) == 0
    with pytest.raises(ValueError, match="part 0/2 of a sliced write .*python -m sharding merge"):
        ShardSet.open(str(part))
