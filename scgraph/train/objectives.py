"""The pretraining loss: the configured objectives, each weighted, from one forward pass.

``mvp`` is the paper's masked value prediction: each masked gene's value from its own
token's final state. It trains per-gene states; nothing in it asks the pooled cell embedding to
describe the cell, and on held-out cells a probe of that embedding did worse after MVP pretraining
than before it. The two cell-level objectives read the cell embedding (CLS or mean) of the masked
input through :class:`scgraph.models.model.GeneDecoder`:

* ``gepc`` (scGPT's GEPC): each masked gene's value from the cell embedding and that gene alone;
* ``recon``: the cell's whole normalised profile, unexpressed genes (zeros) included, from the
  cell embedding; with a large vocabulary the zeros are a reweighted sample
  (:func:`scgraph.data.tokenize.profile`).
"""

from __future__ import annotations

import torch

from scgraph.data.batch import Batch
from scgraph.models.model import mvp_loss


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(weight * (pred - target)^2) / sum(weight), in float32."""
    weight = weight.float()
    return ((pred.float() - target.float()) ** 2 * weight).sum() / weight.sum().clamp(min=1e-12)


def decoded_genes(batch: Batch, weights: dict[str, float]) -> torch.Tensor | None:
    """(B, S) the genes the gene decoder scores for each cell: its own tokens for gepc, then its
    profile for recon; None when no objective reads the cell embedding."""
    gepc, recon = weights.get("gepc", 0.0) > 0, weights.get("recon", 0.0) > 0
    if recon and batch.profile_genes is None:
        raise ValueError("the recon objective needs batches with profiles (build the loader with recon_genes)")
    decode = [batch.genes] if gepc else []
    if recon:
        decode.append(batch.profile_genes)
    return torch.cat(decode, dim=1) if decode else None


def pretraining_loss(model: torch.nn.Module, batch: Batch,
                     weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the weighted sum, each objective's loss) for one batch; ``model`` is a CellModel or the
    DeepSpeed engine around one (called once, so ZeRO-3 gathers each parameter once)."""
    gepc, recon = weights.get("gepc", 0.0) > 0, weights.get("recon", 0.0) > 0
    decode = decoded_genes(batch, weights)
    if decode is not None:
        pred, decoded = model(batch.genes, batch.values, batch.masked, decode)
    else:
        pred, decoded = model(batch.genes, batch.values, batch.masked), None
    parts = {}
    if weights.get("mvp", 0.0) > 0:
        parts["mvp"] = mvp_loss(pred, batch.values, batch.masked)
    if gepc:
        parts["gepc"] = mvp_loss(decoded[:, :batch.genes.shape[1]], batch.values, batch.masked)
    if recon:
        parts["recon"] = weighted_mse(decoded[:, -batch.profile_genes.shape[1]:], batch.profile_values,
                                      batch.profile_weight)
    total = sum(weights[name] * loss for name, loss in parts.items())
    return total, parts
