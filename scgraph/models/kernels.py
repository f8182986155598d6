"""softmax(Q K^T * scale) V for the GNN's static adjacency: narrow queries and keys (the adjacency's
width w = r, or 2r for the symmetric-MLP adjacency), wide values (dv = d / graph_heads), scores
computed once per adjacency head.

Written here rather than taken from a library because no fused kernel covers this case everywhere
(measured and read in torch 2.13): the CPU flash kernel and CUDA flash need dv == w (CUDA flash
takes no mask at all), the math backend holds the L x L scores for backward, FlexAttention has no
backward on CPU. Only CUDA's memory-efficient (and, within limits, cuDNN) kernels accept dv != w
with a padding mask. So:

* ``sdpa``: one ``scaled_dot_product_attention`` call, where widths are equal or a fused CUDA
  kernel accepts them as they are;
* ``scores_once``: ``ScoresOnceAttention`` below, blocked exact attention in plain PyTorch
  (flash-attention style: blocks of whole L x L score matrices, or of query rows for long cells;
  probabilities recomputed in backward; saved for backward only q, k, v and a (B*H, 1, L) key bias,
  nothing L x L). Every product is a bmm, so FlopCounterMode counts all of it;
* ``subheads``: the values viewed as dv / w sub-heads sharing expanded (stride-0) queries and keys
  for the fused SDPA kernels: exact, but the scores are recomputed dv / w times. The only path
  with attention dropout.

``choose_kernel`` picks one at start-up (``auto``): sdpa where it is fused and exact, else
scores_once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Elements of one score block (batch-heads x query rows x keys): 4 MiB of float32, big enough that
#: per-block Python overhead vanishes, small enough to stay in cache (2^19..2^21 measured equal).
BLOCK_ELEMENTS = 1 << 20


def _blocking(bh: int, n_q: int, n_k: int) -> tuple[int, int]:
    """(batch-heads per block, query rows per block): whole score matrices when one fits, several
    batch-heads per block; else one batch-head and a power-of-two chunk of query rows."""
    if n_q * n_k <= BLOCK_ELEMENTS:
        return max(1, min(bh, BLOCK_ELEMENTS // (n_q * n_k))), n_q
    return 1, min(n_q, 1 << int(math.log2(max(16, BLOCK_ELEMENTS // n_k))))


def _key_bias(keep: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(B*H, 1, L) additive bias: 0 for kept keys, the lowest finite value for padding (finite, so a
    cell with no kept key stays finite: the model's convention); None when nothing is padded."""
    keep = keep.reshape(keep.shape[0], -1)
    if not torch.compiler.is_compiling() and bool(keep.all()):
        return None
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :].expand(-1, heads, 1, keep.shape[1]).reshape(-1, 1, keep.shape[1])


class ScoresOnceAttention(torch.autograd.Function):
    """Exact blocked attention on (B*H, L, .) tensors, q and k of width w, v of width dv.

    Per block: S = bias + (scale Q) K^T, P = softmax(S) (in float32 at least), O = P V. Backward recomputes P
    (one fused softmax costs less on CPU than saving and re-exponentiating a log-sum-exp), then
    dV += P^T dO, dS = P * (dO V^T - rowsum), dQ = scale dS K, dK += dS^T (scale Q). In bf16/fp16 the
    scores, dS and the dK, dV sums over query blocks are float32 (the narrow Q, K upcast): bf16 holds a
    score near 30 only to +-0.06, +-6 % in its probability; only P V and P^T dO take P in the input's
    precision, as flash attention does.
    """

    @staticmethod
    def _probabilities(qs: torch.Tensor, kt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scores = torch.bmm(qs, kt) if bias is None else torch.baddbmm(bias, qs, kt)
        return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        bh, n_q, _ = q.shape
        group, chunk = _blocking(bh, n_q, k.shape[1])
        acc = torch.promote_types(q.dtype, torch.float32)
        qs = (q.to(acc) * scale).contiguous()
        k, v = k.to(acc).contiguous(), v.contiguous()
        out = v.new_empty(bh, n_q, v.shape[-1])
        for g0 in range(0, bh, group):
            g = slice(g0, g0 + group)
            kt, bg = k[g].transpose(1, 2), None if bias is None else bias[g]
            for i in range(0, n_q, chunk):
                p = ScoresOnceAttention._probabilities(qs[g, i:i + chunk], kt, bg).to(v.dtype)
                out[g, i:i + chunk] = torch.bmm(p, v[g])
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale, ctx.group, ctx.chunk = scale, group, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias = ctx.saved_tensors  # (k already upcast in forward)
        scale, group, chunk = ctx.scale, ctx.group, ctx.chunk
        bh, n_q, _ = q.shape
        qs, grad_out = (q.to(k.dtype) * scale).contiguous(), grad_out.contiguous()
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v, dtype=k.dtype)
        for g0 in range(0, bh, group):
            g = slice(g0, g0 + group)
            kt, vt, bg = k[g].transpose(1, 2), v[g].transpose(1, 2), None if bias is None else bias[g]
            for i in range(0, n_q, chunk):
                qi, doi = qs[g, i:i + chunk], grad_out[g, i:i + chunk]
                p = ScoresOnceAttention._probabilities(qi, kt, bg)
                ds = torch._softmax_backward_data(torch.bmm(doi, vt).to(p.dtype), p, -1, p.dtype).to(k.dtype)
                dv[g] += torch.bmm(p.to(v.dtype).transpose(1, 2), doi)
                dk[g] += torch.bmm(ds.transpose(1, 2), qi)
                dq[g, i:i + chunk] = torch.bmm(ds, k[g]) * scale
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(v.dtype), None, None


