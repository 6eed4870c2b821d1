"""One set of habits across commands: options, help text, choices, tables, messages.

Each test walks every command of the real app, so a new command inherits the checks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from command_tree import leaf_commands

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    """The commands below name fixtures as the documentation does, relative to the repository."""
    monkeypatch.chdir(ROOT)


def _commands():
    return leaf_commands()


def _opts(cmd) -> set[str]:
    return {o for p in cmd.params for o in list(p.opts) + list(getattr(p, "secondary_opts", []))}


def _help(cmd, name: str, width: int = 80) -> str:
    import click

    with click.Context(cmd, info_name=f"surgery {name}", terminal_width=width, max_content_width=width) as ctx:
        return cmd.get_help(ctx)


# ---------------------------------------------------------------- the same options everywhere


def test_every_command_takes_quiet_and_json():
    missing = {name: sorted({"-q", "--quiet", "--json"} - _opts(cmd)) for name, cmd in _commands().items()}
    assert not {k: v for k, v in missing.items() if v}


def test_every_writing_command_takes_dash_o():
    """A command that can replace what it writes (--force) names it with -o/--output; `check`'s
    only write is the manifest of --write-sha256."""
    writers = {name for name, cmd in _commands().items() if "--force" in _opts(cmd)} - {"check"}
    assert writers >= {"convert", "merge", "fuse", "grow", "edit apply", "edit extract", "edit to-peft", "edit from-peft"}
    assert not [name for name in writers if not {"-o", "--output"} <= _opts(_commands()[name])]


def test_one_meaning_per_option_name():
    """--config is the merge recipe only, --top the N largest changes of diff only; the old
    spellings elsewhere are hidden aliases."""
    for name, cmd in _commands().items():
        shown = {o for p in cmd.params if not getattr(p, "hidden", False) for o in p.opts}
        if "--config" in shown:
            assert name == "merge", name
        if "--top" in shown:
            assert name == "diff", name


def test_base_help_says_the_same_thing():
    texts = {name: p.help for name, cmd in _commands().items() for p in cmd.params if "--base" in p.opts}
    assert len(texts) >= 4
    assert not [n for n, t in texts.items() if n != "merge" and not t.startswith("Base (pretrained) checkpoint")]


@pytest.mark.parametrize("name,opt", [("grow", "--init"), ("edit apply", "--on-collapse"), ("convert", "--dtype"),
                                      ("eval ppl", "--model-dtype"), ("edit extract", "--factor-dtype")])
def test_choices_are_listed_and_checked_before_the_library(name, opt, cli):
    """--help lists the choices; a bad one is refused by the parser (exit 2, the choices named)
    before the command body runs, so even a missing input is not reached."""
    listed = re.search(r"^\s+(?:-\w, )?" + re.escape(opt) + r" [<\[{]([\w|]+)[>\]}]", _help(_commands()[name], name, width=200),
                       re.M)
    choices = listed.group(1).split("|") if listed else []
    assert len(choices) >= 3, f"{name} --help does not list the choices of {opt}"
    r = cli(*name.split(), "no/such/checkpoint", opt, "bogus")
    assert r.code == 2 and "bogus" in r.stderr and choices[0] in r.stderr and "no/such" not in r.stderr


def test_choice_values_reach_the_library_as_plain_strings(cli, tmp_path):
    r = cli("convert", "fixtures/gpt2-tiny/base", "-o", tmp_path / "o", "--dtype", "BF16", "--json")
    assert r.code == 0, r.stderr
    record = r.json()["record"]
    assert record["parameters"]["dtype"] == "bfloat16" and type(record["parameters"]["dtype"]) is str
    import json

    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


@pytest.mark.slow
def test_deprecated_spellings_still_work(cli, tmp_path):
    r = cli("check", "fixtures/llama-tiny/base", "--config", "--no-integrity", "--json")
    assert r.code == 0 and "use --shapes" in r.stderr
    assert [c["name"] for c in r.json()["checks"]] == ["config"]
    r = cli("analyze", "spectrum", "fixtures/llama-tiny/base", "--top", "2", "--json", "-q")
    assert r.code == 0 and "use --singular-values" in r.stderr
    assert all(len(t["top_singular_values"]) == 2 for t in r.json()["tensors"])


def test_convert_takes_o_and_the_old_positional_output(cli, tmp_path):
    a = cli("convert", "fixtures/gpt2-tiny/base", "-o", tmp_path / "a", "--json")
    b = cli("convert", "fixtures/gpt2-tiny/base", tmp_path / "b", "--json")
    assert a.code == 0 and b.code == 0
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    r = cli("convert", "fixtures/gpt2-tiny/base", tmp_path / "c", "-o", tmp_path / "d")
    assert r.code == 2 and "give the output once" in r.stderr and not (tmp_path / "c").exists()
    r = cli("convert", "fixtures/gpt2-tiny/base")
    assert r.code == 2 and "-o" in r.stderr


@pytest.mark.slow
def test_quiet_hides_progress_messages(cli, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text((ROOT / "fixtures/notes.txt").read_text())
    args = ["analyze", "subspace", "--base", "fixtures/llama-tiny/base", "fixtures/llama-tiny/ft-a",
            "fixtures/llama-tiny/ft-b", "--rank", "2", "--text", str(text), "--rows", "1"]
    loud, quiet = cli(*args), cli(*args, "-q")
    assert loud.code == quiet.code == 0
    assert "computing per-block importance" in loud.stderr and quiet.stderr == ""


# ---------------------------------------------------------------- help text


def _normal(text: str) -> str:
    """Whitespace-insensitive text; click may break a line after a hyphen."""
    return " ".join(re.sub(r"-\n\s*", "-", text).split())


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_shows_every_text_whole(name):
    """Every option's help and the command's own text appear whole at 80 columns: nothing eaten
    as markup ("leaves [a, b]" once printed as "leaves ."), nothing cut to "…"."""
    cmd = _commands()[name]
    text = _help(cmd, name)
    flat = _normal(text)
    assert "…" not in text
    for p in cmd.params:
        if getattr(p, "hidden", False) or not getattr(p, "help", None):
            continue
        assert _normal(p.help) in flat, f"{name} {p.opts}: help text damaged: {p.help!r}"
    assert _normal(cmd.help.split("\n\n")[0]) in flat
    assert max(len(line) for line in text.splitlines() if not line.startswith("    surgery ")) <= 80


def test_help_examples_are_not_rewrapped():
    from surgery.commands import merge

    text = _help(_commands()["merge"], "merge", width=60)
    for example in merge.EXAMPLES:
        assert f"    {example}" in text.splitlines()


def test_root_help_lists_completion(cli):
    r = cli("--help")
    assert r.code == 0 and "--install-completion" in r.stdout and "--show-completion" in r.stdout


def test_completion_script_is_printed():
    """`surgery --show-completion bash` prints a script wired to this program's name."""
    import subprocess
    import sys

    code = "import sys; from surgery.commands.app import main; sys.exit(main(['--show-completion', 'bash']))"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "_SURGERY_COMPLETE" in res.stdout and "complete" in res.stdout


