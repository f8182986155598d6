"""The one mechanism behind every command line: configs -> parsers, YAML + flags, and configs written
as the YAML files --config reads."""

from __future__ import annotations

import dataclasses

import pytest

from scgraph.cli import Command, build_parser, config_values, parse, run, write_config_file
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
    return Command(config, lambda cfg: None, prog="test")


@pytest.mark.parametrize("cfg", CONFIGS, ids=[type(c).__name__ for c in CONFIGS])
def test_every_config_round_trips_through_its_config_file(cfg, tmp_path):
    path = write_config_file(cfg, tmp_path / "step.yaml")
    assert parse(command(type(cfg)), ["--config", str(path)]) == cfg, path.read_text()


def test_a_config_file_says_the_whole_resolved_run_and_flags_still_win(tmp_path):
    """What a preset or the objectives imply is written out (the file is the run's record), and
    reads back the same; a flag given beside the file wins over it."""
    cfg = PretrainConfig(run=RunConfig(model=ModelConfig(backbone="gnn"), train=TrainConfig(objectives="mvp")),
                         shards="s")
    values = config_values(cfg)
    assert values["model"]["cell_decoder"] is False and values["model"]["block_layout"] == cfg.run.model.block_layout
    assert values["shards"] == "s" and "run" not in values  # the run's sections sit at the top, as flags do
    path = write_config_file(cfg, tmp_path / "run.yaml")
    again = parse(command(PretrainConfig), ["--config", str(path), "--hidden", "64"])
    assert again == dataclasses.replace(cfg, run=dataclasses.replace(
        cfg.run, model=dataclasses.replace(cfg.run.model, hidden=64)))


def test_positional_and_required_arguments_may_come_from_the_file(tmp_path):
    merge = command(MergeConfig)
    path = write_config_file(MergeConfig(out="/m", parts=("/p0", "/p1")), tmp_path / "merge.yaml")
    assert parse(merge, ["--config", str(path)]).parts == ("/p0", "/p1")
    path.write_text("out: /m\n")
    with pytest.raises(ValueError, match="parts is required: give PART or set parts in the config file"):
        parse(merge, ["--config", str(path)])


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
