"""FLOPs per cell, measured and analytic, for the paper's Table II cost columns.

``FlopCounterMode`` counts zero FLOPs for the fused CPU ``scaled_dot_product_attention`` kernel, so
the measurement runs under the math backend, which is counted. The analytic count sits beside it as
a cross-check; both count matrix products only (multiply-add = 2 FLOPs), as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scgraph.config import ModelConfig
from scgraph.models.model import CellModel, mvp_loss


def _graph_scores_width(cfg: ModelConfig) -> int:
    return cfg.adjacency_rank * (2 if cfg.adjacency == "symmetric_mlp" else 1)


def analytic_forward_flops(cfg: ModelConfig, length: int) -> int:
    """Forward FLOPs for one cell of ``length`` tokens.

    The GNN's scores A[g,g] are counted once per adjacency (the formula's cost); the fused kernel
    recomputes them for each value sub-head, which the measured count shows.
    """
    n, d = length, cfg.hidden
    per_layer = 2 * 2 * n * d * cfg.ffn_width
    if cfg.backbone == "transformer":
        per_layer += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d
    else:
        per_layer += 2 * n * d * d * (2 if cfg.graph_out_proj else 1)
        per_layer += 2 * n * n * _graph_scores_width(cfg) * cfg.graph_heads + 2 * n * n * d
        if cfg.adjacency == "symmetric_mlp":
            per_layer += cfg.graph_heads * 2 * 2 * n * cfg.adjacency_rank ** 2
    value_encoder = {"linear": 2 * n * d, "mlp": 2 * n * d + 2 * n * d * d, "bins": 0}[cfg.value_encoder]
    head = 2 * n * d
    return cfg.layers * per_layer + value_encoder + head


@dataclass
class FlopCount:
    forward: float
    forward_backward: float
    analytic_forward: float

    @property
    def analytic_forward_backward(self) -> float:
        """Backward costs about twice the forward (gradients for inputs and for weights)."""
        return 3 * self.analytic_forward


def full_length_cells(cfg: ModelConfig, batch: int, length: int, seed: int = 0):
    """Cells with ``length`` distinct genes each, no padding: the cost of a full sequence."""
    gen = torch.Generator().manual_seed(seed)
    if length > cfg.vocab_size:
        raise ValueError(f"length {length} exceeds the vocabulary ({cfg.vocab_size} genes)")
    genes = torch.stack([torch.randperm(cfg.vocab_size, generator=gen)[:length] for _ in range(batch)])
    values = torch.rand(batch, length, generator=gen) * 5
    masked = torch.rand(batch, length, generator=gen) < 0.15
    return genes, values, masked


def measure_flops(model: CellModel, length: int, batch: int = 2) -> FlopCount:
    """Forward and forward+backward FLOPs per cell, counted by ``FlopCounterMode`` (math SDPA)."""
    genes, values, masked = full_length_cells(model.cfg, batch, length)
    device = next(model.parameters()).device
    genes, values, masked = genes.to(device), values.to(device), masked.to(device)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(genes, values, masked)
        with FlopCounterMode(display=False) as both:
            mvp_loss(model(genes, values, masked), values, masked).backward()
    model.zero_grad(set_to_none=True)
    return FlopCount(forward=fwd.get_total_flops() / batch,
                     forward_backward=both.get_total_flops() / batch,
                     analytic_forward=float(analytic_forward_flops(model.cfg, length)))
