"""The paper's Table II cost columns: FLOPs per cell (measured and analytic) and training memory.

FLOPs are counted twice over: for the encoder alone (the paper's Table II compares encoders) and
for a training step on the objectives the run trains (encoder, the value head, the gene decoder
when an objective reads the cell embedding; forward and backward): what MFU divides by.
``FlopCounterMode`` counts zero FLOPs for the fused CPU ``scaled_dot_product_attention`` kernel, so
the measurement runs under the math backend, which is counted. The analytic count sits beside it as
a cross-check; both count matrix products only (multiply-add = 2 FLOPs), as the paper does.
Memory on CPU is measured by the distinct storages each category holds (no allocator statistics
exist there); on CUDA by ``max_memory_allocated``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scgraph.config import ModelConfig
from scgraph.data.batch import Batch
from scgraph.models.model import CellModel, mvp_loss
from scgraph.train.objectives import decoded_genes, pretraining_loss


def analytic_encoder_flops(cfg: ModelConfig, length: int) -> int:
    """Forward FLOPs of the encoder (value encoder and blocks) for one cell of ``length`` tokens
    (matrix products, multiply-add = 2).

    The GNN's scores A[g,g] are counted once per adjacency head (the formula's cost, and what the
    scores-once kernel does; the sub-head kernel recomputes them per sub-head). The linear GNN
    never forms them: phi(V)^T (H W_v), then phi(U) times that.
    """
    n, d, w = length, cfg.hidden, cfg.score_width
    per_layer = 2 * 2 * n * d * cfg.ffn_width
    if cfg.family == "attention":
        per_layer += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d
    else:
        per_layer += 2 * n * d * d * (2 if cfg.graph_out_proj else 1)
        if cfg.backbone == "gnn_linear":
            per_layer += 2 * 2 * n * w * d
        else:
            per_layer += 2 * n * n * w * cfg.graph_heads + 2 * n * n * d
        if cfg.adjacency == "symmetric_mlp":
            per_layer += cfg.graph_heads * 2 * 2 * n * cfg.adjacency_rank ** 2
    value_encoder = {"linear": 2 * n * d, "mlp": 2 * n * d + 2 * n * d * d, "bins": 0}[cfg.value_encoder]
    return cfg.layers * per_layer + value_encoder


def analytic_training_flops(cfg: ModelConfig, length: int, weights: dict[str, float], decoded: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs per cell of a training step on the objectives ``weights``:
    the encoder, the value head (run in every forward, back-propagated only for mvp), and, when an
    objective reads the cell embedding, the gene decoder (its projection, and one score per cell for
    each of the ``decoded`` distinct genes its batch scores). Backward costs each product twice
    (gradients of its input and of its weights), but the value encoder's first layer once (its input,
    the data, takes no gradient)."""
    n, d = length, cfg.hidden
    encoder = analytic_encoder_flops(cfg, length)
    data_layer = 0 if cfg.value_encoder == "bins" else 2 * n * d
    head = 2 * n * d
    decoder = 2 * d * d + 2 * d * decoded if decoded else 0
    backward = 2 * encoder - data_layer + (2 * head if weights.get("mvp", 0.0) > 0 else 0) + 2 * decoder
    forward = encoder + head + decoder
    return forward, forward + backward


