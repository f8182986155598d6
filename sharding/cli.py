"""``python -m sharding {write,merge,verify,stats,build-soma}``: each command's options are its config in
``scgraph.data.shards.config``; the command lines come from them (``scgraph.cli``).

Errors a user can fix (bad filter, missing column, empty query, non-count data, a foreign output
directory, a damaged shard) end the command with one line on stderr and exit status 2 (1 for a
failed verify), never a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

from scgraph.cli import Command, run_subcommands, subcommand_parser
from scgraph.data.shards.config import BuildSomaConfig, MergeConfig, ShardWriteConfig, StatsConfig, VerifyConfig
from sharding.layout import build_soma_command
from sharding.merge import merge_command
from sharding.verify import verify_command
from sharding.writer import stats_command, write_command

PROG = "python -m sharding"
DESCRIPTION = ("Stream single-cell counts (CELLxGENE Census, a SOMA experiment or an .h5ad) into WebDataset tar "
               "shards with a manifest, check them, or build a local census stand-in.")
COMMANDS = {
    "write": Command(ShardWriteConfig, write_command, prog=f"{PROG} write"),
    "merge": Command(MergeConfig, merge_command, prog=f"{PROG} merge"),
    "verify": Command(VerifyConfig, verify_command, prog=f"{PROG} verify"),
    "stats": Command(StatsConfig, stats_command, prog=f"{PROG} stats"),
    "build-soma": Command(BuildSomaConfig, build_soma_command, prog=f"{PROG} build-soma"),
}


def build_parser():
    """The whole program's parser (``--help`` of every command)."""
    return subcommand_parser(COMMANDS, PROG, DESCRIPTION)


def main(argv: Sequence[str] | None = None) -> int:
    return run_subcommands(COMMANDS, PROG, DESCRIPTION, argv)