# ---------------------------------------------------------------- tables at 80 columns


def test_fit_table_keeps_names_whole_and_drops_columns_first():
    from rich.console import Console

    from surgery.commands._render import Col, fit_table

    names = ["model.layers.11.post_attention_layernorm.weight", "model.embed_tokens.weight"]
    cols = [Col("tensor", key=True), Col("shape"), Col("σ_max"), Col("stable rank", drop=1), Col("top 4 σ", drop=2),
            Col("eff. rank / min(m,n)", drop=3)]
    rows = [(n, "576×1536", "12.34", "45.6", "9.1 8.2 7.3 6.4", "0.8765") for n in names]
    console = Console(width=80, record=True, soft_wrap=True)
    table, dropped = fit_table(console, cols, rows)
    assert dropped == ["top 4 σ", "eff. rank / min(m,n)"]
    console.print(table)
    out = console.export_text()
    assert all(len(line) <= 80 for line in out.splitlines())
    assert all(n in out for n in names) and "0.8765" not in out and "45.6" in out
    wide = Console(width=200, record=True, soft_wrap=True)
    table, dropped = fit_table(wide, cols, rows)
    assert dropped == []
    narrow = Console(width=50, record=True, soft_wrap=True)
    table, dropped = fit_table(narrow, cols, rows)
    narrow.print(table)
    out = narrow.export_text()
    assert dropped == ["stable rank", "top 4 σ", "eff. rank / min(m,n)"] and all(len(l) <= 50 for l in out.splitlines())
    # the 48-character name cannot fit beside the other columns: it folds, whole, never "…"
    assert "…" not in out and "model.layers.11.post_attention_layernorm.weight" in "".join(
        line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│"))


@pytest.mark.parametrize("args,names_of", [
    (["inspect", "fixtures/llama-tiny/base"], "fixtures/llama-tiny/base"),
    (["diff", "fixtures/llama-tiny/base", "fixtures/llama-tiny/ft-a"], "fixtures/llama-tiny/base"),
    (["analyze", "spectrum", "fixtures/llama-tiny/base", "-q"], "fixtures/llama-tiny/base"),
    (["analyze", "gain", "fixtures/llama-wide/base", "--vs", "fixtures/llama-tiny/base", "-q"], "fixtures/llama-wide/base"),
])
def test_command_tables_fit_80_columns(args, names_of, cli, monkeypatch, one_thread):
    """On an 80-column console every line fits, nothing is cut to "…" and every 2-D tensor's
    name is printed whole."""
    from surgery.checkpoint import open_checkpoint

    monkeypatch.setenv("COLUMNS", "80")
    r = cli(*args)
    assert r.code == 0, r.stderr
    table_lines = [line for line in r.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert table_lines and max(len(line) for line in table_lines) <= 80
    assert "…" not in r.stdout
    ckpt = open_checkpoint(names_of)
    names = [n for n in ckpt.names if len(ckpt.info(n).shape) == 2]
    assert names and [n for n in names if n not in r.stdout] == []


# ---------------------------------------------------------------- library messages name parameters


def _raise_strings(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value


def _library_files(skip: tuple[str, ...] = ()):
    for p in sorted((ROOT / "surgery").rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        if not rel.startswith(("surgery/commands/",) + skip):
            yield rel, p


def test_library_errors_name_parameters_not_flags():
    """The library speaks Python (`density`); the command layer turns that into --density.
    surgery/merge/ is being rewritten by the merge interface work and checked after it lands."""
    flags = [f"{rel}:{line}: {m}" for rel, p in _library_files()
             for line, s in _raise_strings(p)  # naming a whole command (`surgery convert --to gguf`) is fine
             for m in re.findall(r"(?<![\w-])--[a-z][a-z-]+", re.sub(r"`surgery [^`]*`", "", s))]
    assert not flags, "library errors naming CLI flags:\n" + "\n".join(flags)


def test_backticked_names_are_parameters_of_some_command():
    from surgery.merge.registry import METHODS

    params = {p.name for cmd in _commands().values() for p in cmd.params}
    params |= {p.name for m in METHODS.values() for p in m.params}  # merge's -p NAME (flagify)
    unknown = [f"{rel}:{line}: `{m}`" for rel, p in _library_files() for line, s in _raise_strings(p)
               for m in re.findall(r"`([A-Za-z_]\w*)(?:=[^`]*)?`", s) if m not in params]
    assert not unknown, "backticked names no command takes (they would print raw):\n" + "\n".join(unknown)


def test_flagify_forms():
    from surgery.commands.app import flagify

    grow = _commands()["grow"]
    msg = "use `init='gram'` or `verify=False`; `force=True`; `config_file`; `checkpoint`; `other=1`; `x`"
    assert flagify(msg, grow) == "use --init gram or --no-verify; --force; --neox-config; CHECKPOINT; other=1; x"


def test_library_message_becomes_the_invoked_commands_flag(cli, tmp_path):
    r = cli("edit", "apply", "fixtures/llama-tiny/base", tmp_path / "missing.safetensors", "-o", tmp_path / "o",
            "--check-every", "0")
    assert r.code == 2 and "--check-every must be at least 1" in r.stderr and "`" not in r.stderr
    r = cli("grow", "fixtures/tokenformer-tiny", "-o", tmp_path / "g", "--qkv-tokens", "24")
    assert r.code == 2 and "--init tile repeats" in r.stderr and "use --init gram" in r.stderr


# ---------------------------------------------------------------- what outputs look like on disk


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_outputs_honour_the_umask(cli, tmp_path, umask):
    """safetensors creates files 0600; outputs get what a plain open() would give."""
    import os
    import stat

    old = os.umask(umask)
    try:
        edit = tmp_path / "e.safetensors"
        assert cli("edit", "extract", "fixtures/llama-tiny/base", "fixtures/llama-tiny/ft-a", "-o", edit, "--rank", "1",
                   "-q").code == 0
        assert cli("edit", "to-peft", edit, "-o", tmp_path / "lora", "--base", "fixtures/llama-tiny/base",
                   "--drop-vectors", "-q").code == 0
    finally:
        os.umask(old)
    files = [edit, tmp_path / "lora" / "adapter_model.safetensors", tmp_path / "lora" / "adapter_config.json"]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}
    assert stat.S_IMODE((tmp_path / "lora").stat().st_mode) == 0o777 & ~umask


def test_to_peft_records_a_local_base_absolute(cli, tmp_path):
    """PEFT resolves base_model_name_or_path from wherever the adapter is loaded, so a relative
    --base is recorded as the absolute path it named."""
    import json

    edit = tmp_path / "e.safetensors"
    assert cli("edit", "extract", "fixtures/llama-tiny/base", "fixtures/llama-tiny/ft-a", "-o", edit, "--rank", "1",
               "-q").code == 0
    assert cli("edit", "to-peft", edit, "-o", tmp_path / "lora", "--base", "fixtures/llama-tiny/../llama-tiny/base",
               "--drop-vectors", "-q").code == 0
    recorded = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(ROOT / "fixtures" / "llama-tiny" / "base")
