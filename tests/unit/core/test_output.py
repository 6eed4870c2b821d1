"""surgery.core.output: the output policy every write goes through (check_output, atomic_file,
write_file, atomic_output, scratch_dir, leftovers of dead processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from surgery.core.errors import OutputError, OutputExistsError, UsageError
from surgery.core.output import atomic_file, atomic_output, check_output, clean_leftovers, scratch_dir, write_file


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_check_output_refuses_overlap_with_inputs(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    f = model / "w.safetensors"
    f.write_bytes(b"x")
    for out, msg in [(model, "is the input"), (tmp_path, "contains the input"), (model / "sub" / "o", "lies inside"),
                     (f, "is the input")]:
        with pytest.raises(UsageError, match=msg):
            check_output(out, force=True, inputs=[model if out != f else f])
    # through a symbolic link: the resolved paths are compared
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(UsageError, match="is the input"):
        check_output(link, force=True, inputs=[model])


def test_check_output_names_and_existing(tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists; pass `force=True`"):
        check_output(tmp_path / "exists", force=False)
    assert check_output(tmp_path / "exists", force=True) == tmp_path / "exists"
    for bad, msg in [("", "empty"), (".", "names an existing folder"), (str(tmp_path / "a" / ".."), "names an existing"),
                     (str(tmp_path / ("n" * 250)), "too long"), (str(tmp_path / "afile" / "o"), "is not a folder")]:
        with pytest.raises(UsageError, match=msg):
            check_output(bad, force=True)
    with pytest.raises(UsageError, match="is a folder; name a file"):
        check_output(tmp_path / "exists", force=True, kind="file")
    with pytest.raises(UsageError, match="is not a folder"):
        check_output(tmp_path / "afile", force=True, kind="folder")


def test_atomic_file_writes_all_or_nothing(tmp_path):
    target = tmp_path / "m.txt"
    with atomic_file(target, force=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name != target.name
        tmp.write_text("new")
    assert target.read_text() == "new" and _listing(tmp_path) == ["m.txt"]
    with pytest.raises(RuntimeError):
        with atomic_file(target, force=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "new" and _listing(tmp_path) == ["m.txt"]  # untouched, no temporary left
    with pytest.raises(OutputExistsError):
        write_file(target, "again", force=False)
    assert write_file(target, b"bytes", force=True).read_bytes() == b"bytes"
    with pytest.raises(OutputError, match="nothing was written"):
        with atomic_file(tmp_path / "empty.txt", force=False):
            pass
    assert _listing(tmp_path) == ["m.txt"]


def test_atomic_file_replaces_a_symlink_not_its_target(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("keep")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_file(link, "new", force=True)
    assert real.read_text() == "keep" and not link.is_symlink() and link.read_text() == "new"


def test_atomic_output_folder_force_swaps(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out, force=False) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, force=True) as tmp:
            (tmp / "b").write_text("2")
            raise KeyboardInterrupt
    assert _listing(out) == ["a"] and _listing(tmp_path) == ["out"]
    with atomic_output(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert _listing(out) == ["b"] and _listing(tmp_path) == ["out"]


def test_leftovers_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = [tmp_path / f".out.surgery-tmp-{pid}-0123abcd", tmp_path / f".surgery-scratch-{pid}-89abcdef"]
    for p in stale:
        p.mkdir()
    mine = tmp_path / f".out.surgery-tmp-{os.getpid()}-00000000"
    mine.mkdir()
    unrelated = tmp_path / ".out.surgery-tmp-notapid"
    unrelated.mkdir()
    assert sorted(clean_leftovers(tmp_path)) == sorted(stale)
    assert _listing(tmp_path) == sorted([mine.name, unrelated.name])


def test_scratch_dir_is_removed_even_on_error(tmp_path):
    with scratch_dir(tmp_path / "output") as s:
        assert s.parent == tmp_path and s.is_dir()
        (s / "big.bin").write_bytes(b"0" * 10)
    assert not s.exists()
    with pytest.raises(ValueError):
        with scratch_dir(tmp_path / "output") as s:
            raise ValueError
    assert _listing(tmp_path) == []
