"""Checkpoints: save, load, the latest tag, compatibility with the run resuming them, and the
frozen encoder a checkpoint holds.

A checkpoint is DeepSpeed's directory ``OUT/checkpoints/<tag>/`` (model, optimizer and scheduler
state at any ZeRO stage, plus our client state: step, epoch, batches consumed, losses, MLflow run)
with ``scgraph.json`` beside DeepSpeed's files: the resolved run config, the shard set's identity
and its gene vocabulary, so an encoder can be loaded and fed without the shards; and the run folder
it belongs to, whose MLflow run a copy of the folder must not write into.

Every file of a checkpoint (and of an exported encoder) is listed with its size and sha256 in
``scgraph.files.json``, written last; ``--resume``, the probe and ``scgraph.embed`` check them, so a
changed byte is named instead of trained on. Cost: hashing reads every byte once more, about 2 s
per GB on one core here (0.55 GB/s; a 100M-parameter model with fp32 Adam state is 1.6 GB), at
each save and at each check. Lists written before checksums (sizes only) are still accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scgraph.config import RunConfig
from scgraph.data.tokenize import GeneChoice
from scgraph.data.vocab import GeneVocab
from scgraph.io.files import file_sha256, write_atomic
from scgraph.models.model import CellModel, build_model
from scgraph.tracking import flatten, run_artifact

CHECKPOINTS = "checkpoints"
SCGRAPH_META = "scgraph.json"
#: The exported encoder: ``model/encoder.pt`` (fp32 state dict) and ``model/scgraph.json`` (config,
#: gene vocabulary). Logged as the pretraining run's artifact ``model``.
MODEL_DIR = "model"
ENCODER = "encoder.pt"
#: Written last into a checkpoint or an exported encoder: its files, each with its size and sha256.
FILES = "scgraph.files.json"
#: Run settings a resume may change: how long (``--max-steps``, and the warmup derived from it unless
#: given) and how often to log; they shape the schedule from here on, not what was learnt. A resume
#: that changes any other setting of the checkpoint's run config (tokenizer, objectives, optimiser,
#: batch, seed) is refused: the run's record would no longer say what trained it.
RESUMABLE_CHANGES = ("train.max_steps", "train.warmup_steps", "train.log_every")
#: Suffix of a tag's universal checkpoint (see ``Checkpointer.universal``).
UNIVERSAL = "_universal"


def latest_tag(folder: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` pointer names in ``folder``, or None."""
    latest = Path(folder) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def write_file_list(folder: Path) -> None:
    """The list of ``folder``'s files (size, sha256), written last: a folder that has it was written whole."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != FILES}
    write_atomic(folder / FILES, json.dumps(files))


def files_problem(folder: Path, checksums: bool = True) -> str | None:
    """What is wrong with the files of ``folder`` against its list (missing, resized, or, with
    ``checksums``, changed bytes), or None."""
    listing = folder / FILES
    if not listing.is_file():
        return f"checkpoint {folder} was not written whole (no {FILES})"
    for name, record in json.loads(listing.read_text()).items():
        size, digest = (record, None) if isinstance(record, int) else (record["bytes"], record["sha256"])
        path = folder / name
        if not path.is_file():
            return f"checkpoint file {path} is missing"
        if path.stat().st_size != size:
            return f"checkpoint file {path} has {path.stat().st_size} bytes, {size} when it was written"
        if checksums and digest is not None and file_sha256(path) != digest:
            return f"checkpoint file {path} changed since it was written (sha256 mismatch, same size)"
    return None


@dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint's ``scgraph.json`` says beside DeepSpeed's files: the run's resolved
    config, its gene vocabulary and how training chose each cell's genes (enough to load and feed
    the encoder without the shards), the shard set it trained on, how it was saved, and the run
    folder and MLflow run that own it. Files written by older versions lack some fields: None."""

    run: RunConfig
    feature_ids: list[str]
    feature_names: list[str]
    shards: str | None = None
    shards_identity: str | None = None
    step: int | None = None
    zero_stage: int = 0
    precision: str | None = None
    world_size: int | None = None
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    output: str | None = None
    experiment: str | None = None
    gene_choice: dict[str, Any] | None = None  # GeneChoice.to_record()
    exported_from: str | None = None  # set in an exported encoder: the checkpoint it came from

    @classmethod
    def read(cls, folder: Path, tag: str) -> CheckpointRecord:
        path = Path(folder) / tag / SCGRAPH_META
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {Path(folder) / tag} has no {SCGRAPH_META}: not an scgraph "
                                    "checkpoint")
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known} | {"run": RunConfig.from_dict(data["run"])})

    def write(self, folder: Path) -> None:
        write_atomic(Path(folder) / SCGRAPH_META, json.dumps(dataclasses.asdict(self) | {"run": self.run.to_dict()}))

    @property
    def vocab(self) -> GeneVocab:
        return GeneVocab(self.feature_ids, self.feature_names)

    @property
    def choice(self) -> GeneChoice | None:
        """What the training tokenizer knew of its corpus (normalised-rank divisors, variable
        genes), so inference selects each cell's genes as training did."""
        return GeneChoice.from_record(self.gene_choice, self.run.model.vocab_size)


