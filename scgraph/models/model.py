"""The whole network in one file: input embedding, the token mixers, the shared Block, heads.

A cell is a set of (gene, value) tokens: there is no positional encoding anywhere. The Transformer
and the GNN differ only in the token mixer a ``Block`` is given; the preset (``ModelConfig``) sets
the rest. The GNN mixer is attention with static, gene-indexed queries and keys, so it runs on the
same fused ``scaled_dot_product_attention`` kernels and never keeps an L x L tensor for backward.

Registries (``MIXERS``, ``ADJACENCIES``, ``ACTIVATIONS``) are the one place each name is declared;
``scgraph.config`` validates against them. A new token mixer is one class with ``family`` and the
``(cfg, adjacency)`` constructor, and one line in ``MIXERS``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from scgraph.config import ModelConfig

#: Activations of the feed-forward and of the post_act layout, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def check_token_ids(genes: torch.Tensor, n_tokens: int) -> None:
    """Out-of-range ids would index past the gene tables (a device assert on CUDA): refuse them."""
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
    """h0 = E_gene[g] + W_val(x) (Eq. 6); a masked value is replaced by a learned mask vector."""

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
    """Multi-head self-attention (Eq. 9-10): weights depend on the cell."""

    family = "attention"

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


class FactorizedAdjacency(nn.Module):
    """A = U V^T over the whole vocabulary; a batch reads only its genes' rows (Eq. 11-12).

    Dense ``nn.Embedding`` gradients on purpose: sparse ones fail under DeepSpeed ZeRO.
    """

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
        return (self.u(genes).view(split).transpose(1, 2),
                self.v(genes).view(split).transpose(1, 2))


class SymmetricMLPAdjacency(nn.Module):
    """The authors' ``gnn_cp``: A[g,g] = F[g]F[g]^T + M(F'[g])M(F'[g])^T, non-negative init.

    The sum of two dot products is one dot product of concatenations, so queries = keys =
    [F[g], M(F'[g])] of width 2r, and the fused kernels apply unchanged.
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
        split = (b, n, self.heads, self.width // 2)
        f = self.f(genes).view(split)
        qk = torch.cat([f, self.mlp(self.f2(genes).view(split))], dim=-1).transpose(1, 2)
        return qk, qk


ADJACENCIES: dict[str, type[nn.Module]] = {
    "factorized": FactorizedAdjacency,
    "symmetric_mlp": SymmetricMLPAdjacency,
}


class GraphMixer(nn.Module):
    """softmax(A[g, g]) H W_v with a static trainable adjacency A, the same for every cell.

    Computed as attention with queries U[g] and keys V[g]. Fused kernels want equal head widths, so
    when the d/graph_heads value channels of each adjacency are a multiple of its score width they
    are viewed as sub-heads of that width, and the queries/keys are expanded over them (a stride-0
    view when graph_heads is 1): ``subheads`` says how many. Otherwise (``subheads`` None) the values
    keep their width and SDPA picks a kernel that allows it (on CPU the math one, which holds the
    L x L scores).
    """

    family = "graph"

    def __init__(self, cfg: ModelConfig, adjacency: nn.Module) -> None:
        super().__init__()
        self.adjacency = adjacency
        self.scale = cfg.adjacency_scale
        self.dropout = cfg.dropout
        dv = cfg.hidden // cfg.graph_heads
        self.subheads = dv // cfg.score_width if dv % cfg.score_width == 0 else None
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden) if cfg.graph_out_proj else nn.Identity()

    def forward(self, h: torch.Tensor, genes: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q, k = self.adjacency.queries_keys(genes)
        b, gh, n, w = q.shape
        v = self.value(h).view(b, n, gh, -1).transpose(1, 2)  # (B, gh, L, dv)
        m = self.subheads or 1
        if self.subheads:  # sub-heads of the adjacency's width, sharing its queries and keys
            v = v.reshape(b, gh, n, m, w).transpose(2, 3).reshape(b, gh * m, n, w)
            q = q.unsqueeze(2).expand(b, gh, m, n, w).reshape(b, gh * m, n, w)
            k = k.unsqueeze(2).expand(b, gh, m, n, w).reshape(b, gh * m, n, w)
        o = _attend(q, k, v, attn_mask, self.scale, self.dropout if self.training else 0.0)
        o = o.view(b, gh, m, n, -1).permute(0, 3, 1, 2, 4).reshape(b, n, -1)
        return self.out(o)


#: The token mixers by name (the names ``--backbone`` takes), the Transformer first.
MIXERS: dict[str, type[nn.Module]] = {
    "transformer": AttentionMixer,
    "gnn": GraphMixer,
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
    ``post_act`` h += act(LN(Mixer h)) (the authors' GNN layer, no MLP).
    """

    def __init__(self, cfg: ModelConfig, mixer: nn.Module) -> None:
        super().__init__()
        self.layout = cfg.block_layout
        self.mixer = mixer
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg) if cfg.ffn_width > 0 else None
        self.norm2 = nn.LayerNorm(cfg.hidden) if self.mlp is not None else None
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
        else:
            h = h + self.drop(self.act(self.norm1(self.mixer(h, genes, attn_mask))))
            if self.mlp is not None:
                h = h + self.drop(self.mlp(self.norm2(h)))
        return h


class CellModel(nn.Module):
    """Encoder (embedding + Blocks) with the masked-value-prediction head W_out (Eq. 5-8)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = InputEmbedding(cfg)
        mixer = MIXERS[cfg.backbone]
        self.blocks = nn.ModuleList(Block(cfg, mixer(cfg, adjacency)) for adjacency in self._adjacencies(cfg))
        self.final_norm = nn.LayerNorm(cfg.hidden) if cfg.block_layout == "pre_norm" else nn.Identity()
        self.head = nn.Linear(cfg.hidden, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _adjacencies(cfg: ModelConfig) -> Iterator[nn.Module | None]:
        """One per layer for a graph mixer (the same module in every layer when shared), each made
        just before its layer's mixer (so a seed gives the same weights as ever)."""
        if MIXERS[cfg.backbone].family != "graph":
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
            h = block(h, genes, attn_mask)
        return self.final_norm(h)

    def forward(self, genes: torch.Tensor, values: torch.Tensor,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted value for every position (B, L); the loss reads only the masked ones."""
        return self.head(self.encode(genes, values, masked)).squeeze(-1)

    def cell_embedding(self, genes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, d): the CLS output, or the mean over the cell's genes (pad and CLS excluded)."""
        h = self.encode(genes, values)
        if self.cfg.cell_embedding == "cls":
            if not bool((genes[:, 0] == self.cfg.cls_id).all()):
                raise ValueError("cell_embedding is 'cls' but the input has no CLS token at position 0")
            return h[:, 0]
        is_gene = (genes < self.cfg.vocab_size).unsqueeze(-1).to(h.dtype)
        return (h * is_gene).sum(1) / is_gene.sum(1).clamp(min=1.0)


def mvp_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked positions only (Eq. 5), in float32 whatever the model's
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


__all__ = ["ACTIVATIONS", "ADJACENCIES", "MIXERS", "AttentionMixer", "Block", "CellModel", "GraphMixer",
           "build_model", "count_parameters", "mvp_loss"]
