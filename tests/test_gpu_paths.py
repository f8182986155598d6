"""What a first GPU run depends on, checked on CPU: configs that need no compiler, half precision that
stays finite, the device each rank takes, the MFU peak, kernels chosen the trainer's way, no value read
back on the hot path, and the GPU check itself (``benchmarks/gpu_check.py --smoke``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scgraph.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from scgraph.data.batch import SparseBatch
from scgraph.eval.embed import embed_cells
from scgraph.models.kernels import scores_once
from scgraph.models.model import build_model, mvp_loss
from scgraph.train.config import PretrainConfig
from scgraph.train.distributed import init_distributed, leave, rank_device
from scgraph.train.dsconfig import load_ds_config, precision, resolve_ds_config
from scgraph.train.optim import deepspeed_engine
from scgraph.train.telemetry import full_length_batch, table_peak
from scgraph.train.trainer import Pretrainer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.glob("ds_configs/*.json"))


@pytest.fixture(scope="module")
def group_of_one():
    """A process group of one rank, as plain ``python launchers/pretrain.py`` joins it; the
    environment it sets is given back afterwards."""
    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    yield init_distributed()
    leave(clean=True)
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_each_shipped_config_trains_with_torch_adamw_and_builds_no_op(path, group_of_one):
    """A config's Adam/AdamW block makes DeepSpeed compile FusedAdam (CUDA_HOME needed on a GPU):
    every shipped config leaves the optimizer to the trainer's torch AdamW. Only what a CPU cannot
    do is adapted: fp16 (refused on CPU) becomes bf16."""
    ds = load_ds_config(path)
    if precision(ds) == "fp16":
        ds = {key: value for key, value in ds.items() if key != "fp16"} | {"bf16": {"enabled": True}}
    _, world, device = group_of_one
    train = TrainConfig(batch_size=ds["train_micro_batch_size_per_gpu"])
    model = build_model(ModelConfig(backbone="gnn", vocab_size=50, hidden=16, layers=1, adjacency_rank=4))
    engine = deepspeed_engine(model, resolve_ds_config(ds, train, world, on_cpu=True), train, total_steps=2)
    assert type(engine.basic_optimizer) is torch.optim.AdamW
    batch = full_length_batch(model.cfg, 2, 8).to(device)
    loss = mvp_loss(engine(batch.genes, batch.values, batch.masked), batch.values, batch.masked)
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)


def test_linear_gnn_in_fp16_keeps_mixing_at_the_default_shape():
    """The linear GNN's normaliser sums L x w products: at the default width 128 (2r, the symmetric
    adjacency) and 513 tokens it passes fp16's largest value unless computed in float32."""
    cfg = ModelConfig(backbone="gnn_linear", vocab_size=1_000, layers=1)
    assert cfg.score_width == 128
    torch.manual_seed(0)
    model = build_model(cfg).half()
    batch = full_length_batch(cfg, 2, 512)
    genes = torch.cat([torch.full((2, 1), cfg.cls_id), batch.genes], dim=1)  # 513 tokens with the CLS
    values = torch.cat([torch.zeros(2, 1), batch.values], dim=1).half()
    mixed = []
    model.blocks[0].mixer.register_forward_hook(lambda module, args, out: mixed.append(out))
    model(genes, values).float().sum().backward()
    assert torch.isfinite(mixed[0]).all() and mixed[0].abs().amax() > 0
    adjacency = model.blocks[0].mixer.adjacency
    assert all(p.grad is not None and p.grad.abs().amax() > 0 for p in (adjacency.f.weight, adjacency.f2.weight))


@pytest.mark.slow
def test_gpu_check_smoke_runs_twice_into_one_folder(tmp_path):
    """A rerun into the same --out measures every stage again (the runs of the first are replaced,
    not refused), saves each stage, and ends with the command for a lent GPU and its timeout; a
    folder the check did not make is refused."""
    out = tmp_path / "check"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    for _ in range(2):
        proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        stages = json.loads((out / "gpu_check.json").read_text())["stages"]
        assert len(stages) == 8 and not [name for name, r in stages.items() if "error" in r], stages
        assert stages["length gnn"]["largest_fitting"]["length"] == 64
        assert {type(stages[f"train {m}"]["data_wait_frac"]) for m in ("transformer", "gnn", "gnn_linear")} == {float}
        assert re.search(r"timeout \d+ python benchmarks/gpu_check.py --out \S+", proc.stdout.splitlines()[-1])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes").write_text("kept")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path / "mine")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds files this check did not write" in proc.stderr
    assert (tmp_path / "mine" / "notes").read_text() == "kept"


