"""Command lines generated from the typed configs: the one mechanism behind every entry point.

A command's options are the fields of its config dataclass, each declared with :func:`option`
(help text; optionally a flag name, choices, or ``cli=False`` for what only a config file sets).
From the class this module builds the argparse parser (flags, types, choices, help ending in the
default), reads a YAML config file (``--config FILE``, every command) against the same fields
(unknown keys and wrong types named), layers defaults < file < flags, and writes a config as such
a file (:func:`write_config_file`), which is how one command hands another its settings (the demo
runs every step so, printing the command a user would type).

Why a small layer over argparse rather than tyro, simple-parsing or jsonargparse: those generate
nested ``--model.hidden`` flags (ours are flat: ``--hidden``, as the paper's users type them) and
print multi-line errors; mapping a field to an argparse option is all that is needed, and it is
short. jsonargparse would also read and write the YAML, but with its own nesting of flattened
configs and its own messages; PyYAML and the dataclasses' fields do it here in a few lines.

Over 450 lines because the parser, the config-file reader and writer, and the error boundary every
entry point runs in (one line and exit 2 for what a user can fix) walk the same fields; split,
each would repeat that walk.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from scgraph.io.files import write_atomic

#: What to do about an I/O failure, by errno.
_IO_HINTS = {
    errno.ENOSPC: "free some space and run the same command again (finished work is kept)",
    errno.EDQUOT: "free some space and run the same command again (finished work is kept)",
    errno.EACCES: "choose a location you may write to, or fix its permissions",
    errno.EPERM: "choose a location you may write to, or fix its permissions",
    errno.EROFS: "choose a location on a writable file system",
}


def explain(err: BaseException) -> str | None:
    """The one line that says what went wrong for a failure the user can fix (bad input, a file
    that cannot be read or written, a full disk), or None for a bug (which keeps its traceback).

    Errors raised by this project name the file or field themselves (ValueError and the OSError
    subclasses it raises with a message); an OSError from the system is given its file and a hint.
    """
    if isinstance(err, ValueError):
        return str(err)
    if isinstance(err, OSError):
        if err.strerror is None:  # raised here with a message of ours
            return str(err)
        where = f": {err.filename}" if err.filename else ""
        hint = _IO_HINTS.get(err.errno)
        return f"{err.strerror}{where}" + (f"; {hint}" if hint else "")
    return None


def _rank() -> int:
    """This process's rank in a multi-process launch (0 alone or when unset)."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def report(err: BaseException, *, every_rank: bool = True) -> bool:
    """Print the one line of :func:`explain` for a failure the user can fix; False for a bug.

    Every rank of a launch parses the same command line, so those errors are printed by rank 0
    alone (``every_rank=False``); a failure while running may be one rank's own, so each rank says
    it, ranks above 0 naming themselves.
    """
    message = explain(err)
    if message is None:
        return False
    rank = _rank()
    if rank == 0 or every_rank:
        print(f"error: {f'rank {rank}: ' if rank else ''}{message}", file=sys.stderr, flush=True)
    return True


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, aliases: Sequence[str] = (),
           choices: Sequence[str] | Callable[[], Sequence[str]] | None = None, metavar: str | None = None,
           cli: bool = True, flatten: bool = False, group: str | None = None, positional: bool = False,
           required: bool = False, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A config field with what its command-line option needs.

    ``flag``: the option's name (default ``--field-name``); ``choices``: allowed values, or a
    function giving them (read when the parser is built, so a registry can supply them);
    ``cli=False``: settable in a config file only; ``flatten``: a nested config whose fields are
    this command's own (flags and config-file keys at this level); ``group``: a mutually exclusive,
    required group of options (exactly one must be given); ``positional``: an argument without a
    flag (one or more values for a tuple field); ``required``: a flag the command line must give
    unless ``--config FILE`` does (the field keeps a default so the dataclass can be built in code).
    """
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "metavar": metavar,
            "cli": cli, "flatten": flatten, "group": group, "positional": positional, "required": required}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class _Leaf:
    """One settable field of a (possibly nested) config: where it sits and how it is typed."""

    path: tuple[str, ...]
    field: dataclasses.Field
    kind: Any  # the resolved annotation

    @property
    def meta(self) -> Any:
        return self.field.metadata

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.path[-1].replace("_", "-")

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def default(self) -> Any:
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return MISSING


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[_Leaf]:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if _is_config(kind):
            yield from _leaves(kind, (*prefix, f.name))
        elif f.init:
            yield _Leaf((*prefix, f.name), f, kind)


def _sections(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], type]]:
    """(path, class) of every nested config, outermost first."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            yield (*prefix, f.name), hints[f.name]
            yield from _sections(hints[f.name], (*prefix, f.name))


