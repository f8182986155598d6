"""MLflow for every kind of run (pretraining, probe, Table II, the synthetic study): one module,
one default store.

The store is ``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
working directory (MLflow 3 refuses a bare ``./mlruns`` file store). A distributed run tracks from
rank 0 only: every other rank holds an inactive ``Tracker`` whose calls do nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_store(uri: str | None = None, *, existing: bool = False) -> str:
    """The store's URI after checking what can be checked before any work: a SQLite store must be
    a database in an existing folder (``existing``: the file must be there too, for commands that
    only read it, where a mistyped path would silently create an empty store)."""
    uri = tracking_uri(uri)
    if "://" not in uri:
        raise ValueError(f"MLflow store {uri!r} is a plain path: MLflow 3 needs a database, e.g. "
                         f"sqlite:///{Path(uri) / 'mlflow.db'}")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(16) not in (b"SQLite format 3\0", b""):
                    raise ValueError(f"MLflow store {uri}: {path} is not an SQLite database")
        elif existing:
            raise ValueError(f"no MLflow store at {uri} ({path} does not exist): check the path")
        elif not path.parent.is_dir():
            raise ValueError(f"MLflow store {uri}: folder {path.parent} does not exist")
    return uri


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


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlartifacts`` beside the
    database (MLflow's default would be ./mlruns of whatever directory the command ran in)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def client(uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


class Tracker:
    """One MLflow run. ``active`` is False on non-zero ranks, where every call is a no-op."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.run_id: str | None = None
        self._client: Any = None

    def start(self, uri: str | None, experiment: str, run_name: str | None, params: dict[str, Any],
              tags: dict[str, str], run_id: str | None = None) -> None:
        """A new run, or (``run_id``) the same run again after a resume."""
        if not self.active:
            return
        from mlflow.exceptions import MlflowException

        self._client = client(check_store(uri))
        try:
            self._open(experiment, run_name, tags, run_id, uri)
        except MlflowException as err:
            raise ValueError(f"MLflow store {tracking_uri(uri)}: {str(err).splitlines()[0]}") from None
        self.params(params)

    def _open(self, experiment: str, run_name: str | None, tags: dict[str, str], run_id: str | None,
              uri: str | None) -> None:
        if run_id is not None:
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.tags(tags)
        else:
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self._client.create_experiment(
                experiment, artifact_location=artifact_location(tracking_uri(uri)))
            self.run_id = self._client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

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

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.series((k, float(v), step or 0) for k, v in values.items())

    def series(self, points: Iterable[tuple[str, float, int]], run_id: str | None = None) -> None:
        """Many (key, value, step) points in as few requests as MLflow allows."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in points]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self._client.log_batch(run_id or self.run_id, metrics=metrics[i:i + 1000])

    def child(self, run_name: str, params: dict[str, Any], points: Iterable[tuple[str, float, int]]) -> str | None:
        """A finished nested run under this one (e.g. one setting of a study), logged in one go."""
        if not self.active:
            return None
        parent = self._client.get_run(self.run_id)
        run = self._client.create_run(parent.info.experiment_id, run_name=run_name,
                                      tags={"mlflow.parentRunId": self.run_id})
        child_id = run.info.run_id
        from mlflow.entities import Param

        self._client.log_batch(child_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.series(points, run_id=child_id)
        self._client.set_terminated(child_id, status="FINISHED")
        return child_id

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            self._client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def last_step(self, key: str) -> int:
        """The largest step logged for ``key`` in this run (0 if none)."""
        if not self.active:
            return 0
        return max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=0)

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED, or KILLED (stopped by a signal, resumable)."""
        if self.active and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
            self.run_id = None
