"""The one mechanism behind every command line: configs -> parsers, YAML + flags, and back to argv."""

from __future__ import annotations

import dataclasses

import pytest

from scgraph.cli import Command, build_parser, parse, run, to_argv
from scgraph.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from scgraph.data.shards.config import BuildSomaConfig, MergeConfig, ShardWriteConfig, VerifyConfig, WriteOptions
from scgraph.demo import DemoConfig
from scgraph.eval.config import CompareConfig, ProbeConfig
from scgraph.synthetic.config import StudyConfig
from scgraph.train.config import PretrainConfig

CONFIGS = [
    PretrainConfig(run=RunConfig(model=ModelConfig(backbone="gnn", hidden=32, heads=4, adjacency_shared=True),
                                 tokenizer=TokenizerConfig(seq_len=64, selection="top"),
                                 train=TrainConfig(lr=1e-3, grad_clip=None)),
                   shards="/data/s", deepspeed_config="ds_configs/cpu_zero2.json", resume=True, epochs=3),
    ProbeConfig(checkpoint="runs/gnn", data="cells.h5ad", repeats=2, standardize=False, quiet=True),
    CompareConfig(experiment="table2", mlflow_uri="sqlite:///x.db"),
    DemoConfig(out="runs/d", steps=10, lr=3e-3),
    StudyConfig(betas=(0.0, 0.5), sigmas=(0.1,), position_embedding=False, workers=1),
    ShardWriteConfig(census_uri="/c", out="/o", options=WriteOptions(obs_filter="split == 'a'",
                                                                     obs_columns=("cell_type", "tissue"),
                                                                     slice="1/4"), quiet=True),
    MergeConfig(out="/m", parts=("/p0", "/p1")),
    VerifyConfig(directory="/s", quiet=True),
    BuildSomaConfig(h5ad="x.h5ad", out="/c", label_key="label"),
]


def command(config: type) -> Command:
    return Command(config, lambda cfg: None, prog="test", config_file=True)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[type(c).__name__ for c in CONFIGS])
def test_every_config_round_trips_through_its_command_line(cfg):
    argv = to_argv(cfg)
    assert parse(command(type(cfg)), argv) == cfg, argv


def test_argv_leaves_out_what_a_preset_implies():
    cfg = PretrainConfig(run=RunConfig(model=ModelConfig(backbone="gnn")), shards="s")
    assert to_argv(cfg) == ["--backbone", "gnn", "--shards", "s"]
    explicit = dataclasses.replace(cfg, run=RunConfig(model=ModelConfig(backbone="gnn", block_layout="pre_norm")))
    assert "--block-layout" in to_argv(explicit)


def test_argv_of_fields_derived_from_each_other_says_the_cause_and_leaves_out_the_effect():
    """Objectives without recon need no cell decoder: --objectives alone rebuilds both."""
    cfg = PretrainConfig(run=RunConfig(model=ModelConfig(backbone="gnn"), train=TrainConfig(objectives="mvp")),
                         shards="s")
    assert cfg.run.model.cell_decoder is False
    assert to_argv(cfg) == ["--backbone", "gnn", "--objectives", "mvp", "--shards", "s"]
    assert parse(command(PretrainConfig), to_argv(cfg)) == cfg


def test_yaml_sections_and_flags_are_layered_and_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone: gnn\n  hidden: 64\ntrain:\n  lr: 1.0e-3\nshards: /data\n")
    cfg = parse(command(PretrainConfig), ["--config", str(path), "--hidden", "32"])
    assert (cfg.run.model.backbone, cfg.run.model.hidden, cfg.run.train.lr, cfg.shards) == ("gnn", 32, 1e-3, "/data")
    path.write_text("train:\n  lr: fast\nshards: /data\n")
    with pytest.raises(ValueError, match=f"config file {path}: train.lr must be a number; got 'fast'"):
        parse(command(PretrainConfig), ["--config", str(path)])
    path.write_text("model: [1, 2]\n")
    with pytest.raises(ValueError, match="model must be a section of settings"):
        parse(command(PretrainConfig), ["--config", str(path)])
    path.write_text("model:\n  hidden: 64\n  bad indent\n")
    with pytest.raises(ValueError, match=f"config file {path} is not valid YAML at line"):
        parse(command(PretrainConfig), ["--config", str(path)])


def test_bad_flags_and_bad_values_are_one_line_with_exit_status_2(capsys):
    probe = Command(ProbeConfig, lambda cfg: None, prog="probe.py")
    with pytest.raises(SystemExit) as exit_:
        parse(probe, ["--checkpoint", "c", "--data", "d", "--repeats", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument --repeats: must be an integer; got 'many'")
    assert run(probe, ["--checkpoint", "c", "--data", "d", "--repeats", "0"]) == 2
    assert capsys.readouterr().err == "error: --repeats must be >= 1; got 0\n"


def test_help_of_every_option_ends_with_its_default():
    text = build_parser(command(PretrainConfig)).format_help()
    assert "--seq-len SEQ_LEN" in text and "genes per cell L (default: 512)" in text
    assert "--deepspeed_config DEEPSPEED_CONFIG, --deepspeed-config" in text


def test_a_required_flag_is_shown_so_and_a_config_file_may_give_it(tmp_path, capsys):
    pretrain = command(PretrainConfig)
    usage = build_parser(pretrain).format_usage()
    assert " --shards SHARDS " in usage and "[--shards" not in usage
    assert run(pretrain, []) == 2
    assert "the following arguments are required: --shards" in capsys.readouterr().err
    path = tmp_path / "run.yaml"
    path.write_text("shards: /data\n")
    assert parse(pretrain, ["--config", str(path)]).shards == "/data"
    path.write_text("model:\n  hidden: 64\n")
    with pytest.raises(ValueError, match="--shards is required"):
        parse(pretrain, ["--config", str(path)])


def test_errors_every_rank_meets_alike_are_printed_by_rank_0_alone(monkeypatch, capsys):
    """Every rank of a launch parses the same command line; a failure while running may be one rank's."""
    def unreadable(cfg):
        raise ValueError("shard 3 is unreadable")

    probe, failing = (Command(ProbeConfig, work, prog="probe.py") for work in (lambda cfg: None, unreadable))
    bad_flag, bad_value = (["--checkpoint", "c", "--data", "d", "--repeats", value] for value in ("many", "0"))
    monkeypatch.setenv("RANK", "1")
    assert run(probe, bad_flag) == 2 and run(probe, bad_value) == 2
    assert capsys.readouterr().err == ""
    assert run(failing, ["--checkpoint", "c", "--data", "d"]) == 2
    assert capsys.readouterr().err == "error: rank 1: shard 3 is unreadable\n"
    monkeypatch.setenv("RANK", "0")
    assert run(probe, bad_value) == 2 and run(failing, ["--checkpoint", "c", "--data", "d"]) == 2
    assert capsys.readouterr().err == "error: --repeats must be >= 1; got 0\nerror: shard 3 is unreadable\n"
