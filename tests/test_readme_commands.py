"""Every command the README shows exists: each ``tessera …`` command line with each flag it
names, and each benchmark, whose ``--help`` must run with the interpreter ``make`` set up.

A renamed command or flag, or a dependency that setup does not install, fails here instead
of in a user's first try.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.testing

from tests.peers import venv_tool
from viewer_bridge.main import app

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "deploy" / "README.md"]

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_SPAN = re.compile(r"``?([^`\n]+)``?")
# `tessera` (or `.venv/bin/tessera`) and the words after it that can name sub-commands:
# lowercase words and `a|b|c` alternatives; a value (`node.toml`, `NAME`, `3`) ends them.
_COMMAND = re.compile(
    r"(?:^|[\s(])(?:\.venv/bin/)?tessera((?:\s+[a-z][a-z0-9|-]*(?=\s|$))*)(.*)$")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_BENCHMARK = re.compile(r"(?:^|\s)((?:\.venv/bin/)?python3?)\s+(benchmarks/[\w/]+\.py)")


def _snippets(text: str) -> list[str]:
    """Each line of a fenced block and each inline code span: one command line each."""
    fenced = [line for block in _FENCE.findall(text) for line in block.splitlines()[1:-1]]
    prose = _FENCE.sub("", text)
    return fenced + _SPAN.findall(prose)


def readme_commands() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(command words, flags) for every ``tessera`` command line in the docs."""
    found: dict[tuple[str, ...], set[str]] = {}
    for doc in DOCS:
        for snippet in _snippets(doc.read_text(encoding="utf-8")):
            snippet = snippet.split("#", 1)[0]
            match = _COMMAND.search(snippet)
            if match is None:
                continue
            words = match.group(1).split()
            if not words:
                continue  # the program's name in prose
            flags = set(_FLAG.findall(match.group(2)))
            if words and "|" in words[-1]:
                for alternative in words[-1].split("|"):
                    found.setdefault((*words[:-1], alternative), set())
            else:
                found.setdefault(tuple(words), set()).update(flags)
    return sorted((words, tuple(sorted(flags))) for words, flags in found.items())


def readme_benchmarks() -> list[tuple[str, str]]:
    """(interpreter, script) for every benchmark command in the README."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return sorted({(m.group(1), m.group(2)) for s in _snippets(text)
                   for m in _BENCHMARK.finditer(s)})


def _resolve(words: tuple[str, ...]) -> Any:
    """The (typer-vendored click) command that ``tessera WORDS`` runs."""
    command: Any = typer.main.get_command(app)
    context = typer.Context(command, info_name="tessera")
    for word in words:
        if not hasattr(command, "get_command"):
            break  # the rest are the command's own arguments (`add-head kidneys`)
        sub = command.get_command(context, word)
        assert sub is not None, f"`tessera {' '.join(words)}`: no command {word!r}"
        command, context = sub, typer.Context(sub, info_name=word, parent=context)
    return command


def test_the_docs_name_commands_and_benchmarks() -> None:
    """The extraction itself sees what the README shows (a parser that finds nothing passes
    everything)."""
    commands = dict(readme_commands())
    assert ("node", "serve") in commands and "--config" in commands[("node", "serve")]
    assert ("hub", "rejections") in commands  # from `tessera hub init|serve|...|rejections`
    assert ("demo",) in commands
    assert len(readme_benchmarks()) >= 7


@pytest.mark.parametrize(("words", "flags"), readme_commands(),
                         ids=lambda value: " ".join(value) or "-")
def test_readme_command_exists_with_its_flags(words: tuple[str, ...],
                                              flags: tuple[str, ...]) -> None:
    command = _resolve(words)
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    unknown = sorted(set(flags) - known)
    assert not unknown, f"`tessera {' '.join(words)}` has no option {unknown}; it has {known}"
    result = typer.testing.CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output


def test_the_installed_console_script_runs() -> None:
    result = subprocess.run([venv_tool("tessera"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "node" in result.stdout and "hub" in result.stdout


@pytest.mark.parametrize(("interpreter", "script"), readme_benchmarks(),
                         ids=lambda value: value)
def test_readme_benchmark_starts(interpreter: str, script: str) -> None:
    """Run as the README says, with the interpreter `make` set up: its imports (plots
    included) resolve and its options parse."""
    assert interpreter == ".venv/bin/python", (
        f"the README runs {script} with {interpreter!r}; name the venv's interpreter")
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout.lower()
