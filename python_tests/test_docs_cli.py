"""README.md and docs/ say what the command line's parser does: the subcommand list, every
documented ``python -m invkernels ...`` invocation, the demo's options and the ``--threads`` limit
are read from the parser that ``python -m invkernels`` builds."""

import argparse
import glob
import os
import re
import shlex

import pytest

from invkernels import __main__ as cli
from invkernels.demo import DemoConfig
from invkernels.spline_demo import SplineDemoConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))]

# `python -m invkernels {a,b,c}`: a list of the subcommands.
COMMAND_LIST = re.compile(r"python -m invkernels \{([^}]*)\}")
# A command line quoted in a Markdown code span; group 1 is what follows `python -m invkernels `.
INVOCATION = re.compile(r"`[^`]*?python -m invkernels ([^`{]*)`")
# `--threads` (what it takes), as docs/models.md documents the option.
THREADS_NOTE = re.compile(r"`--threads` \(([^)]*)\)")
THREADS_LIMIT = re.compile(r"at most (\d+) per logical CPU")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands in the order ``--help`` lists them, each with its parser."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings} - {"-h", "--help"}


def documented_command_lists(text: str) -> list[list[str]]:
    return [[name.strip() for name in names.split(",")] for names in COMMAND_LIST.findall(text)]


def documented_invocations() -> list[tuple[str, list[str]]]:
    """``(file, argv)`` of every command line quoted in README.md and docs/, cut at a shell operator."""
    found = []
    for path in DOCS:
        for rest in INVOCATION.findall(read(path)):
            rest = re.split(r"&&|\|\||[|;#]", rest)[0]
            found.append((os.path.relpath(path, ROOT), shlex.split(rest)))
    return found


def options_paragraphs(text: str) -> list[set[str]]:
    """The options named in each ``Options: ...`` sentence of a page."""
    sentences = re.findall(r"^Options: (.*?)(?:\.\s|\.$)", text, flags=re.MULTILINE | re.DOTALL)
    return [set(re.findall(r"`(--[a-z][a-z-]*)", sentence)) for sentence in sentences]


def test_readme_lists_the_parsers_subcommands():
    commands = list(subparsers(cli.build_parser()))
    lists = documented_command_lists(read(os.path.join(ROOT, "README.md")))
    assert lists, "README.md should list the subcommands as `python -m invkernels {...}`"
    for names in lists:
        assert names == commands, f"README.md lists {names}, the parser has {commands}"


def test_every_documented_command_list_and_the_help_line_match_the_parser():
    commands = list(subparsers(cli.build_parser()))
    for path in DOCS:
        for names in documented_command_lists(read(path)):
            assert names == commands, f"{os.path.relpath(path, ROOT)} lists {names}, the parser has {commands}"
    (names,) = documented_command_lists(cli.__doc__.splitlines()[0])
    assert names == commands, f"the --help description lists {names}, the parser has {commands}"


def test_every_documented_invocation_parses():
    parser = cli.build_parser()
    invocations = documented_invocations()
    assert {argv[0] for _, argv in invocations} >= {"demo", "invert"}
    for path, argv in invocations:
        assert argv and argv[0] in subparsers(parser), f"{path}: `python -m invkernels {shlex.join(argv)}`"
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path}: the parser refuses `python -m invkernels {shlex.join(argv)}`")


def test_documented_threads_limit_is_the_parsers(capsys):
    notes = [(os.path.relpath(path, ROOT), note) for path in DOCS for note in THREADS_NOTE.findall(read(path))]
    assert any(path == os.path.join("docs", "models.md") for path, _ in notes), \
        "docs/models.md should document `--threads` (...) with its limit"
    for path, note in notes:
        limit = THREADS_LIMIT.search(note)
        assert limit, f"{path}: `--threads` ({note}) should say 'at most N per logical CPU'"
        assert int(limit.group(1)) == cli.THREADS_PER_CPU, \
            f"{path} says at most {limit.group(1)} per logical CPU, the CLI takes {cli.THREADS_PER_CPU}"
    parser = cli.build_parser()
    most = cli.THREADS_PER_CPU * (os.cpu_count() or 1)
    for command in ("demo", "invert"):
        assert parser.parse_args([command, "--threads", str(most)]).threads == most
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--threads", str(most + 1)])
        assert exit_info.value.code == 2
        assert f"at most {cli.THREADS_PER_CPU} per logical CPU" in capsys.readouterr().err


def test_documented_demo_options_are_the_parsers():
    text = read(os.path.join(ROOT, "docs", "models.md"))
    glow, spline = options_paragraphs(text)
    demo = subparsers(cli.build_parser())["demo"]
    assert glow | spline == options(demo), \
        f"docs/models.md documents {sorted(glow | spline)}, `demo` takes {sorted(options(demo))}"
    assert "--steps" not in glow and "--epochs" not in spline
    flat = " ".join(text.split())
    assert f"`--epochs` (default {DemoConfig.epochs})" in flat
    assert f"`--steps` (default {SplineDemoConfig.steps})" in flat
    backend = next(a for a in demo._actions if "--backend" in a.option_strings)
    assert f"`--backend {'|'.join(backend.choices)}`" in flat
    out = next(a for a in demo._actions if "--out" in a.option_strings)
    assert f"`--out` (default `{out.default}`)" in flat