class Checkpointer:
    """The checkpoints of one pretraining run (``OUT/checkpoints``)."""

    def __init__(self, output: Path) -> None:
        self.dir = Path(output) / CHECKPOINTS

    def latest(self) -> str | None:
        return latest_tag(self.dir)

    def check_compatible(self, tag: str, run: RunConfig, shards_path: str, shards_identity: str) -> list[str]:
        """Refuse to resume ``tag`` with another model, other data or other settings, or into a copy
        of another run's folder, saying what differs; returns the changes a resume may make
        (``RESUMABLE_CHANGES``) as ``'train.max_steps 6 -> 8'``, for the run's record."""
        record = CheckpointRecord.read(self.dir, tag)
        saved = dataclasses.asdict(record.run.model)
        current = dataclasses.asdict(run.model)
        if saved["vocab_size"] != current["vocab_size"]:
            raise ValueError(f"the checkpoint's vocabulary has {saved['vocab_size']} genes but the shard set "
                             f"{shards_path} has {current['vocab_size']}: resume needs the same shards")
        changed = sorted(k for k in current if saved.get(k) != current[k])
        if changed:
            raise ValueError("the model config differs from the checkpoint's in " + ", ".join(
                f"{k} ({saved.get(k)!r} -> {current[k]!r})" for k in changed))
        if record.shards_identity != shards_identity:
            raise ValueError(f"the checkpoint was trained on shard set {record.shards_identity}, "
                             f"not {shards_identity} ({shards_path})")
        self._check_owner(record)
        saved, current = (flatten("", {k: v for k, v in r.to_dict().items() if k != "model"})
                          for r in (record.run, run))
        changed = [k for k in sorted(saved) if k in current and saved[k] != current[k]]
        refused = [k for k in changed if k not in RESUMABLE_CHANGES]
        if refused:
            raise ValueError(f"--resume continues checkpoint {self.dir / tag} with its own settings, but these differ: "
                             + ", ".join(f"{k} ({saved[k]!r} -> {current[k]!r})" for k in refused)
                             + f"; resume with the same settings (only {', '.join(RESUMABLE_CHANGES)} may change), or "
                               "start a new run in a new --output")
        return [f"{k} {saved[k]} -> {current[k]}" for k in changed]

    def _check_owner(self, record: CheckpointRecord) -> None:
        """Refuse to resume a copy of another run folder that still holds that run: the copy would
        write into the original's MLflow run (its metrics, its model artifact, its status). A moved
        folder (the original is gone) resumes."""
        recorded, run_id, here = record.output, record.mlflow_run_id, self.dir.parent.resolve()
        if recorded is None or run_id is None or Path(recorded) == here:
            return
        original, owner = Checkpointer(Path(recorded)), None
        with contextlib.suppress(OSError, ValueError):  # nothing readable there: the folder was moved
            owner = CheckpointRecord.read(original.dir, original.latest() or "").mlflow_run_id
        if owner == run_id:
            raise ValueError(f"--output {here} is a copy of the run folder {recorded}, which owns MLflow run "
                                 f"{run_id}: resuming the copy would write into that run; resume {recorded} itself, "
                                 "or start a new run in a new --output")

    def save(self, engine: Any, tag: str, record: CheckpointRecord, client_state: dict[str, Any], rank: int) -> None:
        """scgraph.json goes first: DeepSpeed moves its ``latest`` pointer only after writing its own
        files, so a kill at any moment leaves ``latest`` on a resumable checkpoint. The file list
        (names, sizes, sha256) goes last: a checkpoint that has it was written whole, and a file
        whose bytes changed is named on resume."""
        folder = self.dir / tag
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            record.write(folder)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state)
        dist.barrier()
        if rank == 0:
            write_file_list(folder)
        dist.barrier()

    def mark_best(self, tag: str, rank: int) -> None:
        """Point ``checkpoints/best`` at ``tag`` (the lowest validation loss so far)."""
        if rank == 0:
            write_atomic(self.dir / "best", tag)

    def complete_tags(self) -> list[str]:
        """Tags written whole, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.dir.glob(f"*/{FILES}") if not p.parent.name.endswith(UNIVERSAL))

    def problem(self, tag: str, checksums: bool = True) -> str | None:
        """What is wrong with checkpoint ``tag`` on disk (a missing, resized or changed file), or None."""
        return files_problem(self.dir / tag, checksums)

    def refuse(self, tag: str, problem: str) -> ValueError:
        """The one-line error for a checkpoint that cannot be resumed, naming what to resume instead."""
        earlier = [t for t in self.complete_tags() if t < tag and self.problem(t, checksums=False) is None]
        advice = (f"resume from the previous complete checkpoint with --resume-from {earlier[-1]}" if earlier
                  else "no earlier complete checkpoint exists: start over in a new --output")
        return ValueError(f"{problem}; {advice}")

    def universal(self, tag: str, rank: int) -> str:
        """The tag of ``tag``'s DeepSpeed universal checkpoint (ZeRO state gathered per parameter,
        loadable on any number of ranks), converted once by rank 0 with DeepSpeed's own tool; the
        file list is written last, as for any checkpoint, so a killed conversion is redone."""
        target = f"{tag}{UNIVERSAL}"
        if rank == 0 and self.problem(target, checksums=False) is not None:
            folder = self.dir / target
            shutil.rmtree(folder, ignore_errors=True)
            done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                   str(self.dir / tag), "--output_folder", str(folder), "--inject_missing_state"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise ValueError(f"checkpoint {self.dir / tag} could not be converted for another number of ranks "
                                 f"(deepspeed.checkpoint.ds_to_universal: {done.stderr.strip().splitlines()[-1:]})")
            shutil.copy(self.dir / tag / SCGRAPH_META, folder / SCGRAPH_META)
            write_file_list(folder)
        dist.barrier()
        return target

    def load(self, engine: Any, tag: str) -> dict[str, Any]:
        """Model, optimizer and scheduler into ``engine``; returns the client state. A file that
        cannot be read is a ValueError naming the checkpoint and what to resume instead."""
        try:
            _, client = engine.load_checkpoint(str(self.dir), tag=tag)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
            raise self.refuse(tag, f"checkpoint {self.dir / tag} cannot be read ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if client is None:
            raise self.refuse(tag, f"DeepSpeed found no checkpoint in {self.dir / tag}")
        return client


@dataclass
class Pretrained:
    """A frozen encoder (fp32, CPU, eval mode), the record of the checkpoint it came from, and where."""

    model: CellModel
    record: CheckpointRecord
    path: Path

    @property
    def run(self) -> RunConfig:
        return self.record.run


def resolve_checkpoint(path: str | Path, mlflow_uri: str | None = None) -> tuple[Path, str]:
    """(folder, name) of what ``path`` names: an exported encoder folder (``model/``, or the
    ``runs:/<run_id>/model`` artifact of a pretraining run), a pretraining ``--output`` directory
    (its latest checkpoint), its ``checkpoints`` directory, or one checkpoint directory; or a clear
    error."""
    if str(path).startswith("runs:/"):
        path = run_artifact(str(path), mlflow_uri)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / SCGRAPH_META).is_file():
        return path.parent, path.name
    for folder in (path / CHECKPOINTS, path):
        tag = latest_tag(folder)
        if tag:
            CheckpointRecord.read(folder, tag)
            return folder, tag
    raise FileNotFoundError(f"{path} holds no model: expected a pretraining --output directory, its "
                            f"{CHECKPOINTS}/ directory, a checkpoint directory with {SCGRAPH_META}, or an encoder "
                            f"exported as runs:/RUN_ID/{MODEL_DIR}")


def export_encoder(state: dict[str, torch.Tensor], record: CheckpointRecord, source: Path, folder: Path) -> Path:
    """The encoder as a self-contained folder (``state``'s fp32 weights, the run config, the gene
    vocabulary; ``source`` the checkpoint they equal): what a user keeps, and what
    ``load_pretrained`` reads without DeepSpeed."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().float().cpu() for k, v in state.items()}, folder / ENCODER)
    dataclasses.replace(record, exported_from=str(source)).write(folder)
    write_file_list(folder)
    return folder


