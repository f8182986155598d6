"""Training through the product's one trainer (``run_pretraining``: the Pretrainer's whole
lifecycle) with the default recipe (``cell``: the cell's expression profile reconstructed from its
embedding) on real CBMC cells, one rank, in this process. Two ranks under the real deepspeed
launcher: tests/test_pretrain.py. The run config's validation is tested here too."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import moved_from_init

from scgraph.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from scgraph.data.batch import SparseBatch
from scgraph.data.tokenize import build_batch
from scgraph.io.counts import log1p_cp10k
from scgraph.train.checkpointer import load_pretrained
from scgraph.train.config import PretrainConfig
from scgraph.train.trainer import run_pretraining
from sharding.cli import main as sharding

STEPS = 200
HELD_OUT = 1000
#: the default recipe (cell: recon), the default model (Transformer, scbenchmark preset), made small
RUN = RunConfig(model=ModelConfig(hidden=32, layers=2, heads=4), tokenizer=TokenizerConfig(seq_len=64),
                train=TrainConfig(batch_size=32, max_steps=STEPS, log_every=10))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cbmc):
    """CBMC less 1,000 held-out cells, sharded by the sharding tool and pretrained for 200 steps by
    ``run_pretraining`` (plain python: world size 1). Returns (output, MLflow run, held-out cells,
    the pretraining cells)."""
    folder = tmp_path_factory.mktemp("train")
    held = np.zeros(cbmc.n_obs, dtype=bool)
    held[np.random.default_rng(0).choice(cbmc.n_obs, HELD_OUT, replace=False)] = True
    cbmc[~held].write_h5ad(folder / "pretrain.h5ad")
    assert sharding(["write", "--quiet", "--h5ad", str(folder / "pretrain.h5ad"), "--out", str(folder / "shards"),
                     "--cells-per-shard", "2000"]) == 0
    store = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = PretrainConfig(run=RUN, shards=str(folder / "shards"), output=str(folder / "run"), mlflow_uri=store,
                         experiment="train", system_metrics=False, peak_tflops=1.0)
    assert run_pretraining(cfg) == 0
    mlflow.set_tracking_uri(store)
    (run,) = mlflow.search_runs(experiment_names=["train"], output_format="list")
    return folder / "run", run, sp.csr_matrix(cbmc.X[held]), sp.csr_matrix(cbmc.X[~held])


def test_the_default_recipe_reconstructs_held_out_cells_better_than_the_average_cell(trained):
    """What the recon objective claims, checked apart from its code: from the embedding of a masked
    held-out cell the model predicts the cell's whole log1p CP10k profile (all 500 genes) better
    than the mean profile of the pretraining cells does, the prediction the decoder starts from.
    (Measured: 0.86 of the average cell's error after 200 steps.)"""
    out, _, held, pretrain = trained
    pretrained = load_pretrained(out)
    model, run = pretrained.model.eval(), pretrained.run
    genes = held.shape[1]
    batch = build_batch(SparseBatch.from_csr(held, (5,), genes), run.tokenizer, genes, run.train.mask_ratio)
    with torch.no_grad():
        _, predicted = model(batch.genes, batch.values, batch.masked, torch.arange(genes).expand(held.shape[0], -1))
    truth = log1p_cp10k(held).toarray()
    average_cell = np.asarray(log1p_cp10k(pretrain).mean(axis=0))
    model_error = ((predicted.numpy() - truth) ** 2).mean()
    average_error = ((average_cell - truth) ** 2).mean()
    assert model_error < 0.93 * average_error, (model_error, average_error)


def test_training_moves_the_encoder_and_leaves_the_value_head_to_weight_decay(trained):
    """Every weight matrix of the encoder moved far from its initialisation (the run's seed rebuilds
    it), while the MVP value head, which the recon objective does not train, moved only by weight
    decay: the step trained what the recipe says."""
    moved = moved_from_init(trained[0])
    encoder = {name: m for name, m in moved.items() if name.startswith(("embed.", "blocks."))}
    assert len(encoder) >= 10 and min(encoder.values()) > 0.1, encoder
    assert moved["head.weight"] < 0.02, moved["head.weight"]


def test_the_loss_falls_and_the_telemetry_counts_the_flops_of_the_default_recipe_by_hand(trained):
    """The FLOPs per cell the run logs are those of what trains, counted here by hand (matrix
    products, multiply-add = 2): the Transformer encoder of the scbenchmark preset on L = 64 genes
    (the cell embedding is their mean: no CLS token), the value head (forward only: recon does not
    read it), and the gene decoder scoring all 500 genes (the profile covers the whole vocabulary
    when it is smaller than --recon-genes). Backward costs each product twice, but the value encoder's first layer (its
    input, the data, takes no gradient) once."""
    _, run, *_ = trained
    metrics = run.data.metrics
    n, d, genes, layers = 64, 32, 500, 2
    value_encoder = 2 * n * d + 2 * n * d * d  # Linear(1, d), ReLU, Linear(d, d)
    layer = 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * d  # qkv, QK^T, PV, out,
    encoder = value_encoder + layers * layer  # feed-forward of width d
    head = 2 * n * d
    decoder = 2 * d * d + 2 * d * genes  # projection of the cell embedding, one score per gene
    forward = encoder + head + decoder
    backward = 2 * encoder - 2 * n * d + 2 * decoder
    for name, count in (("encoder", encoder), ("train_forward", forward), ("train", forward + backward)):
        assert metrics[f"cost/{name}_flops_per_cell"] == count, name
        assert metrics[f"cost/{name}_flops_per_cell_analytic"] == count, name
    tflops = metrics["train/cells_per_s"] * (forward + backward) / 1e12
    assert metrics["train/tflops"] == pytest.approx(tflops) and metrics["train/mfu"] == pytest.approx(tflops / 1.0)
    loss = [m.value for m in sorted(mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss"),
                                    key=lambda m: m.step)]
    assert len(loss) == STEPS // 10 and max(loss[-3:]) < 0.95 * loss[0], loss


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": ModelConfig(backbone="gnn", cell_embedding="cls"), "tokenizer": TokenizerConfig(cls_token=False)},
     "cell_embedding is 'cls' but tokenizer.cls_token is off"),
    ({"model": ModelConfig(value_encoder="bins", cell_embedding="mean", preset="symmetric")},
     "value_encoder is 'bins' but tokenizer.n_bins is not set"),
])
def test_mismatched_run_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mask_ratio": 0.0}, "mask_ratio must be in"),
    ({"lr": -1.0}, "lr must be > 0"),
    ({"max_steps": 0}, "max_steps must be > 0"),
])
def test_bad_train_config_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_run_config_resolves_the_cls_token_from_the_cell_embedding():
    assert RunConfig().tokenizer.cls_token is False  # both presets read the mean of the gene states
    assert RunConfig(model=ModelConfig(cell_embedding="cls")).tokenizer.cls_token is True  # the authors' readout
    assert RunConfig(model=ModelConfig(preset="symmetric")).tokenizer.cls_token is False
