"""Command line of the synthetic study: every ``StudyConfig`` field as an option, then run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from scgraph.config import BLOCK_LAYOUTS
from scgraph.synthetic.config import BETA_RANGE, INITS, StudyConfig
from scgraph.synthetic.generators import GENERATORS
from scgraph.synthetic.study import run_study


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(
        prog="launchers/synthetic.py",
        description="The synthetic relative-position study (paper Table I, Figure 3): per (beta, sigma) "
                    "train a one-layer Transformer and GNN (hidden 8) on masked value prediction and "
                    "compare their best test MSE. Writes OUT/table1.csv, table1.txt, "
                    "fig3a_best_loss_vs_beta.png, fig3b_test_loss_curves.png, results.json, and logs to "
                    "MLflow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--generator", default=d.generator, choices=GENERATORS,
                   help="value generator of SPEC §2 (static_predecessor: SPEC's default, the closest to "
                        "the paper's shape when SPEC tried them)")
    p.add_argument("--betas", type=_floats, default=d.betas, metavar="B,B,...",
                   help=f"relative-position coefficients, each in [{BETA_RANGE[0]:g}, {BETA_RANGE[1]:g}]")
    p.add_argument("--sigmas", type=_floats, default=d.sigmas, metavar="S,S,...",
                   help="std of the exogenous values, each > 0")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per dataset")
    p.add_argument("--train-fraction", type=float, default=d.train_fraction,
                   help="share of samples for training; the rest is the test set")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs per model")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="datasets (and model inits) per setting; losses are averaged over them")
    p.add_argument("--alpha", type=float, default=d.alpha, help="absolute-position coefficient")
    p.add_argument("--mu", type=_floats, default=d.mu, metavar="M,M,M,M",
                   help="means of the exogenous values of tokens A, B, C, D")
    p.add_argument("--w-seed", type=int, default=d.w_seed,
                   help="seed of the static coefficients w ~ U(-0.5, 0.5), shared by every setting")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the datasets and model inits")
    p.add_argument("--hidden", type=int, default=d.hidden, help="model width")
    p.add_argument("--mlp-ratio", type=float, default=d.mlp_ratio,
                   help="feed-forward width / hidden in the Block (0: no feed-forward, the paper's "
                        "'single layer' between linear input and output layers)")
    p.add_argument("--block-layout", default=d.block_layout, choices=BLOCK_LAYOUTS,
                   help="layout of the shared Block (post_norm: the mixer reads the linear input layer's "
                        "output, as in the paper; see scgraph/synthetic/models.py)")
    p.add_argument("--heads", type=int, default=d.heads, help="Transformer attention heads")
    p.add_argument("--no-position-embedding", dest="position_embedding", action="store_false",
                   help="drop the learned absolute-position embedding from both models (embedding on: "
                        "%(default)s)")
    p.add_argument("--init", default=d.init, choices=INITS,
                   help="initialisation of the Linear layers: pytorch (PyTorch's default, as the paper's "
                        "nn layers) or census (N(0, 0.02), the large models'; slow to leave the flat "
                        "attention saddle at hidden 8)")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="feed raw values instead of values standardized by the training set's mean "
                        "and std (losses are reported in the generator's units either way; standardize: "
                        "%(default)s)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="parallel processes, one thread each (1: run in this process)")
    p.add_argument("--out", default=str(d.out), help="output directory")
    p.add_argument("--mlflow-uri", default=None,
                   help="MLflow tracking URI; None means sqlite:///OUT/mlflow.db")
    p.add_argument("--experiment", default=d.experiment, help="MLflow experiment name")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = StudyConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    except ValueError as err:
        parser.error(str(err))
    run_study(cfg)
