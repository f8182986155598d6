"""MLflow for every kind of run (pretraining, probe, Table II, the synthetic study): one module,
one default store, one metric schema, artifacts that travel with the store.

The store is ``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
working directory (MLflow 3 refuses a bare ``./mlruns`` file store). With a SQLite store every
experiment keeps its artifacts in ``mlartifacts/`` beside the database, under a location-free
``mlflow-artifacts:/`` URI: copy or move the folder and everything still opens with
``cd FOLDER && mlflow ui --backend-store-uri sqlite:///mlflow.db`` (which serves ./mlartifacts).

Every run carries the tag ``scgraph.kind`` (pretrain, probe, compare, synthetic) and a one-sentence
description; metric names start with what they describe (``train/``, ``val/``, ``cost/``,
``probe/``, ``study/``) and carry their unit, so the UI groups them. One-off figures (cost, probe
scores, study summaries) are logged once at step 0. A distributed run tracks from rank 0 only:
every other rank holds an inactive ``Tracker`` whose calls do nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
KIND = "scgraph.kind"
KINDS = ("pretrain", "probe", "compare", "synthetic")
#: What the UI shows as a run's description (markdown).
DESCRIPTION = "mlflow.note.content"
PARENT = "mlflow.parentRunId"
#: Every metric name starts with one of these (the UI groups charts by it).
PREFIXES = ("train/", "val/", "cost/", "probe/", "study/")
ARTIFACTS_DIR = "mlartifacts"
_PROXIED = "mlflow-artifacts:/"


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


#: Schemes of the stores MLflow 3 tracks to (``file:`` is its retired file store, refused unless
#: ``MLFLOW_ALLOW_FILE_STORE=true``, as MLflow itself does).
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")
#: Seconds a tracking server has to answer before a command gives up on it (MLflow's own client
#: retries a server that is down for minutes).
SERVER_TIMEOUT_S = 5.0


def check_store(uri: str | None = None, *, existing: bool = False) -> str:
    """The store's URI after checking what can be checked before any work, in one place for every
    command: a known scheme; a SQLite store must be a database in an existing folder (``existing``:
    the file must be there too, for commands that only read it, where a mistyped path would
    silently create an empty store); a server must answer within ``SERVER_TIMEOUT_S``."""
    explicit = uri
    uri = tracking_uri(uri)
    where = f"MLflow store {uri}" + ("" if explicit or uri == DEFAULT_TRACKING_URI else " ($MLFLOW_TRACKING_URI)")
    if "://" not in uri:
        db = Path(uri).absolute() if uri.endswith(".db") else Path(uri).absolute() / "mlflow.db"
        raise ValueError(f"{where} is a plain path: MLflow 3 needs a database, e.g. sqlite:///{db}")
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{where}: unknown scheme {scheme!r} (use sqlite:///PATH/mlflow.db, http(s)://HOST:PORT "
                         "of an MLflow server, or a database URI)")
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ValueError(f"{where} is MLflow's retired file store: use a database, e.g. "
                         f"sqlite:///{Path(uri.removeprefix('file://')).parent / 'mlflow.db'}")
    if scheme in ("http", "https"):
        _check_server(uri, where)
    path = sqlite_path(uri)
    if path is not None:
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(16) not in (b"SQLite format 3\0", b""):
                    raise ValueError(f"{where}: {path} is not an SQLite database")
        elif existing:
            raise ValueError(f"no MLflow store at {uri} ({path} does not exist): check the path")
        elif not path.parent.is_dir():
            raise ValueError(f"{where}: folder {path.parent} does not exist")
    return uri


def _check_server(uri: str, where: str) -> None:
    """Refuse a tracking server that does not answer MLflow's health check in time."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as err:
        raise ValueError(f"{where}: the server answered {err.code} {err.reason} to MLflow's health check: is it an "
                         "MLflow server?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(f"{where}: no MLflow server answers ({reason}) within {SERVER_TIMEOUT_S:g} s; start it "
                         "(mlflow server --backend-store-uri sqlite:///mlflow.db) or check the URI") from None


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path | None:
    """Where a SQLite store's artifacts live: ``mlartifacts`` beside the database."""
    path = sqlite_path(uri)
    return None if path is None else path.resolve().parent / ARTIFACTS_DIR


def ui_command(uri: str | None = None) -> str:
    """The command that opens the store in MLflow's UI, artifacts included."""
    uri = tracking_uri(uri)
    path = sqlite_path(uri)
    if path is None:
        return f"mlflow ui --backend-store-uri {uri}"
    return f"cd {path.resolve().parent} && mlflow ui --backend-store-uri sqlite:///{path.name}"


