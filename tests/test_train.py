"""Training basics on real cells: both backbones can fit, and the run config is validated."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from plain_loop import iterate_batches, train_plain

from scgraph.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from scgraph.data.batch import make_batch
from scgraph.data.datasets import load_cbmc
from scgraph.models.model import build_model


@pytest.fixture(scope="module")
def cbmc():
    return load_cbmc()


@pytest.mark.parametrize("backbone", ["transformer", "gnn"])
@pytest.mark.parametrize("preset", ["symmetric", "scbenchmark"])
def test_backbone_overfits_a_tiny_fixed_batch(cbmc, backbone, preset):
    tok = TokenizerConfig(seq_len=32, cls_token=preset == "scbenchmark")
    batch = make_batch(cbmc.counts[:8], tok, cbmc.counts.shape[1], 0.25, np.random.default_rng(0))
    model = build_model(ModelConfig(backbone=backbone, preset=preset, vocab_size=cbmc.counts.shape[1],
                                    hidden=32, layers=2, heads=4, adjacency_rank=8))
    history = train_plain(model, itertools.repeat(batch), TrainConfig(lr=3e-3, max_steps=150, grad_clip=None))
    first, last = history.losses[0], history.mean_loss(10)
    assert last < first / 10, f"{backbone}/{preset}: loss {first:.3f} -> {last:.3f}"


def test_training_on_real_cells_beats_predicting_the_mean(cbmc):
    """A few steps on fresh batches of real CBMC cells must learn more than the mean value."""
    tok = TokenizerConfig(seq_len=64)
    vocab = cbmc.counts.shape[1]
    model = build_model(ModelConfig(backbone="gnn", preset="symmetric", vocab_size=vocab, hidden=32,
                                    layers=1, heads=4, adjacency_rank=8))
    batches = iterate_batches(cbmc.counts, tok, vocab, batch_size=32, mask_ratio=0.15, seed=0)
    history = train_plain(model, batches, TrainConfig(recipe="paper", lr=2e-3, max_steps=120))  # MVP, no decay
    held_out = make_batch(cbmc.counts[-256:], tok, vocab, 0.15, np.random.default_rng(1))
    target = held_out.values[held_out.masked]
    with torch.no_grad():
        pred = model.eval()(held_out.genes, held_out.values, held_out.masked)[held_out.masked]
    assert ((pred - target) ** 2).mean() < 0.8 * ((target - target.mean()) ** 2).mean()
    assert history.cells == 120 * 32 and history.cells_per_second > 0


def test_iterate_batches_is_reproducible(cbmc):
    tok = TokenizerConfig(seq_len=16)
    take = lambda seed: list(itertools.islice(
        iterate_batches(cbmc.counts[:100], tok, 500, batch_size=10, mask_ratio=0.15, seed=seed), 12))
    a, b, c = take(3), take(3), take(4)
    assert all(torch.equal(x.genes, y.genes) and torch.equal(x.masked, y.masked) for x, y in zip(a, b))
    assert not all(torch.equal(x.genes, y.genes) for x, y in zip(a, c))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": ModelConfig(backbone="gnn", preset="scbenchmark"), "tokenizer": TokenizerConfig(cls_token=False)},
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
    assert RunConfig().tokenizer.cls_token is True  # scbenchmark: CLS cell embedding
    assert RunConfig(model=ModelConfig(preset="symmetric")).tokenizer.cls_token is False
