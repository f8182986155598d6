"""The linear probe: the estimator and its split on real labels, and the whole probe on tiny
checkpoints pretrained with the real deepspeed launcher (fixtures in conftest), real CBMC cells and
a real MLflow store."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
from conftest import stored_artifacts
from mlflow.tracking import MlflowClient

from scgraph.data.datasets import load_cbmc
from scgraph.data.shards import ShardSet
from scgraph.eval.cells import read_cells
from scgraph.eval.evaluate import format_report, labelled_cells
from scgraph.eval.evaluate import main as probe_main
from scgraph.eval.probe import LinearProbe, evaluate, stratified_split
from scgraph.io.counts import log1p_cp10k
from scgraph.train.checkpointer import load_pretrained
from sharding.layout import build_census_layout

SUMMARY_KEYS = {"accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std", "n_cells", "n_classes",
                "genes_matched"}


@pytest.fixture(scope="module")
def cbmc_data():
    return load_cbmc()


def test_stratified_split_is_70_30_per_class_with_every_class_of_two_or_more_cells_on_both_sides(cbmc_data):
    labels = np.concatenate([cbmc_data.labels, ["pair", "pair"]])  # the smallest class a split can take
    train, test = stratified_split(labels, 0.3, seed=3)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    for cls in np.unique(labels):
        n, n_test = (labels == cls).sum(), (labels[test] == cls).sum()
        assert 1 <= n_test <= n - 1, cls
        assert abs(n_test - 0.3 * n) <= 1, cls
    again, _ = stratified_split(labels, 0.3, seed=3)
    other, _ = stratified_split(labels, 0.3, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(ValueError, match="class 'one' has 1 cell"):
        stratified_split(np.array(["a", "a", "one"]))


def test_linear_probe_learns_cell_types_from_real_expression(cbmc_data):
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(len(cbmc_data.labels), 1500, replace=False))
    X, y = log1p_cp10k(cbmc_data.counts[cells]).toarray(), cbmc_data.labels[cells]
    scores = evaluate(lambda seed: LinearProbe(epochs=10, seed=seed), X, y, repeats=2)
    summary = scores.summary()
    assert summary["accuracy_mean"] > 0.85, summary  # DATA.md: logistic regression reaches 0.94 on all cells
    assert summary["accuracy_std"] > 0 and len(scores.accuracy) == 2
    assert set(scores.y_pred) <= set(y) and len(scores.y_true) == len(scores.y_pred)
    # recall of each class = its test cells predicted right / its test cells (repeat 1, by hand)
    by_hand = [(scores.y_pred[scores.y_true == c] == c).mean() for c in np.unique(y)]
    np.testing.assert_allclose(scores.recall[0], by_hand)
    assert list(summary["recall_per_class"]) == list(np.unique(y))
    np.testing.assert_allclose(list(summary["recall_per_class"].values()), np.mean(scores.recall, axis=0))
    probe = LinearProbe(epochs=2).fit(X, y)
    assert probe.score(X, y) == pytest.approx((probe.predict(X) == y).mean())


@pytest.mark.parametrize(("X", "y", "message"), [
    (np.zeros(10), np.zeros(10), "Expected 2D array, got 1D array"),
    (np.zeros((10, 3)), np.zeros(9), r"inconsistent numbers of samples: \[10, 9\]"),
    (np.full((4, 2), np.nan), np.array([0, 1, 0, 1]), "Input X contains NaN"),
    (np.zeros((4, 2)), np.array(["T"] * 4), "y has 1 class \\('T'\\)"),
    (np.zeros((4, 2)), np.array([0.5, 1.5, 0.2, 0.1]), "Unknown label type: continuous"),
])
def test_linear_probe_refuses_bad_input_naming_the_argument(X, y, message):
    with pytest.raises(ValueError, match=message):
        LinearProbe().fit(X, y)


def test_linear_probe_must_be_fitted_and_sees_the_same_features():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        LinearProbe().predict(np.zeros((2, 3)))
    probe = LinearProbe(epochs=1).fit(np.eye(4), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="X has 5 features, but LinearProbe is expecting 4 features"):
        probe.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="lr must be > 0"):
        LinearProbe(lr=0).fit(np.eye(4), np.array([0, 1, 0, 1]))


def test_linear_probe_is_a_scikit_learn_classifier():
    """Every check scikit-learn runs on its own classifiers (clone, params, fit/predict/score, input
    validation, pickling, pipelines), at the paper's settings."""
    from sklearn.utils.estimator_checks import check_estimator

    failed = [r for r in check_estimator(LinearProbe(), on_fail=None) if r["status"] == "failed"]
    assert failed == []


