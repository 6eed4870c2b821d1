"""Every documented shell example runs as written.

Examples come from the ``bash``/``sh``/``console`` blocks of README.md and docs/*.md and
from the ``Examples:`` section of every command's ``--help``. Each source runs in its own
scratch folder holding a copy of fixtures/ (examples write under out/ there), in order, with
the real ``surgery`` console script and PYTHONPATH pointing at this checkout. A failure
names the file and line (or the command's help) and shows the command's stderr.

Not run: lines marked ``# needs the Hub`` (they need the network) or ``# needs a cluster``
(several machines), ``pip install`` (the environment is already installed), ``python -m pytest``
(this suite) and ``python benchmarks/`` (benchmarks run for minutes on a quiet machine, not
inside the suite). The fast test
only parses every example's ``surgery`` invocations (unknown flags, bad choices and
missing arguments fail it); the slow test runs them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from command_tree import leaf_commands

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NEEDS_HUB = "# needs the Hub"
NEEDS = (NEEDS_HUB, "# needs a cluster")
NOT_RUN = ("pip install", "python -m pytest", "python benchmarks/")


@dataclass
class Example:
    where: str  # "README.md:28" or "surgery merge --help"
    script: str  # one shell command; continuation lines and heredocs included

    @property
    def skipped(self) -> bool:
        return any(n in self.script for n in NEEDS) or self.script.lstrip().startswith(NOT_RUN)


def _commands(lines: list[tuple[int, str]], where: str) -> list[Example]:
    """Split a shell block into commands: ``\\`` continuations and heredocs stay together."""
    out: list[Example] = []
    i = 0
    while i < len(lines):
        lineno, text = lines[i]
        if not text.strip() or text.lstrip().startswith("#"):
            i += 1
            continue
        parts = [text]
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", text)
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i][1])
        if heredoc:
            while i + 1 < len(lines):
                i += 1
                parts.append(lines[i][1])
                if lines[i][1].strip() == heredoc.group(1):
                    break
        out.append(Example(f"{where}:{lineno}", "\n".join(parts)))
        i += 1
    return out


def doc_examples(path: Path) -> list[Example]:
    """The shell commands of one Markdown file's bash/sh/console blocks, in order. Other
    blocks (synopses, JSON, YAML, Python) are not run; in console blocks only ``$ `` lines are."""
    rel = path.relative_to(ROOT).as_posix()
    examples: list[Example] = []
    lang: str | None = None  # None: outside a fenced block
    block: list[tuple[int, str]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```\s*(\S*)", line)
        if fence:
            if lang is None:
                lang, block = fence.group(1), []
            else:
                if lang in SHELL_LANGS:
                    examples += _commands(block, rel)
                lang = None
        elif lang == "console":
            if line.startswith("$ "):
                block.append((lineno, line[2:]))
        elif lang in SHELL_LANGS:
            block.append((lineno, line))
    return examples


def help_examples() -> dict[str, list[Example]]:
    """Each command's ``Examples:`` lines as ``--help`` prints them."""
    import click

    found: dict[str, list[Example]] = {}
    for path, cmd in leaf_commands().items():
        name = f"surgery {path}"
        with click.Context(cmd, info_name=name, terminal_width=80) as ctx:
            text = cmd.get_help(ctx)
        lines = text.splitlines()
        start = next((i for i, l in enumerate(lines) if l.strip() == "Examples:"), None)
        found[name] = []
        if start is None:
            continue
        for line in lines[start + 1:]:
            if line.strip().startswith("surgery "):
                found[name].append(Example(f"{name} --help", line.strip()))
            elif line.strip() and not line.startswith(" "):
                break
    return found


def _all_sources() -> dict[str, list[Example]]:
    """Examples by where they run together: one Markdown file, or one top-level command's
    help (``edit apply`` uses the file ``edit extract``'s example writes)."""
    sources = {p.relative_to(ROOT).as_posix(): doc_examples(p) for p in DOCS}
    for name, examples in help_examples().items():
        sources.setdefault("help:" + " ".join(name.split()[:2]), []).extend(examples)
    return {k: v for k, v in sources.items() if v}


