"""``launchers/compare.py``: the paper's Table II from the MLflow runs of one experiment.

A row is a (setting, backbone) pair, the setting being hidden size / genes per cell L as in the
paper (prefixed by the preset when the experiment holds more than one). Its cost columns come from
the pretraining run (the encoder's forward FLOPs per cell, peak training memory), its accuracy
columns from the probe runs linked to that run (tag ``pretraining_run_id``), one column per probed
dataset. When a row has several pretraining runs, the latest one with a probe is used and the
others are named in the notes; when a run was probed several times on a dataset, the latest probe
counts.
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
from scgraph.eval.config import CompareConfig
from scgraph.eval.evaluate import CONTROLS
from scgraph.eval.figures import grouped_bar_chart
from scgraph.models.config import BACKBONES, short_name
from scgraph.plots import line_plot
from scgraph.tracking import KIND, Tracker, check_store, client, git_commit, run_link, tracking_uri


def _order(backbone: str) -> int:
    """Paper order: the Transformer row first, then the GNN(s) compared with it."""
    return BACKBONES.index(backbone) if backbone in BACKBONES else len(BACKBONES)


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
    #: dataset -> control -> (mean, std): the probe's controls, run beside the encoder
    controls: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    probe_run_ids: dict[str, str] = field(default_factory=dict)
    loss: list[tuple[int, float]] = field(default_factory=list)
    #: the training recipe and objectives (runs from before recipes existed used the paper's)
    recipe: str = "paper"
    objectives: str = "mvp"

    def average(self, datasets: list[str]) -> float:
        means = [self.accuracy[d][0] for d in datasets if d in self.accuracy]
        return float(np.mean(means)) if means else math.nan


@dataclass
class Table:
    rows: list[Row]
    datasets: list[str]
    notes: list[str]
    several_presets: bool
    experiment_id: str = ""
    several_recipes: bool = False

    def setting(self, row: Row) -> str:
        """The row's label: hidden/L, after the preset and the recipe when the table holds several."""
        return " ".join([*([row.preset] if self.several_presets else []),
                         *([row.recipe] if self.several_recipes else []), f"{row.hidden}/{row.seq_len}"])

    def recipes(self) -> str:
        """Which training recipe(s) the rows used, for the table's caption."""
        used = dict.fromkeys(f"{r.recipe} (objectives {r.objectives})" for r in self.rows)
        return "recipe " + ", ".join(used) if len(used) == 1 else "recipes " + ", ".join(used)

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
    probes = [r for r in runs if r.data.tags.get(KIND) == "probe"]
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
               tags.get("backbone", "?"), p.get("run.train.recipe", "paper"), p.get("run.train.objectives", "mvp"))
        grouped[key][tags.get("pretraining_run_id", "none")][tags.get("dataset", "data")] = probe

    rows, notes = [], []
    for key, per_run in grouped.items():
        latest = max(per_run, key=lambda rid: max(p.info.start_time for p in per_run[rid].values()))
        older = sorted(set(per_run) - {latest})
        if older:
            notes.append(f"{key[3]} {key[1]}/{key[2]} ({key[0]}): using pretraining run {latest}; older run(s) "
                         f"{', '.join(older)} left out")
        row = Row(*key[:4], pretraining_run_id=latest, recipe=key[4], objectives=key[5])
        source = pretraining(latest)
        if source is not None:
            metrics = source.data.metrics
            # the encoder's forward (runs logged before it was counted apart: the model's forward)
            row.flops = metrics.get("cost/encoder_flops_per_cell", metrics.get("cost/forward_flops_per_cell", math.nan))
            row.memory = metrics.get("cost/peak_memory_mib", math.nan) * 2**20
            row.loss = sorted((m.step, m.value) for m in store.get_metric_history(latest, "train/loss"))
        else:
            notes.append(f"{key[3]} {key[1]}/{key[2]}: pretraining run {latest} not found, no FLOPs or memory")
        for dataset, probe in per_run[latest].items():
            m = probe.data.metrics
            row.accuracy[dataset] = (m["probe/accuracy_mean"], m.get("probe/accuracy_std", 0.0))
            row.controls[dataset] = {c: (m[f"probe/{c}/accuracy_mean"], m.get(f"probe/{c}/accuracy_std", 0.0))
                                     for c in CONTROLS if f"probe/{c}/accuracy_mean" in m}
            row.probe_run_ids[dataset] = probe.info.run_id
        rows.append(row)
    rows.sort(key=lambda r: (r.preset, r.recipe, r.hidden, r.seq_len, _order(r.backbone), r.backbone))
    datasets = sorted({d for r in rows for d in r.accuracy})
    return Table(rows, datasets, notes, several_presets=len({r.preset for r in rows}) > 1,
                 experiment_id=found.experiment_id, several_recipes=len({r.recipe for r in rows}) > 1)


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
        out.append(["Average", short_name(backbone), "", "", *[_percent(m) for m in means], _percent(average),
                    _signed(diff)])
    return out


