"""Table II from real MLflow runs: the tiny demo's two pretraining runs (real deepspeed launches)
and their probe runs (fixtures in conftest)."""

from __future__ import annotations

import csv
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import stored_artifacts
from mlflow.tracking import MlflowClient

from scgraph.eval.compare import Row, Table, collect, markdown, table_rows
from scgraph.eval.compare import main as compare_main


@pytest.mark.slow
def test_compare_builds_table_ii_from_the_experiments_runs(tiny_demo, probes, tmp_path, capsys):
    code = compare_main(["--experiment", "tiny", "--mlflow-uri", tiny_demo.mlflow_uri, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0
    table = collect("tiny", tiny_demo.mlflow_uri)
    assert [(r.hidden, r.seq_len, r.backbone) for r in table.rows] == [(32, 64, "transformer"), (32, 64, "gnn")]
    assert table.datasets == ["cbmc"]
    tf, gnn = table.rows
    client = MlflowClient(tracking_uri=tiny_demo.mlflow_uri)
    for row in table.rows:  # the cost columns are the pretraining run's encoder FLOPs and peak memory
        cost = client.get_run(row.pretraining_run_id).data.metrics
        assert (row.flops, row.memory) == (cost["cost/encoder_flops_per_cell"], cost["cost/peak_memory_mib"] * 2**20)
        assert row.accuracy["cbmc"] == pytest.approx((probes[row.backbone]["accuracy_mean"],
                                                      probes[row.backbone]["accuracy_std"]))
        assert row.pretraining_run_id == probes[row.backbone]["pretraining_run_id"]
    assert tf.flops > gnn.flops  # the Transformer's Q/K projections and feed-forward
    assert table.difference(gnn) == pytest.approx(gnn.average(["cbmc"]) - tf.average(["cbmc"]))
    assert math.isnan(table.difference(tf))

    header = "| Settings | Model | FLOPs/cell | Mem | cbmc | Average | GNN − TF |"
    assert header in printed and "| 32/64 | TF |" in printed and "| 32/64 | GNN |" in printed
    assert f"{100 * (gnn.average(['cbmc']) - tf.average(['cbmc'])):+.2f} |" in printed
    assert "Transformer / GNN forward FLOPs per cell" in printed
    assert "Table II, experiment tiny, recipe cell (objectives recon)" in printed
    assert header in (tmp_path / "table2.md").read_text()
    with open(tmp_path / "table2.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["backbone"] for r in rows] == ["transformer", "gnn"]
    assert float(rows[0]["cbmc_accuracy_mean"]) == pytest.approx(tf.accuracy["cbmc"][0])
    # the bar chart: one bar colour per row (tab10's first two), each drawn
    pixels = plt.imread(tmp_path / "table2.png")[..., :3]
    for colour in plt.get_cmap("tab10").colors[:2]:
        assert (np.abs(pixels - np.array(colour)).max(axis=-1) < 0.02).sum() > 100, colour

    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`scgraph.kind` = 'compare'")
    folder, names = stored_artifacts(tiny_demo.mlflow_uri, run.info.run_id)
    assert names == {"table2.csv", "table2.md", "table2.png", "loss_overlay.png"}
    assert (folder / "table2.png").read_bytes() == (tmp_path / "table2.png").read_bytes()
    assert collect("tiny", tiny_demo.mlflow_uri).rows == table.rows  # its own run is not a row


def test_several_settings_get_the_papers_average_rows():
    rows = [Row("scbenchmark", 256, 512, "transformer", "a", 2e9, 1.7e8, {"lept": (0.95, 0.003), "pan": (0.97, 0.003)}),
            Row("scbenchmark", 256, 512, "gnn", "b", 7.6e8, 2.7e7, {"lept": (0.94, 0.001), "pan": (0.96, 0.002)}),
            Row("scbenchmark", 128, 512, "transformer", "c", 7e8, 1.4e8, {"lept": (0.90, 0.002)}),
            Row("scbenchmark", 128, 512, "gnn", "d", 4e8, 1.9e7, {"lept": (0.92, 0.002)})]
    table = Table(rows, ["lept", "pan"], [], several_presets=False)
    lines = table_rows(table)
    assert lines[0] == ["256/512", "TF", "2.00G", "170.00MB", "95.00 ± 0.30", "97.00 ± 0.30", "96.00", ""]
    assert lines[1][-2:] == ["95.00", "-1.00"]
    assert lines[3][4:] == ["92.00 ± 0.20", "–", "92.00", "+2.00"]  # a missing dataset is a dash
    assert lines[4] == ["Average", "TF", "", "", "92.50", "97.00", "93.00", ""]
    assert lines[5] == ["Average", "GNN", "", "", "93.00", "96.00", "93.50", "+0.50"]
    assert markdown(table).count("\n") == 2 + len(lines) - 1
    paper = Row("scbenchmark", 256, 512, "gnn", "e", 7.6e8, 2.7e7, {"lept": (0.90, 0.001)})
    mixed = Table([rows[1], paper], ["lept"], [], several_presets=False, several_recipes=True)
    rows[1].recipe, rows[1].objectives = "cell", "recon"
    assert [mixed.setting(r) for r in mixed.rows] == ["cell 256/512", "paper 256/512"]
    assert mixed.recipes() == "recipes cell (objectives recon), paper (objectives mvp)"


@pytest.mark.slow
def test_compare_without_probe_runs_or_experiment_is_a_one_line_error(tiny_demo, tmp_path, capsys):
    for args, message in ((["--experiment", "nope"], "no MLflow experiment named 'nope'"),
                          (["--experiment", "Default"], "has no finished probe runs")):
        code = compare_main([*args, "--mlflow-uri", tiny_demo.mlflow_uri, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.strip().count("\n") == 0, err
