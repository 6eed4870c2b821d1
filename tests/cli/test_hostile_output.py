"""Data loss: every writing command and option combination × outputs that are, contain or
lie inside something the command reads (checkpoints, adapters, edit files, states,
recipes, texts, manifests), symbolic links to inputs, and two writers racing for one -o.
A refused write exits 2 with one line and leaves every file exactly as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_helpers import FIXTURES, LLAMA, lora_adapter, one_line_error


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under ``root``: content digest or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One tree holding every kind of input: checkpoints, an adapter, an edit file, a state,
    a recipe, a text, a manifest, a TokenFormer, and (relative) links to them."""
    w = tmp_path_factory.mktemp("pristine") / "w"
    for name in ("base", "ft-a", "ft-b", "ft-c"):
        shutil.copytree(LLAMA / name, w / "models" / name)
    shutil.copytree(FIXTURES / "tokenformer-tiny", w / "tf")
    lora_adapter(w / "adapters" / "lora")
    from surgery.edit.extract import extract_edit

    (w / "edits").mkdir()
    extract_edit(w / "models" / "base", w / "models" / "ft-a", w / "edits" / "e.edit.safetensors", rank=2)
    from surgery.commands.app import main

    assert main(["merge", "-m", "continual_task_arithmetic", "--base", str(w / "models" / "base"),
                 str(w / "models" / "ft-a"), "--state", str(w / "state"), "-o", str(w / "merged"), "--quiet"]) == 0
    (w / "recipe.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {w / 'models' / 'ft-a'}\n"
                                  f"    parameters: {{weight: 0.5}}\n  - model: {w / 'models' / 'ft-b'}\n"
                                  f"    parameters: {{weight: 0.5}}\n")
    (w / "probe.txt").write_text("The cat sat on the mat.\nA second sentence for the probe.\n")
    from surgery.check import write_manifest
    from surgery.checkpoint import open_checkpoint

    (w / "SHA256SUMS").write_text(write_manifest(open_checkpoint(w / "models" / "base")))
    (w / "links").mkdir()
    os.symlink("../models/base", w / "links" / "to-base")
    os.symlink("../models/base/model.safetensors", w / "links" / "to-weights.png")
    os.symlink("../edits/e.edit.safetensors", w / "links" / "to-edit.safetensors")
    os.symlink("../SHA256SUMS", w / "links" / "to-sums")
    return w


@pytest.fixture
def world(pristine, tmp_path):
    """A fresh copy of the pristine tree for one row (same absolute layout under tmp_path)."""
    w = tmp_path / "w"
    shutil.copytree(pristine, w, symlinks=True)
    state = (w / "state" / "state.json")
    state.write_text(state.read_text().replace(str(pristine), str(w)))
    return w


W = Path("/W")  # placeholder root of the rows; replaced by the row's own copy


