"""What a hostile new user still found (round 3): each case ends in exit status 2 and one line naming
the problem and the file or field, or in the right result, with nothing already written changed.
One catalogue in one file (over 450 lines) because the cases share two costly fixtures: a tiny
shard set and a finished pretraining run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


# --- pretraining: checkpoints that changed, copies of a run folder, resumes with other settings -------

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "gnn", "--hidden", "8", "--layers", "1", "--heads", "2", "--adjacency-rank", "4",
        "--batch-size", "4", "--micro-batch-size", "4", "--log-every", "1"]


def pretrain(*args: str) -> subprocess.CompletedProcess:
    """launchers/pretrain.py as one plain python process (world size 1) on a tiny model."""
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "launchers/pretrain.py", *TINY, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def last_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(small_shards, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 asked for L 64 on a 40-gene vocabulary, and its store."""
    folder = tmp_path_factory.mktemp("trained")
    store = f"sqlite:///{folder}/mlflow.db"
    done = pretrain("--shards", str(small_shards), "--output", str(folder / "run"), "--seq-len", "64", "--max-steps",
                    "4", "--checkpoint-every", "2", "--mlflow-uri", store, "--experiment", "e")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--seq-len 64 is more than the 40 genes of" in done.stdout
    return folder / "run", store


def _meta(run: Path, tag: str = "step00000004") -> dict:
    return json.loads((run / "checkpoints" / tag / "scgraph.json").read_text())


def test_l_is_never_longer_than_the_vocabulary(trained):
    assert _meta(trained[0])["run"]["tokenizer"]["seq_len"] == 40


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_whose_bytes_changed_is_refused_by_resume_the_probe_and_embed(trained, tmp_path):
    import shutil

    from scgraph.train.checkpointer import FILES, Checkpointer, load_pretrained

    original, store = trained
    damaged = tmp_path / "run"
    shutil.copytree(original, damaged)
    victim = damaged / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    _flip_a_byte(victim)
    said = f"checkpoint file {victim} changed since it was written (sha256 mismatch"
    assert Checkpointer(damaged).problem("step00000004").startswith(said)
    with pytest.raises(ValueError, match=r"cannot be read \(checkpoint file .* changed since it was written"):
        load_pretrained(damaged)  # the probe's and scgraph.embed's loader
    line = last_line(pretrain("--shards", str(_meta(original)["shards"]), "--output", str(damaged), "--seq-len", "64",
                              "--resume", "--max-steps", "6", "--mlflow-uri", store, "--experiment", "e"))
    assert line.startswith(f"error: {said}") and "--resume-from step00000002" in line
    encoder = tmp_path / "model"
    shutil.copytree(original / "model", encoder)
    _flip_a_byte(encoder / "encoder.pt")
    with pytest.raises(ValueError, match="encoder.pt changed since it was written"):
        load_pretrained(encoder)
    # a file list written before checksums (sizes only) still loads
    listing = original / "model" / FILES
    sizes = {name: record["bytes"] for name, record in json.loads(listing.read_text()).items()}
    old = tmp_path / "old"
    shutil.copytree(original / "model", old)
    (old / FILES).write_text(json.dumps(sizes))
    assert load_pretrained(old).run.model.hidden == 8


