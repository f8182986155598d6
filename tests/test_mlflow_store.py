"""The MLflow store as a user browses it: a real `mlflow server` on the store the tiny pipeline
wrote (pretraining, probes, Table II), moved to another folder first, checked through its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from scgraph.eval.compare import run_compare
from scgraph.eval.config import CompareConfig
from scgraph.tracking import KINDS, PREFIXES
from scgraph.train.checkpointer import load_pretrained
from scgraph.train.distributed import free_port

pytestmark = pytest.mark.slow


class Server:
    """``mlflow server`` on loopback, started in the store's folder (it serves ./mlartifacts)."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", "sqlite:///mlflow.db",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240  # about a minute on a loaded 2-core machine
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def get(self, path: str, **query) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def raw(self, route: str, **query) -> bytes:
        with urllib.request.urlopen(f"{self.url}{route}?{urllib.parse.urlencode(query)}", timeout=30) as r:
            return r.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def moved_store(tiny_demo, probes, tmp_path_factory) -> Path:
    """The pipeline's store (after Table II), copied to a new folder; the original is left alone."""
    run_compare(CompareConfig(experiment="tiny", mlflow_uri=tiny_demo.mlflow_uri,
                              out=str(tmp_path_factory.mktemp("table2"))))
    folder = tmp_path_factory.mktemp("moved") / "store"
    folder.mkdir()
    shutil.copy2(tiny_demo.root / "mlflow.db", folder / "mlflow.db")
    shutil.copytree(tiny_demo.root / "mlartifacts", folder / "mlartifacts")
    return folder


@pytest.fixture(scope="module")
def server(moved_store):
    server = Server(moved_store)
    yield server
    server.stop()


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_every_run_says_its_kind_and_what_it_is_and_probes_nest_under_their_pretraining(server):
    experiment = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")["experiment"]
    runs = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                       "max_results": 1000})["runs"]
    by_kind: dict[str, list[dict]] = {}
    for run in runs:
        kind = tags(run)["scgraph.kind"]
        assert kind in KINDS and tags(run)["mlflow.note.content"].strip(), run["info"]["run_name"]
        by_kind.setdefault(kind, []).append(run)
    # other tests may build Table II on the same store too: one compare run or more, each complete
    assert {k: len(v) for k, v in by_kind.items() if k != "compare"} == {"pretrain": 2, "probe": 2}
    pretraining = {r["info"]["run_id"]: r for r in by_kind["pretrain"]}
    for run in pretraining.values():  # what the run optimised, in words
        assert "recipe cell (objectives recon x 1)" in tags(run)["mlflow.note.content"]
    for probe in by_kind["probe"]:
        assert tags(probe)["mlflow.parentRunId"] in pretraining
        assert tags(probe)["pretraining_run_id"] == tags(probe)["mlflow.parentRunId"]
        params = {p["key"]: p["value"] for p in probe["data"]["params"]}
        assert params["probe.repeats"] == "2" and "n_cells" in params  # settings are params
        assert not {m["key"] for m in probe["data"]["metrics"]} & {"n_cells", "repeats", "probe/repeats"}
    assert by_kind["compare"]
    for table in by_kind["compare"]:
        read = tags(table)["pretraining_runs"].split(",")
        assert sorted(read) == sorted(pretraining)
        assert all(f"runs/{run_id})" in tags(table)["mlflow.note.content"] for run_id in read)
    for run in runs:  # every metric is named in the schema: grouped by prefix in the UI
        assert all(m["key"].startswith(PREFIXES) for m in run["data"].get("metrics", [])), run["info"]["run_name"]


def test_training_metrics_are_by_step_and_one_off_figures_once_at_step_zero(server):
    experiment = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")["experiment"]
    runs = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                       "filter": "tags.`scgraph.kind` = 'pretrain'"})["runs"]
    for run in runs:
        run_id = run["info"]["run_id"]
        loss = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
        assert [m["step"] for m in loss] == [3]  # every 10 steps and the last: the tiny demo trains 3
        for key in ("cost/peak_memory_mib", "cost/encoder_flops_per_cell", "cost/train_flops_per_cell"):
            history = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
            assert [m["step"] for m in history] == [0], key
        inputs = run["inputs"]["dataset_inputs"]
        assert inputs and json.loads(inputs[0]["dataset"]["profile"])["cells"] == 7439


def test_artifacts_live_inside_the_moved_store_and_the_encoder_loads_from_it(server, moved_store):
    experiment = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:/")  # says nothing of the folder
    runs = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                       "max_results": 1000})["runs"]
    for run in runs:
        listed = server.get("/api/2.0/mlflow/artifacts/list", run_id=run["info"]["run_id"])
        names = {f["path"] for f in listed.get("files", [])}
        expected = {"pretrain": {"model", "loss_curve.png", "config"}, "probe": {"probe.json"},
                    "compare": {"table2.md", "loss_overlay.png"}}[tags(run)["scgraph.kind"]]
        assert expected <= names, (tags(run)["scgraph.kind"], names)
        relative = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
        assert (moved_store / "mlartifacts" / relative).is_dir()
    table = max((r for r in runs if tags(r)["scgraph.kind"] == "compare"), key=lambda r: r["info"]["start_time"])
    served = server.raw("/get-artifact", path="table2.md", run_uuid=table["info"]["run_id"])
    relative = table["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
    assert served == (moved_store / "mlartifacts" / relative / "table2.md").read_bytes()
    pretraining = next(r for r in runs if tags(r)["scgraph.kind"] == "pretrain")
    encoder = load_pretrained(f"runs:/{pretraining['info']['run_id']}/model",
                              mlflow_uri=f"sqlite:///{moved_store / 'mlflow.db'}")
    assert encoder.run.model.backbone == tags(pretraining)["backbone"]