#: Dense bf16/fp16 tensor-core peak TFLOP/s of common GPUs (vendor data sheets), for MFU. Matched
#: by the longest name that occurs in ``torch.cuda.get_device_name()``. The NVL (PCIe, NVLink bridge)
#: parts run lower clocks than the SXM ones: 1,671 TFLOP/s with sparsity, 835 dense.
PEAK_TFLOPS = {"H200": 989.0, "H200 NVL": 835.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
               "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A10": 125.0,
               "L4": 121.0, "V100": 125.0, "A6000": 155.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def table_peak(name: str) -> float | None:
    """The table's peak for the GPU named ``name``, or None for one it does not hold."""
    matches = [key for key in PEAK_TFLOPS if key in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def peak_tflops(device: torch.device, precision: str, explicit: float | None = None) -> float | None:
    """The device's peak TFLOP/s for MFU: ``explicit``, else the table for a known GPU in bf16 or
    fp16; None otherwise (fp32 on a GPU, any CPU: give --peak-tflops)."""
    if explicit is not None:
        return explicit
    if device.type != "cuda" or precision == "fp32":
        return None
    return table_peak(torch.cuda.get_device_name(device))


@dataclass
class FlopCount:
    """FLOPs per cell, measured and analytic: the encoder's forward alone, and a training step's
    forward and forward + backward on the objectives it trains."""

    encoder: float
    forward: float
    forward_backward: float
    analytic_encoder: float
    analytic_forward: float
    analytic_forward_backward: float


def full_length_batch(cfg: ModelConfig, batch: int, length: int, seed: int = 0) -> Batch:
    """Cells with ``length`` distinct genes each, no padding: the cost of a full sequence."""
    if length > cfg.vocab_size:
        raise ValueError(f"length {length} exceeds the vocabulary ({cfg.vocab_size} genes)")
    gen = torch.Generator().manual_seed(seed)
    genes = torch.stack([torch.randperm(cfg.vocab_size, generator=gen)[:length] for _ in range(batch)])
    return Batch(genes=genes, values=torch.rand(batch, length, generator=gen) * 5,
                 masked=torch.rand(batch, length, generator=gen) < 0.15)


def measure_flops(model: CellModel, batch: Batch, weights: dict[str, float]) -> FlopCount:
    """FLOPs per cell of ``batch``, counted by ``FlopCounterMode`` under the math attention backend:
    the encoder's forward, and the forward and forward + backward of the loss on the objectives
    ``weights``. Dense kernels cost the same for padded and full cells; the gene decoder's cost per
    cell grows with the distinct genes the batch scores."""
    batch = batch.to(next(model.parameters()).device)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as encoder, torch.no_grad():
            model.encode(batch.genes, batch.values, batch.masked)
        with FlopCounterMode(display=False) as forward, torch.no_grad():
            pretraining_loss(model, batch, weights)
        with FlopCounterMode(display=False) as both:
            pretraining_loss(model, batch, weights)[0].backward()
    model.zero_grad(set_to_none=True)
    decode = decoded_genes(batch, weights)
    length = batch.genes.shape[1]
    analytic = analytic_training_flops(model.cfg, length, weights, 0 if decode is None else len(torch.unique(decode)))
    cells = len(batch)
    return FlopCount(encoder=encoder.get_total_flops() / cells, forward=forward.get_total_flops() / cells,
                     forward_backward=both.get_total_flops() / cells,
                     analytic_encoder=float(analytic_encoder_flops(model.cfg, length)),
                     analytic_forward=float(analytic[0]), analytic_forward_backward=float(analytic[1]))


def _tensors(obj: object, depth: int = 3):
    """Tensors held by ``obj`` directly or inside lists, tuples and dicts (a few levels deep)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth - 1)


class StorageCounter:
    """Bytes of distinct storages. Views (an expanded U[g], a slice of a flat ZeRO buffer) share
    their base's storage, so each storage is counted once. Use one counter per set of tensors
    alive at the same moment: a freed storage's address is reused by later tensors. ``exclude``
    holds addresses counted elsewhere (the parameters, alive throughout)."""

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.seen: set[int] = set(exclude or ())

    def add(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t.device.type == "meta" or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in self.seen or storage.nbytes() == 0:
                continue
            self.seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total


def parameter_tensors(module: torch.nn.Module):
    """What a rank holds of each parameter: its ZeRO-3 partition when partitioned, else itself."""
    for p in module.parameters():
        yield getattr(p, "ds_tensor", p)


def optimizer_tensors(optimizer: object):
    """The base optimizer's state and master weights (DeepSpeed wraps it as ``.optimizer``)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        yield from _tensors(state)
    for group in getattr(inner, "param_groups", []):
        yield from group["params"]


def optimizer_state_bytes(optimizer: object) -> int:
    """Bytes of the base optimizer's state (Adam moments) on this rank: what ZeRO partitions."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return StorageCounter().add(t for state in getattr(inner, "state", {}).values() for t in _tensors(state))


def gradient_tensors(module: torch.nn.Module, optimizer: object):
    """Gradients held after backward: on parameters, and in the ZeRO optimizer's partition buffers
    (attributes whose name mentions grad), which is where stages 1-3 keep them."""
    for p in module.parameters():
        if p.grad is not None:
            yield p.grad
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in getattr(inner, "param_groups", []):
        for p in group["params"]:
            if p.grad is not None:
                yield p.grad
    for name, value in vars(optimizer).items() if optimizer is not inner else ():
        if "grad" in name.lower():
            yield from _tensors(value)


class SavedTensors:
    """Context manager: bytes of distinct storages saved for backward during a forward pass."""

    def __init__(self, exclude: StorageCounter) -> None:
        self.counter = exclude
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += self.counter.add([t])
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class MemoryMeter:
    """Peak training memory of this rank. CUDA: ``max_memory_allocated``. CPU: the measured bytes
    of parameters, tensors saved for backward, gradients, and optimizer state (with master
    weights) in the first optimizer step, each category counted when all its tensors are alive."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.param_storages: set[int] = set()
        self.parts: dict[str, int] = {}
        self._activations: SavedTensors | None = None

    def _count(self, tensors) -> int:
        return StorageCounter(exclude=self.param_storages).add(tensors)

    def before_forward(self, module: torch.nn.Module) -> None:
        if "params" not in self.parts:
            counter = StorageCounter()
            self.parts["params"] = counter.add(parameter_tensors(module))
            self.param_storages = counter.seen
            self._activations = SavedTensors(StorageCounter(exclude=self.param_storages))
            self._activations.__enter__()

    def after_forward(self) -> None:
        if self._activations is not None:
            self._activations.__exit__(None, None, None)
            self.parts["activations"] = self._activations.bytes
            self._activations = None

    def after_backward(self, module: torch.nn.Module, optimizer: object) -> None:
        if "gradients" not in self.parts:
            self.parts["gradients"] = self._count(gradient_tensors(module, optimizer))

    def after_step(self, optimizer: object) -> None:
        if "optimizer" not in self.parts:
            self.parts["optimizer"] = self._count(optimizer_tensors(optimizer))

    def summary(self) -> dict[str, float]:
        """Bytes: ``peak`` and, as measured, ``params``, ``activations``, ``gradients``, ``optimizer``."""
        out = {k: float(v) for k, v in self.parts.items()}
        if self.device.type == "cuda":
            out["peak"] = float(torch.cuda.max_memory_allocated(self.device))
        else:
            out["peak"] = float(sum(self.parts.values()))
        return out


@dataclass
class StepCost:
    """What one training step of a model costs on this device."""

    peak_memory_bytes: float
    memory: dict[str, float]
    cells_per_s: float


def measure_training_step(model: CellModel, batch: Batch, *, timed_steps: int = 2, lr: float = 2e-4) -> StepCost:
    """Peak memory of a first AdamW step (MemoryMeter) and cells/s over ``timed_steps`` more.

    Wrap the call in ``sdpa_kernel(SDPBackend.MATH)`` to cost the non-fused attention the paper used.
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))
    meter = MemoryMeter(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(measure: bool) -> None:
        if measure:
            meter.before_forward(model)
        loss = mvp_loss(model(batch.genes, batch.values, batch.masked), batch.values, batch.masked)
        if measure:
            meter.after_forward()
        loss.backward()
        if measure:
            meter.after_backward(model, optimizer)
        optimizer.step()
        if measure:
            meter.after_step(optimizer)
        optimizer.zero_grad(set_to_none=True)

    step(measure=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(timed_steps):
        step(measure=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    memory = meter.summary()
    return StepCost(peak_memory_bytes=memory.pop("peak"), memory=memory,
                    cells_per_s=timed_steps * len(batch) / seconds if seconds else float("nan"))