def test_the_checkpoint_record_round_trips_and_reads_what_older_versions_wrote(trained, tmp_path):
    import shutil

    import torch

    from scgraph.train.checkpointer import FILES, CheckpointRecord, load_pretrained

    original, _ = trained
    record = CheckpointRecord.read(original / "checkpoints", "step00000004")
    assert (record.step, record.world_size, record.run.tokenizer.seq_len) == (4, 1, 40)
    assert record.output == str(original.resolve()) and len(record.feature_ids) == 40
    record.write(tmp_path)
    assert CheckpointRecord.read(tmp_path.parent, tmp_path.name) == record
    old = tmp_path / "old"  # an export of an older version: fewer fields, one we no longer know, no file list
    shutil.copytree(original / "model", old)
    written = json.loads((old / "scgraph.json").read_text())
    assert written["exported_from"] == str(original / "checkpoints" / "step00000004")
    for gone in ("gene_choice", "experiment", "zero_stage", "exported_from"):
        del written[gone]
    (old / "scgraph.json").write_text(json.dumps(written | {"retired_field": 1}))
    (old / FILES).unlink()
    loaded = load_pretrained(old).record
    assert (loaded.gene_choice, loaded.experiment, loaded.zero_stage) == (None, None, 0)
    assert loaded.vocab.feature_ids == record.feature_ids and loaded.choice is None
    # the encoder exported from memory (fp32, whole on the rank) holds the final checkpoint's weights
    exported, final = (load_pretrained(p).model.state_dict() for p in (original / "model",
                                                                       original / "checkpoints" / "step00000004"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_a_copied_run_folder_does_not_resume_into_the_originals_mlflow_run(trained, tmp_path):
    import shutil

    import mlflow

    from scgraph.config import RunConfig
    from scgraph.train.checkpointer import Checkpointer

    original, store = trained
    meta = _meta(original)
    before = mlflow.MlflowClient(store).get_run(meta["mlflow_run_id"])
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    line = last_line(pretrain("--shards", meta["shards"], "--output", str(copy), "--seq-len", "64", "--resume",
                              "--max-steps", "6", "--mlflow-uri", store, "--experiment", "e"))
    assert line == (f"error: --output {copy} is a copy of the run folder {original}, which owns MLflow run "
                    f"{meta['mlflow_run_id']}: resuming the copy would write into that run; resume {original} "
                    "itself, or start a new run in a new --output")
    after = mlflow.MlflowClient(store).get_run(meta["mlflow_run_id"])
    assert (after.info.status, after.data.metrics) == (before.info.status, before.data.metrics) == (
        "FINISHED", before.data.metrics)
    # a moved folder (the original is gone) is the same run: it resumes
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    for path in (moved / "checkpoints").glob("*/scgraph.json"):
        path.write_text(json.dumps(meta | {"output": str(tmp_path / "gone")}))
    run = RunConfig.from_dict(meta["run"])
    assert Checkpointer(moved).check_compatible("step00000004", run, meta["shards"], meta["shards_identity"]) == []


def test_resume_refuses_changed_settings_and_records_a_longer_run(trained):
    import dataclasses

    import mlflow

    from scgraph.config import RunConfig
    from scgraph.train.checkpointer import Checkpointer

    original, store = trained
    meta = _meta(original)
    run = RunConfig.from_dict(meta["run"])
    checkpoints = Checkpointer(original)
    other = dataclasses.replace(run, tokenizer=dataclasses.replace(run.tokenizer, seq_len=16))
    with pytest.raises(ValueError, match=r"these differ: tokenizer.seq_len \(40 -> 16\); resume with the same"):
        checkpoints.check_compatible("step00000004", other, meta["shards"], meta["shards_identity"])
    done = pretrain("--shards", meta["shards"], "--output", str(original), "--seq-len", "64", "--resume",
                    "--max-steps", "6", "--mlflow-uri", store, "--experiment", "e")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed step00000004 at step 4" in done.stdout and "; train.max_steps 4 -> 6\n" in done.stdout
    resumed = mlflow.MlflowClient(store).get_run(meta["mlflow_run_id"])
    assert resumed.data.tags["resumed_changes"] == "train.max_steps 4 -> 6" and resumed.info.status == "FINISHED"


# --- labelled cells for the probe and scgraph.embed ------------------------------------------------


def anndata_warnings(recwarn) -> list[str]:
    """What anndata itself warned (its file-age and duplicate-name warnings on stderr, beside our one line)."""
    return [str(w.message) for w in recwarn if "/anndata/" in w.filename]


def test_duplicate_gene_ids_and_non_counts_are_refused_naming_the_file_and_matrix(trained, tmp_path, capsys,
                                                                                  recwarn):
    import anndata as ad
    import numpy as np

    from scgraph.eval.embed import embed
    from scgraph.eval.evaluate import main as probe

    adata = generated_anndata(generated_counts(60, 20, 5))
    adata.var_names = [f"GENE{i % 10:05d}" for i in range(20)]  # every id twice, each in the model's vocabulary
    path = tmp_path / "dup.h5ad"
    adata.write_h5ad(path)
    assert sharding(["write", "--quiet", "--h5ad", str(path), "--out", str(tmp_path / "s")]) == 2
    assert "gene feature ids must be unique; 'GENE00000' appears 2 times" in capsys.readouterr().err
    err = one_line_error(capsys, probe(["--checkpoint", str(trained[0]), "--data", str(path), "--label-key", "label",
                                        "--out", str(tmp_path / "probe"), "--quiet"]))
    assert err == f"error: --data {path} (X): gene feature ids must be unique; 'GENE00000' appears 2 times\n"
    assert anndata_warnings(recwarn) == []
    with pytest.raises(ValueError, match=r"^adata \(X\): gene feature ids must be unique; 'GENE00000' appears 2 times"):
        embed(ad.read_h5ad(path), str(tmp_path / "no-model"))
    normalised = generated_anndata(generated_counts(60, 20, 5))
    normalised.raw = normalised.copy()
    normalised.raw.X.data[:] = np.log1p(normalised.raw.X.data)
    with pytest.raises(ValueError, match=r"^adata \(raw.X\): counts of cell cell0 contain non-integer values"):
        embed(normalised, str(tmp_path / "no-model"))


def test_embed_reads_an_anndata_opened_backed(trained, tmp_path):
    import anndata as ad
    import numpy as np

    from scgraph.eval.embed import embed

    path = tmp_path / "cells.h5ad"
    generated_anndata(generated_counts(30, 40, 10, seed=3)).write_h5ad(path)
    backed = embed(ad.read_h5ad(path, backed="r"), str(trained[0] / "model"), progress=False)
    in_memory = embed(ad.read_h5ad(path), str(trained[0] / "model"), progress=False)
    assert np.array_equal(backed.obsm["X_scgraph"], in_memory.obsm["X_scgraph"])
    assert backed.obsm["X_scgraph"].shape == (30, 8)


# --- refused before any work: tracking stores, validation data, resume tags, objectives ------------


def test_every_tracking_uri_is_checked_before_any_work(small_shards, tmp_path, capsys, monkeypatch):
    import socket
    import time

    from scgraph import tracking
    from scgraph.cli import run
    from scgraph.train.trainer import COMMAND as PRETRAIN

    def refused(uri: str | None) -> str:
        args = ["--mlflow-uri", uri] if uri else []
        err = one_line_error(capsys, run(PRETRAIN, ["--shards", str(small_shards), "--output", str(tmp_path / "out"),
                                                    *args]))
        assert not (tmp_path / "out").exists()
        return err

    assert "unknown scheme 'bogus'" in refused("bogus://x")
    assert f"retired file store: use a database, e.g. sqlite:///{tmp_path}/mlflow.db" in refused(
        f"file://{tmp_path}/mlruns")
    assert refused(str(tmp_path / "m.db")).endswith(f"a plain path: MLflow 3 needs a database, e.g. "
                                                    f"sqlite:///{tmp_path}/m.db\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://y")
    assert "MLflow store bogus://y ($MLFLOW_TRACKING_URI): unknown scheme" in refused(None)
    monkeypatch.setattr(tracking, "SERVER_TIMEOUT_S", 1.0)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        err = refused(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert "no MLflow server answers" in err and time.monotonic() - started < 30


@pytest.mark.parametrize(("argv", "said"), [
    (["--val-every", "2"], "--val-every 2 needs validation data"),
    (["--resume-from", "../other/checkpoints/step00000002"], "--resume-from takes a checkpoint tag of this run"),
    (["--objectives", "recon:inf"], "objectives: weight of recon must be finite; got inf"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(small_shards, tmp_path, capsys, argv, said):
    from scgraph.cli import run
    from scgraph.train.trainer import COMMAND as PRETRAIN

    err = one_line_error(capsys, run(PRETRAIN, ["--shards", str(small_shards), "--output", str(tmp_path / "o"),
                                                *argv]))
    assert said in err and not (tmp_path / "o").exists()


def test_validation_on_the_training_cells_and_a_diverging_loss_are_one_line(small_shards, tmp_path):
    line = last_line(pretrain("--shards", str(small_shards), "--val-shards", str(small_shards), "--output",
                              str(tmp_path / "a"), "--seq-len", "16", "--max-steps", "2", "--mlflow-uri",
                              f"sqlite:///{tmp_path}/m.db"))
    assert f"--val-shards {small_shards} holds the training cells of --shards" in line
    line = last_line(pretrain("--shards", str(small_shards), "--output", str(tmp_path / "b"), "--seq-len", "16",
                              "--lr", "2e4", "--max-steps", "30", "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"))
    assert " at step " in line and "training diverged; lower --lr (now 20000)" in line


def test_an_h5ad_in_anndatas_legacy_layout_is_sharded(tmp_path, recwarn):
    import h5py
    import numpy as np

    counts = generated_counts(6, 4, 2)
    with h5py.File(tmp_path / "legacy.h5ad", "w") as f:  # anndata < 0.7: obs and var as compound datasets
        x = f.create_group("X")
        x.attrs["h5sparse_format"], x.attrs["h5sparse_shape"] = "csr", counts.shape
        x["data"], x["indices"], x["indptr"] = counts.data, counts.indices, counts.indptr
        f["obs"] = np.array([(f"c{i}".encode(), f"t{i % 2}".encode()) for i in range(6)],
                            dtype=[("index", "S8"), ("label", "S8")])
        f["var"] = np.array([(f"g{i}".encode(),) for i in range(4)], dtype=[("index", "S8")])
    assert sharding(["write", "--quiet", "--h5ad", str(tmp_path / "legacy.h5ad"), "--out", str(tmp_path / "s"),
                     "--obs-columns", "label"]) == 0
    shards = ShardSet.open(str(tmp_path / "s"))
    assert shards.feature_ids == ["g0", "g1", "g2", "g3"]
    joinids, read, obs = shards.read_all()
    assert (read != counts).nnz == 0 and [o["label"] for o in obs] == ["t0", "t1"] * 3
    assert anndata_warnings(recwarn) == []  # "written with a very old version of AnnData" said nothing useful


# --- outputs: another command's results are not replaced; an unwritable one fails before the work ----


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def read_only(tmp_path):
    """A read-only tmpfs (skip where this machine cannot mount one)."""
    point = tmp_path / "ro"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(point)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield point
    subprocess.run(["umount", str(point)], check=False)


def test_probe_outputs_of_another_probe_are_refused_and_unwritable_ones_fail_first(trained, tmp_path, capsys,
                                                                                  read_only):
    from scgraph.eval.evaluate import main as probe

    data = tmp_path / "cells.h5ad"
    generated_anndata(generated_counts(60, 40, 10, seed=5)).write_h5ad(data)
    out, export = tmp_path / "probe", tmp_path / "cells_embedded.h5ad"
    args = ["--checkpoint", str(trained[0]), "--data", str(data), "--label-key", "label", "--repeats", "1", "--epochs",
            "1", "--tsne-cells", "30", "--quiet"]
    assert probe([*args, "--out", str(out), "--export", str(export)]) == 0
    assert probe([*args, "--out", str(out), "--export", str(export)]) == 0  # the same command replaces its own
    capsys.readouterr()
    before = tree(tmp_path)
    err = one_line_error(capsys, probe([*args, "--seed", "1", "--out", str(out)]))
    assert err == (f"error: --out {out} holds the results of another probe (other export, seed): choose a new "
                   "--out, or --overwrite to replace them\n")
    err = one_line_error(capsys, probe([*args, "--out", str(tmp_path / "other"), "--export", str(export)]))
    assert err.startswith(f"error: --export {export} exists and this probe did not write it")
    assert tree(tmp_path) == before
    for outputs in (["--out", str(read_only / "probe")],
                    ["--out", str(tmp_path / "p2"), "--export", str(read_only / "cells.h5ad")]):
        err = one_line_error(capsys, probe([*args, *outputs]))
        assert err.startswith("error: Read-only file system: ") and "writable file system" in err
    assert tree(tmp_path) == before
    assert probe([*args, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "probe.json").read_text())["command"]["seed"] == 1


def test_a_synthetic_study_with_other_settings_does_not_replace_the_table(tmp_path, capsys):
    from scgraph.synthetic.study import main as study

    args = ["--betas", "0", "--sigmas", "0.1", "--samples", "200", "--epochs", "1", "--workers", "1", "--out",
            str(tmp_path / "s"), "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"]
    assert study(args) == 0
    capsys.readouterr()
    before = tree(tmp_path / "s")
    err = one_line_error(capsys, study([*args, "--epochs", "2"]))
    assert err.startswith(f"error: --out {tmp_path / 's'} holds the results of a study with other settings")
    assert tree(tmp_path / "s") == before


# --- messages that misled ----------------------------------------------------------------------------


def test_messages_name_the_file_and_the_matrix_or_key_at_fault(small_shards, tmp_path, capsys):
    import numpy as np

    from scgraph.cli import run
    from scgraph.train.trainer import COMMAND as PRETRAIN

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": -4}))
    err = one_line_error(capsys, run(PRETRAIN, ["--shards", str(small_shards), "--output", str(tmp_path / "o"),
                                                "--deepspeed-config", str(ds), "--mlflow-uri",
                                                f"sqlite:///{tmp_path}/m.db"]))
    assert err == f"error: DeepSpeed config {ds}: train_micro_batch_size_per_gpu must be an integer > 0; got -4\n"
    adata = generated_anndata(generated_counts(20, 10, 3))
    adata.raw = adata.copy()
    adata.raw.X.data[:] = np.log1p(adata.raw.X.data)
    adata.write_h5ad(tmp_path / "log.h5ad")
    err = one_line_error(capsys, sharding(["write", "--quiet", "--h5ad", str(tmp_path / "log.h5ad"), "--out",
                                           str(tmp_path / "s")]))
    assert err.startswith(f"error: {tmp_path / 'log.h5ad'} (raw.X): counts of cell soma_joinid=0 contain non-integer")


def test_embed_warns_when_few_of_the_models_genes_are_there_or_a_cell_has_none(trained):
    import anndata as ad

    from scgraph.eval.embed import embed

    counts = generated_counts(20, 15, 4, seed=2).tolil()
    counts[3, :] = 0
    adata = ad.AnnData(X=counts.tocsr(), var=generated_anndata(generated_counts(1, 15, 1)).var)  # GENE00000..14
    with pytest.warns(UserWarning) as caught:
        embed(adata, str(trained[0] / "model"), progress=False)
    said = [str(w.message) for w in caught if str(w.message).startswith("scgraph.embed")]
    assert said == ["scgraph.embed: the data holds 15 of the model's 40 genes (38 %): the encoder sees little of "
                    "what it learnt",
                    "scgraph.embed: 1 cell(s) have no count in any gene the model knows: each is embedded as an "
                    "empty cell"]


def test_an_embed_seq_len_beyond_the_longest_cell_is_clamped_with_a_note(trained, tmp_path):
    from scgraph.eval.evaluate import main as probe

    data = tmp_path / "cells.h5ad"
    generated_anndata(generated_counts(40, 40, 10, seed=6)).write_h5ad(data)
    assert probe(["--checkpoint", str(trained[0]), "--data", str(data), "--label-key", "label", "--repeats", "1",
                  "--epochs", "1", "--tsne-cells", "30", "--quiet", "--out", str(tmp_path / "p"),
                  "--embed-seq-len", "5000"]) == 0
    notes = json.loads((tmp_path / "p" / "probe.json").read_text())["notes"]
    assert "--embed-seq-len 5000 is more than the longest cell (10 genes): every cell shows all its genes" in notes


def test_labels_the_font_cannot_draw_are_one_warning_naming_the_figure(tmp_path):
    import warnings

    import numpy as np

    from scgraph.eval.figures import confusion_plot

    labels = np.array(["T細胞", "B細胞", "NK"] * 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        confusion_plot(labels, labels, np.unique(labels), tmp_path / "c.png", title="cells")
    said = [str(w.message) for w in caught]
    assert said == [f"{tmp_path / 'c.png'}: the font has no glyph for 細 胞: shown as boxes"]


def test_the_probe_checks_its_tracking_store_before_reading_any_cell(trained, tmp_path, capsys):
    import shutil

    from scgraph.eval.evaluate import main as probe

    model = tmp_path / "model"  # an encoder whose pretraining run named a store that cannot be
    shutil.copytree(trained[0] / "model", model)
    meta = json.loads((model / "scgraph.json").read_text())
    (model / "scgraph.json").write_text(json.dumps(meta | {"mlflow_uri": "bogus://z"}))
    err = one_line_error(capsys, probe(["--checkpoint", str(model), "--data", str(tmp_path / "missing.h5ad"),
                                        "--label-key", "label", "--out", str(tmp_path / "p")]))
    assert "MLflow store bogus://z: unknown scheme 'bogus'" in err
