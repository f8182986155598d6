"""Frozen encoders -> one vector per cell, the input of the linear probe.

Cells are tokenized exactly as in pretraining (the checkpoint's tokenizer config: normalisation,
L genes, CLS token), with a fixed seed for the random choice among a cell's genes when it has more
than L, so that the same cell always gets the same embedding.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from scgraph.config import RunConfig
from scgraph.data.tokenize import tokenize
from scgraph.models.model import CellModel, build_model


def embed_cells(model: CellModel, run: RunConfig, counts: sp.csr_matrix, *, batch_size: int = 256, seed: int = 0,
                desc: str | None = None, progress: bool = True) -> np.ndarray:
    """(cells, hidden) float32: ``model.cell_embedding`` (mean over genes or the CLS output, as the
    model was configured) of each row of ``counts``, given in the model's vocabulary; on the GPU
    when there is one (the model is moved there)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(seed)
    model = model.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, counts.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                          leave=False):
            tokens = tokenize(counts[start:start + batch_size], run.tokenizer, run.model.vocab_size, rng)
            embedding = model.cell_embedding(torch.from_numpy(tokens.genes).to(device),
                                             torch.from_numpy(tokens.values).to(device))
            out.append(embedding.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, run.model.hidden), dtype=np.float32)


def random_encoder(run: RunConfig, seed: int = 0) -> CellModel:
    """An untrained encoder of the same shape and initialisation scheme: the control that says
    how much of the probe's accuracy pretraining earned (random features of expression already
    separate cell types well)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(run.model).eval()
