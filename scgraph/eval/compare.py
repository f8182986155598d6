"""``launchers/compare.py``: the paper's Table II from the MLflow runs of one experiment.

A row is a (setting, backbone) pair, the setting being hidden size / genes per cell L as in the
paper (prefixed by the preset when the experiment holds more than one). Its cost columns come from
the pretraining run (forward FLOPs per cell, peak training memory), its accuracy columns from the
probe runs linked to that run (tag ``pretraining_run_id``), one column per probed dataset. When a
row has several pretraining runs, the latest one with a probe is used and the others are named in
the notes; when a run was probed several times on a dataset, the latest probe counts.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scgraph.cli import Command, run
from scgraph.config import CompareConfig, backbones
from scgraph.eval.evaluate import PROBE_KIND
from scgraph.eval.figures import grouped_bar_chart
from scgraph.tracking import Tracker, check_store, client, git_commit, tracking_uri

COMPARE_KIND = "compare"


def _order(backbone: str) -> int:
    """Paper order: the Transformer row first, then the GNN(s) compared with it."""
    names = backbones()
    return names.index(backbone) if backbone in names else len(names)


@dataclass
class Row:
    """One line of Table II; accuracies are fractions in [0, 1], ``accuracy[dataset] = (mean, std)``."""

    preset: str
    hidden: int
    seq_len: int
    backbone: str
    pretraining_run_id: str
    flops: float = math.nan
    memory: float = math.nan
    accuracy: dict[str, tuple[float, float]] = field(default_factory=dict)

    def average(self, datasets: list[str]) -> float:
        means = [self.accuracy[d][0] for d in datasets if d in self.accuracy]
        return float(np.mean(means)) if means else math.nan


@dataclass
class Table:
    rows: list[Row]
    datasets: list[str]
    notes: list[str]
    several_presets: bool

    def setting(self, row: Row) -> str:
        base = f"{row.hidden}/{row.seq_len}"
        return f"{row.preset} {base}" if self.several_presets else base

    def settings(self) -> list[str]:
        return list(dict.fromkeys(self.setting(r) for r in self.rows))

    def find(self, setting: str, backbone: str) -> Row | None:
        return next((r for r in self.rows if self.setting(r) == setting and r.backbone == backbone), None)

    def difference(self, row: Row) -> float:
        """GNN average minus Transformer average of the same setting (NaN on other rows)."""
        other = self.find(self.setting(row), "transformer") if row.backbone == "gnn" else None
        return row.average(self.datasets) - other.average(self.datasets) if other else math.nan


def _number(params: dict[str, str], key: str) -> int:
    try:
        return int(float(params[key]))
    except (KeyError, ValueError):
        return -1


def collect(experiment: str, uri: str | None = None) -> Table:
    """Read the experiment's finished probe runs and the pretraining runs they name."""
    from mlflow.exceptions import MlflowException

    store = client(check_store(uri, existing=True))
    found = store.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in store.search_experiments()) or "none"
        raise ValueError(f"no MLflow experiment named {experiment!r} in {tracking_uri(uri)} (experiments: {names})")
    runs = store.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=50_000, order_by=["attributes.start_time ASC"])
    probes = [r for r in runs if r.data.tags.get("scgraph.kind") == PROBE_KIND]
    if not probes:
        raise ValueError(f"experiment {experiment!r} has no finished probe runs: run launchers/probe.py on its "
                         "checkpoints first")
    by_id = {r.info.run_id: r for r in runs}

    def pretraining(run_id: str):
        if run_id not in by_id:
            try:
                by_id[run_id] = store.get_run(run_id)
            except MlflowException:
                by_id[run_id] = None
        return by_id[run_id]

    # row key -> pretraining run id -> dataset -> latest probe (runs come oldest first)
    grouped: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    for probe in probes:
        p, tags = probe.data.params, probe.data.tags
        key = (p.get("run.model.preset", "?"), _number(p, "run.model.hidden"), _number(p, "run.tokenizer.seq_len"),
               tags.get("backbone", "?"))
        grouped[key][tags.get("pretraining_run_id", "none")][tags.get("dataset", "data")] = probe

    rows, notes = [], []
    for key, per_run in grouped.items():
        latest = max(per_run, key=lambda rid: max(p.info.start_time for p in per_run[rid].values()))
        older = sorted(set(per_run) - {latest})
        if older:
            notes.append(f"{key[3]} {key[1]}/{key[2]} ({key[0]}): using pretraining run {latest}; older run(s) "
                         f"{', '.join(older)} left out")
        row = Row(*key, pretraining_run_id=latest)
        source = pretraining(latest)
        if source is not None:
            metrics = source.data.metrics
            row.flops = metrics.get("flops_forward_per_cell", metrics.get("flops_per_cell", math.nan))
            row.memory = metrics.get("peak_memory_bytes", math.nan)
        else:
            notes.append(f"{key[3]} {key[1]}/{key[2]}: pretraining run {latest} not found, no FLOPs or memory")
        for dataset, probe in per_run[latest].items():
            m = probe.data.metrics
            row.accuracy[dataset] = (m["accuracy_mean"], m.get("accuracy_std", 0.0))
        rows.append(row)
    rows.sort(key=lambda r: (r.preset, r.hidden, r.seq_len, _order(r.backbone), r.backbone))
    datasets = sorted({d for r in rows for d in r.accuracy})
    return Table(rows, datasets, notes, several_presets=len({r.preset for r in rows}) > 1)


