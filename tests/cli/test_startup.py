"""Start-up: `surgery inspect`, `check --sha256` and `--version` load only what they use, so
the gains of lazy command building cannot silently regress (issue #14: inspect <= 0.5 s on
SmolLM2). The module sets are the guard, not timings (timings on a shared machine lie).

Each run is a fresh interpreter, the way a user runs the command."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

# Heavy modules no header-only command may load: torch and transformers (seconds), numpy,
# the Hub client, pydantic (what typer's own coercion would import), and the other commands.
HEAVY = ("torch", "transformers", "numpy", "huggingface_hub", "pydantic", "safetensors")
OTHER_COMMANDS = tuple(f"surgery.commands.{c}" for c in ("check", "diff", "convert", "merge", "tune", "analyze",
                                                         "eval", "edit", "grow", "fuse", "pull", "push"))
PROBE = ("import sys, json; from surgery.commands.app import main; code = main(sys.argv[1:]); "
         "sys.stderr.write('\\nMODULES ' + json.dumps(sorted(sys.modules)) + '\\n'); sys.exit(code)")


def _run(*args):
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=120)
    line = [x for x in r.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return r, set(json.loads(line.split(" ", 1)[1]))


def test_inspect_json_loads_no_heavy_module_and_no_other_command(fixtures_dir):
    r, mods = _run("inspect", fixtures_dir / "llama-tiny" / "base", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_tensors"] > 0
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert not mods & set(OTHER_COMMANDS), sorted(mods & set(OTHER_COMMANDS))
    unused = {"rich", "click", "surgery.core.executor", "surgery.checkpoint.hub"}
    assert not mods & unused, sorted(mods & unused)


def test_inspect_table_loads_no_torch(fixtures_dir):
    r, mods = _run("inspect", fixtures_dir / "llama-tiny" / "base")
    assert r.returncode == 0, r.stderr
    assert "model.embed_tokens.weight" in r.stdout
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_version_builds_no_command():
    r, mods = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("surgery ")
    assert not mods & (set(HEAVY) | set(OTHER_COMMANDS) | {"surgery.commands.inspect"})


# ---------------------------------------------------------------- the lazy app is the whole app


def _tree(cmd, path=()):
    yield path, cmd
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        yield from _tree(sub, path + (name,))


def _facts(cmd, path, formatted):
    import click

    params = [(p.name, p.opts, p.secondary_opts, p.required, p.default, getattr(p, "help", None)) for p in cmd.params]
    facts = (type(cmd), cmd.help, cmd.short_help, cmd.epilog, params)
    return facts + ((cmd.get_help(click.Context(cmd, info_name=" ".join(("surgery",) + path))),) if formatted else ())


def _lazy_and_whole(formatted):
    import typer

    from surgery.commands.app import COMMANDS, app, build_app

    whole = typer.main.get_command(app)
    assert set(whole.commands) == set(COMMANDS)
    for name in COMMANDS:
        part = typer.main.get_command(build_app([name]))
        assert list(part.commands) == [name]
        full = dict(_tree(whole.commands[name], (name,)))
        lazy = dict(_tree(part.commands[name], (name,)))
        assert list(full) == list(lazy)
        for path in full:
            assert _facts(lazy[path], path, formatted) == _facts(full[path], path, formatted), path


def test_commands_registry_is_the_whole_app():
    """COMMANDS lists every command module of surgery.commands; building one command gives
    the command the whole app has (same class, help, parameters)."""
    import surgery.commands
    from surgery.commands.app import COMMANDS

    modules = {m.name for m in pkgutil.iter_modules(surgery.commands.__path__) if not m.name.startswith("_")}
    assert set(COMMANDS) == modules - {"app"}  # a new command module that is not registered would vanish
    _lazy_and_whole(formatted=False)


@pytest.mark.slow  # `merge --help` lists the methods from the registry, which imports torch
def test_lazy_commands_print_the_same_help():
    _lazy_and_whole(formatted=True)


def test_plain_coercion_agrees_with_typers_own():
    """The pydantic-free coercion of str/bool parameters returns what typer's own coercion
    returns (or hands the value to it), for every such parameter of every command."""
    import typer

    pytest.importorskip("pydantic")
    from surgery.commands.app import _plain, _PlainCoercion, app

    whole = typer.main.get_command(app)
    pairs = [(p, q) for (_, a), (_, b) in zip(_tree(whole), _tree(typer.main.get_command(app)))
             for p, q in zip(a.params, b.params)]
    checked = 0
    for ref, fast in pairs:
        _plain(fast)
        if not isinstance(getattr(fast, "_runtime_param", None), _PlainCoercion):
            continue
        checked += 1
        for value in ("x", "", " a b ", "0", "true", True, False, None, b"bytes"):
            fast._runtime_param = None
            _plain(fast)
            try:
                want = ref.get_runtime_param().coerce(value, param=ref, ctx=None)
            except Exception as exc:  # typer's BadParameter: the plain path must raise it too
                with pytest.raises(type(exc)):
                    fast.get_runtime_param().coerce(value, param=fast, ctx=None)
                continue
            got = fast.get_runtime_param().coerce(value, param=fast, ctx=None)
            assert got == want and type(got) is type(want), (ref.name, value, got, want)
    if hasattr(whole.commands["inspect"].params[0], "get_runtime_param"):  # typer with runtime coercion
        assert checked > 50, checked


# ---------------------------------------------------------------- tables drawn without rich's layout


def test_plain_tables_are_drawn_as_rich_draws_them():
    """print_table writes plain tables itself; for random tables (plain or not, fitting or not,
    on consoles with and without styles) its output equals rich's drawing of fit_table's table."""
    import io
    import random

    from rich.console import Console
    from rich.text import Text

    from surgery.commands._render import Col, _plain_table, fit_table, print_table

    rng = random.Random(0)
    atoms = ["model", "layers", "0", "weight", ".", "_", "576", "×", "1.15 KB", "bfloat16", "→", "é", " ", "", "-"]
    odd = ["[b]", "x:y", "中", "e\u0301", "a\tb", ":smile:"]  # markup, emoji codes, wide, combining, control

    def text(n):
        t = "".join(rng.choice(odd if rng.random() < 0.03 else atoms) for _ in range(rng.randint(0, n)))
        return t if rng.random() < 0.1 else t.strip()  # edge spaces are left to rich

    drawn_plain = 0
    for case in range(100):
        ncol = rng.randint(1, 5)
        cols = [Col(text(2) or "h", rng.choice(["left", "right"]), key=(i == 0), drop=0 if i == 0 else rng.randint(0, 3),
                    wrap=rng.random() < 0.2) for i in range(ncol)]
        rows = [[text(6) for _ in range(ncol)] for _ in range(rng.randint(0, 6))]
        title = rng.choice([None, "", text(4), "fixtures/llama-tiny/base"])

        def console(styled):
            return Console(file=io.StringIO(), width=rng.choice([20, 60, 80, 240, 240]), soft_wrap=True,
                           force_terminal=styled, color_system="standard" if styled else None)

        for styled in (False, True):
            ours, ref = console(styled), console(styled)
            ref.width = ours.width
            print_table(ours, cols, rows, title=title)
            table, dropped = fit_table(ref, cols, rows, title)
            ref.print(table)
            if dropped:
                ref.print(Text(f"not shown at this width: {', '.join(dropped)} (--json has every column)", style="dim"),
                          soft_wrap=False)
            assert ours.file.getvalue() == ref.file.getvalue(), (case, cols, rows, title)
            drawn_plain += _plain_table(ours, cols, rows, title) is not None
    assert drawn_plain > 20  # the fast path was exercised, not only the fallback
