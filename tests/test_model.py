"""The two backbones: symmetry, padding, the fused GNN mixer, gradients, the MVP loss; the model's
names, which configs read without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import dense_graph_mixer
from torch import nn

from scgraph.config import ModelConfig
from scgraph.models import config as names
from scgraph.models import model
from scgraph.models.model import AttentionMixer, build_model, count_parameters, mvp_loss

ROOT = Path(__file__).resolve().parents[1]

G = 50


def small_config(backbone: str, preset: str = "symmetric", **overrides) -> ModelConfig:
    base = dict(backbone=backbone, preset=preset, vocab_size=G, hidden=32, layers=2, heads=4,
                adjacency_rank=8)
    return ModelConfig(**(base | overrides))


VARIANTS = [
    ("transformer", "symmetric", {}),
    ("gnn", "symmetric", {}),
    ("transformer", "scbenchmark", {"cell_embedding": "mean"}),
    ("gnn", "scbenchmark", {"cell_embedding": "mean"}),
    ("gnn", "symmetric", {"adjacency_shared": True, "graph_heads": 2}),
]
IDS = [f"{b}-{p}{'-' + '-'.join(o) if o else ''}" for b, p, o in VARIANTS]


def random_cells(batch: int, length: int, n_real: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    genes = torch.full((batch, length), G, dtype=torch.long)
    values = torch.zeros(batch, length)
    for i, k in enumerate(n_real):
        genes[i, :k] = torch.randperm(G, generator=gen)[:k]
        values[i, :k] = torch.rand(k, generator=gen) * 5
    return genes, values


@pytest.mark.parametrize(("backbone", "preset", "extra"), VARIANTS, ids=IDS)
def test_backbone_is_permutation_equivariant_in_genes(backbone, preset, extra):
    torch.manual_seed(0)
    model = build_model(small_config(backbone, preset, **extra)).eval()
    genes, values = random_cells(3, 12, [12, 12, 12])
    perm = torch.randperm(12)
    with torch.no_grad():
        h = model.encode(genes, values)
        h_perm = model.encode(genes[:, perm], values[:, perm])
        torch.testing.assert_close(h_perm, h[:, perm], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.cell_embedding(genes[:, perm], values[:, perm]),
                                   model.cell_embedding(genes, values), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("backbone", "preset", "extra"), VARIANTS, ids=IDS)
def test_backbone_ignores_extra_padding(backbone, preset, extra):
    torch.manual_seed(0)
    model = build_model(small_config(backbone, preset, **extra)).eval()
    genes, values = random_cells(2, 10, [7, 10])
    padded_genes = torch.cat([genes, torch.full((2, 6), G)], dim=1)
    padded_values = torch.cat([values, torch.randn(2, 6)], dim=1)  # junk values under padding
    with torch.no_grad():
        h = model.encode(genes, values)
        h_pad = model.encode(padded_genes, padded_values)
        real = genes != G
        torch.testing.assert_close(h_pad[:, :10][real], h[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.cell_embedding(padded_genes, padded_values),
                                   model.cell_embedding(genes, values), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adjacency", ["factorized", "symmetric_mlp"])
@pytest.mark.parametrize(("hidden", "rank", "graph_heads"), [(32, 8, 1), (32, 8, 2), (24, 16, 1)])
def test_gnn_mixer_matches_dense_softmax_adjacency(adjacency, hidden, rank, graph_heads):
    torch.manual_seed(0)
    cfg = small_config("gnn", hidden=hidden, adjacency_rank=rank, graph_heads=graph_heads,
                       adjacency=adjacency, heads=4)
    model = build_model(cfg)
    mixer = model.blocks[0].mixer
    genes, _ = random_cells(4, 20, [20, 13, 1, 0])
    h = torch.randn(4, 20, hidden)
    mask = model.attention_mask(genes)
    fused = mixer(h, genes, mask)
    dense = dense_graph_mixer(mixer, h, genes, mask)
    torch.testing.assert_close(fused, dense, atol=1e-5, rtol=1e-5)
    if graph_heads == 1:  # and both equal the formula itself for one cell: softmax(A[g,g]) H W_v
        q, k = mixer.adjacency.queries_keys(genes[1:2, :13])
        a = torch.softmax((q[0, 0] @ k[0, 0].T) * cfg.adjacency_scale, dim=-1)
        torch.testing.assert_close(fused[1, :13], mixer.out(a @ mixer.value(h[1, :13])),
                                   atol=1e-5, rtol=1e-5)


def test_gnn_fused_path_keeps_no_length_squared_tensor_for_backward():
    torch.manual_seed(0)
    length = 40
    model = build_model(small_config("gnn", layers=1, hidden=32, adjacency_rank=8))
    mixer = model.blocks[0].mixer
    genes, _ = random_cells(2, length, [length, length])
    h = torch.randn(2, length, 32, requires_grad=True)
    mask = model.attention_mask(genes)
    shapes: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        mixer(h, genes, mask).sum().backward()
    assert shapes, "nothing was saved for backward"
    assert not any(len(s) >= 2 and s[-1] == length and s[-2] == length for s in shapes), shapes


def test_attention_mixer_equals_torch_multihead_attention():
    torch.manual_seed(0)
    cfg = small_config("transformer", hidden=32, heads=4)
    ours = AttentionMixer(cfg)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ours.qkv.weight.copy_(ref.in_proj_weight)
        ours.qkv.bias.copy_(ref.in_proj_bias)
        ours.out.weight.copy_(ref.out_proj.weight)
        ours.out.bias.copy_(ref.out_proj.bias)
    genes, _ = random_cells(3, 15, [15, 9, 4])
    h = torch.randn(3, 15, 32)
    pad = genes == G
    expected, _ = ref(h, h, h, key_padding_mask=pad, need_weights=False)
    got = ours(h, genes, (~pad)[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_gnn_gradient_reaches_only_adjacency_rows_of_present_genes(shared):
    torch.manual_seed(0)
    model = build_model(small_config("gnn", adjacency_shared=shared))
    genes, values = random_cells(2, 10, [10, 6])
    masked = torch.zeros_like(genes, dtype=torch.bool)
    masked[:, :3] = True
    mvp_loss(model(genes, values, masked), values, masked).backward()
    present = torch.zeros(model.cfg.n_tokens, dtype=torch.bool)
    present[genes[genes != G].unique()] = True
    tables = [model.blocks[0].mixer.adjacency.u, model.blocks[0].mixer.adjacency.v]
    for table in tables:
        row_has_grad = table.weight.grad.abs().sum(dim=1) > 0
        assert row_has_grad[present].all(), "a present gene's U/V row got no gradient"
        assert not row_has_grad[~present].any(), "an absent gene's (or pad's) U/V row got gradient"


def test_mvp_loss_ignores_unmasked_and_padding_positions():
    torch.manual_seed(0)
    target = torch.randn(3, 8)
    masked = torch.zeros(3, 8, dtype=torch.bool)
    masked[0, [1, 4]] = True
    masked[2, 0] = True
    pred = torch.randn(3, 8)
    loss = mvp_loss(pred, target, masked)
    changed = torch.where(masked, pred, pred + 100 * torch.randn(3, 8))
    assert mvp_loss(changed, target, masked) == loss
    expected = ((pred - target)[masked] ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert mvp_loss(pred, target, torch.zeros_like(masked)) == 0


def test_model_never_sees_masked_values():
    torch.manual_seed(0)
    model = build_model(small_config("transformer")).eval()
    genes, values = random_cells(2, 10, [10, 10])
    masked = torch.zeros_like(genes, dtype=torch.bool)
    masked[:, 2] = True
    leaked = values.clone()
    leaked[:, 2] = 1000.0
    with torch.no_grad():
        torch.testing.assert_close(model(genes, values, masked), model(genes, leaked, masked))


def test_cls_cell_embedding_reads_position_zero_and_requires_the_token():
    model = build_model(small_config("gnn", "scbenchmark", cell_embedding="cls")).eval()
    genes, values = random_cells(2, 8, [8, 5])
    with pytest.raises(ValueError, match="no CLS token"):
        model.cell_embedding(genes, values)
    with_cls = torch.cat([torch.full((2, 1), model.cfg.cls_id), genes], dim=1)
    vals = torch.cat([torch.zeros(2, 1), values], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.cell_embedding(with_cls, vals), model.encode(with_cls, vals)[:, 0])


def test_cell_without_genes_gives_finite_outputs():
    model = build_model(small_config("gnn")).eval()
    genes, values = random_cells(2, 6, [0, 3])
    with torch.no_grad():
        assert torch.isfinite(model.encode(genes, values)).all()
        assert torch.isfinite(model.cell_embedding(genes, values)).all()


def test_gene_ids_outside_vocabulary_are_refused():
    model = build_model(small_config("gnn"))
    genes, values = random_cells(1, 5, [5])
    genes[0, 2] = G + 7
    with pytest.raises(ValueError, match="gene id 57 is outside the vocabulary"):
        model(genes, values)


def test_presets_set_the_authors_layout_and_explicit_values_win():
    tf = ModelConfig(backbone="transformer", preset="scbenchmark")
    gnn = ModelConfig(backbone="gnn", preset="scbenchmark")
    assert (tf.ffn_width, tf.block_layout, tf.activation) == (256, "post_norm", "relu")
    assert (gnn.ffn_width, gnn.block_layout, gnn.adjacency) == (0, "post_act", "symmetric_mlp")
    sym = ModelConfig(backbone="gnn", preset="symmetric")
    assert (sym.ffn_width, sym.block_layout) == (1024, "pre_norm")
    assert ModelConfig(backbone="gnn", preset="symmetric", mlp_ratio=2.0).ffn_width == 512
    assert build_model(small_config("gnn", "scbenchmark")).blocks[0].mlp is None


def test_parameter_counts_separate_the_adjacency():
    cfg = small_config("gnn", layers=3)
    counts = count_parameters(build_model(cfg))
    assert counts["params_adjacency"] == 3 * 2 * cfg.n_tokens * cfg.adjacency_rank
    shared = count_parameters(build_model(small_config("gnn", layers=3, adjacency_shared=True)))
    assert shared["params_adjacency"] == 2 * cfg.n_tokens * cfg.adjacency_rank
    assert count_parameters(build_model(small_config("transformer")))["params_adjacency"] == 0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"backbone": "transformer", "hidden": 30, "heads": 4}, "hidden \\(30\\) must be divisible by heads \\(4\\)"),
    ({"hidden": 30, "graph_heads": 4}, "hidden \\(30\\) must be divisible by graph_heads \\(4\\)"),
    ({"adjacency_rank": 0}, "adjacency_rank must be > 0"),
    ({"adjacency_rank": -3}, "adjacency_rank must be > 0"),
    ({"backbone": "mamba"}, "backbone must be one of transformer, gnn, gnn_linear; got 'mamba'"),
    ({"preset": "mine"}, "preset must be one of"),
    ({"dropout": 1.5}, "dropout must be in"),
])
def test_bad_model_config_is_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(overrides.pop("backbone", "gnn"), **overrides)


def test_each_backbone_checks_only_its_own_widths():
    assert small_config("gnn", hidden=30, heads=4).hidden == 30  # heads belong to the Transformer
    assert small_config("transformer", hidden=30, heads=5, graph_heads=4).hidden == 30


@pytest.mark.parametrize("backbone", ["transformer", "gnn", "gnn_linear"])
def test_a_bf16_model_takes_fp32_values_and_its_losses_stay_fp32(backbone):
    """What a bf16 DeepSpeed engine does to the module (weights cast, data left fp32): the value
    encoder casts the values, masks and padding still apply, and the losses are computed in fp32
    close to the fp32 model's."""
    from scgraph.config import RunConfig, TrainConfig
    from scgraph.data.batch import Batch
    from scgraph.train.objectives import pretraining_loss

    torch.manual_seed(0)
    run = RunConfig(model=small_config(backbone, "scbenchmark"), train=TrainConfig(objectives="mvp,gepc,recon"))
    model = build_model(run.model)
    low = build_model(run.model)
    low.load_state_dict(model.state_dict())
    low.to(torch.bfloat16)
    genes, values = random_cells(3, 12, [12, 7, 3])
    genes[:, 0] = run.model.cls_id
    masked = torch.zeros_like(genes, dtype=torch.bool)
    masked[:, 1] = True
    batch = Batch(genes, values, masked, genes[:, 1:].clamp(max=G - 1), values[:, 1:], torch.ones(3, 11))
    exact, exact_parts = pretraining_loss(model, batch, run.train.weights)
    loss, parts = pretraining_loss(low, batch, run.train.weights)
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
    for name in exact_parts:  # bf16 keeps 8 bits of mantissa: a few per cent after two layers
        assert parts[name].item() == pytest.approx(exact_parts[name].item(), rel=0.05), name
    pred = low(genes, values, masked)
    assert pred.dtype == torch.bfloat16 and torch.isfinite(pred).all()
    leaked = values.clone()
    leaked[masked] = 99.0  # a masked value never reaches the bf16 model either
    torch.testing.assert_close(low(genes, leaked, masked), pred)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in low.parameters())


