"""The GNN's attention kernels and the linear GNN: each equals its dense formula (values and
gradients, with padding), keeps nothing L x L for backward, and is counted by FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_graph_mixer

from scgraph.config import ModelConfig
from scgraph.models.kernels import BLOCK_ELEMENTS, ScoresOnceAttention, scores_once
from scgraph.models.model import build_model
from scgraph.train.telemetry import analytic_encoder_flops, full_length_batch, measure_flops

G = 60


def cells(batch: int, length: int, real: list[int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    genes = torch.full((batch, length), G, dtype=torch.long)
    for i, k in enumerate(real):
        genes[i, :k] = torch.randperm(G, generator=gen)[:k]
    return genes


def gnn(backbone: str = "gnn", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(backbone=backbone, preset="symmetric", vocab_size=G, hidden=32, layers=1, heads=4, adjacency_rank=8)
    return build_model(ModelConfig(**(base | overrides)))


@pytest.mark.parametrize("kernel", ["scores_once", "subheads", "sdpa"])
@pytest.mark.parametrize("adjacency", ["factorized", "symmetric_mlp"])
@pytest.mark.parametrize("graph_heads", [1, 2])
def test_every_kernel_computes_softmax_of_the_static_adjacency_with_its_gradients(kernel, adjacency, graph_heads):
    model = gnn(adjacency=adjacency, graph_heads=graph_heads)
    mixer = model.blocks[0].mixer
    mixer.kernel = kernel
    genes = cells(4, 20, [20, 13, 1, 0])
    h = torch.randn(4, 20, 32, requires_grad=True)
    mask = model.attention_mask(genes)
    ours, reference = mixer(h, genes, mask), dense_graph_mixer(mixer, h, genes, mask)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), [h, *mixer.parameters()])
    expected = torch.autograd.grad((reference * weights).sum(), [h, *mixer.parameters()])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_scores_once_is_exact_in_float64_and_on_long_cells_split_into_row_blocks():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, 1100, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 1, 1100, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(1, 1100, dtype=torch.bool)
    keep[0, 900:] = False
    assert 1100 * 1100 > BLOCK_ELEMENTS  # one cell's scores do not fit one block: rows are chunked
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~keep[:, None, None, :], float("-inf"))
    dense = torch.softmax(scores, -1) @ v
    ours = scores_once(q, k, v, keep, 0.5)
    torch.testing.assert_close(ours, dense, atol=1e-10, rtol=1e-10)
    out_grad = torch.randn_like(dense)
    expected = torch.autograd.grad(dense, (q, k, v), out_grad)
    for got, want in zip(torch.autograd.grad(ours, (q, k, v), out_grad), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    small = [torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    values = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: ScoresOnceAttention.apply(a, b, c, None, 0.7),
                                    (*small, values))


@pytest.mark.parametrize("kernel", ["scores_once", "subheads"])
def test_no_length_squared_tensor_is_kept_for_backward(kernel):
    length = 40
    model = gnn()
    mixer = model.blocks[0].mixer
    mixer.kernel = kernel
    genes = cells(2, length, [length, 30])
    h = torch.randn(2, length, 32, requires_grad=True)
    shapes: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        mixer(h, genes, model.attention_mask(genes)).sum().backward()
    assert shapes and not any(len(s) >= 2 and s[-1] == length and s[-2] == length for s in shapes), shapes


def test_scores_once_forward_flops_are_the_analytic_count():
    model = gnn(hidden=64, layers=2, adjacency_rank=8, preset="scbenchmark")  # symmetric-MLP adjacency, w = 16
    batch = full_length_batch(model.cfg, 2, 48)
    flops = measure_flops(model, batch, {"mvp": 1.0})
    assert flops.encoder == pytest.approx(analytic_encoder_flops(model.cfg, 48), rel=0.05)


def dense_linear(mixer, h, genes, mask):
    q, k = mixer.adjacency.queries_keys(genes)
    b, heads, n, _ = q.shape
    v = mixer.value(h).view(b, n, heads, -1).transpose(1, 2)
    weights = (mixer.phi(q) @ mixer.phi(k).transpose(-1, -2)) * mask.reshape(b, 1, 1, n)
    out = weights / weights.sum(-1, keepdim=True) @ v
    return mixer.out(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("feature_map", ["elu+1", "softplus"])
def test_linear_gnn_equals_its_dense_formula_and_ignores_order_and_padding(feature_map):
    model = gnn("gnn_linear", feature_map=feature_map, layers=2)
    mixer = model.blocks[0].mixer
    genes = cells(3, 12, [12, 7, 3])
    h = torch.randn(3, 12, 32)
    mask = model.attention_mask(genes)
    torch.testing.assert_close(mixer(h, genes, mask), dense_linear(mixer, h, genes, mask), atol=1e-5, rtol=1e-5)
    values = torch.rand(3, 12) * 3
    with torch.no_grad():
        out = model.encode(genes, values)
        perm = torch.randperm(12)
        torch.testing.assert_close(model.encode(genes[:, perm], values[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)
        padded = torch.cat([genes, torch.full((3, 5), G)], 1), torch.cat([values, torch.randn(3, 5)], 1)
        real = genes != G
        torch.testing.assert_close(model.encode(*padded)[:, :12][real], out[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["transformer", "gnn", "gnn_linear"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(backbone):
    from scgraph.models.model import mvp_loss

    model = gnn(backbone, layers=2)
    batch = full_length_batch(model.cfg, 3, 16)

    def step(checkpointing: bool):
        model.zero_grad()
        model.checkpointing = checkpointing
        loss = mvp_loss(model(batch.genes, batch.values, batch.masked), batch.values, batch.masked)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, checkpointed = step(False), step(True)
    assert plain[0] == pytest.approx(checkpointed[0], rel=1e-6)
    for a, b in zip(plain[1], checkpointed[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