def table_rows(table: Table) -> list[list[str]]:
    """Table II as strings: one line per (setting, backbone), then the averages over settings."""
    out = []
    for row in table.rows:
        diff = table.difference(row)
        out.append([table.setting(row), short_name(row.backbone), _si(row.flops), _si(row.memory, "B"),
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


def controls_markdown(table: Table) -> str:
    """The encoders beside the probe's controls, per dataset: what pretraining earned."""
    names = [c for c in CONTROLS if any(c in r.controls.get(d, {}) for r in table.rows for d in table.datasets)]
    header = ["Settings", "Model", "Dataset", "pretrained", *[CONTROLS[c] for c in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        for dataset in table.datasets:
            if dataset in row.accuracy:
                cells = [_percent(*row.controls[dataset][c]) if c in row.controls[dataset] else "–" for c in names]
                lines.append("| " + " | ".join([table.setting(row), short_name(row.backbone), dataset,
                                                _percent(*row.accuracy[dataset]), *cells]) + " |")
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
    """Numbers, not strings: one line per row, accuracies as fractions, the controls beside them."""
    columns = [(d, c) for d in table.datasets for c in CONTROLS]
    fields = ["setting", "backbone", "preset", "recipe", "objectives", "hidden", "seq_len", "forward_flops_per_cell",
              "peak_memory_bytes",
              *[f"{d}_accuracy_{s}" for d in table.datasets for s in ("mean", "std")],
              *[f"{d}_{c}_accuracy_mean" for d, c in columns], "average_accuracy", "gnn_minus_tf",
              "pretraining_run_id"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in table.rows:
            accuracy = [v for d in table.datasets for v in row.accuracy.get(d, (math.nan, math.nan))]
            controls = [row.controls.get(d, {}).get(c, (math.nan, math.nan))[0] for d, c in columns]
            writer.writerow([table.setting(row), row.backbone, row.preset, row.recipe, row.objectives, row.hidden,
                             row.seq_len, row.flops,
                             row.memory, *accuracy, *controls, row.average(table.datasets), table.difference(row),
                             row.pretraining_run_id])
    return path


def loss_overlay(table: Table, path: Path) -> Path:
    """Every row's pretraining loss on one pair of axes, so the backbones compare at a glance."""
    curves = {f"{table.setting(r)} {short_name(r.backbone)}": tuple(zip(*r.loss)) for r in table.rows if r.loss}
    return line_plot(curves, path, title=f"Pretraining loss, {table.recipes()}", xlabel="step",
                     ylabel="weighted loss (MSE)")


def bar_chart(table: Table, path: Path) -> Path:
    groups = [*table.datasets, "Average"]
    series = {}
    for row in table.rows:
        means = [100 * row.accuracy.get(d, (math.nan, 0))[0] for d in table.datasets]
        stds = [100 * row.accuracy.get(d, (0, 0))[1] for d in table.datasets]
        series[f"{table.setting(row)} {short_name(row.backbone)}"] = (
            [*means, 100 * row.average(table.datasets)], [*stds, math.nan])
    return grouped_bar_chart(groups, series, path, title="Linear-probe accuracy (Table II)", ylabel="accuracy %")


def run_compare(cfg: CompareConfig) -> Table:
    """Collect, print, write table2.csv / table2.md / table2.png / loss overlay, and log them to a
    ``compare`` run that lists and links every run it read."""
    experiment, uri = cfg.experiment, cfg.mlflow_uri
    table = collect(experiment, uri)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text, controls = markdown(table), controls_markdown(table)
    extra = [*cost_ratios(table), *table.notes]
    (out / "table2.md").write_text(f"Table II, experiment {experiment}, {table.recipes()}: linear-probe accuracy % "
                                   "(mean ± std over repeats); FLOPs = forward FLOPs per cell; Mem = peak training "
                                   "memory\n\n"
                                   + text + "\n" + "".join(f"\n- {line}" for line in extra)
                                   + "\n\nThe encoders beside the probe's controls (accuracy %):\n\n" + controls + "\n")
    paths = [write_csv(table, out / "table2.csv"), out / "table2.md", bar_chart(table, out / "table2.png")]
    if any(r.loss for r in table.rows):
        paths.append(loss_overlay(table, out / "loss_overlay.png"))
    _track(table, experiment, uri, paths)
    print(f"Table II, experiment {experiment}, {table.recipes()} (accuracy %, mean ± std over probe repeats; FLOPs "
          "forward per cell; Mem peak training memory)")
    print(text)
    for line in extra:
        print(f"  {line}")
    print("The encoders beside the probe's controls (accuracy %):")
    print(controls)
    print(f"wrote {', '.join(str(p) for p in paths)}", flush=True)
    return table


def _track(table: Table, experiment: str, uri: str | None, paths: list[Path]) -> None:
    """The Table II run: its description links every pretraining and probe run it read."""
    links = []
    for row in table.rows:
        name = f"{table.setting(row)} {short_name(row.backbone)}"
        probes = ", ".join(run_link(table.experiment_id, rid, f"probe on {d}") for d, rid in row.probe_run_ids.items())
        links.append(f"- {name}: {run_link(table.experiment_id, row.pretraining_run_id, 'pretraining')}; {probes}")
    description = (f"Table II of experiment {experiment}: cost and linear-probe accuracy of every (setting, backbone), "
                   "from these runs:\n" + "\n".join(links))
    read = {"pretraining_runs": ",".join(r.pretraining_run_id for r in table.rows),
            "probe_runs": ",".join(rid for r in table.rows for rid in r.probe_run_ids.values())}
    tracker = Tracker()
    tracker.start(uri, experiment, "table2", "compare", description, {"experiment": experiment} | read,
                  {"git_commit": git_commit()} | read)
    for path in paths:
        tracker.artifact(path)
    tracker.end()


COMMAND = Command(CompareConfig, run_compare, prog="launchers/compare.py")


def main(argv: Sequence[str] | None = None) -> int:
    """``launchers/compare.py``."""
    return run(COMMAND, argv)