# --- types ---------------------------------------------------------------------------------------


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else kind), True
    return kind, False


def _describe(kind: Any) -> str:
    base, _ = _unwrap(kind)
    if typing.get_origin(base) is tuple:
        return "a list of numbers" if typing.get_args(base)[0] in (int, float) else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path"}.get(base, str(base))


def coerce(value: Any, kind: Any, name: str, *, text: bool = False) -> Any:
    """``value`` as ``kind``, or a ValueError naming ``name``. ``text``: the value is a command-line
    string (parsed: numbers, comma-separated lists, 'none'); otherwise it came from a file whose
    own types must match (a quoted "2" where a number belongs is refused)."""
    base, optional = _unwrap(kind)
    if optional and text and value.lower() in ("none", "null"):
        value = None
    if not text and isinstance(value, str) and base not in (str, Path):
        raise ValueError(f"{name} must be {_describe(kind)}; got {value!r}")
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {_describe(kind)}; got null")
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if text:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be {_describe(kind)}; got {value!r}")
        return tuple(coerce(v, item, name, text=text) for v in value)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false; got {value!r}")
    if base in (int, float):
        try:
            if isinstance(value, (int, str)) and not isinstance(value, bool) or (
                    base is float and isinstance(value, float)):
                return base(value)
        except ValueError:
            pass
        raise ValueError(f"{name} must be {_describe(base)}; got {value!r}")
    if base in (str, Path):
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{name} must be {_describe(base)}; got {value!r}")
        return base(value)
    return value


def _argparse_type(leaf: _Leaf, item: bool = False) -> Callable[[str], Any]:
    """Text -> the field's type; ``item``: one value of a tuple field given as separate arguments."""
    kind = typing.get_args(_unwrap(leaf.kind)[0])[0] if item else leaf.kind

    def convert(text: str) -> Any:
        try:
            return coerce(text, kind, leaf.flag, text=True)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{leaf.flag} ")) from None

    convert.__name__ = _describe(kind)  # argparse names the type in its messages
    return convert


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


# --- parsing -------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what> (see PROG --help)`` and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n" if _rank() == 0 else None)


@dataclass
class Command:
    """One entry point: its config class (whose docstring is the description) and what runs it.

    ``run`` returns an exit status (or None for 0). Every command takes ``--config FILE``;
    ``ignored`` names options that launchers add and the program does not use (DeepSpeed's
    ``--local_rank``).
    """

    config: type
    run: Callable[[Any], int | None]
    prog: str
    epilog: str | None = None
    ignored: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return " ".join((self.config.__doc__ or "").split())


