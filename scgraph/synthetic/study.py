"""The study runner: every (beta, sigma, repeat, backbone) as one task over a process pool, results
gathered into Table I, written to OUT and logged to MLflow as they arrive.

A task derives its dataset seed from (seed, repeat, beta, sigma) only, so both models of a setting
see the same data, and a reduced grid reproduces the full grid's settings exactly. Each setting is
logged and ``results.json`` rewritten the moment it completes, so an interrupted study keeps what
it finished.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from scgraph.cli import Command, run
from scgraph.io.files import check_directory
from scgraph.models.model import count_parameters
from scgraph.synthetic.bounds import floors
from scgraph.synthetic.config import StudyConfig
from scgraph.synthetic.generators import static_coefficients
from scgraph.synthetic.models import build_synthetic_model
from scgraph.synthetic.report import (
    SettingResult,
    format_floors,
    format_table,
    plot_best_loss_vs_beta,
    plot_curves,
    ratio_average,
    write_csv,
    write_floors_csv,
)
from scgraph.synthetic.train import BACKBONE_LABELS, Curve, Task, run_task, single_thread
from scgraph.tracking import Tracker, git_commit


def tasks_of(cfg: StudyConfig) -> list[Task]:
    """Sigma-major, smallest first: an interrupted study has whole Table I columns, the paper's
    headline sigma = 0.1 column first."""
    return [Task(b, s, r, backbone) for s in sorted(cfg.sigmas) for b in sorted(cfg.betas)
            for r in range(cfg.repeats) for backbone in BACKBONE_LABELS]


def parameter_counts(cfg: StudyConfig) -> dict[str, int]:
    """Trainable parameters per model, to show the comparison is at the same scale."""
    counts = {}
    for backbone, label in BACKBONE_LABELS.items():
        model = build_synthetic_model(cfg, backbone)
        counts[f"params_{label.lower()}"] = count_parameters(model)["params_total"]
    return counts


def _start_tracking(cfg: StudyConfig) -> Tracker:
    """The study's MLflow run; each setting becomes a nested run as it completes."""
    tracker = Tracker()
    description = (f"Synthetic relative-position study (the paper's Table I): generator {cfg.generator}, betas "
                   f"{','.join(f'{b:g}' for b in cfg.betas)} x sigmas {','.join(f'{s:g}' for s in cfg.sigmas)}, "
                   f"{cfg.samples:,} samples, {cfg.epochs} epochs, {cfg.repeats} repeat(s); a nested run per setting.")
    tracker.start(cfg.mlflow_uri, cfg.experiment, f"table1-{cfg.generator}", "synthetic", description,
                  cfg.params() | parameter_counts(cfg), {"git_commit": git_commit()})
    return tracker


def _log_setting(tracker: Tracker, result: SettingResult) -> None:
    points = [(f"study/{k}", v, 0) for k, v in result.row().items() if k not in ("beta", "sigma")]
    for backbone, label in BACKBONE_LABELS.items():
        for r, curve in enumerate(result.curves[backbone]):
            suffix = f"_r{r}" if len(result.curves[backbone]) > 1 else ""
            points += [(f"study/{label.lower()}_test_loss{suffix}", v, epoch)
                       for epoch, v in enumerate(curve.test_losses, 1)]
            points.append((f"study/{label.lower()}_best_epoch{suffix}", curve.best_epoch, 0))
    tracker.child(f"beta={result.beta:g} sigma={result.sigma:g}", {"beta": result.beta, "sigma": result.sigma},
                  points)


def _finish_tracking(tracker: Tracker, results: list[SettingResult], out: Path, seconds: float) -> None:
    tracker.metrics({"study/seconds": seconds} | {f"study/ratio_avg_beta_{beta:g}": ratio_average(results, beta)
                                                 for beta in sorted({r.beta for r in results})})
    for path in sorted(out.glob("*.csv")) + sorted(out.glob("*.png")) + sorted(out.glob("*.txt")):
        tracker.artifact(path)
    tracker.artifact(out / "results.json")
    tracker.end()


