"""The command line shared by every entry script.

Flags are generated from ``config.Config`` (one source of truth for names,
types, help and defaults). Defaults are layered once, timm-style: the entry
script's defaults, the published row for the dataset and IPC, the method's
defaults, then ``--config FILE.yaml``; the command line overrides them all.
Errors the user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from checkpoint import CHECKPOINT, PREVIOUS, Checkpoint, load_checkpoint
from config import (FIELD_TYPES, FIELDS, INERT_FLAGS, INERT_GROUP, RESUME_MAY_CHANGE, Config, load_yaml_config,
                    protocol_defaults, validate)
from distributed import reports_errors
from errors import ConfigError, exit_code_of
from fast_paths import SWITCHES
from pipeline import run
from runtime import keep_freed_memory, stopping_on_signals


AUTO_RESUME = "auto"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) with exit code 2, once per machine
    under torchrun."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}; see --help\n" if reports_errors() else None)


def _add_flag(group: argparse._ArgumentGroup, name: str, kind: type, default: Any, help_text: str,
              choices: tuple[Any, ...] | None) -> None:
    if default is not None:
        help_text += " (default: %(default)s)"
    if kind is bool:
        group.add_argument(f"--{name}", dest=name, action="store_true", help=help_text)
        group.add_argument(f"--no-{name}", f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
    elif choices == SWITCHES:  # --NAME alone is "on", --no-NAME "off", as for booleans
        group.add_argument(f"--{name}", dest=name, nargs="?", const="on", choices=SWITCHES, help=help_text)
        group.add_argument(f"--no-{name}", f"--no_{name}", dest=name, action="store_const", const="off",
                           help=argparse.SUPPRESS)
    else:
        group.add_argument(f"--{name}", dest=name, type=kind, choices=choices, help=help_text)


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Flags for the named Config fields, grouped by purpose, defaulting to the field defaults."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in names:
        spec = FIELDS[name]
        group_name = spec.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        _add_flag(groups[group_name], name, FIELD_TYPES[name], spec.default, spec.metadata["help"],
                  spec.metadata["choices"])
        parser.set_defaults(**{name: spec.default})


def add_inert_flags(parser: argparse.ArgumentParser) -> None:
    """The reference scripts' flags that change nothing here (config.INERT_FLAGS): parsed and
    checked like the others, then left out when Config is built."""
    group = parser.add_argument_group(INERT_GROUP)
    for name, flag in INERT_FLAGS.items():
        _add_flag(group, name, type(flag.default), flag.default, flag.note, flag.choices)
        parser.set_defaults(**{name: flag.default})


def build_parser(prog: str, defaults: dict[str, Any]) -> OneLineParser:
    """All flags of Config, grouped by purpose, with ``defaults`` as their effective defaults."""
    parser = OneLineParser(prog=prog, allow_abbrev=False,
                           description="Distil a dataset with BACON, IDM or DM. Booleans have --no-NAME forms.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (the command line wins)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint, with "
                        "its saved settings; 'auto' (with --run_name and the run's full flags) continues "
                        "SAVE_PATH/RUN_NAME when it holds a checkpoint and starts it otherwise, so a command "
                        "restarted as is (torchrun --max-restarts) picks up where it stopped")
    add_config_flags(parser, FIELDS)
    add_inert_flags(parser)
    parser.set_defaults(**defaults)
    return parser


@dataclass
class Invocation:
    """What a command line asks for: the settings, and whether to print them, resume a run, or (with
    ``--resume auto`` and no checkpoint yet) start one in the named folder."""

    config: Config
    print_only: bool = False
    resume: Checkpoint | None = None
    in_place: bool = False


def _prescan(argv: Sequence[str], prog: str) -> argparse.Namespace:
    """The flags that decide the other flags' defaults."""
    pre = OneLineParser(prog=prog, add_help=False, allow_abbrev=False)
    for flag in ("--config", "--dataset", "--method", "--resume"):
        pre.add_argument(flag)
    pre.add_argument("--ipc", type=int)
    return pre.parse_known_args(argv)[0]


def _layered_defaults(known: argparse.Namespace, from_file: dict[str, Any],
                      script_defaults: dict[str, Any]) -> dict[str, Any]:
    """Defaults below the command line: script, published row, method, --config file."""

    def choose(name: str) -> Any:
        for source in (vars(known), from_file, script_defaults):
            if source.get(name) is not None:
                return source[name]
        return FIELDS[name].default

    protocol = protocol_defaults(choose("dataset"), choose("ipc"), choose("method"))
    return {**script_defaults, **protocol, **from_file}


def _refuse_changes(saved: dict[str, Any], config: Config) -> None:
    changed = [name for name in FIELDS if name not in RESUME_MAY_CHANGE and saved[name] != getattr(config, name)]
    if changed:
        raise ConfigError("--resume continues a run with its saved settings; "
                          f"{', '.join('--' + name for name in changed)} would change its result: drop them")


def resolve_config(argv: Sequence[str] | None, script_defaults: dict[str, Any], prog: str = "BACON") -> Invocation:
    """Parse ``argv`` into a validated Config (the checkpoint's, with --resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known = _prescan(argv, prog)
    from_file = load_yaml_config(known.config) if known.config else {}
    auto = known.resume == AUTO_RESUME
    resume = load_checkpoint(known.resume) if known.resume and not auto else None
    defaults = {**resume.config, **from_file} if resume else _layered_defaults(known, from_file, script_defaults)
    values = vars(build_parser(prog, defaults).parse_args(argv))
    print_only = values.pop("print_config")
    config = Config(**{name: value for name, value in values.items() if name in FIELDS})
    validate(config)
    if auto:
        return _resume_automatically(config, print_only)
    if resume is not None:
        _refuse_changes(resume.config, config)
    return Invocation(config, print_only, resume)


def _resume_automatically(config: Config, print_only: bool) -> Invocation:
    """--resume auto: continue SAVE_PATH/RUN_NAME if it holds a checkpoint, else start it there."""
    if not config.run_name:
        raise ConfigError("--resume auto needs --run_name: a restarted command finds its run by that name")
    directory = Path(config.save_path) / config.run_name
    if not any((directory / name).exists() for name in (CHECKPOINT, PREVIOUS)):
        return Invocation(config, print_only, in_place=True)
    resume = load_checkpoint(directory)
    _refuse_changes(resume.config, config)
    return Invocation(config, print_only, resume)


def main(script_defaults: dict[str, Any], argv: Sequence[str] | None = None) -> int:
    """Entry point of the BACON_*.py scripts; returns the process exit code."""
    prog = Path(sys.argv[0]).name or "BACON"
    keep_freed_memory()

    def distil() -> None:
        invocation = resolve_config(argv, script_defaults, prog)
        if invocation.print_only:
            print(yaml.safe_dump(invocation.config.to_dict(), sort_keys=False), end="")
        else:
            run(invocation.config, invocation.resume, invocation.in_place)

    with stopping_on_signals():
        return exit_code_of(prog, distil, quiet=not reports_errors())
