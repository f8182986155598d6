"""Load a pretrained encoder from a DeepSpeed checkpoint, whatever the ZeRO stage it was saved at.

Accepts a pretraining ``--output`` directory (its latest checkpoint), a ``checkpoints`` directory,
or one checkpoint tag directory. ZeRO 1-3 partitions are consolidated to fp32 with DeepSpeed's own
``zero_to_fp32``; a ZeRO-0 checkpoint holds the whole module already.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scgraph.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from scgraph.models.model import CellModel, build_model

CHECKPOINTS = "checkpoints"
SCGRAPH_META = "scgraph.json"


@dataclass
class Pretrained:
    model: CellModel
    run: RunConfig
    meta: dict[str, Any]
    path: Path

    @property
    def feature_ids(self) -> list[str]:
        return self.meta["feature_ids"]


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints directory, tag) for any of the accepted forms, or a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / SCGRAPH_META).is_file():
        return path.parent, path.name
    for folder in (path / CHECKPOINTS, path):
        latest = folder / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            read_meta(folder, tag)
            return folder, tag
    raise FileNotFoundError(f"{path} holds no model: expected a pretraining --output directory, its "
                            f"{CHECKPOINTS}/ directory, or a checkpoint directory with {SCGRAPH_META}")


def read_meta(folder: Path, tag: str) -> dict[str, Any]:
    """The scgraph side of a checkpoint: run config, shard identity, gene vocabulary."""
    path = folder / tag / SCGRAPH_META
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {folder / tag} has no {SCGRAPH_META}: not an scgraph checkpoint")
    return json.loads(path.read_text())


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    return RunConfig(model=ModelConfig(**data["model"]), tokenizer=TokenizerConfig(**data["tokenizer"]),
                     train=TrainConfig(**data["train"]))


def load_pretrained(path: str | Path) -> Pretrained:
    """The encoder in fp32 on CPU, in eval mode, with its config and gene vocabulary."""
    folder, tag = resolve_checkpoint(path)
    meta = read_meta(folder, tag)
    run = run_config_from_dict(meta["run"])
    if meta.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    else:
        state = torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    model = build_model(run.model)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return Pretrained(model=model.eval(), run=run, meta=meta, path=folder / tag)
