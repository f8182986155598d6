"""The whole network in one file: input embedding, the token mixers, the shared Block, heads.

A cell is a set of (gene, value) tokens: there is no positional encoding anywhere. The Transformer
and the GNN differ only in the token mixer a ``Block`` is given; the preset (``ModelConfig``) sets
the rest. The GNN mixer is attention with static, gene-indexed queries and keys, so it runs on the
same fused ``scaled_dot_product_attention`` kernels and never keeps an L x L tensor for backward.

Registries (``MIXERS``, ``ADJACENCIES``, ``ACTIVATIONS``, ``FEATURE_MAPS``) map each name to its
class; the names themselves, and each mixer's family, are ``scgraph.models.config``'s (no torch there,
so configs are checked without it). A new token mixer is one class with the ``(cfg, adjacency)``
constructor, one line in ``MIXERS``, and its name and family in ``MIXER_FAMILIES`` there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from scgraph.config import ModelConfig
from scgraph.data.tokens import is_gene
from scgraph.models.kernels import choose_kernel, static_attention

#: Activations of the feed-forward and of the post_act layout, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def check_token_ids(genes: torch.Tensor, n_tokens: int) -> None:
    """Out-of-range ids would index past the gene tables (a device assert on CUDA): refuse them. Host
    tensors only (a GPU read stalls its queue: the trainer checks first), and not in torch.compile."""
    if torch.compiler.is_compiling() or genes.device.type != "cpu":
        return
    if genes.numel() and (int(genes.min()) < 0 or int(genes.max()) >= n_tokens):
        bad = genes[(genes < 0) | (genes >= n_tokens)][0].item()
        raise ValueError(f"gene id {bad} is outside the vocabulary (valid ids 0..{n_tokens - 1})")


class ValueEncoder(nn.Module):
    """W_val: a scalar expression value -> a d-vector (linear, the authors' MLP, or bin embedding)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.value_encoder
        self.clamp = cfg.value_clamp
        d = cfg.hidden
        if self.kind == "linear":
            self.net = nn.Linear(1, d)
        elif self.kind == "mlp":
            self.net = nn.Sequential(nn.Linear(1, d), nn.ReLU(), nn.Linear(d, d))
        else:
            self.net = nn.Embedding(cfg.n_bins, d)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self.kind == "bins":
            return self.net(values.round().long().clamp(0, self.net.num_embeddings - 1))
        if self.clamp is not None:
            values = values.clamp(max=self.clamp)
        dtype = next(self.net.parameters()).dtype  # bf16/fp16 engines cast weights, not the data
        return self.net(values.unsqueeze(-1).to(dtype))


class InputEmbedding(nn.Module):
    """h0 = E_gene[g] + W_val(x); a masked value is replaced by a learned mask vector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gene = nn.Embedding(cfg.n_tokens, cfg.hidden)
        self.value = ValueEncoder(cfg)
        self.mask_value = nn.Parameter(torch.zeros(cfg.hidden))

    def forward(self, genes: torch.Tensor, values: torch.Tensor,
                masked: torch.Tensor | None) -> torch.Tensor:
        v = self.value(values)
        if masked is not None:
            v = torch.where(masked.unsqueeze(-1), self.mask_value.to(v.dtype), v)
        return self.gene(genes) + v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
            scale: float | None, dropout: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                          scale=scale)


class AttentionMixer(nn.Module):
    """Multi-head self-attention: weights depend on the cell."""

    def __init__(self, cfg: ModelConfig, adjacency: nn.Module | None = None) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, h: torch.Tensor, genes: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = _attend(q, k, v, attn_mask, None, self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


def _distinct_rows(genes: torch.Tensor, *tables: nn.Embedding) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rows of each table for the batch's distinct genes, and each token's index among them.
    Read with ``index_select`` rather than an embedding lookup per token: its backward (one
    index_add into the table) measured 3x cheaper on CPU, and per-gene work (the symmetric
    adjacency's MLP) runs once per distinct gene. Dense gradients on purpose: sparse ones fail
    under DeepSpeed ZeRO."""
    unique, tokens = torch.unique(genes, return_inverse=True)
    return tokens, [table.weight.index_select(0, unique) for table in tables]


class FactorizedAdjacency(nn.Module):
    """A = U V^T over the whole vocabulary; a batch reads only its genes' rows."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.width = cfg.graph_heads, cfg.adjacency_rank
        self.u = nn.Embedding(cfg.n_tokens, cfg.graph_heads * cfg.adjacency_rank)
        self.v = nn.Embedding(cfg.n_tokens, cfg.graph_heads * cfg.adjacency_rank)
        for table in (self.u, self.v):
            nn.init.normal_(table.weight, std=cfg.adjacency_rank ** -0.5)

    def queries_keys(self, genes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, graph_heads, L, r) queries U[g] and keys V[g]."""
        b, n = genes.shape
        split = (b, n, self.heads, self.width)
        tokens, (u, v) = _distinct_rows(genes, self.u, self.v)
        return u[tokens].view(split).transpose(1, 2), v[tokens].view(split).transpose(1, 2)


class SymmetricMLPAdjacency(nn.Module):
    """The authors' ``gnn_cp``: A[g,g] = F[g]F[g]^T + M(F'[g])M(F'[g])^T, non-negative init.

    The sum of two dot products is one dot product of concatenations, so queries = keys =
    [F[g], M(F'[g])] of width 2r, and the attention kernels apply unchanged.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        r = cfg.adjacency_rank
        self.heads, self.width = cfg.graph_heads, 2 * r
        self.f = nn.Embedding(cfg.n_tokens, cfg.graph_heads * r)
        self.f2 = nn.Embedding(cfg.n_tokens, cfg.graph_heads * r)
        self.mlp = nn.Sequential(nn.Linear(r, r), nn.GELU(), nn.Linear(r, r))
        for table in (self.f, self.f2):
            nn.init.uniform_(table.weight, 0.0, r ** -0.5)

    def queries_keys(self, genes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = genes.shape
        tokens, (f, f2) = _distinct_rows(genes, self.f, self.f2)
        per_gene = (len(f), self.heads, self.width // 2)
        rows = torch.cat([f.view(per_gene), self.mlp(f2.view(per_gene))], dim=-1)
        qk = rows[tokens].view(b, n, self.heads, self.width).transpose(1, 2)
        return qk, qk


ADJACENCIES: dict[str, type[nn.Module]] = {
    "factorized": FactorizedAdjacency,
    "symmetric_mlp": SymmetricMLPAdjacency,
}


class GraphMixer(nn.Module):
    """softmax(A[g, g]) H W_v with a static trainable adjacency A, the same for every cell.

    Computed as attention with queries U[g] and keys V[g] of the adjacency's width and values of
    width d / graph_heads, by one of ``scgraph.models.kernels`` (``kernel``, fixed for the device
    and precision by :meth:`CellModel.choose_kernels`; the portable exact one until then).
    """

    def __init__(self, cfg: ModelConfig, adjacency: nn.Module) -> None:
        super().__init__()
        self.adjacency = adjacency
        self.scale = cfg.adjacency_scale
        self.dropout = cfg.dropout
        self.kernel = choose_kernel("auto", torch.device("cpu"), torch.float32, cfg.score_width,
                                    cfg.hidden // cfg.graph_heads)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden) if cfg.graph_out_proj else nn.Identity()

    def values(self, h: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, graph_heads, L, d / graph_heads) values H W_v."""
        b, n, d = h.shape
        return self.value(h).view(b, n, heads, d // heads).transpose(1, 2)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, graph_heads, L, dv) back to (B, L, d), then the output projection."""
        b, heads, n, dv = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, heads * dv))

    def forward(self, h: torch.Tensor, genes: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q, k = self.adjacency.queries_keys(genes)
        v = self.values(h, q.shape[1])
        o = static_attention(q, k, v, attn_mask, self.scale, self.kernel, self.dropout if self.training else 0.0)
        return self.merge(o)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 > 0 (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


#: Positive feature maps phi of the linear GNN, by name (``--feature-map``).
FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"elu+1": elu_plus_one, "softplus": F.softplus}


class LinearGraphMixer(GraphMixer):
    """A static adjacency in linear time: out_i = sum_j phi(u_i).phi(v_j) h_j W_v / sum_j
    phi(u_i).phi(v_j), computed as phi(U[g]) (phi(V[g])^T H W_v) in O(L r d), never L x L. A
    row-normalised, non-negative, low-rank adjacency (not the softmax of U V^T); padded keys weigh
    nothing."""

    eps = 1e-6

    def __init__(self, cfg: ModelConfig, adjacency: nn.Module) -> None:
        super().__init__(cfg, adjacency)
        self.phi = FEATURE_MAPS[cfg.feature_map]

    def forward(self, h: torch.Tensor, genes: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q, k = self.adjacency.queries_keys(genes)  # (B, gh, L, w)
        # float32: the normaliser sums L x w products, ~70,000 at w = 128, L = 513: in fp16 inf, so output 0
        v = self.values(h, q.shape[1]).float()  # (B, gh, L, dv)
        fq = self.phi(q.float())
        fk = self.phi(k.float()) * attn_mask.reshape(h.shape[0], 1, -1, 1)
        num = fq @ (fk.transpose(-1, -2) @ v)  # (B, gh, L, dv)
        den = (fq * fk.sum(dim=-2, keepdim=True)).sum(-1, keepdim=True).clamp_min(self.eps)
        return self.merge((num / den).to(h.dtype))


#: The token mixers by name (the names ``--backbone`` takes), the Transformer first.
MIXERS: dict[str, type[nn.Module]] = {
    "transformer": AttentionMixer,
    "gnn": GraphMixer,
    "gnn_linear": LinearGraphMixer,
}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn_width), ACTIVATIONS[cfg.activation](),
                                 nn.Linear(cfg.ffn_width, cfg.hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class Block(nn.Module):
    """One layer, shared by every backbone; only ``mixer`` differs.

    Layouts: ``pre_norm`` h += Mixer(LN h); h += MLP(LN h) (symmetric preset);
    ``post_norm`` h = LN(h + Mixer h); h = LN(h + MLP h) (nn.TransformerEncoderLayer);
    ``post_act`` h += act(LN(Mixer h)) (the authors' GNN layer, no MLP); ``residual`` h += Mixer h;
    h += MLP h, no normalisation (the synthetic study's: a norm after a static aggregation lets
    the GNN multiply what it aggregated, which a static adjacency alone cannot).
    """

    def __init__(self, cfg: ModelConfig, mixer: nn.Module) -> None:
        super().__init__()
        self.layout = cfg.block_layout
        self.mixer = mixer
        normed = self.layout != "residual"
        self.norm1 = nn.LayerNorm(cfg.hidden) if normed else None
        self.mlp = MLP(cfg) if cfg.ffn_width > 0 else None
        self.norm2 = nn.LayerNorm(cfg.hidden) if normed and self.mlp is not None else None
        self.act = ACTIVATIONS[cfg.activation]()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, genes: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        if self.layout == "pre_norm":
            h = h + self.drop(self.mixer(self.norm1(h), genes, attn_mask))
            if self.mlp is not None:
                h = h + self.drop(self.mlp(self.norm2(h)))
        elif self.layout == "post_norm":
            h = self.norm1(h + self.drop(self.mixer(h, genes, attn_mask)))
            if self.mlp is not None:
                h = self.norm2(h + self.drop(self.mlp(h)))
        elif self.layout == "post_act":
            h = h + self.drop(self.act(self.norm1(self.mixer(h, genes, attn_mask))))
            if self.mlp is not None:
                h = h + self.drop(self.mlp(self.norm2(h)))
        else:
            h = h + self.drop(self.mixer(h, genes, attn_mask))
            if self.mlp is not None:
                h = h + self.drop(self.mlp(h))
        return h


class GeneDecoder(nn.Module):
    """A cell's value of gene g read from the cell embedding c alone: <W c, q_g> + b_g, with the
    decoder's own gene table q (scGPT's GEPC read-out). Scoring a whole profile costs one product
    with the rows of the batch's distinct genes, not one per (cell, gene)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.genes = nn.Embedding(cfg.n_tokens, cfg.hidden)
        self.bias = nn.Parameter(torch.zeros(cfg.n_tokens))

    def start_at(self, means: torch.Tensor) -> None:
        """Start each gene's bias at its mean value in the data (``means``, one per vocabulary
        gene): the decoder then learns only how a cell differs from the average cell. In the demo
        (CBMC, 600 steps) starting from zero instead cost 5.6 (Transformer) and 2.8 (GNN) points of
        held-out probe accuracy."""
        with torch.no_grad():
            self.bias[: len(means)] = means.to(self.bias)

    def forward(self, cell: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """``cell`` (B, d), ``genes`` (B, S) ids -> (B, S) predicted values."""
        tokens, (rows,) = _distinct_rows(genes, self.genes)
        scores = self.proj(cell) @ rows.T.to(cell.dtype)  # (B, distinct genes)
        return scores.gather(1, tokens) + self.bias[genes]


class CellModel(nn.Module):
    """Encoder (embedding + Blocks) with the masked-value-prediction head W_out and, for
    objectives that read the cell embedding, a :class:`GeneDecoder`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = InputEmbedding(cfg)
        mixer = MIXERS[cfg.backbone]
        self.blocks = nn.ModuleList(Block(cfg, mixer(cfg, adjacency)) for adjacency in self._adjacencies(cfg))
        self.final_norm = nn.LayerNorm(cfg.hidden) if cfg.block_layout == "pre_norm" else nn.Identity()
        self.head = nn.Linear(cfg.hidden, 1)
        self.decoder = GeneDecoder(cfg) if cfg.cell_decoder else None
        #: recompute each block's activations in backward (``--activation-checkpointing``)
        self.checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _adjacencies(cfg: ModelConfig) -> Iterator[nn.Module | None]:
        """One per layer for a graph mixer (the same module in every layer when shared), each made
        just before its layer's mixer (so a seed gives the same weights as ever)."""
        if cfg.family != "graph":
            yield from [None] * cfg.layers
            return
        shared = None
        for _ in range(cfg.layers):
            if shared is None or not cfg.adjacency_shared:
                shared = ADJACENCIES[cfg.adjacency](cfg)
            yield shared

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, InputEmbedding):
            nn.init.normal_(module.gene.weight, std=0.02)
        elif isinstance(module, GeneDecoder):
            nn.init.normal_(module.genes.weight, std=module.genes.embedding_dim ** -0.5)

    def choose_kernels(self, requested: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """Fix how this model runs on ``device`` in ``dtype``, for training and inference alike: fp32 products
        on CUDA in TF32, every GNN mixer's kernel (``auto`` resolved); the kernel, or None without a choice."""
        if device.type == "cuda":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        mixers = [b.mixer for b in self.blocks if isinstance(b.mixer, GraphMixer)]
        if not mixers or isinstance(mixers[0], LinearGraphMixer):
            return None
        cfg = self.cfg
        kernel = choose_kernel(requested, device, dtype, cfg.score_width, cfg.hidden // cfg.graph_heads)
        for mixer in mixers:
            mixer.kernel = kernel
        return kernel

    def attention_mask(self, genes: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, L) True where a key takes part. A cell with no genes attends to its padding
        (outputs finite, then ignored) rather than dividing by zero."""
        keep = genes != self.cfg.pad_id
        keep = keep | ~keep.any(dim=1, keepdim=True)
        return keep[:, None, None, :]

    def encode(self, genes: torch.Tensor, values: torch.Tensor,
               masked: torch.Tensor | None = None) -> torch.Tensor:
        """Per-gene hidden states (B, L, d)."""
        check_token_ids(genes, self.cfg.n_tokens)
        attn_mask = self.attention_mask(genes)
        h = self.embed(genes, values, masked)
        for block in self.blocks:
            if self.checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, genes, attn_mask, use_reentrant=False)
            else:
                h = block(h, genes, attn_mask)
        return self.final_norm(h)

    def forward(self, genes: torch.Tensor, values: torch.Tensor, masked: torch.Tensor | None = None,
                decode: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predicted value for every position (B, L); the loss reads only the masked ones. With
        ``decode`` (B, S) gene ids, also the decoder's prediction of those genes' values from the
        cell embedding of this (masked) input: ((B, L), (B, S))."""
        h = self.encode(genes, values, masked)
        pred = self.head(h).squeeze(-1)
        if decode is None:
            return pred
        if self.decoder is None:
            raise ValueError("this model has no gene decoder (cell_decoder is off); it cannot decode cells")
        return pred, self.decoder(self.pool(h, genes), decode)

    def pool(self, h: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """(B, d) cell embedding from final states: the CLS output, or the mean over the cell's
        genes (pad and CLS excluded)."""
        if self.cfg.cell_embedding == "cls":  # (checked on the host only: RunConfig puts the CLS first)
            if genes.device.type == "cpu" and not bool((genes[:, 0] == self.cfg.cls_id).all()):
                raise ValueError("cell_embedding is 'cls' but the input has no CLS token at position 0")
            return h[:, 0]
        gene = is_gene(genes, self.cfg.vocab_size).unsqueeze(-1).to(h.dtype)
        return (h * gene).sum(1) / gene.sum(1).clamp(min=1.0)

    def cell_embedding(self, genes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, d): the encoder's embedding of unmasked cells (see :meth:`pool`)."""
        return self.pool(self.encode(genes, values), genes)


def mvp_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked positions only, in float32 whatever the model's
    precision; 0 for a batch with nothing masked."""
    weight = masked.float()
    return ((pred.float() - target.float()) ** 2 * weight).sum() / weight.sum().clamp(min=1.0)


def count_parameters(model: CellModel) -> dict[str, int]:
    """Parameter counts per part, each shared tensor counted once: the input embeddings, the
    adjacency factors (U, V or F, F', M), the rest of the blocks, and the total."""
    def distinct(modules) -> dict[int, int]:
        return {id(p): p.numel() for m in modules for p in m.parameters()}

    adjacency = distinct(m for m in model.modules() if isinstance(m, tuple(ADJACENCIES.values())))
    blocks = distinct(model.blocks)
    return {
        "params_total": sum(distinct([model]).values()),
        "params_embeddings": sum(distinct([model.embed]).values()),
        "params_adjacency": sum(adjacency.values()),
        "params_blocks": sum(v for k, v in blocks.items() if k not in adjacency),
    }


def build_model(cfg: ModelConfig) -> CellModel:
    return CellModel(cfg)


__all__ = ["ACTIVATIONS", "ADJACENCIES", "FEATURE_MAPS", "MIXERS", "AttentionMixer", "Block", "CellModel",
           "GeneDecoder", "GraphMixer", "LinearGraphMixer", "build_model", "count_parameters", "mvp_loss"]