def git_commit(path: str | Path = Path(__file__).parent) -> str:
    """The commit of the code that ran, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(path), capture_output=True,
                             text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(path),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested dicts -> ``a.b.c`` keys, the form MLflow params take."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return {prefix: json.dumps(value) if isinstance(value, list) else value}


def client(uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A markdown link to a run, as the UI's description renders it."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


def local_artifacts(uri: str, run_artifact_uri: str) -> Path | None:
    """The folder holding a run's artifacts in a SQLite store's ``mlartifacts`` (None elsewhere)."""
    root = artifact_root(tracking_uri(uri))
    if root is None or not run_artifact_uri.startswith(_PROXIED):
        return None
    return root / run_artifact_uri.removeprefix(_PROXIED)


def run_artifact(uri: str, mlflow_uri: str | None = None) -> Path:
    """The local folder of a ``runs:/<run_id>/<path>`` artifact (downloaded if the store is remote)."""
    from mlflow.exceptions import MlflowException

    run_id, _, inner = uri.removeprefix("runs:/").partition("/")
    store = check_store(mlflow_uri, existing=True)
    try:
        run = client(store).get_run(run_id)
    except MlflowException:
        raise ValueError(f"{uri}: no run {run_id} in the MLflow store {store}") from None
    local = local_artifacts(store, run.info.artifact_uri)
    if local is not None:
        return local / inner
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=inner, tracking_uri=store))


class Tracker:
    """One MLflow run of one kind. ``active`` is False on non-zero ranks, where every call is a no-op."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None
        self._client: Any = None
        self._monitor: Any = None

    def start(self, uri: str | None, experiment: str, run_name: str | None, kind: str, description: str,
              params: dict[str, Any], tags: dict[str, str], run_id: str | None = None,
              parent: str | None = None) -> None:
        """A new run (a child of ``parent`` when given), or (``run_id``) the same run again after a
        resume."""
        if not self.active:
            return
        from mlflow.exceptions import MlflowException

        if kind not in KINDS:
            raise ValueError(f"run kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.uri = check_store(uri)
        self._client = client(self.uri)
        tags = {KIND: kind, DESCRIPTION: description, **tags} | ({PARENT: parent} if parent else {})
        try:
            self._open(experiment, run_name, tags, run_id)
        except MlflowException as err:
            raise ValueError(f"MLflow store {self.uri}: {str(err).splitlines()[0]}") from None
        self.params(params)

    def _open(self, experiment: str, run_name: str | None, tags: dict[str, str], run_id: str | None) -> None:
        if run_id is not None:
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.experiment_id = self._client.get_run(run_id).info.experiment_id
            self.tags(tags)
            return
        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:  # artifacts beside a SQLite store, under a URI that does not say where the folder is
            location = f"{_PROXIED}{uuid.uuid4().hex}" if artifact_root(self.uri) else None
            self.experiment_id = self._client.create_experiment(experiment, artifact_location=location)
        self.run_id = self._client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

    def params(self, values: dict[str, Any]) -> None:
        if self.active and values:
            from mlflow.entities import Param

            items = [Param(k, "" if v is None else str(v)) for k, v in values.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self._client.log_batch(self.run_id, params=items[i:i + 100])

    def tags(self, values: dict[str, str]) -> None:
        if self.active:
            for key, value in values.items():
                self._client.set_tag(self.run_id, key, value)

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        """Metrics at one step; names must follow the schema (a prefix from ``PREFIXES``)."""
        self.series((k, float(v), step) for k, v in values.items())

    def series(self, points: Iterable[tuple[str, float, int]], run_id: str | None = None) -> None:
        """Many (key, value, step) points in as few requests as MLflow allows."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in points]
        wrong = sorted({m.key for m in metrics if not m.key.startswith(PREFIXES)})
        if wrong:
            raise ValueError(f"metric name(s) {', '.join(wrong)} start with none of {', '.join(PREFIXES)}")
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self._client.log_batch(run_id or self.run_id, metrics=metrics[i:i + 1000])

    def child(self, run_name: str, params: dict[str, Any], points: Iterable[tuple[str, float, int]]) -> str | None:
        """A finished nested run under this one (e.g. one setting of a study), logged in one go."""
        if not self.active:
            return None
        from mlflow.entities import Param

        run = self._client.create_run(self.experiment_id, run_name=run_name,
                                      tags={PARENT: self.run_id, KIND: self._client.get_run(self.run_id)
                                            .data.tags.get(KIND, "")})
        child_id = run.info.run_id
        self._client.log_batch(child_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.series(points, run_id=child_id)
        self._client.set_terminated(child_id, status="FINISHED")
        return child_id

    def dataset(self, name: str, digest: str, source: str, profile: dict[str, Any], context: str) -> None:
        """Record what the run read (``mlflow.log_input``): the shard set or the labelled cells."""
        if not self.active:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        data = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                       profile=json.dumps(profile))
        self._client.log_inputs(self.run_id, [DatasetInput(data, [InputTag("mlflow.data.context", context)])])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        """A file or a folder into the run's artifacts (beside a SQLite store: copied there)."""
        if not self.active:
            return
        run = self._client.get_run(self.run_id)
        local = local_artifacts(self.uri, run.info.artifact_uri)
        if local is None:
            if Path(path).is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path=folder)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path=folder)
            return
        target = local / folder if folder else local
        target.mkdir(parents=True, exist_ok=True)
        if Path(path).is_dir():
            shutil.copytree(path, target / Path(path).name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target / Path(path).name)

    def last_step(self, key: str) -> int:
        """The largest step logged for ``key`` in this run (0 if none)."""
        if not self.active:
            return 0
        return max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=0)

    def system_metrics(self) -> None:
        """CPU, memory, disk, network (and GPU) of this machine into the run, every 10 s."""
        if not self.active:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, samples_before_logging=1,
                                             resume_logging=True, tracking_uri=self.uri)
        self._monitor.start()

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED, or KILLED (stopped by a signal, resumable)."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self.active and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
            self.run_id = None