def test_embedding_chooses_kernels_as_the_trainer_does():
    """embed_cells (scgraph.embed and the probe) fixes the GNN's kernels for the device it runs on,
    as the trainer does, whatever the model arrived with (here: a kernel another setting chose)."""
    run = RunConfig(model=ModelConfig(backbone="gnn", vocab_size=50, hidden=32, layers=2, adjacency_rank=8),
                    tokenizer=TokenizerConfig(seq_len=16))
    trainer_choice = build_model(run.model).choose_kernels("auto", torch.device("cpu"), torch.float32)
    model = build_model(run.model)
    model.choose_kernels("subheads", torch.device("cpu"), torch.float32)
    counts = sp.random(6, 50, density=0.4, format="csr", random_state=0) * 10
    embed_cells(model, run, counts.astype(np.float32), progress=False)
    assert trainer_choice == "scores_once" and {block.mixer.kernel for block in model.blocks} == {trainer_choice}


def test_a_forward_on_an_accelerator_reads_no_value_back():
    """The token-id and CLS checks run on host tensors only (on a GPU each read back stalls the queue):
    on the meta device, where any read back raises, a forward and the CLS pooling go through. The
    trainer checks each batch's gene ids on the host before the transfer instead."""
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=1, heads=4, cell_embedding="cls")  # the Transformer
    with torch.device("meta"):
        model = build_model(cfg)
    genes = torch.cat([torch.full((2, 1), cfg.cls_id), torch.randint(0, 50, (2, 8))], dim=1)
    assert model.cell_embedding(genes.to("meta"), torch.rand(2, 9, device="meta")).shape == (2, 32)
    trainer = Pretrainer(PretrainConfig(run=RunConfig(model=cfg), shards="unused"))
    trainer.device = torch.device("meta")
    cells = SparseBatch(torch.tensor([0, 2, 3]), torch.tensor([4, 99, 7], dtype=torch.int32), torch.ones(3), (0,), 2)
    with pytest.raises(ValueError, match="gene id 99 is outside the vocabulary"):
        trainer._to_device(cells)


@pytest.mark.parametrize(("env", "visible", "device"), [
    ({"LOCAL_RANK": "3"}, 0, "cpu"),
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 4, "cuda:3"),  # each task sees the node's GPUs
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 1, "cuda:0"),  # --gpus-per-task 1: its GPU is device 0
    ({"LOCAL_RANK": "3", "DS_ACCELERATOR": "cuda"}, 1, "cuda:0"),
    ({"LOCAL_RANK": "3"}, 2, "LOCAL_RANK 3 but this task sees 2 GPUs"),
    ({"LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}, 1, "DS_ACCELERATOR=cpu but 1 CUDA GPU"),
])
def test_each_rank_takes_a_device_it_sees(env, visible, device):
    if ":" in device or device == "cpu":
        assert rank_device(env, visible) == torch.device(device)
    else:
        with pytest.raises(ValueError, match=device):
            rank_device(env, visible)


@pytest.mark.parametrize(("section", "said"), [
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage: Input should be 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": "x"}}, "zero_optimization.overlap_comm: Input should be"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "zero_optimization.overlap_com: Extra inputs"),
    ({"bf16": {"enabled": "maybe"}}, "bf16.enabled: Input should be a valid boolean"),
    ({"fp16": []}, "fp16 must be an object; got []"),
    ({"gradient_clipping": "1"}, "gradient_clipping must be a number >= 0; got '1'"),
])
def test_deepspeed_sections_are_checked_by_deepspeeds_own_models_naming_the_file(section, said, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4} | section))
    with pytest.raises(ValueError, match=f"^DeepSpeed config {path}: " + re.escape(said)):
        load_ds_config(path)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA GH200 480GB", 989.0), ("Tesla T4", None),
])
def test_mfu_peak_of_each_gpu_is_its_datasheet_dense_bf16(name, peak):
    assert table_peak(name) == peak


def test_scores_once_in_bf16_forms_scores_and_sums_gradients_in_float32():
    """In bf16 the kernel's scores, dS and its dK, dV sums over query blocks (2,048 keys: 4 blocks)
    are float32: against float64 on the same bf16 inputs every output and gradient is within 1 %
    (scores formed in bf16 were off by 4 %)."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 2048, 16, generator=gen, dtype=torch.float64).mul(1.5).to(torch.bfloat16)
            for _ in range(2))
    v = torch.randn(1, 1, 2048, 32, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    grad = torch.randn(1, 1, 2048, 32, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    keep = torch.ones(1, 2048, dtype=torch.bool)
    keep[:, -100:] = False
    results = []
    for dtype in (torch.bfloat16, torch.float64):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = scores_once(*inputs, keep, 1.0)
        out.backward(grad.to(dtype))
        results.append([out.detach().double()] + [t.grad.double() for t in inputs])
    for got, want in zip(*results):
        assert (got - want).abs().max() < 0.01 * want.abs().max()
