"""docs/flags.md documents exactly the flags the command-line tools accept.

The rule, per tool (the distillation scripts, evaluate.py, report.py and
``set_formats.py export``), between the tool's parser and the tool's ``## ``
section of docs/flags.md:

1. every option string of the parser has a row: it appears in the first
   column of a table in that section. A boolean's ``--no-NAME`` /
   ``--no_NAME`` forms are covered by the row of ``--NAME``, and argparse's
   own ``-h/--help`` needs no row;
2. every flag (a ``--word``) in the first column of a table in that section
   is an option string of the parser: the page names no flag a tool lacks.

A failure names the flags and the section, so adding a flag to a parser
without documenting it (or removing one and leaving its row) fails here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable

import pytest

import cli
import evaluate
import report
import set_formats

FLAGS_DOC = Path(__file__).resolve().parent.parent / "docs" / "flags.md"
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


class _Captured(Exception):
    """Raised in place of parsing, carrying the parser a ``main()`` built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def parser_built_by(main: Callable[[list[str]], int]) -> argparse.ArgumentParser:
    """The parser a tool's ``main()`` builds inline, caught at its ``parse_args`` (nothing runs)."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        try:
            main([])
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{main.__module__}.main() never parsed its arguments")


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``set_formats.py export``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError(f"{parser.prog} has no subcommands")


# Each tool: the text its section heading in flags.md contains, and how to build its parser.
TOOLS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "BACON_*.py": lambda: cli.build_parser("BACON", {}),
    "evaluate.py": evaluate.build_parser,
    "report.py": lambda: parser_built_by(report.main),
    "set_formats.py export": lambda: subcommand(parser_built_by(set_formats.main), "export"),
}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string the parser accepts, -h/--help aside."""
    return {option for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for option in action.option_strings}


def needing_a_row(options: set[str]) -> set[str]:
    """The options a reader must find: ``--no-X`` and ``--no_X`` are covered by ``--X``."""
    return {option for option in options
            if not (re.match(r"--no[-_]", option) and "--" + option[len("--no-"):] in options)}


def sections(text: str) -> dict[str, str]:
    """flags.md split at its ``## `` headings: heading line -> body (down to the next one)."""
    parts = re.split(r"^(## .*)$", text, flags=re.MULTILINE)
    return {heading: body for heading, body in zip(parts[1::2], parts[2::2])}


def first_column_flags(markdown: str) -> set[str]:
    """The ``--word``s in the first column of the tables of ``markdown``."""
    flags = set()
    for line in markdown.splitlines():
        cells = line.strip().split("|")
        if line.lstrip().startswith("|") and len(cells) > 2 and not set(cells[1].strip()) <= set("-: "):
            flags |= set(FLAG.findall(cells[1]))
    return flags


def section_of(tool: str) -> tuple[str, str]:
    matches = [(heading, body) for heading, body in sections(FLAGS_DOC.read_text()).items() if tool in heading]
    assert len(matches) == 1, f"docs/flags.md needs exactly one '## ' heading naming {tool!r}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module", params=list(TOOLS))
def tool(request: pytest.FixtureRequest) -> tuple[str, set[str], str, set[str]]:
    """(tool, its parser's option strings, its flags.md heading, the flags its tables list)."""
    name = request.param
    heading, body = section_of(name)
    return name, option_strings(TOOLS[name]()), heading, first_column_flags(body)


def test_every_flag_of_the_parser_has_a_row(tool: tuple[str, set[str], str, set[str]]) -> None:
    """Rule 1: an option the parser accepts is listed in the first column of the tool's section."""
    name, options, heading, documented = tool
    missing = sorted(needing_a_row(options) - documented)
    assert not missing, f"docs/flags.md, section {heading!r}, has no row for {name} flag(s): {', '.join(missing)}"


def test_every_flag_in_the_doc_exists(tool: tuple[str, set[str], str, set[str]]) -> None:
    """Rule 2: a flag the tool's section lists is one the tool's parser accepts."""
    name, options, heading, documented = tool
    unknown = sorted(documented - options)
    assert not unknown, f"docs/flags.md, section {heading!r}, lists flag(s) {name} does not have: {', '.join(unknown)}"


def test_no_table_lists_flags_outside_a_tool_section() -> None:
    """Rule 2, for the rest of the page: flag rows belong under some tool's heading."""
    text = FLAGS_DOC.read_text()
    outside = first_column_flags(re.split(r"^## ", text, flags=re.MULTILINE)[0])
    outside |= {flag for heading, body in sections(text).items() if not any(t in heading for t in TOOLS)
                for flag in first_column_flags(body)}
    assert not outside, f"docs/flags.md lists flag(s) outside any tool's section: {', '.join(sorted(outside))}"