def _si(value: float, unit: str = "") -> str:
    if not math.isfinite(value):
        return "–"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def _percent(mean: float, std: float | None = None) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _signed(difference: float) -> str:
    """A GNN − TF difference in accuracy points; blank where there is none (the TF rows)."""
    return f"{100 * difference:+.2f}" if math.isfinite(difference) else ""


def _header(table: Table) -> list[str]:
    return ["Settings", "Model", "FLOPs/cell", "Mem", *table.datasets, "Average", "GNN − TF"]


def _averages(table: Table) -> list[list[str]]:
    """The paper's closing 'Average' rows: each backbone's mean over settings, per dataset."""
    stats: dict[str, tuple[list[float], float]] = {}
    for backbone in sorted({r.backbone for r in table.rows}, key=_order):
        rows = [r for r in table.rows if r.backbone == backbone]
        means = [float(np.mean([r.accuracy[d][0] for r in rows if d in r.accuracy] or [math.nan]))
                 for d in table.datasets]
        stats[backbone] = (means, float(np.nanmean([r.average(table.datasets) for r in rows])))
    out = []
    for backbone, (means, average) in stats.items():
        tf = stats.get("transformer")
        diff = average - tf[1] if backbone == "gnn" and tf else math.nan
        out.append(["Average", _model(backbone), "", "", *[_percent(m) for m in means], _percent(average),
                    _signed(diff)])
    return out


def _model(backbone: str) -> str:
    return {"transformer": "TF", "gnn": "GNN"}.get(backbone, backbone)


def table_rows(table: Table) -> list[list[str]]:
    """Table II as strings: one line per (setting, backbone), then the averages over settings."""
    out = []
    for row in table.rows:
        diff = table.difference(row)
        out.append([table.setting(row), _model(row.backbone), _si(row.flops), _si(row.memory, "B"),
                     *[_percent(*row.accuracy[d]) if d in row.accuracy else "–" for d in table.datasets],
                     _percent(row.average(table.datasets)), _signed(diff)])
    if len(table.settings()) > 1:
        out += _averages(table)
    return out


def markdown(table: Table) -> str:
    header = _header(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(table)]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else "–"


def cost_ratios(table: Table) -> list[str]:
    """Transformer / GNN cost per setting: the paper's efficiency claim in one line each."""
    lines = []
    for setting in table.settings():
        tf, gnn = table.find(setting, "transformer"), table.find(setting, "gnn")
        if tf and gnn:
            lines.append(f"{setting}: Transformer / GNN forward FLOPs per cell {_ratio(tf.flops, gnn.flops)}, "
                         f"peak training memory {_ratio(tf.memory, gnn.memory)}")
    return lines


def write_csv(table: Table, path: Path) -> Path:
    """Numbers, not strings: one line per row, accuracies as fractions."""
    fields = ["setting", "backbone", "preset", "hidden", "seq_len", "flops_forward_per_cell", "peak_memory_bytes",
              *[f"{d}_accuracy_{s}" for d in table.datasets for s in ("mean", "std")], "average_accuracy",
              "gnn_minus_tf", "pretraining_run_id"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in table.rows:
            accuracy = [v for d in table.datasets for v in row.accuracy.get(d, (math.nan, math.nan))]
            writer.writerow([table.setting(row), row.backbone, row.preset, row.hidden, row.seq_len, row.flops,
                             row.memory, *accuracy, row.average(table.datasets), table.difference(row),
                             row.pretraining_run_id])
    return path


def bar_chart(table: Table, path: Path) -> Path:
    groups = [*table.datasets, "Average"]
    series = {}
    for row in table.rows:
        means = [100 * row.accuracy.get(d, (math.nan, 0))[0] for d in table.datasets]
        stds = [100 * row.accuracy.get(d, (0, 0))[1] for d in table.datasets]
        series[f"{table.setting(row)} {_model(row.backbone)}"] = (
            [*means, 100 * row.average(table.datasets)], [*stds, math.nan])
    return grouped_bar_chart(groups, series, path, title="Linear-probe accuracy (Table II)", ylabel="accuracy %")


def run_compare(cfg: CompareConfig) -> Table:
    """Collect, print, write table2.csv / table2.md / table2.png, and log them to a ``compare`` run."""
    experiment, uri = cfg.experiment, cfg.mlflow_uri
    table = collect(experiment, uri)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(table)
    extra = [*cost_ratios(table), *table.notes]
    (out / "table2.md").write_text(f"Table II, experiment {experiment}: linear-probe accuracy % (mean ± std over "
                                   "repeats); FLOPs = forward FLOPs per cell; Mem = peak training memory\n\n"
                                   + text + "\n" + "".join(f"\n- {line}" for line in extra) + "\n")
    paths = [write_csv(table, out / "table2.csv"), out / "table2.md", bar_chart(table, out / "table2.png")]
    tracker = Tracker(active=True)
    tracker.start(uri, experiment, "table2", {"experiment": experiment},
                  {"scgraph.kind": COMPARE_KIND, "git_commit": git_commit()})
    for path in paths:
        tracker.artifact(path)
    tracker.end()
    print(f"Table II, experiment {experiment} (accuracy %, mean ± std over probe repeats; FLOPs forward per cell; "
          "Mem peak training memory)")
    print(text)
    for line in extra:
        print(f"  {line}")
    print(f"wrote {', '.join(str(p) for p in paths)}", flush=True)
    return table


COMMAND = Command(CompareConfig, run_compare, prog="launchers/compare.py")


def main(argv: Sequence[str] | None = None) -> int:
    """``launchers/compare.py``."""
    return run(COMMAND, argv)
