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
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from config import FIELD_TYPES, FIELDS, Config, load_yaml_config, protocol_defaults, validate
from errors import exit_code_of
from pipeline import run
from runtime import keep_freed_memory


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) with exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def _add_flag(group: argparse._ArgumentGroup, name: str) -> None:
    spec = FIELDS[name]
    kind = FIELD_TYPES[name]
    help_text = spec.metadata["help"] + ("" if spec.default is None else " (default: %(default)s)")
    if kind is bool:
        group.add_argument(f"--{name}", dest=name, action="store_true", help=help_text)
        group.add_argument(f"--no-{name}", f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
    else:
        group.add_argument(f"--{name}", dest=name, type=kind, choices=spec.metadata["choices"], help=help_text)


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Flags for the named Config fields, grouped by purpose, defaulting to the field defaults."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in names:
        group_name = FIELDS[name].metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        _add_flag(groups[group_name], name)
        parser.set_defaults(**{name: FIELDS[name].default})


def build_parser(prog: str, defaults: dict[str, Any]) -> OneLineParser:
    """All flags of Config, grouped by purpose, with ``defaults`` as their effective defaults."""
    parser = OneLineParser(prog=prog, allow_abbrev=False,
                           description="Distil a dataset with BACON, IDM or DM. Booleans have --no-NAME forms.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (the command line wins)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved configuration and exit")
    add_config_flags(parser, FIELDS)
    parser.set_defaults(**defaults)
    return parser


def _layered_defaults(argv: Sequence[str], script_defaults: dict[str, Any], prog: str) -> dict[str, Any]:
    """Defaults below the command line: script, published row, method, --config file."""
    pre = OneLineParser(prog=prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--dataset")
    pre.add_argument("--ipc", type=int)
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    from_file = load_yaml_config(known.config) if known.config else {}

    def choose(name: str) -> Any:
        for source in (vars(known), from_file, script_defaults):
            if source.get(name) is not None:
                return source[name]
        return FIELDS[name].default

    protocol = protocol_defaults(choose("dataset"), choose("ipc"), choose("method"))
    return {**script_defaults, **protocol, **from_file}


def resolve_config(argv: Sequence[str] | None, script_defaults: dict[str, Any], prog: str = "BACON") -> tuple[Config, bool]:
    """Parse ``argv`` into a validated Config; also whether --print_config was given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog, _layered_defaults(argv, script_defaults, prog))
    values = vars(parser.parse_args(argv))
    values.pop("config")
    print_only = values.pop("print_config")
    config = Config(**values)
    validate(config)
    return config, print_only


def main(script_defaults: dict[str, Any], argv: Sequence[str] | None = None) -> int:
    """Entry point of the BACON_*.py scripts; returns the process exit code."""
    prog = Path(sys.argv[0]).name or "BACON"
    keep_freed_memory()

    def distil() -> None:
        config, print_only = resolve_config(argv, script_defaults, prog)
        if print_only:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        else:
            run(config)

    return exit_code_of(prog, distil)