def add_options(parser: argparse.ArgumentParser, command: Command, *, from_file: bool = False) -> None:
    """Every CLI field of the command's config as an option, grouped by nested config; ``from_file``:
    a ``--config FILE`` was given, so it may supply the required ones (checked when the config is built)."""
    cls = command.config
    groups: dict[tuple[str, ...], Any] = {(): parser}
    for path, section in _sections(cls):
        title = (section.__doc__ or section.__name__).strip().splitlines()[0].rstrip(".")
        groups[path] = parser.add_argument_group(f"{path[-1]}: {title}")
    exclusive: dict[str, Any] = {}
    for leaf in _leaves(cls):
        meta = leaf.meta
        if not meta.get("cli", True):
            continue
        choices = meta.get("choices")
        choices = tuple(choices()) if callable(choices) else choices
        default = leaf.default
        text = meta.get("help") or leaf.path[-1]
        if default not in (MISSING, None, "") and not (isinstance(default, bool) and not default):
            text += f" (default: {_show(default)})"
        base, _ = _unwrap(leaf.kind)
        kwargs: dict[str, Any] = {"dest": leaf.dest, "help": text, "default": argparse.SUPPRESS}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs |= {"type": _argparse_type(leaf), "choices": choices,
                       "metavar": meta.get("metavar") or ("{" + ",".join(choices) + "}" if choices
                                                          else leaf.path[-1].upper())}
        target = groups[leaf.path[:-1]]
        if meta.get("positional"):
            many = typing.get_origin(base) is tuple
            kwargs.pop("dest")
            kwargs |= {"type": _argparse_type(leaf, item=many), "nargs": ("*" if many else "?") if from_file else
                       ("+" if many else None), "metavar": meta.get("metavar") or leaf.path[-1].upper()}
            if default is MISSING and not from_file:
                kwargs.pop("default")
            target.add_argument(leaf.dest, **kwargs)
            continue
        if meta.get("group"):
            if meta["group"] not in exclusive:
                exclusive[meta["group"]] = parser.add_argument_group(meta["group"]).add_mutually_exclusive_group(
                    required=not from_file)
            target = exclusive[meta["group"]]
        elif (default is MISSING or meta.get("required")) and not from_file:
            kwargs["required"] = True
        target.add_argument(leaf.flag, *meta.get("aliases", ()), **kwargs)
    parser.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML file with any of these settings (nested configs as sections, as "
                             "written beside each demo step); flags win")
    for flag in command.ignored:
        parser.add_argument(flag, help=argparse.SUPPRESS, default=argparse.SUPPRESS)


def build_parser(command: Command, parser: argparse.ArgumentParser | None = None, *,
                 from_file: bool = False) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=command.prog, description=command.description, epilog=command.epilog)
    add_options(parser, command, from_file=from_file)
    return parser


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, name = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: Path, cls: type) -> dict[str, Any]:
    """A YAML file as nested values for ``cls``: the fields of a flattened config sit at the top
    level; an unknown key is refused, naming its section."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    try:
        return _place(data, cls, ())
    except ConfigFieldError as err:
        raise ConfigFieldError(f"config file {path}: {err}") from None


class ConfigFieldError(ValueError):
    """A setting that does not fit its config: an unknown key or a value of the wrong type."""


def _place(data: dict[str, Any], cls: type, shown: tuple[str, ...]) -> dict[str, Any]:
    """``data`` nested under the paths of ``cls``'s fields (a flattened config's fields may sit at
    this level); ``shown`` is the section as a user writes it (flattened levels left out)."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    flattened = [name for name, f in fields.items() if _is_config(hints[name]) and f.metadata.get("flatten")]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in fields and _is_config(hints[key]):
            if not isinstance(value, dict):
                raise ConfigFieldError(f"{'.'.join((*shown, key))} must be a section of settings")
            inner = shown if key in flattened else (*shown, key)
            out[key] = _merge(out.get(key, {}), _place(value, hints[key], inner))
        elif key in fields:
            out[key] = value
        else:
            owner = next((name for name in flattened if key in _keys(hints[name])), None)
            if owner is None:
                where = f"{'.'.join(shown)} field(s)" if shown else "key(s)"
                raise ConfigFieldError(f"unknown {where} {key}")
            out[owner] = _merge(out.get(owner, {}), _place({key: value}, hints[owner], shown))
    return out


def _keys(cls: type) -> set[str]:
    """Keys a config file may use for ``cls``: its fields and those of its flattened parts."""
    hints = _hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        keys.add(f.name)
        if _is_config(hints[f.name]) and f.metadata.get("flatten"):
            keys |= _keys(hints[f.name])
    return keys