def scores_once(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over kept keys: q, k (B, H, L, w), v (B, H, L, dv), ``keep`` (B, L)
    or (B, 1, 1, L) -> (B, H, L, dv)."""
    b, h, n, w = q.shape
    bias = _key_bias(keep, h, torch.promote_types(q.dtype, torch.float32))  # added to float32 scores
    out = ScoresOnceAttention.apply(q.reshape(b * h, n, w), k.reshape(b * h, n, w), v.reshape(b * h, n, -1), bias,
                                    float(scale))
    return out.view(b, h, n, -1)


def subheads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
             dropout: float = 0.0) -> torch.Tensor:
    """The values as dv / w sub-heads of width w sharing each head's (expanded) queries and keys."""
    b, h, n, w = q.shape
    m = v.shape[-1] // w
    vs = v.reshape(b, h, n, m, w).transpose(2, 3).reshape(b, h * m, n, w)
    qs = q.unsqueeze(2).expand(b, h, m, n, w).reshape(b, h * m, n, w)
    ks = k.unsqueeze(2).expand(b, h, m, n, w).reshape(b, h * m, n, w)
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep.reshape(b, 1, 1, n), dropout_p=dropout,
                                       scale=scale)
    return o.view(b, h, m, n, w).transpose(2, 3).reshape(b, h, n, m * w)


def _fused_takes_wide_values(device: torch.device, dtype: torch.dtype, w: int, dv: int) -> bool:
    """Whether a fused CUDA SDPA kernel (memory-efficient, cuDNN) accepts q, k of width w and v of
    width dv with a padding mask and gradients, asked with small dummy tensors of those widths."""
    if device.type != "cuda":
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_efficient_attention

        q = torch.zeros(1, 1, 8, w, device=device, dtype=dtype, requires_grad=True)
        v = torch.zeros(1, 1, 8, dv, device=device, dtype=dtype, requires_grad=True)
        mask = torch.ones(1, 1, 1, 8, device=device, dtype=torch.bool)
        params = SDPAParams(q, q, v, mask, 0.0, False, False)
        return bool(can_use_efficient_attention(params) or can_use_cudnn_attention(params))
    except (ImportError, RuntimeError, TypeError):  # an API that moved: use the portable kernel
        return False


def choose_kernel(requested: str, device: torch.device, dtype: torch.dtype, w: int, dv: int) -> str:
    """The kernel ``auto`` means here: one fused SDPA call when the widths are equal (CPU or CUDA
    flash) or a fused CUDA kernel accepts dv != w; otherwise ``scores_once``."""
    if requested != "auto":
        return requested
    if dv == w or _fused_takes_wide_values(device, dtype, w, dv):
        return "sdpa"
    return "scores_once"


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                     kernel: str, dropout: float = 0.0) -> torch.Tensor:
    """Attention with gene-indexed queries and keys by ``kernel`` (one of ``scgraph.models.config.KERNELS``
    but auto)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep.reshape(q.shape[0], 1, 1, -1),
                                              dropout_p=dropout, scale=scale)
    if kernel == "subheads" or dropout > 0:
        return subheads(q, k, v, keep, scale, dropout)
    return scores_once(q, k, v, keep, scale)