def _surgery_invocations(script: str) -> list[list[str]]:
    """argv lists of every ``surgery ...`` call in a command (pipes, && and ; split it)."""
    text = re.sub(r"\\\n", " ", script.split("<<")[0])
    calls = []
    for piece in re.split(r"&&|\|\||[|;]", text):
        try:
            words = shlex.split(piece, comments=True)
        except ValueError:
            continue
        if words and words[0] == "surgery":
            argv, skip = [], False
            for w in words[1:]:  # drop redirections: `> check.json`, `2>&1`
                if skip:
                    skip = False
                elif re.fullmatch(r"\d?>>?|<", w):
                    skip = True
                elif not re.match(r"\d?>|<", w):
                    argv.append(w)
            calls.append(argv)
    return calls


# ---------------------------------------------------------------- fast: the examples parse


def test_examples_were_found():
    sources = _all_sources()
    assert "README.md" in sources and any(k.startswith("help:") for k in sources)
    # every command shows at least one example in its --help
    empty = [k for k, v in help_examples().items() if not v]
    assert not empty, f"commands without examples in --help: {empty}"


def test_every_example_parses():
    """Flags exist, choices are valid and required arguments are given: checked by the real
    parser, without running anything."""
    import click
    import typer

    from surgery.commands.app import app, expand_ray

    root = typer.main.get_command(app)
    problems = []
    for examples in _all_sources().values():
        for ex in examples:
            for argv in _surgery_invocations(ex.script):
                cmd, args, name = root, expand_ray(argv), ["surgery"]  # main()'s own argv step
                while getattr(cmd, "commands", None) and args and args[0] in cmd.commands:
                    name.append(args[0])
                    cmd = cmd.commands[args.pop(0)]
                if getattr(cmd, "commands", None):
                    problems.append(f"{ex.where}: `{' '.join(argv)}` names no command")
                    continue
                try:
                    ctx = cmd.make_context(" ".join(name), args)
                except click.exceptions.Exit:
                    continue
                except Exception as exc:  # click's UsageError / BadParameter (vendored or not)
                    problems.append(f"{ex.where}: `surgery {' '.join(argv)}`: {exc}")
                    continue
                old = [p.opts[0] for p in cmd.params if p.hidden and ctx.params.get(p.name) not in (None, False)]
                if old:
                    problems.append(f"{ex.where}: `surgery {' '.join(argv)}` uses the deprecated {', '.join(old)}")
    assert not problems, "examples that do not parse:\n" + "\n".join(problems)


# ---------------------------------------------------------------- slow: the examples run


def _surgery_executable(tmp: Path) -> str:
    """The installed console script (what users run), else a stand-in that runs the same entry point."""
    exe = shutil.which("surgery")
    if exe:
        return str(Path(exe).parent)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "surgery"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                    "'from surgery.commands.app import _console_script; _console_script()' \"$@\"\n")
    shim.chmod(0o755)
    return str(bin_dir)


def _scratch(tmp: Path) -> Path:
    """A copy of fixtures/ plus a pickled checkpoint at old-model/ for `surgery convert`."""
    import torch
    from safetensors.torch import load_file

    work = tmp / "work"
    shutil.copytree(ROOT / "fixtures", work / "fixtures")
    old = work / "old-model"
    old.mkdir()
    torch.save(load_file(str(ROOT / "fixtures/gpt2-tiny/base/model.safetensors")), old / "pytorch_model.bin")
    shutil.copy(ROOT / "fixtures/gpt2-tiny/base/config.json", old / "config.json")
    return work


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = _surgery_executable(tmp) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("SURGERY_DEBUG", None)
    return env


def _param_sources():
    return [pytest.param(k, id=k) for k in sorted(_all_sources())]


@pytest.mark.slow
@pytest.mark.parametrize("source", _param_sources())
def test_examples_run(source, tmp_path):
    examples = _all_sources()[source]
    runnable = [e for e in examples if not e.skipped]
    if not runnable:
        pytest.skip(f"{source}: every example needs the network")
    if any("jq " in e.script for e in runnable) and shutil.which("jq") is None:
        runnable = [e for e in runnable if "jq " not in e.script]
    work, env = _scratch(tmp_path), _env(tmp_path)
    assignments: list[str] = []  # F=fixtures/llama-tiny lines carry over to later commands
    failures = []
    for ex in runnable:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", ex.script.strip()):
            assignments.append(ex.script.strip())
            continue
        script = "\n".join(["set -o pipefail", *assignments, ex.script])
        res = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            failures.append(f"{ex.where}: exit {res.returncode}\n  $ {ex.script}\n  "
                            + "\n  ".join((res.stderr.strip() or res.stdout.strip()).splitlines()[-8:]))
    assert not failures, f"{len(failures)} example(s) failed:\n\n" + "\n\n".join(failures)