def test_cells_of_a_class_of_one_and_unlabelled_cells_are_left_out_and_said(cbmc_data):
    labels = np.array([*cbmc_data.labels[:200], "Lonely", None], dtype=object)
    keep, notes = labelled_cells(labels, "cell_type")
    assert len(keep) == 200 and keep.max() == 199
    assert any("Lonely" in note for note in notes) and any("1 cell(s) without" in note for note in notes)
    with pytest.raises(ValueError, match="only one class has 2 or more cells"):
        labelled_cells(np.array(["A", "A", "B"], dtype=object), "cell_type")


@pytest.mark.slow
def test_probe_reports_scores_of_both_backbones_beside_every_control(probes):
    for backbone, report in probes.items():
        assert SUMMARY_KEYS <= set(report)
        assert set(report["controls"]) == {"random_encoder", "bag_of_genes", "pca", "logistic_regression"}
        for summary in [report, *report["controls"].values()]:
            assert SUMMARY_KEYS <= set(summary)
            assert summary["n_cells"] == 400 and summary["n_classes"] == 11
        assert len(report["accuracy_per_repeat"]) == 2 and report["repeats"] == 2
        assert np.std(report["accuracy_per_repeat"], ddof=1) == pytest.approx(report["accuracy_std"])
        # the control known to hold on these cells: expression separates CBMC's types (DATA.md: 0.94 on all of
        # them). Whether 3 tiny steps of pretraining beat the random-init twin is not known (the demo's 1800 do:
        # benchmarks/RESULTS.md); tests/test_train.py checks what training does.
        assert report["controls"]["logistic_regression"]["accuracy_mean"] > 0.8
        assert report["backbone"] == backbone and report["dataset"] == "cbmc"
        text = format_report(report)
        assert "random-init encoder" in text and "logistic regression" in text
        hardest = min(report["recall_per_class"], key=report["recall_per_class"].get)
        assert set(report["test_cells_per_class"]) == set(report["recall_per_class"])
        tested = report["test_cells_per_class"]  # 30 % of each class's cells, at least one: 122 of 400 here
        assert min(tested.values()) >= 1 and sum(tested.values()) == 122 and tested["CD14+ Mono"] == 40
        assert f"pretrained / PCA-50): {hardest} " in text
        older = {k: v for k, v in report.items() if k != "recall_per_class"}  # a probe.json from before it
        assert format_report(older) == "\n".join(line for line in text.split("\n") if "Hardest" not in line)
        beats = report["accuracy_mean"] > report["controls"]["random_encoder"]["accuracy_mean"]
        assert ("beats the random encoder" in text) == beats and ("does NOT beat" in text) == (not beats)
    assert probes["gnn"]["genes_matched"] == 500 and probes["gnn"]["genes_dropped"] == 0
    # the .h5ad had 20 genes the model never saw: dropped, counted and said
    assert probes["transformer"]["genes_matched"] == 500 and probes["transformer"]["genes_dropped"] == 20
    assert any("20 of 520 genes" in note for note in probes["transformer"]["notes"])


@pytest.mark.slow
def test_probe_run_is_in_mlflow_linked_to_its_pretraining_run_with_figures(tiny_demo, probes):
    client = MlflowClient(tracking_uri=tiny_demo.mlflow_uri)
    for backbone, report in probes.items():
        run = client.get_run(report["probe_run_id"])
        pretrained = load_pretrained(report["checkpoint"])
        assert run.data.tags["pretraining_run_id"] == pretrained.record.mlflow_run_id == report["pretraining_run_id"]
        pretraining = client.get_run(report["pretraining_run_id"])
        assert pretraining.info.experiment_id == run.info.experiment_id  # the checkpoint's experiment
        assert run.data.tags["scgraph.kind"] == "probe" and run.data.tags["backbone"] == backbone
        assert run.data.metrics["probe/accuracy_mean"] == pytest.approx(report["accuracy_mean"])
        assert "probe/random_encoder/accuracy_mean" in run.data.metrics
        folder, artifacts = stored_artifacts(tiny_demo.mlflow_uri, run.info.run_id)
        assert {"probe.json", f"tsne_{backbone}.png", f"confusion_{backbone}.png"} <= artifacts
        assert json.loads((folder / "probe.json").read_text())["probe_run_id"] == run.info.run_id


@pytest.mark.slow
def test_export_round_trips_through_anndata_in_input_order(tiny_demo, probes, heldout_h5ad):
    for backbone, source in (("gnn", str(tiny_demo.heldout_shards)), ("transformer", heldout_h5ad)):
        exported = ad.read_h5ad(probes[backbone]["export"]["path"])
        key = f"X_scgraph_{backbone}"
        assert probes[backbone]["export"]["obsm_key"] == key
        cells = read_cells(source)
        assert list(exported.obs_names) == list(cells.adata.obs_names)
        assert exported.obsm[key].shape == (cells.adata.n_obs, 32) and np.isfinite(exported.obsm[key]).all()
        assert exported.obs["cell_type"].astype(str).tolist() == cells.labels("cell_type").tolist()
    shards = ShardSet.open(str(tiny_demo.heldout_shards))
    assert exported.n_vars == 520 and shards.n_cells == 400


