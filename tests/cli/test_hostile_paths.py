"""Output-path errors: every one is a single line (exit 2 for a path that cannot be an
output, 3 when the operating system refuses the write), and nothing is left behind: no
output, no temporary sibling."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess

import pytest
from hostile_helpers import LLAMA, one_line_error

SRC = str(LLAMA / "base")   # 213 KB of weights


@pytest.mark.parametrize("out", ["", ".", "..", "sub/..", "sub/.", "x" * 250])
def test_paths_that_cannot_be_outputs(cli, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    line = one_line_error(cli("convert", SRC, out), 2)
    assert "output" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_output_under_a_regular_file(cli, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    line = one_line_error(cli("convert", SRC, tmp_path / "f.txt" / "out"), 2)
    assert "is not a folder" in line


def test_path_over_path_max(cli, tmp_path):
    deep = tmp_path.joinpath(*["d" * 200] * 25, "out")
    assert len(str(deep)) > 4096
    line = one_line_error(cli("convert", SRC, deep), (2, 3))
    assert "too long" in line
    assert [p.name for p in tmp_path.iterdir()] == []


@contextlib.contextmanager
def _tmpfs(path, size: str, readonly: bool = False):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk(cli, tmp_path):
    with _tmpfs(tmp_path / "small", "96k") as mnt:
        line = one_line_error(cli("convert", SRC, mnt / "out"), 3)
        assert "no space left on the device" in line and "nothing was written" in line
        assert list(mnt.iterdir()) == []


def test_read_only_parent(cli, tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", readonly=True) as mnt:
        line = one_line_error(cli("convert", SRC, mnt / "out"), 3)
        assert "cannot write" in line and "out" in line
        assert list(mnt.iterdir()) == []


def test_file_size_limit(cli, tmp_path):
    """RLIMIT_FSIZE below the output's size: EFBIG on write, one line, nothing left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        res = cli("convert", SRC, tmp_path / "out", "--dtype", "float32")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    line = one_line_error(res, 3)
    assert "file-size limit" in line
    assert os.listdir(tmp_path) == []