def _save_json(cfg: StudyConfig, results: list[SettingResult], path: Path, seconds: float | None = None) -> None:
    payload = {"config": cfg.params(), "seconds": seconds, "settings": [
        {**r.row(), "curves": {b: [c.test_losses for c in cs] for b, cs in r.curves.items()}}
        for r in sorted(results, key=lambda r: (r.beta, r.sigma))]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


#: The reduced protocol: half the paper's samples and epochs, batch 64 (four times the steps per
#: epoch) and lr 3e-3. At batch 256 the hidden-8 Transformer needs more steps than 100 epochs give
#: to find its routing: at lr 3e-3 one of three datasets stalled at 0.061 at beta = 0.4,
#: sigma = 0.1 (its floor 0.007; the others 0.014-0.018), and neither warmup, a cosine decay, nor lr
#: 1e-2 freed it (0.039-0.064); batch 64 gave 0.009-0.014 on all six runs at beta 0.4-0.5. About 10
#: minutes for the whole grid on two cores, against 54 for the paper's protocol with three repeats.
REDUCED = dict(samples=10_000, epochs=100, lr=3e-3, batch_size=64)

#: Fields that say where and how a study ran, not what it computed.
RUN_FIELDS = ("workers", "out", "mlflow_uri", "experiment", "overwrite")


def _same_settings(cfg: StudyConfig, payload: dict[str, Any]) -> bool:
    """Whether ``results.json``'s ``payload`` was computed with ``cfg``'s settings (``RUN_FIELDS`` aside)."""
    return {k: v for k, v in payload["config"].items() if k not in RUN_FIELDS} == {
        k: v for k, v in cfg.params().items() if k not in RUN_FIELDS}


def load_results(cfg: StudyConfig) -> tuple[list[SettingResult], float] | None:
    """The settings and run time in ``cfg.out/results.json`` if that study finished with ``cfg``'s
    settings (``RUN_FIELDS`` may differ), else None: a benchmark reuses a grid that took most of an hour."""
    path = cfg.out / "results.json"
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    if payload.get("seconds") is None or not _same_settings(cfg, payload):
        return None
    return [SettingResult(s["beta"], s["sigma"], {b: [Curve(losses) for losses in cs] for b, cs in s["curves"].items()})
            for s in payload["settings"]], payload["seconds"]


def _completed(cfg: StudyConfig):
    """(task, curve) pairs as they finish: in a pool of ``cfg.workers`` processes, or in-process."""
    tasks = tasks_of(cfg)
    if cfg.workers == 1:
        threads = torch.get_num_threads()
        single_thread()
        try:
            yield from (run_task(cfg, t) for t in tasks)
        finally:
            torch.set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch state in the workers
    with ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=single_thread) as pool:
        futures = [pool.submit(run_task, cfg, t) for t in tasks]
        for future in as_completed(futures):
            yield future.result()


def run_study(cfg: StudyConfig, *, progress: bool = True, log: bool = True) -> list[SettingResult]:
    """Run the grid; write table1.csv, table1.txt, the figures and results.json under ``cfg.out``;
    print Table I; log everything to MLflow unless ``log`` is False. Results of a study with other
    settings in ``cfg.out`` are refused unless ``cfg.overwrite``."""
    check_directory("--out", cfg.out)
    previous = cfg.out / "results.json"
    if previous.is_file() and not cfg.overwrite and not _same_settings(cfg, json.loads(previous.read_text())):
        raise FileExistsError(f"--out {cfg.out} holds the results of a study with other settings: choose a new --out, "
                              "or --overwrite to replace them")
    cfg.out.mkdir(parents=True, exist_ok=True)
    tracker = _start_tracking(cfg) if log else None
    start = time.perf_counter()
    pending: dict[tuple[float, float], list[tuple[Task, Curve]]] = defaultdict(list)
    results: list[SettingResult] = []
    per_setting = cfg.repeats * len(BACKBONE_LABELS)
    with tqdm(total=len(cfg.betas) * len(cfg.sigmas), desc="settings", unit="setting",
              disable=not progress) as bar:
        for task, curve in _completed(cfg):
            pending[task.setting].append((task, curve))
            if len(pending[task.setting]) < per_setting:
                continue
            done = SettingResult(task.beta, task.sigma)
            for t, c in sorted(pending.pop(task.setting), key=lambda tc: tc[0].repeat):
                done.curves.setdefault(t.backbone, []).append(c)
            results.append(done)
            _save_json(cfg, results, cfg.out / "results.json")
            if tracker:
                _log_setting(tracker, done)
            bar.set_postfix(beta=f"{done.beta:g}", sigma=f"{done.sigma:g}", ratio=f"{done.ratio:.2f}")
            bar.update()
    seconds = time.perf_counter() - start
    _save_json(cfg, results, cfg.out / "results.json", seconds)
    print(write_report(cfg, results, seconds))
    if tracker:
        _finish_tracking(tracker, results, cfg.out, seconds)
    return results


def write_report(cfg: StudyConfig, results: list[SettingResult], seconds: float) -> str:
    """Table I with the floors under it (returned, and in table1.txt), table1.csv, floors.csv and
    Figure 3 under ``cfg.out``."""
    title = (f"Table I: best test MSE (mean ± std over repeats), generator {cfg.generator}, {cfg.samples} samples, "
             f"{cfg.epochs} epochs, {cfg.repeats} repeat(s), {seconds / 60:.1f} min")
    bounds = [floors(cfg.generator, beta=r.beta, sigma=r.sigma, w=static_coefficients(cfg.w_seed),
                     alpha=cfg.alpha, mu=cfg.mu, seed=cfg.seed) for r in results]
    table = format_table(results, title) + "\n\n" + format_floors(bounds)
    (cfg.out / "table1.txt").write_text(table + "\n")
    write_csv(results, cfg.out / "table1.csv")
    write_floors_csv(bounds, cfg.out / "floors.csv")
    plot_best_loss_vs_beta(results, cfg.out / "fig3a_best_loss_vs_beta.png", bounds)
    plot_curves(results, cfg.out / "fig3b_test_loss_curves.png")
    return table


COMMAND = Command(StudyConfig, run_study, prog="launchers/synthetic.py")


def main(argv: Sequence[str] | None = None) -> int:
    """``launchers/synthetic.py``."""
    return run(COMMAND, argv)