def test_each_registry_maps_exactly_the_names_configs_accept():
    """A class registered without its name (or a name without its class) fails here, not at a user's
    first run of it; the order is --help's and the comparison tables' (the Transformer first)."""
    assert tuple(model.MIXERS) == names.BACKBONES
    assert tuple(model.ADJACENCIES) == names.ADJACENCIES
    assert tuple(model.ACTIVATIONS) == names.ACTIVATIONS
    assert tuple(model.FEATURE_MAPS) == names.FEATURE_MAPS


def python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this checkout."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_configs_are_built_and_parsed_without_torch():
    """A command line is checked (every backbone and preset resolved) before the seconds torch takes to import."""
    done = python(
        "import sys\n"
        "from scgraph.cli import Command, parse\n"
        "from scgraph.config import ModelConfig\n"
        "from scgraph.train.config import PretrainConfig\n"
        "from scgraph.models.config import BACKBONES, PRESETS\n"
        "configs = [ModelConfig(backbone=b, preset=p) for b in BACKBONES for p in PRESETS]\n"
        "argv = ['--shards', 'x', '--backbone', 'gnn_linear', '--activation', 'relu', '--graph-kernel', 'sdpa']\n"
        "assert parse(Command(PretrainConfig, run=print, prog='pretrain'), argv).run.model.family == 'graph'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("first", ["scgraph.models.model", "scgraph.config", "scgraph.models.config"])
def test_the_model_and_its_config_import_in_either_order(first):
    """No import circle: whichever module a program imports first, the model builds."""
    done = python(f"import {first}\n"
                  "from scgraph.config import ModelConfig\n"
                  "from scgraph.models.model import build_model\n"
                  "build_model(ModelConfig(backbone='gnn', vocab_size=10, hidden=8, layers=1, adjacency_rank=2))\n")
    assert done.returncode == 0, done.stderr