def _cases(w: Path = W) -> list[tuple[str, list[str]]]:
    m = w / "models"
    base, a, b, c = (str(m / n) for n in ("base", "ft-a", "ft-b", "ft-c"))
    ad, e, st, tf = str(w / "adapters" / "lora"), str(w / "edits" / "e.edit.safetensors"), str(w / "state"), str(w / "tf")
    fuse = ["fuse", base, ad]
    rows = []
    for check in ([], ["--check"]):
        for force in ([], ["--force"]):
            tag = " ".join(check + force)
            for target in (base, str(m), ad, str(w / "adapters"), base + "/inner", ad + "/inner",
                           str(w / "links" / "to-base")):
                rows.append((f"fuse {tag} -o {Path(target).relative_to(w)}", fuse + ["-o", target] + check + force))
    for force in ([], ["--force"]):
        rows += [
            (f"edit apply -o edit folder {force}", ["edit", "apply", base, e, "-o", str(w / "edits")] + force),
            (f"edit apply -o base {force}", ["edit", "apply", base, e, "-o", base] + force),
            (f"edit apply -o text {force}", ["edit", "apply", base, e, "--text", str(w / "probe.txt"), "-o",
                                             str(w / "probe.txt")] + force),
            (f"edit apply --plot onto the weights {force}", ["edit", "apply", base, e, "-o", str(w / "new-out"),
                                                             "--plot", base + "/model.safetensors.png"] + force),
            (f"edit apply --plot through a link {force}", ["edit", "apply", base, e, "-o", str(w / "new-out"),
                                                           "--plot", str(w / "links" / "to-weights.png")] + force),
            (f"edit extract -o inside base {force}", ["edit", "extract", base, a, "-o", base + "/x.safetensors"] + force),
            (f"edit extract -o the edited model's weights {force}", ["edit", "extract", base, a, "-o",
                                                                     a + "/model.safetensors"] + force),
            (f"edit to-peft -o edit folder {force}", ["edit", "to-peft", e, "-o", str(w / "edits"), "--base", base]
             + force),
            (f"edit to-peft -o the edit through a link {force}", ["edit", "to-peft", e, "-o",
                                                                   str(w / "links" / "to-edit.safetensors"),
                                                                   "--base", base] + force),
            (f"edit from-peft -o inside adapter {force}", ["edit", "from-peft", ad, "-o", ad + "/e.safetensors"] + force),
            (f"edit from-peft -o base weights {force}", ["edit", "from-peft", ad, "--base", base, "-o",
                                                         base + "/model.safetensors"] + force),
            (f"check --write-sha256 onto the weights {force}", ["check", base, "--write-sha256",
                                                                base + "/model.safetensors"] + force),
            (f"check --write-sha256 onto the manifest read {force}", ["check", base, "--sha256", str(w / "SHA256SUMS"),
                                                                      "--write-sha256", str(w / "links" / "to-sums")]
             + force),
            (f"check --write-sha256 onto the reference {force}", ["check", base, "--against", a, "--write-sha256",
                                                                  a + "/config.json"] + force),
            (f"convert -o source {force}", ["convert", base, base] + force),
            (f"convert -o parent {force}", ["convert", base, str(m)] + force),
            (f"convert -o link to source {force}", ["convert", base, str(w / "links" / "to-base")] + force),
            (f"grow -o source {force}", ["grow", tf, "-o", tf, "--factor", "2"] + force),
            (f"grow -o config folder {force}", ["grow", tf, "-o", str(w), "--factor", "2"] + force),
        ]
    rows += [
        ("analyze spectrum --plot onto the weights", ["analyze", "spectrum", base, "--plot", base + "/w.png"]),
        ("analyze spectrum --plot through a link", ["analyze", "spectrum", base, "--plot",
                                                    str(w / "links" / "to-weights.png")]),
        ("analyze gain --plot inside the proxy", ["analyze", "gain", base, "--vs", a, "--plot", a + "/g.png"]),
    ]
    # merge rows, black-box at the command line
    for force in ([], ["--force"]):
        rows += [
            (f"merge -o a model {force}", ["merge", "-m", "linear", a, b, "-o", a] + force),
            (f"merge -o the base's parent {force}", ["merge", "-m", "task_arithmetic", "--base", base, a, b, "-o",
                                                     str(m)] + force),
            (f"merge --state X -o X {force}", ["merge", "-m", "opcm", "--base", base, a, b, "--state",
                                              str(w / "same"), "-o", str(w / "same")] + force),
            (f"merge --resume S -o S {force}", ["merge", "--resume", st, c, "-o", st] + force),
            (f"merge --resume S --state inside base {force}", ["merge", "--resume", st, c, "--state", base + "/st",
                                                               "-o", str(w / "new-out")] + force),
            (f"merge --config R -o R's folder {force}", ["merge", "--config", str(w / "recipe.yml"), "-o", str(w)]
             + force),
        ]
    return rows


ROWS = _cases()


@pytest.mark.parametrize("label", [label for label, _ in ROWS])
def test_refused_and_nothing_changed(cli, world, label):
    args = [a.replace(str(W), str(world)) for a in dict(ROWS)[label]]
    before = snapshot(world)
    res = cli(*args)
    after = snapshot(world)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"exit {res.code}, changed {changed[:6]}, stderr {res.stderr.strip()[:300]!r}"
    line = one_line_error(res, 2)
    assert "input" in line or "already exists" in line or "state" in line, line


def test_output_appearing_meanwhile_is_refused(tmp_path):
    """The final rename refuses an output that appeared while the command ran (another
    writer); the one that appeared is left intact."""
    import torch

    from surgery.checkpoint import open_checkpoint
    from surgery.core.engine import OutputTensor, write_checkpoint
    from surgery.core.errors import OutputExistsError

    out = tmp_path / "out"

    def compute():
        out.mkdir()
        (out / "theirs.txt").write_text("the other writer's output")
        return torch.ones(2)

    with pytest.raises(OutputExistsError, match="appeared while this command ran"):
        write_checkpoint([OutputTensor("w", (2,), torch.float32, compute=compute)], out, donor=None,
                         operation="t", parameters={})
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]            # no temporary sibling left
    del open_checkpoint


@pytest.mark.slow
def test_two_concurrent_writers(tmp_path):
    """Two real processes writing the same -o without --force: one wins, the other is refused
    (exit 2), and the output is exactly one of the two, never a mix and never replaced."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = tmp_path / "out"
    cmds = [[sys.executable, "-m", "surgery.commands.app", "convert", str(LLAMA / src), str(out), "--dtype", "float32",
             "--quiet"] for src in ("ft-a", "ft-b")]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already exists" in loser or "appeared while this command ran" in loser
    from surgery.checkpoint import open_checkpoint

    got = open_checkpoint(out)
    winner = "ft-a" if results[0][0] == 0 else "ft-b"
    ref = open_checkpoint(LLAMA / winner)
    assert all(bool((got.get(n) == ref.get(n)).all()) for n in ref.names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