@pytest.mark.slow
def test_scgraph_embed_puts_the_probes_embeddings_in_obsm_and_scanpy_reads_them(tiny_demo, probes, heldout_h5ad):
    import scanpy as sc

    import scgraph

    adata = ad.read_h5ad(heldout_h5ad)
    exported = ad.read_h5ad(probes["transformer"]["export"]["path"])
    out = scgraph.embed(adata, str(tiny_demo.pretrain_output("transformer")), progress=False)
    assert out is adata and adata.obsm["X_scgraph"].shape == (adata.n_obs, 32)
    # the same cells, the same encoder, the same protocol as the probe's export
    np.testing.assert_allclose(adata.obsm["X_scgraph"], exported.obsm["X_scgraph_transformer"], rtol=1e-5, atol=1e-5)
    assert adata.uns["X_scgraph"]["genes_matched"] == 500 and adata.uns["X_scgraph"]["genes_dropped"] == 20
    everything = scgraph.embed(adata.copy(), str(tiny_demo.pretrain_output("transformer")), key="X_all",
                               selection="all", progress=False)
    assert not np.allclose(everything.obsm["X_all"], adata.obsm["X_scgraph"])  # every gene, not the top 64
    assert adata.uns["X_scgraph"]["seq_len"] == 64 and "seq_len" not in everything.uns["X_all"]
    with pytest.raises(ValueError, match="seq_len must be > 0; got 0"):
        scgraph.embed(adata.copy(), str(tiny_demo.pretrain_output("transformer")), seq_len=0, progress=False)
    sc.pp.neighbors(adata, use_rep="X_scgraph")
    assert adata.obsp["connectivities"].shape == (adata.n_obs, adata.n_obs)


def test_probe_reads_a_census_layout_soma_collection(cbmc, tmp_path):
    uri = build_census_layout(cbmc[:300], str(tmp_path / "census"), label_key="label")
    cells = read_cells(uri)
    assert cells.counts.shape == (300, 500) and cells.feature_ids[:2] == ["CBMC_G000", "CBMC_G001"]
    assert (cells.counts != cbmc[:300].X).nnz == 0
    assert cells.labels("cell_type").tolist() == cbmc.obs["label"][:300].astype(str).tolist()


def _fails(capsys, args: list[str]) -> str:
    code = probe_main([*args, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err


@pytest.mark.slow
def test_bad_input_is_a_one_line_error(tiny_demo, heldout_h5ad, pbmc_h5ad, cbmc, capsys, tmp_path):
    gnn = str(tiny_demo.pretrain_output("gnn"))
    common = ["--out", str(tmp_path / "out"), "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"]
    err = _fails(capsys, ["--checkpoint", gnn, "--data", heldout_h5ad, "--label-key", "celltype", *common])
    assert "--label-key 'celltype' is not an obs column" in err and "cell_type, split" in err
    (tmp_path / "empty").mkdir()
    err = _fails(capsys, ["--checkpoint", str(tmp_path / "empty"), "--data", heldout_h5ad, *common])
    assert "holds no model" in err
    err = _fails(capsys, ["--checkpoint", gnn, "--data", pbmc_h5ad, "--label-key", "bulk_labels", *common])
    assert "no gene of pbmc68k is in the checkpoint's vocabulary" in err
    one = cbmc[:50].copy()
    one.obs["cell_type"] = "T"
    one.write_h5ad(tmp_path / "one.h5ad")
    err = _fails(capsys, ["--checkpoint", gnn, "--data", str(tmp_path / "one.h5ad"), *common])
    assert "has a single class ('T', 50 cells)" in err
    err = _fails(capsys, ["--checkpoint", gnn, "--data", str(tmp_path / "nothing.h5ad"), *common])
    assert "no such file or directory" in err
    err = _fails(capsys, ["--checkpoint", gnn, "--data", heldout_h5ad, *common, "--embed-seq-len", "0"])
    assert "--embed-seq-len must be > 0; got 0" in err
    assert not (tmp_path / "out").exists()
    # output paths are checked before any cell is embedded, naming the flag; the file in the way is kept
    (tmp_path / "taken").write_text("notes")
    err = _fails(capsys, ["--checkpoint", gnn, "--data", heldout_h5ad, "--out", str(tmp_path / "taken"),
                          "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"])
    assert f"--out {tmp_path / 'taken'} is a file, not a folder" in err
    err = _fails(capsys, ["--checkpoint", gnn, "--data", heldout_h5ad, *common,
                          "--export", str(tmp_path / "taken" / "sub" / "cells.h5ad")])
    assert f"--export {tmp_path / 'taken' / 'sub'}: {tmp_path / 'taken'} is a file, not a folder" in err
    assert (tmp_path / "taken").read_text() == "notes" and not (tmp_path / "out").exists()
