"""Frozen encoders -> one vector per cell: ``scgraph.embed`` for scanpy users, and the probe's input.

Cells are tokenized with the checkpoint's tokenizer (normalisation, binning, CLS token, and its
restriction to the corpus's most variable genes, if any) and by default select their genes as in
training (``train``): an encoder meets at inference what it learned on (a seeded draw where training
drew at random, so the same cell always gets the same embedding). The protocol can also be the
cell's top genes by expression, by normalised rank, a seeded random subset, or every expressed gene
(both backbones are length-agnostic: a set of any size goes in). The number of genes at inference
is separate from the training L. Cells are embedded in order of length, so a batch is padded only
to its longest cell: with every gene shown, short cells do not pay for long ones.
"""

from __future__ import annotations

import dataclasses
import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from scgraph.config import EMBED_SELECTIONS, RunConfig, TokenizerConfig
from scgraph.data.batch import SparseBatch
from scgraph.data.tokenize import GeneChoice, tokenize
from scgraph.data.tokens import is_gene
from scgraph.models.model import CellModel, build_model


def resolved_selection(tok: TokenizerConfig, selection: str) -> str:
    """The selection an inference protocol runs: ``train`` is the training tokenizer's."""
    return tok.selection if selection == "train" else selection


def genes_shown(tok: TokenizerConfig, selection: str, seq_len: int | None) -> int | None:
    """Genes per cell under an inference protocol: ``seq_len`` (default: the training L), or None
    for ``all`` (each cell shows every gene it expresses)."""
    return None if selection == "all" else tok.seq_len if seq_len is None else seq_len


def inference_tokenizer(tok: TokenizerConfig, selection: str, seq_len: int | None, counts: sp.csr_matrix
                        ) -> TokenizerConfig:
    """The training tokenizer with the inference protocol's gene choice: ``top`` or ``random``
    ``seq_len`` genes (default: the training L), or ``all`` of each cell's genes; no gene dropout."""
    if selection not in EMBED_SELECTIONS:
        raise ValueError(f"embed selection must be one of {', '.join(EMBED_SELECTIONS)}; got {selection!r}")
    longest = max(1, int(np.diff(counts.indptr).max(initial=0)))  # a longer L would only add padding
    if selection == "all":
        return dataclasses.replace(tok, seq_len=longest, selection="top", gene_dropout=0.0)
    return dataclasses.replace(tok, seq_len=min(genes_shown(tok, selection, seq_len), longest),
                               selection=resolved_selection(tok, selection), gene_dropout=0.0)


def embed_cells(model: CellModel | BagOfGenes, run: RunConfig, counts: sp.csr_matrix, *, selection: str = "train",
                seq_len: int | None = None, choice: GeneChoice | None = None, batch_size: int = 256, seed: int = 0,
                desc: str | None = None, progress: bool = True) -> np.ndarray:
    """(cells, hidden) float32: ``model.cell_embedding`` (mean over genes or the CLS output, as the
    model was configured) of each row of ``counts``, given in the model's vocabulary; on the GPU
    when there is one (the model is moved there). ``choice``: the checkpoint's gene choice (what
    its training knew of the corpus). Cells go through in order of length (each batch padded to its
    longest cell; padding changes no embedding) and come back in input order; a random protocol's
    draws are seeded by ``seed`` (the same cells, seed and batch size give the same embeddings on a
    given device). Cells are tokenized on the device as in training (``tokenize``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    counts = sp.csr_matrix(counts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    if isinstance(model, CellModel):  # (the bag-of-genes control has no kernels to choose)
        model.choose_kernels("auto", device, next(model.parameters()).dtype)  # as training does (kernels, TF32)
    order = np.argsort(np.diff(counts.indptr), kind="stable")
    out = np.zeros((counts.shape[0], run.model.hidden), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, counts.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                          leave=False):
            rows = order[start:start + batch_size]
            block = counts[rows]
            tok = inference_tokenizer(run.tokenizer, selection, seq_len, block)
            cells = SparseBatch.from_csr(block, (seed, start), run.model.vocab_size).to(device)
            tokens = tokenize(cells, tok, run.model.vocab_size, cells.generator(), choice)  # on the device
            embedding = model.cell_embedding(tokens.genes, tokens.values)
            out[rows] = embedding.float().cpu().numpy()
    return out


def random_encoder(run: RunConfig, seed: int = 0) -> CellModel:
    """An untrained encoder of the same shape and initialisation scheme: the control that says
    how much of the probe's accuracy pretraining earned (random features of expression already
    separate cell types well)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(run.model).eval()


class BagOfGenes(torch.nn.Module):
    """The cheapest control: each cell is the mean of a random, untrained gene table over the genes
    it shows the encoder, weighted by their values. No mixing and no training: what an encoder
    must beat to show that it learned more than which genes a cell expresses."""

    def __init__(self, run: RunConfig, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(run.model.n_tokens, run.model.hidden, generator=generator)
        self.vocab_size = run.model.vocab_size

    def cell_embedding(self, genes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        weight = torch.where(is_gene(genes, self.vocab_size), values, torch.zeros_like(values))
        total = (weight[..., None] * self.table[genes]).sum(dim=1)
        return total / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)


def embed(adata: ad.AnnData, checkpoint: str, *, key: str = "X_scgraph", selection: str = "train",
          seq_len: int | None = None, match_genes_by: str = "feature_id", batch_size: int = 256,
          mlflow_uri: str | None = None, progress: bool = True) -> ad.AnnData:
    """Embed every cell of ``adata`` with a pretrained encoder and store the vectors in
    ``adata.obsm[key]`` (``adata`` is returned, changed in place), ready for
    ``sc.pp.neighbors(adata, use_rep=key)``.

    ``checkpoint``: a pretraining ``--output`` directory, a checkpoint, an exported ``model/``
    folder, or ``runs:/RUN_ID/model`` (with ``mlflow_uri``). Raw counts come from ``adata.raw.X``
    when present, else ``X``; genes are matched to the model's vocabulary by ``var['feature_id']``
    (or the var names), or by ``feature_name`` for gene symbols; genes it never saw are dropped.
    ``selection`` / ``seq_len``: which genes each cell shows the encoder (see the module doc).
    """
    from scgraph.eval.cells import cells_of, coverage_notes, match_genes
    from scgraph.train.checkpointer import load_pretrained

    cells = cells_of(adata, "adata")  # (the data's problems first: they are cheaper to find)
    pretrained = load_pretrained(checkpoint, mlflow_uri)
    mapping = match_genes(cells, pretrained.record.vocab, match_genes_by)
    counts = mapping.apply(cells.counts)
    for note in coverage_notes(mapping, counts):
        warnings.warn(f"scgraph.embed: {note}", stacklevel=2)
    adata.obsm[key] = embed_cells(pretrained.model, pretrained.run, counts, selection=selection,
                                  seq_len=seq_len, choice=pretrained.record.choice, batch_size=batch_size,
                                  progress=progress,
                                  desc=f"embed ({pretrained.run.model.backbone})")
    adata.uns[key] = {"checkpoint": str(checkpoint), "backbone": pretrained.run.model.backbone,
                      "selection": resolved_selection(pretrained.run.tokenizer, selection),
                      "genes_matched": mapping.matched, "genes_dropped": mapping.dropped}
    shown = genes_shown(pretrained.run.tokenizer, selection, seq_len)
    if shown is not None:  # (h5ad cannot store None)
        adata.uns[key]["seq_len"] = shown
    return adata
