"""The DeepSpeed config: read, reconcile with the scgraph config, validate before any work starts.

One source of truth per setting: the global batch (``train.batch_size``, the paper's 256) and the
learning rate come from the scgraph config; the micro-batch per rank comes from the DeepSpeed JSON
unless ``--micro-batch-size`` overrides it; gradient accumulation is derived so that
micro x accumulation x world = global batch, and any explicit value that disagrees is refused.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scgraph.cli import construct
from scgraph.config import TrainConfig


@dataclass
class _Switch:
    """A DeepSpeed section that is on or off."""

    enabled: bool = False


@dataclass
class _Zero:
    """ZeRO's stage: 0 (plain data parallel) to 3 (parameters partitioned too)."""

    stage: int = 0

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3; got {self.stage}")


@dataclass
class _Schema:
    """The keys of a DeepSpeed JSON that scgraph reads or derives; any other key passes through to
    DeepSpeed unchecked."""

    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None
    train_batch_size: int | None = None
    gradient_clipping: float | None = None
    zero_optimization: _Zero = field(default_factory=_Zero)
    bf16: _Switch = field(default_factory=_Switch)
    fp16: _Switch = field(default_factory=_Switch)


#: Keys scgraph fills in itself, so a HuggingFace-style "auto" there just means "derive it".
_DERIVED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
            "gradient_clipping")


def _autos(value: Any, path: str = "") -> list[str]:
    """Dotted keys whose value is the string "auto"."""
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _autos(v, f"{path}.{key}" if path else key)]
    return [path] if value == "auto" else []


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """The JSON at ``path``, validated against the keys scgraph uses (one line naming a bad one).
    "auto" where scgraph derives the value (batch sizes, clipping, the optimizer's lr and weight
    decay) means just that; anywhere else DeepSpeed cannot read it, so it is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object")
    for key in _DERIVED:
        if ds.get(key) == "auto":
            del ds[key]
    for key in ("lr", "weight_decay"):
        if ds.get("optimizer", {}).get("params", {}).get(key) == "auto":
            del ds["optimizer"]["params"][key]
    autos = _autos(ds)
    if autos:
        raise ValueError(f"DeepSpeed config {path}: {', '.join(autos)} is 'auto', a HuggingFace Trainer placeholder "
                         "that DeepSpeed itself cannot read: give a value")
    try:
        construct(_Schema, ds, strict=False)
    except ValueError as err:
        raise ValueError(f"DeepSpeed config {path}: {err}") from None
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if ds.get(key) is not None and ds[key] <= 0:
            raise ValueError(f"DeepSpeed config {path}: {key} must be > 0; got {ds[key]}")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds: dict[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def resolve_ds_config(ds: dict[str, Any], train: TrainConfig, world_size: int, *,
                      micro_batch_size: int | None = None, on_cpu: bool = False) -> dict[str, Any]:
    """A complete, consistent DeepSpeed config for this world size (the input is not modified)."""
    ds = copy.deepcopy(ds)
    micro = micro_batch_size or ds.get("train_micro_batch_size_per_gpu")
    if not micro or micro <= 0:
        raise ValueError("set train_micro_batch_size_per_gpu in the DeepSpeed config or pass --micro-batch-size")
    per_step = micro * world_size
    if train.batch_size % per_step:
        raise ValueError(
            f"global batch {train.batch_size} is not a multiple of micro-batch {micro} x world size "
            f"{world_size} = {per_step}: change --batch-size or --micro-batch-size")
    accumulation = train.batch_size // per_step
    for key, derived in (("gradient_accumulation_steps", accumulation), ("train_batch_size", train.batch_size)):
        given = ds.get(key)
        if given is not None and int(given) != derived:
            raise ValueError(
                f"DeepSpeed config sets {key}={given} but micro-batch {micro} x world size {world_size} "
                f"x accumulation for global batch {train.batch_size} needs {key}={derived}")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = train.batch_size
    if train.grad_clip is not None:
        ds["gradient_clipping"] = train.grad_clip
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {})
        ds["optimizer"]["params"]["lr"] = train.lr
        ds["optimizer"]["params"]["weight_decay"] = train.weight_decay
    if on_cpu and precision(ds) == "fp16":
        raise ValueError("fp16 is not supported by DeepSpeed on CPU: use a bf16 or fp32 config "
                         "(ds_configs/cpu_zero2.json, cpu_zero3.json)")
    return ds