def construct(cls: type, values: dict[str, Any], shown: tuple[str, ...] = ()) -> Any:
    """``cls`` from nested values, every leaf coerced to its type (ConfigFieldError names the
    field); the dataclasses' own validation then runs as they are built."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    missing = [name for name, f in fields.items() if name not in values and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        meta = fields[missing[0]].metadata
        given = (meta.get("metavar") or missing[0].upper()) if meta.get("positional") else \
            meta.get("flag") or "--" + missing[0].replace("_", "-")
        raise ConfigFieldError(f"{'.'.join((*shown, missing[0]))} is required: give {given} or set "
                               f"{missing[0]} in the config file")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigFieldError(f"unknown {'.'.join(shown) or cls.__name__} field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if _is_config(kind):
            inner = shown if fields[name].metadata.get("flatten") else (*shown, name)
            if not isinstance(value, (dict, kind, type(None))):
                raise ConfigFieldError(f"{'.'.join(inner) or name} must be a section of settings; got {value!r}")
            kwargs[name] = value if isinstance(value, kind) else construct(kind, value or {}, inner)
        else:
            try:
                kwargs[name] = coerce(value, kind, ".".join((*shown, name)))
            except ValueError as err:
                raise ConfigFieldError(str(err)) from None
    return cls(**kwargs)


def parse(command: Command, argv: Sequence[str] | None = None) -> Any:
    """The validated config of one command line (argparse errors exit 2 in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from_file = any(a == "--config" or a.startswith("--config=") for a in argv)
    args = vars(build_parser(command, from_file=from_file).parse_args(argv))
    for flag in command.ignored:
        args.pop(flag.lstrip("-").replace("-", "_"), None)
    config_file = args.pop("config", None)
    values = read_config_file(config_file, command.config) if config_file else {}
    try:
        return construct(command.config, _merge(values, _nest(args)))
    except ConfigFieldError as err:
        raise ConfigFieldError(f"config file {config_file}: {err}" if config_file else str(err)) from None


def run(command: Command, argv: Sequence[str] | None = None) -> int:
    """Parse, validate and run one command: the error boundary of every entry point. A failure the
    user can fix (:func:`explain`) is one line on stderr and exit status 2; only a bug shows a
    traceback. The exit status is what ``run`` returns when that is an int, else 0."""
    try:
        cfg = parse(command, argv)
    except SystemExit as stop:  # --help (0), or argparse's one-line error (2), printed by rank 0
        return stop.code if isinstance(stop.code, int) else 2
    except (ValueError, OSError) as err:
        if not report(err, every_rank=False):
            raise
        return 2
    try:
        status = command.run(cfg)
    except (ValueError, OSError) as err:
        if not report(err):
            raise
        return 2
    return status if isinstance(status, int) else 0


def run_subcommands(commands: dict[str, Command], prog: str, description: str,
                    argv: Sequence[str] | None = None) -> int:
    """A program with subcommands (``python -m sharding write ...``), each a :class:`Command`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands:
        subcommand_parser(commands, prog, description).parse_args(argv)  # --help, or one line naming them
    return run(commands[argv[0]], argv[1:])


def subcommand_parser(commands: dict[str, Command], prog: str, description: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, command in commands.items():
        child = sub.add_parser(name, help=command.description.split(". ")[0], description=command.description,
                               prog=command.prog, epilog=command.epilog)
        add_options(child, command)
    return parser


# --- writing a config as the file --config reads ----------------------------------------------------


def config_values(cfg: Any) -> dict[str, Any]:
    """``cfg``'s fields as ``--config FILE`` reads them: a flattened part's fields at its parent's
    level, tuples as lists, paths as text. Every field is written, resolved (a preset's layouts, a recipe's rate):
    the file says the whole run, and reading it back gives ``cfg``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            inner = config_values(value)
            out |= inner if f.metadata.get("flatten") else {f.name: inner}
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
    return out


def write_config_file(cfg: Any, path: Path) -> Path:
    """``cfg`` as a YAML file that ``--config`` reads back as ``cfg``."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(config_values(cfg), sort_keys=False))
    return path
