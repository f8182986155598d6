"""The training recipe: learning-rate schedule, weight-decay groups, objectives, gene choice,
validation loss."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import generated_anndata, generated_counts

from scgraph.cli import run
from scgraph.config import RECIPES, ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from scgraph.data.batch import Batch, SparseBatch
from scgraph.data.tokenize import build_batch, mean_profile, tokenize
from scgraph.models.model import build_model, mvp_loss
from scgraph.train.config import PretrainConfig
from scgraph.train.objectives import pretraining_loss, weighted_mse
from scgraph.train.optim import lr_factor, param_groups, scheduler
from scgraph.train.trainer import COMMAND as PRETRAIN
from scgraph.train.trainer import Pretrainer
from sharding.cli import main as sharding


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_linearly_then_decays_to_the_minimum_at_the_last_step(schedule):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, lr_schedule=schedule, max_steps=19)
    factors = [lr_factor(step, cfg, 19) for step in range(19)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(0.1)  # min_lr / lr at the last step
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # never rises after the warmup
    assert factors[11] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay, both shapes
    progress = 3 / 14  # step 7: three of the decay's fourteen steps done
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    assert factors[7] == pytest.approx(0.1 + 0.9 * shape)
    assert lr_factor(50, cfg, 19) == pytest.approx(0.1)  # past the end: stays at the minimum


def test_constant_schedule_and_a_warmup_longer_than_the_run():
    cfg = TrainConfig(lr=1e-3, lr_schedule="constant", warmup_steps=0)
    assert {lr_factor(s, cfg, 10) for s in range(10)} == {1.0}
    cfg = TrainConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=8)
    assert lr_factor(3, cfg, 5) == 0.5 and math.isfinite(lr_factor(4, cfg, 5))


def test_the_scheduler_is_restored_from_its_state_like_a_resumed_run():
    cfg = TrainConfig(lr=1e-2, min_lr=0.0, warmup_steps=2, lr_schedule="cosine")
    params = [torch.nn.Parameter(torch.zeros(1))]
    first = torch.optim.AdamW(params, lr=cfg.lr)
    sched = scheduler(cfg, 10)(first)
    for _ in range(6):
        first.step()
        sched.step()
    state = sched.state_dict()
    second = torch.optim.AdamW(params, lr=cfg.lr)
    restored = scheduler(cfg, 10)(second)
    restored.load_state_dict(state)
    assert restored.get_last_lr() == sched.get_last_lr() == [pytest.approx(cfg.lr * lr_factor(6, cfg, 10))]


@pytest.mark.parametrize(("backbone", "preset"), [("gnn", "scbenchmark"), ("transformer", "symmetric")])
def test_weight_decay_reaches_only_the_linear_layers_weight_matrices(backbone, preset):
    model = build_model(ModelConfig(backbone=backbone, preset=preset, vocab_size=30, hidden=16, layers=2, heads=2,
                                    adjacency_rank=4))
    decayed, kept = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    decayed_names = {names[id(p)] for p in decayed["params"]}
    kept_names = {names[id(p)] for p in kept["params"]}
    assert all(n.endswith(".weight") and "norm" not in n and "embed.gene" not in n for n in decayed_names)
    assert "embed.gene.weight" in kept_names and "embed.mask_value" in kept_names
    assert any(n.endswith(".bias") for n in kept_names) and any("norm" in n for n in kept_names)
    if backbone == "gnn":  # the adjacency factors F, F' are tables, not weight matrices; its MLP's are
        assert {"blocks.0.mixer.adjacency.f.weight", "blocks.0.mixer.adjacency.f2.weight"} <= kept_names
        assert "blocks.0.mixer.adjacency.mlp.0.weight" in decayed_names
    assert len(decayed_names) + len(kept_names) == len(list(model.parameters()))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr_schedule": "step"}, "lr_schedule must be one of constant, cosine, linear"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"min_lr": 1.0, "lr": 0.1}, "min_lr must be in"),
])
def test_bad_schedule_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_recipes_fill_only_what_is_left_unset_and_the_paper_recipe_is_one_flag_away():
    cell = TrainConfig(max_steps=600)
    assert (cell.objectives, cell.lr, cell.lr_schedule, cell.weight_decay) == ("recon", 3e-3, "cosine", 0.01)
    assert cell.warmup_steps == 30  # 5 % of the run
    paper = TrainConfig(recipe="paper")
    assert (paper.objectives, paper.lr, paper.lr_schedule, paper.warmup_steps, paper.weight_decay) == \
        ("mvp", 2e-4, "constant", 0, 0.0)
    assert TrainConfig(recipe="paper", lr=1e-3, objectives="mvp:1,gepc:0.5").weights == {"mvp": 1.0, "gepc": 0.5}
    assert set(RECIPES) == {"cell", "paper"}
    # the decoder exists exactly when an objective reads the cell embedding
    assert RunConfig(train=TrainConfig(recipe="paper")).model.cell_decoder is False
    assert RunConfig(train=TrainConfig(objectives="mvp,gepc")).model.cell_decoder is True


def test_weighted_selection_draws_genes_in_proportion_to_their_values():
    counts = sp.csr_matrix(np.tile([[1.0, 3.0, 0.0, 4.0]], (4000, 1)))
    tok = TokenizerConfig(seq_len=1, selection="weighted", normalization="none", gene_dropout=0.0)
    cells = SparseBatch.from_csr(counts, (0,), 4)
    chosen = tokenize(cells, tok, 4, cells.generator()).genes[:, 0].numpy()
    share = np.bincount(chosen, minlength=4) / len(chosen)
    assert share == pytest.approx([1 / 8, 3 / 8, 0.0, 4 / 8], abs=0.025)
    top = tokenize(SparseBatch.from_csr(counts[:1], (0,), 4),
                   TokenizerConfig(seq_len=1, selection="top", normalization="none", gene_dropout=0.0), 4).genes
    assert top.tolist() == [[3]]


def test_the_profile_scores_expressed_genes_and_reweighted_unexpressed_ones():
    counts = sp.csr_matrix(np.array([[0, 0, 1, 0, 0, 3, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=float))
    tok = TokenizerConfig(normalization="none")
    p = build_batch(SparseBatch.from_csr(counts, (1,), 10), tok, 10, 0.15, recon_genes=3)
    p.genes, p.values, p.weight = p.profile_genes.numpy(), p.profile_values.numpy(), p.profile_weight.numpy()
    assert p.genes.shape == (2, 5)  # the most genes a cell expresses (2) + 3 draws
    assert p.genes[0, :2].tolist() == [2, 5] and p.values[0, :2].tolist() == [1.0, 3.0]
    assert p.genes[1, 0] == 0 and p.values[1, 0] == 2.0 and p.weight[1, 4] == 0.0  # its pad slot
    for row, expressed in ((0, {2, 5}), (1, {0})):
        drawn = p.genes[row, len(expressed):len(expressed) + 3]
        kept = drawn[drawn != 10]
        assert not set(kept.tolist()) & expressed and (p.values[row, len(expressed):] == 0).all()
        # weights: 1 per expressed gene, (vocabulary - expressed) / kept draws per kept draw
        assert p.weight[row, len(expressed):len(expressed) + 3][drawn != 10] == \
            pytest.approx((10 - len(expressed)) / len(kept))
        assert p.weight[row].sum() == pytest.approx(10.0)
    assert mean_profile(counts, tok, 10).tolist() == [1.0, 0, 0.5, 0, 0, 1.5, 0, 0, 0, 0]
    full = build_batch(SparseBatch.from_csr(counts, (1,), 10), tok, 10, 0.15, recon_genes=8)
    assert full.profile_genes.tolist() == [list(range(10))] * 2 and (full.profile_weight == 1).all()
    assert full.profile_values[0].tolist() == counts.toarray()[0].tolist()


def test_each_objective_on_a_hand_checked_case():
    assert weighted_mse(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0]),
                        torch.tensor([1.0, 2.0, 0.0])).item() == pytest.approx(8 / 3)
    torch.manual_seed(0)
    model = build_model(RunConfig(model=ModelConfig(vocab_size=6, hidden=4, layers=1, heads=1, cell_embedding="cls"),
                                  train=TrainConfig(objectives="mvp,gepc,recon")).model)
    dec = model.decoder
    with torch.no_grad():  # the decoder reads <c, q_g> + b_g exactly
        dec.proj.weight.copy_(torch.eye(4))
        dec.proj.bias.zero_()
        dec.genes.weight.copy_(torch.arange(32.0).view(8, 4) / 10)
        dec.bias.copy_(torch.arange(8.0))
    cell = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    assert dec(cell, torch.tensor([[3, 1]])).tolist() == [[pytest.approx(1.2 + 2 * 1.5 + 3),
                                                            pytest.approx(0.4 + 2 * 0.7 + 1)]]
    genes = torch.tensor([[7, 0, 2, 4], [7, 1, 3, 6]])  # CLS first (the authors' readout), one pad
    batch = Batch(genes, torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 5.0, 0.0]]),
                  torch.tensor([[False, True, False, False], [False, False, True, False]]),
                  torch.tensor([[0, 2, 4, 5], [1, 3, 0, 6]]),
                  torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]]),
                  torch.tensor([[1.0, 1.0, 1.0, 3.0], [1.0, 1.0, 2.0, 0.0]]))
    total, parts = pretraining_loss(model, batch, {"mvp": 1.0, "gepc": 0.5, "recon": 2.0})
    h = model.encode(batch.genes, batch.values, batch.masked)
    c = h[:, 0]
    assert parts["mvp"].item() == pytest.approx(mvp_loss(model.head(h).squeeze(-1), batch.values, batch.masked).item())
    assert parts["gepc"].item() == pytest.approx(mvp_loss(dec(c, genes), batch.values, batch.masked).item())
    pred = dec(c, batch.profile_genes)
    hand = (((pred - batch.profile_values) ** 2) * batch.profile_weight).sum() / batch.profile_weight.sum()
    assert parts["recon"].item() == pytest.approx(hand.item())
    assert total.item() == pytest.approx(parts["mvp"].item() + 0.5 * parts["gepc"].item() + 2 * parts["recon"].item())
    total.backward()
    assert model.decoder.proj.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("flags", "said"), [
    (["--objectives", "mvp:-1,recon"], "objectives: weight of mvp must be >= 0; got -1"),
    (["--objectives", "contrastive"], "objectives: unknown objective 'contrastive' (choose from mvp, gepc, recon)"),
    (["--objectives", "mvp:0"], "at least one objective needs a weight > 0"),
    (["--objectives", "mvp:1,recon,mvp:2"], "objectives: mvp is given twice in 'mvp:1,recon,mvp:2'"),
    (["--selection", "heaviest"], "invalid choice: 'heaviest'"),
])
def test_bad_objectives_are_one_line_errors(flags, said, tmp_path, capsys):
    code = run(PRETRAIN, ["--shards", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and said in err and err.count("\n") == 0, err


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    generated_anndata(generated_counts(240, 50, 12)).write_h5ad(folder / "cells.h5ad")
    assert sharding(["write", "--quiet", "--h5ad", str(folder / "cells.h5ad"), "--out", str(folder / "shards"),
                     "--cells-per-shard", "60"]) == 0
    return folder


def test_the_validation_loss_reads_only_held_out_shards_and_repeats_exactly(four_shards, tmp_path):
    run_cfg = RunConfig(model=ModelConfig(hidden=16, layers=1, heads=2, vocab_size=50),
                        tokenizer=TokenizerConfig(seq_len=8), train=TrainConfig(batch_size=8, max_steps=2))
    cfg = PretrainConfig(run=run_cfg, shards=str(four_shards / "shards"), output=str(tmp_path / "out"),
                         val_fraction=0.25, mlflow_uri=f"sqlite:///{tmp_path}/m.db", system_metrics=False)
    trainer = Pretrainer(cfg)
    trainer.setup()
    try:
        train_paths, held_paths = set(trainer.shards.shard_paths), set(trainer.val_shards.shard_paths)
        assert len(held_paths) == 1 and len(train_paths) == 3 and not train_paths & held_paths
        first, second = trainer.validate(), trainer.validate()
        assert first == second and math.isfinite(first)
        trainer.train()
        assert trainer.validate() != first  # training changed the model, not the held-out cells
    finally:
        trainer.cleanup()


def test_an_empty_validation_split_is_a_one_line_error(four_shards, tmp_path, capsys):
    one = four_shards / "one"
    assert sharding(["write", "--quiet", "--h5ad", str(four_shards / "cells.h5ad"), "--out", str(one)]) == 0
    code = run(PRETRAIN, ["--shards", str(one), "--val-fraction", "0.2", "--output", str(tmp_path / "o"),
                          "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "--hidden", "16", "--layers", "1",
                          "--batch-size", "8", "--seq-len", "8", "--max-steps", "1", "--no-system-metrics"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holding out a fraction of it for validation needs at least 2" in err, err


def test_two_runs_in_one_process_both_train_and_leave_no_launcher_variables(four_shards, tmp_path, capsys):
    """A notebook (or a test session) may pretrain twice in one process: the first run's teardown
    releases DeepSpeed's references to its process group, or the second meets them; and the
    launcher variables a run alone set for itself are gone after it (a later launch from the same
    process would inherit a stale rank and port)."""
    assert "RANK" not in os.environ
    for i in range(2):
        code = run(PRETRAIN, ["--shards", str(four_shards / "shards"), "--output", str(tmp_path / f"run{i}"),
                              "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "--hidden", "16", "--layers", "1",
                              "--batch-size", "8", "--seq-len", "8", "--max-steps", "2", "--no-system-metrics"])
        assert code == 0, capsys.readouterr().err
        assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)