def load_pretrained(path: str | Path, mlflow_uri: str | None = None) -> Pretrained:
    """The encoder in fp32 on CPU, in eval mode, with its config and gene vocabulary, from any form
    ``resolve_checkpoint`` accepts. ZeRO 1-3 partitions are consolidated with DeepSpeed's own
    ``zero_to_fp32``; a ZeRO-0 checkpoint and an exported encoder hold the whole module already."""
    folder, tag = resolve_checkpoint(path, mlflow_uri)
    problem = files_problem(folder / tag) if (folder / tag / FILES).is_file() else None  # (older exports: no list)
    if problem:
        raise ValueError(f"checkpoint {folder / tag} cannot be read ({problem}); choose another checkpoint directory")
    record = CheckpointRecord.read(folder, tag)
    try:
        if (folder / tag / ENCODER).is_file():
            state = torch.load(folder / tag / ENCODER, map_location="cpu", weights_only=True)
        elif record.zero_stage >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        else:
            state = torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=False)["module"]
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as err:
        problem = Checkpointer(folder.parent).problem(tag) if folder.name == CHECKPOINTS else None
        raise ValueError(f"checkpoint {folder / tag} cannot be read ({problem or f'{type(err).__name__}: {err}'}); "
                         "choose another checkpoint directory") from None
    model = build_model(record.run.model)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return Pretrained(model=model.eval(), record=record, path=folder / tag)
