"""The DeepSpeed config: read, reconcile with the scgraph config, validate before any work starts.

One source of truth per setting: the global batch (``train.batch_size``, the paper's 256) and the
learning rate come from the scgraph config; the micro-batch per rank comes from the DeepSpeed JSON
unless ``--micro-batch-size`` overrides it; gradient accumulation is derived so that
micro x accumulation x world = global batch, and any explicit value that disagrees is refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from scgraph.config import TrainConfig

#: Keys scgraph fills in itself, so a HuggingFace-style "auto" there just means "derive it".
_DERIVED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
            "gradient_clipping")


def _autos(value: Any, path: str = "") -> list[str]:
    """Dotted keys whose value is the string "auto"."""
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _autos(v, f"{path}.{key}" if path else key)]
    return [path] if value == "auto" else []


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """The JSON at ``path``, its keys that scgraph uses validated (one line naming a bad one).
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
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        value = ds.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"DeepSpeed config {path}: {key} must be an integer > 0; got {value!r}")
    clip = ds.get("gradient_clipping")
    if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0):
        raise ValueError(f"DeepSpeed config {path}: gradient_clipping must be a number >= 0; got {clip!r}")
    _check_sections(ds, path)
    return ds


def _check_sections(ds: dict[str, Any], path: Path) -> None:
    """The sections scgraph reads (ZeRO, bf16, fp16) through DeepSpeed's own models of them, so a
    wrong stage, type or unknown key is refused before any work, in one line naming the file,
    with DeepSpeed's reason. (DeepSpeed's whole-config check needs the process group; these do not.)"""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                       ("fp16", DeepSpeedFP16Config)):
        section = ds.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ValueError(f"DeepSpeed config {path}: {key} must be an object; got {section!r}")
        try:
            model(**section)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join([key, *map(str, first["loc"])])
            raise ValueError(f"DeepSpeed config {path}: {where}: {first['msg']}; got {first['input']!r}") from None


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
