"""DeepSpeed pretraining: one trainer, one loop, the backbone a config value.

Lifecycle (torchtune's recipe protocol): ``setup`` -> ``load_checkpoint`` -> ``train`` (which
calls ``save_checkpoint``) -> ``cleanup``. A checkpoint restores everything: model, optimizer and
scheduler (DeepSpeed), step, epoch and the number of batches consumed in it (the loader skips
exactly those), and the MLflow run, so an interrupted run continues as if it never stopped.
Runs under the ``deepspeed`` launcher, ``torchrun``, or plain ``python`` (world size 1).

Longer than the project's 450 lines because the one loop owns the run's whole lifecycle (resume
checks, validation, telemetry and tracking hooks); the checkpoint's record is the next part to
move out, into the checkpointer that already owns its files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from scgraph.cli import Command, report, run
from scgraph.data.batch import Batch, SparseBatch
from scgraph.data.loader import Layout, Segment, ShardLoader, build_loader
from scgraph.data.shards import ShardSet
from scgraph.data.shards.stats import STATS_TARGET_SUM
from scgraph.data.tokenize import GeneChoice, build_batch, mean_profile
from scgraph.data.tokens import is_gene
from scgraph.io.files import check_directory
from scgraph.models.model import CellModel, build_model, check_token_ids, count_parameters
from scgraph.plots import line_plot
from scgraph.tracking import Tracker, check_store, flatten, git_commit
from scgraph.train.checkpointer import (
    MODEL_DIR,
    UNIVERSAL,
    Checkpointer,
    CheckpointRecord,
    export_encoder,
    load_pretrained,
)
from scgraph.train.config import PretrainConfig
from scgraph.train.distributed import all_ranks_agree, init_distributed, leave, mean_over_ranks
from scgraph.train.dsconfig import load_ds_config, precision, resolve_ds_config, zero_stage
from scgraph.train.objectives import pretraining_loss
from scgraph.train.optim import deepspeed_engine
from scgraph.train.telemetry import FlopCount, MemoryMeter, measure_flops, optimizer_state_bytes, peak_tflops

#: Above this share of step time spent waiting for batches, the run says the loader needs more workers.
DATA_WAIT_WARNING = 0.10


@dataclass
class _Window:
    """What happened since the last log line: the source of loss and throughput metrics."""

    loss: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    micro: int = 0
    cells: int = 0
    tokens: int | torch.Tensor = 0  # a device tensor until the log line reads it: no sync per micro-step
    wait: float = 0.0  # seconds the steps waited for their batches
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: tuple[float, dict[str, float]], batch: Batch, vocab_size: int) -> None:
        self.loss += loss[0]
        for name, value in loss[1].items():
            self.parts[name] = self.parts.get(name, 0.0) + value
        self.micro += 1
        self.cells += len(batch)
        self.tokens = self.tokens + is_gene(batch.genes, vocab_size).sum()


class Pretrainer:
    """Pretraining of one backbone (the configured objectives) under a DeepSpeed engine."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        # the recon objective's batches carry each cell's profile
        self.recon_genes = cfg.run.train.recon_genes if cfg.run.train.weights.get("recon") else None
        self.output = Path(cfg.output)
        self.checkpoints = Checkpointer(self.output)
        self.step = 0
        self.epoch = 0
        self.consumed = 0  # micro-batches consumed in the current epoch, on each rank
        self.segments: list[Segment] = []  # earlier parts of the current epoch on other data layouts
        self.losses: list[tuple[int, float]] = []
        self.tracker = Tracker(active=False)
        self.logged_until = 0  # the last step whose metrics MLflow holds
        self.best: tuple[int, float] = (0, math.inf)  # (step, validation loss) of the best checkpoint
        self.last_tag: str | None = None
        self.stop_signal: int | None = None

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        check_store(cfg.mlflow_uri)
        check_directory("--output", self.output)
        self.shards = ShardSet.open(cfg.shards)
        run = cfg.run
        if run.model.vocab_size != self.shards.vocab_size:  # the vocabulary is the shard set's
            run = dataclasses.replace(run, model=dataclasses.replace(run.model, vocab_size=self.shards.vocab_size))
            self.cfg = cfg = dataclasses.replace(cfg, run=run)
        ds_raw = load_ds_config(cfg.deepspeed_config) if cfg.deepspeed_config else {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size or run.train.batch_size}
        self.rank, self.world, self.device = init_distributed()
        if run.tokenizer.seq_len > self.shards.vocab_size:  # no cell has more genes: the rest would be padding
            if self.rank == 0:
                print(f"scgraph: --seq-len {run.tokenizer.seq_len} is more than the {self.shards.vocab_size} genes of "
                      f"{cfg.shards}: L = {self.shards.vocab_size}", flush=True)
            run = dataclasses.replace(run, tokenizer=dataclasses.replace(run.tokenizer, seq_len=self.shards.vocab_size))
            self.cfg = cfg = dataclasses.replace(cfg, run=run)
        self.ds = resolve_ds_config(ds_raw, run.train, self.world, micro_batch_size=cfg.micro_batch_size,
                                    on_cpu=self.device.type == "cpu")
        self.micro = self.ds["train_micro_batch_size_per_gpu"]
        self.accumulation = self.ds["gradient_accumulation_steps"]
        tag = self.checkpoints.latest()
        if tag and not cfg.resume:
            raise ValueError(f"{self.checkpoints.dir} already holds checkpoints (latest {tag}): pass --resume to "
                             "continue that run, or choose a new --output")
        if cfg.resume_from:
            if not (self.checkpoints.dir / cfg.resume_from).is_dir():
                raise ValueError(f"--resume-from {cfg.resume_from}: no such checkpoint in {self.checkpoints.dir} "
                                 f"(complete ones: {', '.join(self.checkpoints.complete_tags()) or 'none'})")
            tag = cfg.resume_from
        self.resume_tag = tag if cfg.resume else None
        if self.resume_tag:
            self._check_resumable(self.resume_tag)
            self.resume_changes = self.checkpoints.check_compatible(self.resume_tag, run, cfg.shards,
                                                                    self.shards.identity)
            saved_world = CheckpointRecord.read(self.checkpoints.dir, self.resume_tag).world_size or self.world
            if saved_world != self.world and zero_stage(self.ds) > 0:
                # ZeRO partitions are per rank: DeepSpeed's universal checkpoint loads on any number
                if self.rank == 0:
                    print(f"scgraph: {self.resume_tag} was written by {saved_world} rank(s), resuming on "
                          f"{self.world}: through DeepSpeed's universal checkpoint", flush=True)
                self.resume_tag = self.checkpoints.universal(self.resume_tag, self.rank)
            if self.resume_tag.endswith(UNIVERSAL):
                self.ds["checkpoint"] = {**self.ds.get("checkpoint", {}), "load_universal": True}

        # statistics of the whole set (validation shards too): the same whichever shards are held out
        self.choice = GeneChoice.build(run.tokenizer, self.shards.gene_stats, cfg.shards)
        self.val_shards = self._validation_shards()
        first = self._loader(0, 0)
        self.batches_per_epoch = first.batches_per_epoch
        if self.rank == 0:
            print(f"scgraph: loader: {first.memory()}", flush=True)
        self.max_steps = (cfg.epochs * self.batches_per_epoch // self.accumulation if cfg.epochs
                          else run.train.max_steps)
        torch.manual_seed(run.train.seed)
        model = build_model(run.model)
        if model.decoder is not None:  # (a resumed run's checkpoint then replaces it)
            model.decoder.start_at(torch.from_numpy(self._mean_profile()))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(self.ds), torch.float32)
        self.graph_kernel = model.choose_kernels(cfg.graph_kernel, self.device, dtype)
        model.checkpointing = cfg.activation_checkpointing
        self.params = count_parameters(model)
        self.flops = self._measure_flops(model, first)
        self.peak = peak_tflops(self.device, precision(self.ds), cfg.peak_tflops)
        self.engine = deepspeed_engine(model, self.ds, run.train, self.max_steps)
        if cfg.compile:
            self.engine.compile()
        self.memory = MemoryMeter(self.device)

    def _mean_profile(self) -> np.ndarray:
        """Each gene's mean model input over the corpus, zeros included (the decoder's starting bias):
        from the manifest's statistics where they describe the tokenizer's normalisation, else (an
        older shard set, another normalisation) from a sample of cells."""
        tok, stats = self.cfg.run.tokenizer, self.shards.gene_stats
        if stats is not None and tok.normalization == "log1p" and tok.target_sum == STATS_TARGET_SUM:
            return stats.mean().astype(np.float32)
        sample = self.shards.sample_counts(self.cfg.verify_shards)
        return mean_profile(sample, tok, self.cfg.run.model.vocab_size)

    def _check_resumable(self, tag: str) -> None:
        """Every rank checks the checkpoint before any rank loads it or touches MLflow, so a damaged
        one is refused by all ranks alike, naming the bad file and the previous complete tag."""
        problem = self.checkpoints.problem(tag, checksums=self.rank == 0)  # (sizes on the others: hashing is slow)
        if not all_ranks_agree(problem is None, self.device):
            raise self.checkpoints.refuse(tag, problem or f"checkpoint {self.checkpoints.dir / tag} failed its check "
                                                          "on another rank")

    def _validation_shards(self) -> ShardSet | None:
        """--val-shards (same vocabulary), or --val-fraction of the training shards split off (then
        training reads only the rest); None without validation data."""
        cfg = self.cfg
        if cfg.val_fraction:
            self.shards, held = self.shards.split(cfg.val_fraction, cfg.run.train.seed)
            return held
        if not cfg.val_shards:
            return None
        held = ShardSet.open(cfg.val_shards)
        if held.identity == self.shards.identity:
            raise ValueError(f"--val-shards {cfg.val_shards} holds the training cells of --shards {cfg.shards}: "
                             "validate on held-out cells (another shard set, or --val-fraction)")
        if held.feature_ids != self.shards.feature_ids:
            raise ValueError(f"--val-shards {cfg.val_shards} is not in the vocabulary of --shards {cfg.shards}: "
                             f"write it with python -m sharding write --vocab-from {cfg.shards}")
        return held

    def _layout(self) -> Layout:
        """This run's data layout: ranks, streams per rank, micro-batch, length windows."""
        return Layout(self.world, max(1, self.cfg.num_workers), self.micro, self.cfg.group_by_length)

    def _loader(self, epoch: int, skip: int, endless: bool = False) -> ShardLoader:
        run = self.cfg.run
        return build_loader(self.shards, run.tokenizer, batch_size=self.micro,
                            seed=run.train.seed, rank=self.rank, world_size=self.world,
                            num_workers=self.cfg.num_workers, shuffle_buffer=self.cfg.shuffle_buffer,
                            epoch=epoch, skip_batches=skip, verify=self.cfg.verify_shards,
                            pin_memory=self.device.type == "cuda", choice=self.choice,
                            group_by_length=self.cfg.group_by_length, endless=endless,
                            segments=tuple(self.segments) if epoch == self.epoch else ())

    def validate(self) -> float:
        """The loss on held-out cells: the same cells with the same masks every time (their own
        fixed seed), split over the ranks, averaged over all of them; the model is not changed."""
        run, cfg = self.cfg.run, self.cfg
        try:
            loader = build_loader(self.val_shards, run.tokenizer, batch_size=self.micro,
                                  seed=run.train.seed + 1, rank=self.rank,
                                  world_size=self.world, shuffle_buffer=0, verify=cfg.verify_shards,
                                  choice=self.choice)
        except ValueError as err:
            raise ValueError(f"validation data too small: {err}") from None
        limit = loader.batches_per_epoch
        if cfg.val_cells is not None:
            limit = min(limit, -(-cfg.val_cells // (self.micro * self.world)))
        self.engine.eval()
        total, batches = 0.0, 0
        with torch.no_grad():
            for cells in itertools.islice(loader, limit):
                batch = self._to_device(cells)
                total += pretraining_loss(self.engine, batch, run.train.weights)[0].item()
                batches += 1
        self.engine.train()
        return mean_over_ranks([total / batches], self.device)[0]

    def _validate_and_keep_best(self) -> None:
        loss = self.validate()
        self.tracker.metrics({"val/loss": loss}, step=self.step)
        if loss < self.best[1]:
            self.best = (self.step, loss)
            if self.last_tag != self._tag():
                self.save_checkpoint()
            self.checkpoints.mark_best(self.last_tag, self.rank)
            self.tracker.tags({"best_checkpoint": self.last_tag, "best_val_loss": f"{loss:.6g}"})
        if self.rank == 0:
            print(f"scgraph: step {self.step}: validation loss {loss:.4f} (best {self.best[1]:.4f} at step "
                  f"{self.best[0]})", flush=True)

    def _measure_flops(self, model: CellModel, loader: ShardLoader) -> FlopCount:
        """FLOPs of what trains: the configured objectives on the first cells of the first training
        micro-batch, counted on the model before DeepSpeed takes it (still on the CPU, in fp32). The
        batch is read in this process (stream 0's first: the first a DataLoader would deliver), so
        no workers start for it."""
        batch = self._to_device(next(iter(loader.dataset)))[: self.cfg.flops_cells]
        return measure_flops(model, batch, self.cfg.run.train.weights)

    # -- checkpoints -------------------------------------------------------------------------
    def load_checkpoint(self) -> None:
        if not self.resume_tag:
            if self.cfg.resume and self.rank == 0:
                print(f"scgraph: no checkpoint in {self.checkpoints.dir}: starting from scratch", flush=True)
            self._start_tracking(run_id=None)
            return
        client = self.checkpoints.load(self.engine, self.resume_tag)
        self.step, self.epoch, self.consumed = client["step"], client["epoch"], client["consumed"]
        # each segment: the layout's fields, then its batches (checkpoints before length grouping: 3 fields)
        self.segments = [(Layout(*row[:-1]), row[-1]) for row in client.get("segments", [])]
        saved = Layout(*client.get("layout", dataclasses.astuple(self._layout())))
        if saved != self._layout() and self.consumed:
            # another world size, micro-batch, number of workers or length window: the rest of the epoch is planned
            # afresh from the cells the earlier layout(s) did not consume
            self.segments.append((saved, self.consumed))
            self.consumed = 0
            if self.rank == 0:
                print(f"scgraph: the data layout changed ({saved} -> {self._layout()}): epoch {self.epoch} "
                      "continues with the cells not trained yet", flush=True)
        self.losses = [tuple(x) for x in client.get("losses", [])]
        self.best = tuple(client.get("best", self.best))
        self._start_tracking(run_id=client.get("mlflow_run_id"))
        self.tracker.tags({"resumed_from": self.resume_tag} | ({"resumed_changes": "; ".join(self.resume_changes)}
                                                              if self.resume_changes else {}))
        # steps between this checkpoint and the interruption were logged already (with the same
        # values: the run is deterministic from here): log only beyond them
        self.logged_until = self.tracker.last_step("train/loss")
        if self.rank == 0:
            print(f"scgraph: resumed {self.resume_tag} at step {self.step} (epoch {self.epoch}, "
                  f"{self.consumed} batches into it)" + "".join(f"; {c}" for c in self.resume_changes), flush=True)

    def _tag(self) -> str:
        return f"step{self.step:08d}"

    def save_checkpoint(self) -> None:
        tag = self._tag()
        client = {"step": self.step, "epoch": self.epoch, "consumed": self.consumed,
                  "layout": dataclasses.astuple(self._layout()),
                  "segments": [[*dataclasses.astuple(layout), batches] for layout, batches in self.segments],
                  "losses": self.losses, "mlflow_run_id": self.tracker.run_id, "best": list(self.best)}
        self.checkpoints.save(self.engine, tag, self._record(), client, self.rank)
        self.last_tag = tag

    def _record(self) -> CheckpointRecord:
        """What the checkpoint of this step says beside DeepSpeed's files."""
        return CheckpointRecord(
            run=self.cfg.run, feature_ids=self.shards.feature_ids, feature_names=self.shards.feature_names,
            shards=str(Path(self.cfg.shards).resolve()), shards_identity=self.shards.identity, step=self.step,
            zero_stage=zero_stage(self.ds), precision=precision(self.ds), world_size=self.world,
            mlflow_run_id=self.tracker.run_id, mlflow_uri=self.cfg.mlflow_uri, output=str(self.output.resolve()),
            experiment=self.cfg.experiment, gene_choice=self.choice and self.choice.to_record())

    # -- tracking ----------------------------------------------------------------------------
    def _start_tracking(self, run_id: str | None) -> None:
        cfg, model = self.cfg, self.cfg.run.model
        self.tracker = Tracker(active=self.rank == 0)
        params = flatten("", {"run": cfg.run.to_dict(), "deepspeed": self.ds}) | {
            "shards": cfg.shards, "world_size": self.world, "micro_batch_size": self.micro,
            "gradient_accumulation_steps": self.accumulation, "max_steps": self.max_steps,
            "device": self.device.type, "precision": precision(self.ds), "zero_stage": zero_stage(self.ds),
            "graph_kernel": self.graph_kernel or "", "peak_tflops": self.peak or ""}
        tags = {"backbone": model.backbone, "preset": model.preset, "shards_identity": self.shards.identity,
                "git_commit": git_commit(), "output": str(self.output.resolve())}
        shape = f"{model.preset} preset, hidden {model.hidden}, {model.layers} layers, L {cfg.run.tokenizer.seq_len}"
        data = f"shard set {self.shards.identity} ({self.shards.n_cells:,} cells, {self.shards.vocab_size:,} genes)"
        setup = (f"{self.max_steps} steps of {cfg.run.train.batch_size} cells on {self.world} rank(s), "
                 f"{precision(self.ds)}, ZeRO stage {zero_stage(self.ds)}")
        objectives = " + ".join(f"{name} x {weight:g}" for name, weight in cfg.run.train.weights.items() if weight)
        description = (f"Pretraining of the {model.backbone} ({shape}) on {data}, recipe {cfg.run.train.recipe} "
                       f"(objectives {objectives}): {setup}.")
        self.tracker.start(cfg.mlflow_uri, cfg.experiment, cfg.run_name, "pretrain", description,
                           params if run_id is None else {}, tags, run_id=run_id)
        if cfg.system_metrics:
            self.tracker.system_metrics()
        if run_id is None:
            self.tracker.dataset(f"shards-{self.shards.identity}", self.shards.identity,
                                 str(Path(cfg.shards).resolve()),
                                 {"cells": self.shards.n_cells, "genes": self.shards.vocab_size,
                                  "shards": len(self.shards.shard_cells)}, "training")
            self.tracker.metrics({f"cost/{k}": v for k, v in self.params.items()} | {
                "cost/encoder_flops_per_cell": self.flops.encoder,
                "cost/encoder_flops_per_cell_analytic": self.flops.analytic_encoder,
                "cost/train_forward_flops_per_cell": self.flops.forward,
                "cost/train_forward_flops_per_cell_analytic": self.flops.analytic_forward,
                "cost/train_flops_per_cell": self.flops.forward_backward,
                "cost/train_flops_per_cell_analytic": self.flops.analytic_forward_backward})
            if self.rank == 0:
                self.output.mkdir(parents=True, exist_ok=True)
                resolved = self.output / "resolved_config.json"
                resolved.write_text(json.dumps({"pretrain": dataclasses.asdict(cfg), "deepspeed": self.ds},
                                               indent=2, default=str))
                self.tracker.artifact(resolved, "config")
                if cfg.deepspeed_config:
                    self.tracker.artifact(cfg.deepspeed_config, "config")

    def _log_memory(self) -> None:
        """The memory summary, once per run at step 0 (measured in the first optimizer step on CPU,
        the CUDA allocator's peak at the end)."""
        self.tracker.metrics({f"cost/{'peak_memory' if k == 'peak' else f'memory_{k}'}_mib": v / 2**20
                              for k, v in self.memory.summary().items()})

    # -- training ----------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the saved data position onwards, epoch after epoch, from one loader
        (its workers live as long as the run); the position moves to the next epoch as its first
        batch is taken, so a checkpoint at an epoch's end still says that epoch."""
        loader = self._loader(self.epoch, self.consumed, endless=True)
        ends = loader.dataset.batches_in(self.epoch)
        for batch in loader:
            if self.consumed == ends:
                self.epoch, self.consumed, self.segments = self.epoch + 1, 0, []
                ends = loader.dataset.batches_in(self.epoch)
            self.consumed += 1
            yield batch

    def _to_device(self, cells: SparseBatch) -> Batch:
        """The loader's cells on this rank's device, made the model's ``Batch`` there (selection,
        masks, profile: ``build_batch``): the one way training, validation and the FLOP count get a
        batch. The gene ids are checked on the host first (on a GPU an id past the tables is a
        device assert, and reading it back there would stall the queue)."""
        run = self.cfg.run
        check_token_ids(cells.genes, run.model.vocab_size)
        return build_batch(cells.to(self.device), run.tokenizer, run.model.vocab_size, run.train.mask_ratio,
                           self.recon_genes, self.choice)

    def _micro_step(self, batch: Batch, measure: bool, boundary: bool) -> tuple[float, dict[str, float]]:
        """Forward, backward and (at an accumulation boundary) the optimizer step of one micro-batch;
        ``measure`` records the memory of each phase (first optimizer step only). The loss and each
        objective's part."""
        engine = self.engine
        if measure:
            self.memory.before_forward(engine.module)
        loss, parts = pretraining_loss(engine, batch, self.cfg.run.train.weights)
        if measure:
            self.memory.after_forward()
        value, *values = torch.stack([loss.detach(), *parts.values()]).tolist()  # one device sync
        if not math.isfinite(value):
            raise ValueError(f"the loss became {value} at step {self.step + 1} (rank {self.rank}): training diverged; "
                             f"lower --lr (now {self.cfg.run.train.lr:g}) or the objective weights, keep --grad-clip "
                             "on, and start again (or --resume-from an earlier checkpoint)")
        engine.backward(loss)
        if measure and boundary:
            self.memory.after_backward(engine.module, engine.optimizer)
        if boundary:
            self.step_lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on in step())
        engine.step()
        if measure and boundary:
            self.memory.after_step(engine.optimizer)
            if self.device.type == "cpu":
                self._log_memory()
        return value, dict(zip(parts, values))

    def _log(self, window: _Window) -> dict[str, float]:
        elapsed = time.perf_counter() - window.start
        loss, cells, tokens, wait = mean_over_ranks([window.loss / window.micro, window.cells, float(window.tokens),
                                                     window.wait], self.device)
        names = sorted(window.parts)
        parts = mean_over_ranks([window.parts[n] / window.micro for n in names], self.device) if len(names) > 1 else []
        metrics = {"train/loss": loss, **{f"train/loss_{n}": v for n, v in zip(names, parts)}, "train/lr": self.step_lr,
                   "train/cells_per_s": cells * self.world / elapsed,
                   "train/tokens_per_s": tokens * self.world / elapsed, "train/epoch": self.epoch,
                   "train/data_wait_s": wait * self.accumulation / window.micro, "train/data_wait_frac": wait / elapsed}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["train/grad_norm"] = float(norm)
        tflops = self.flops.forward_backward * metrics["train/cells_per_s"] / 1e12  # all ranks together
        metrics["train/tflops"] = tflops
        if self.peak:
            metrics["train/mfu"] = tflops / (self.peak * self.world)
        if self.step > self.logged_until:
            self.tracker.metrics(metrics, step=self.step)
        self.losses.append((self.step, loss))
        return metrics

    def train(self) -> None:
        from tqdm.auto import tqdm

        vocab = self.cfg.run.model.vocab_size
        measuring = self.step == 0
        window = _Window()
        batches = self._batches()
        windows, warned = 0, False  # logged in this process; the first holds the loader's start (workers, shard checks)
        with tqdm(total=self.max_steps, initial=self.step, desc=f"pretrain {self.cfg.run.model.backbone}",
                  disable=self.rank != 0, unit="step") as bar:
            while self.step < self.max_steps:
                waited = time.perf_counter()
                cells = next(batches)
                window.wait += time.perf_counter() - waited  # the loader's; building the batch is the step's work
                batch = self._to_device(cells)
                torch.manual_seed(cells.seed)  # the model's dropout masks: the batch's, as after a resume
                boundary = self.engine.is_gradient_accumulation_boundary()
                window.add(self._micro_step(batch, measuring, boundary), batch, vocab)
                if not boundary:
                    continue
                self.step += 1
                measuring = False
                bar.update()
                if self.step % self.cfg.run.train.log_every == 0 or self.step == self.max_steps:
                    metrics = self._log(window)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", cells_s=f"{metrics['train/cells_per_s']:.0f}",
                                    data_wait=f"{metrics['train/data_wait_frac']:.0%}")
                    windows += 1
                    if windows > 1 and not warned:
                        warned = self._warn_data_wait(metrics["train/data_wait_frac"])
                    window = _Window()
                if self.step % self.cfg.checkpoint_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
                if self.val_shards and self.cfg.val_every and self.step % self.cfg.val_every == 0 \
                        and self.step < self.max_steps:
                    self._validate_and_keep_best()
                if self._stopping():
                    break
        if self.last_tag != self._tag():
            self.save_checkpoint()
        if self.val_shards and self.stop_signal is None and self.best[0] != self.step:
            self._validate_and_keep_best()
        if self.stop_signal is None:
            self._finish()
        elif self.rank == 0:
            print(f"scgraph: stopped by {signal.Signals(self.stop_signal).name} at step {self.step}; checkpoint "
                  f"{self.checkpoints.dir / self.last_tag}: --resume continues from it", flush=True)

    def _warn_data_wait(self, fraction: float) -> bool:
        """Say (in one line) when the steps of a logging window waited on data; whether it did."""
        if fraction <= DATA_WAIT_WARNING:
            return False
        if self.rank == 0:
            print(f"scgraph: warning: steps spent {fraction:.0%} of their time waiting for batches: the input "
                  f"pipeline is the bottleneck; raise --num-workers (now {self.cfg.num_workers})", flush=True)
        return True

    def _stopping(self) -> bool:
        """Whether any rank was asked to stop (SIGTERM: SLURM's preemption and time limit; SIGINT;
        SIGUSR1: an early warning): all ranks agree, so they stop at the same step."""
        signals = torch.tensor([self.stop_signal or 0], device=self.device)
        dist.all_reduce(signals, op=dist.ReduceOp.MAX)
        self.stop_signal = int(signals.item()) or None
        return self.stop_signal is not None

    def _finish(self) -> None:
        if self.rank != 0:
            return
        backbone = self.cfg.run.model.backbone
        if self.device.type == "cuda" and self.logged_until == 0:
            self._log_memory()
        if self.losses:
            steps, losses = zip(*self.losses)
            curve = line_plot({backbone: (steps, losses)}, self.output / "loss_curve.png",
                              title=f"{backbone}: pretraining loss ({self.cfg.run.train.objectives})", xlabel="step",
                              ylabel="weighted loss (MSE)")
            self.tracker.artifact(curve)
        reference = self.output / "final_checkpoint.json"
        reference.write_text(json.dumps({"checkpoint_dir": str(self.checkpoints.dir.resolve()),
                                         "tag": self.last_tag, "step": self.step}, indent=2))
        self.tracker.artifact(reference)
        source = self.checkpoints.dir / self.last_tag
        if precision(self.ds) == "fp32" and zero_stage(self.ds) < 3 and not self.cfg.compile:
            state = self.engine.module.state_dict()  # the fp32 weights, whole on every rank: from memory
        else:  # bf16 copies in the module, or ZeRO-3 partitions: DeepSpeed's zero_to_fp32 gathers the fp32 masters
            state = load_pretrained(source).model.state_dict()
        model = export_encoder(state, self._record(), source, self.output / MODEL_DIR)
        self.tracker.artifact(model)
        final = self.losses[-1][1] if self.losses else float("nan")
        print(f"scgraph: {backbone} trained {self.step} steps on {self.world} rank(s), final loss {final:.4f}; "
              f"checkpoint {self.checkpoints.dir / self.last_tag}; encoder {self.output / MODEL_DIR}"
              + (f" (runs:/{self.tracker.run_id}/{MODEL_DIR})" if self.tracker.run_id else ""), flush=True)

    def catch_signals(self) -> None:
        """Turn SIGTERM, SIGINT and SIGUSR1 into "checkpoint at the next step, then stop" (until
        ``cleanup``, which gives back the handlers it found)."""
        def request(signum: int, frame: object) -> None:
            self.stop_signal = signum

        self._handlers = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    def cleanup(self, failed: bool = False) -> None:
        self.tracker.end("FAILED" if failed else "KILLED" if self.stop_signal else "FINISHED")
        leave(clean=not failed)
        for signum, handler in getattr(self, "_handlers", {}).items():
            signal.signal(signum, handler)


def run_pretraining(cfg: PretrainConfig) -> int:
    """The whole lifecycle; returns the process exit code (0 only when this rank finished)."""
    trainer = Pretrainer(cfg)
    trainer.catch_signals()
    try:
        trainer.setup()
        trainer.load_checkpoint()
        trainer.train()
    except BaseException as err:  # mark the MLflow run FAILED, say why in one line, exit non-zero
        trainer.cleanup(failed=True)
        if report(err):
            return 2
        raise
    state = optimizer_state_bytes(trainer.engine.optimizer)
    trainer.cleanup()
    if trainer.stop_signal:
        return 128 + trainer.stop_signal
    print(f"scgraph: rank {trainer.rank}/{trainer.world} finished (optimizer state {state} bytes)", flush=True)
    return 0


COMMAND = Command(PretrainConfig, run_pretraining, prog="pretrain.py", ignored=("--local_rank",),
                  epilog="Example: deepspeed --num_gpus 2 launchers/pretrain.py --backbone gnn --shards shards/ "
                         "--deepspeed_config ds_configs/cpu_zero2.json --max-steps 20 --output runs/gnn")


def main(argv: Sequence[str] | None = None) -> int:
    """``launchers/pretrain.py``."""
    return run(COMMAND, argv)
