"""MLflow tracking from rank 0 only; every other rank gets a tracker that does nothing.

MLflow 3 refuses a bare ``./mlruns`` file store, so the default is a SQLite store in the working
directory, which ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` opens.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(explicit: str | None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def git_commit(path: str | Path = ".") -> str:
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


class Tracker:
    """One MLflow run. ``active`` is False on non-zero ranks, where every call is a no-op."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.run_id: str | None = None

    def start(self, uri: str | None, experiment: str, run_name: str | None,
              params: dict[str, Any], tags: dict[str, str], run_id: str | None = None) -> None:
        """A new run, or (``run_id``) the same run again after a resume."""
        if not self.active:
            return
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(uri))
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
        self.run_id = run.info.run_id
        if params:
            mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=folder)

    def tag(self, key: str, value: str) -> None:
        if self.active:
            import mlflow

            mlflow.set_tag(key, value)

    def end(self, failed: bool = False) -> None:
        if self.active and self.run_id is not None:
            import mlflow

            mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.run_id = None
