"""The demo's building blocks (the whole demo takes minutes: run `make demo` for that): the held-out
split survives the census layout and the shards, and a second run reuses every finished step."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import TINY_DEMO, iter_cells

from scgraph.data.shards import ShardSet
from scgraph.demo import DEMO_BACKBONES, Demo, DemoConfig, StepFailed, held_out_cells
from scgraph.train.checkpointer import load_pretrained


@pytest.mark.slow
def test_held_out_cells_never_reach_pretraining_and_share_its_vocabulary(tiny_demo):
    pretrain, heldout = ShardSet.open(str(tiny_demo.pretrain_shards)), ShardSet.open(str(tiny_demo.heldout_shards))
    assert heldout.n_cells == 400 and pretrain.n_cells == 7839 - 400
    assert heldout.feature_ids == pretrain.feature_ids
    pretrain_ids = {c.soma_joinid for c in iter_cells(pretrain)}
    held = list(iter_cells(heldout))
    assert not pretrain_ids & {c.soma_joinid for c in held}
    assert len({c.obs["cell_type"] for c in held}) == 11
    for backbone in DEMO_BACKBONES:  # each trained the demo's steps on these shards
        final = json.loads((tiny_demo.pretrain_output(backbone) / "final_checkpoint.json").read_text())
        assert final["step"] == TINY_DEMO["steps"], backbone
        assert load_pretrained(tiny_demo.pretrain_output(backbone)).record.shards_identity == pretrain.identity


@pytest.mark.slow
def test_a_second_run_reuses_finished_steps(tiny_demo, probes):
    start = time.perf_counter()
    assert not tiny_demo.build_census()
    assert not tiny_demo.write_shards("shards_pretrain", tiny_demo.pretrain_shards, "pretrain")
    assert not tiny_demo.write_shards("shards_heldout", tiny_demo.heldout_shards, "heldout",
                                      tiny_demo.pretrain_shards)
    assert not any(tiny_demo.pretrain(b) for b in DEMO_BACKBONES)
    assert not tiny_demo.probe("gnn")  # its probe.json names the same checkpoint
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_the_held_out_cells_are_a_seeded_uniform_choice(tiny_demo):
    mask = held_out_cells(7839, 400, seed=0)
    assert mask.sum() == 400 and np.array_equal(mask, held_out_cells(7839, 400, seed=0))
    assert not np.array_equal(mask, held_out_cells(7839, 400, seed=1))
    joinids = sorted(c.soma_joinid for c in iter_cells(ShardSet.open(str(tiny_demo.heldout_shards))))
    assert joinids == np.flatnonzero(mask).tolist()  # build-soma numbers cells in input order
    with pytest.raises(ValueError, match="held_out_cells must be in"):
        held_out_cells(10, 10, seed=0)


def test_a_failing_step_names_its_log(tmp_path):
    demo = Demo(DemoConfig(out=str(tmp_path)))
    with pytest.raises(StepFailed, match=r"shards_pretrain failed \(exit 2\); the end of .*shards_pretrain.log"):
        demo.write_shards("shards_pretrain", demo.pretrain_shards, "pretrain")  # no census built


@pytest.mark.parametrize(("field", "value", "message"), [("preset", "big", "preset must be one of"),
                                                         ("steps", 0, "steps must be > 0")])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**{field: value})


def test_a_folder_made_with_other_settings_is_refused_in_one_line(tmp_path, capsys):
    from scgraph.demo import main

    Demo(DemoConfig(out=str(tmp_path / "a"), hidden=128, steps=600)).claim_folder()
    Demo(DemoConfig(out=str(tmp_path / "a"), hidden=128, steps=600)).claim_folder()  # the same settings: reused
    with pytest.raises(ValueError, match=r"holds a demo run with other settings \(hidden 128 -> 64, steps 600 -> 3\)"):
        Demo(DemoConfig(out=str(tmp_path / "a"), hidden=64, steps=3)).claim_folder()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "pretrain").mkdir()  # an older scgraph's demo folder: no settings record
    assert main(["--out", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds files but no settings.json" in err
    assert (tmp_path / "old" / "pretrain").is_dir() and not (tmp_path / "old" / "settings.json").exists()
