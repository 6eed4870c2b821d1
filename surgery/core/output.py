"""The output policy every write in the project goes through.

- An output may never be, contain or lie inside anything the command reads (checkpoints,
  adapters, edit files, states, recipes, texts, manifests): :func:`check_output` refuses it
  before any work starts.
- Everything is written under a temporary sibling (``.NAME.surgery-tmp-PID-XXXXXXXX``) and
  moved into place by one rename at the end. Without ``force`` the rename refuses an output
  that appeared while the command ran; with ``force`` the old output is swapped out in the
  same atomic step (Linux ``renameat2``), so there is no moment with neither old nor new.
- A crash (even SIGKILL) can leave a temporary sibling behind; the next write beside it
  removes leftovers whose process is gone.
- Operating-system failures (a full disk, a read-only folder, a name too long) become one
  :class:`~surgery.core.errors.OutputError` line, with nothing half-written left behind.

:func:`atomic_output` is for folders (checkpoints, adapters, states), :func:`atomic_file`
for single files (edit files, manifests, plots, logs), :func:`scratch_dir` for temporary
work that must not outlive the command, :func:`resumable_output` for Ray runs whose
temporary sibling survives an interruption so that the same command can continue it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputError, OutputExistsError, UsageError

TMP_TAG = "surgery-tmp"
OLD_TAG = "surgery-old"
SCRATCH_PREFIX = ".surgery-scratch-"
NAME_MAX = 255
# longest suffix added to an output name for its temporary sibling: ".{name}.surgery-tmp-{pid}-{hex8}"
_TMP_EXTRA = len(".") + len(f".{TMP_TAG}-") + 10 + 1 + 8
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.surgery-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_SCRATCH = re.compile(r"^\.surgery-scratch-(?P<pid>\d+)-[0-9a-f]{8}$")

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _resolve(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove temporary siblings and scratch folders in ``folder`` whose process is gone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name) or _SCRATCH.match(entry.name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _tmp_name(output: Path, tag: str = TMP_TAG) -> str:
    return f".{output.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_output(output: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = (),
                 kind: str = "folder") -> Path:
    """Refuse an output path that cannot be written safely (see :func:`_check_output`); an
    operating-system error while looking at it (a path over PATH_MAX, a folder that cannot
    be searched) is one OutputError line."""
    try:
        return _check_output(output, force=force, inputs=inputs, kind=kind)
    except OSError as exc:
        raise _output_error(Path(os.fspath(output)), exc) from exc


def _check_output(output: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = (),
                  kind: str = "folder") -> Path:
    """Refuse an output path that cannot be written safely, before any work starts.

    Args:
        output: The path the user asked for.
        force: Replace an existing output.
        inputs: Everything the command reads (files or folders).
        kind: ``folder`` or ``file``: what the output will be.

    Returns:
        The output path (``~`` expanded).

    Raises:
        UsageError: Empty name, ``.``/``..``, a name too long for its temporary sibling, an
            output that is, contains or lies inside an input, a parent that is a file.
        OutputExistsError: The output exists and ``force`` is False.
    """
    text = os.fspath(output)
    if not text.strip():
        raise UsageError("the output path is empty; name a new folder or file.")
    path = Path(text).expanduser()
    if path.name in ("", ".", "..") or text.rstrip("/").endswith(("/.", "/..")) or text.strip() in (".", ".."):
        raise UsageError(f"output {text!r} names an existing folder itself; name a new {kind} instead.", path=text)
    if len(os.fsencode(path.name)) + _TMP_EXTRA > NAME_MAX:
        raise UsageError(f"output name {path.name[:40]}… is too long ({len(os.fsencode(path.name))} bytes; at most "
                         f"{NAME_MAX - _TMP_EXTRA} so its temporary sibling fits); choose a shorter name.", path=text)
    out_res = _resolve(path)
    for inp in inputs:
        inp_res = _resolve(inp)
        if out_res == inp_res:
            raise UsageError(f"output {text} is the input {inp}; choose another output path.", path=text)
        if out_res in inp_res.parents:
            raise UsageError(f"output {text} contains the input {inp}; choose another output path.", path=text)
        if inp_res in out_res.parents:
            raise UsageError(f"output {text} lies inside the input {inp}; choose a path outside it.", path=text)
    for anc in [path.parent, *path.parent.parents]:
        if anc.exists() or anc.is_symlink():
            if not anc.is_dir():
                raise UsageError(f"output {text} cannot be created: {anc} is not a folder.", path=text)
            break
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputExistsError(f"output {text} already exists; pass `force=True` to replace it.", path=text)
        if kind == "folder" and (path.is_symlink() or not path.is_dir()):
            raise UsageError(f"output {text} exists and is not a folder; remove it or choose another path.", path=text)
        if kind == "file" and path.is_dir():
            raise UsageError(f"output {text} is a folder; name a file.", path=text)
    return path


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2``; False when the system or file system does not support it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where the OS says (Linux), else by the
    set-and-restore dance."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: Path) -> None:
    """Give what was written the permissions a plain ``open()`` would: some writers (the
    safetensors library among them) create files 0600 whatever the umask."""
    mask = _umask()
    entries = [path] if path.is_file() else [path, *path.rglob("*")]
    for p in entries:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _commit(tmp: Path, output: Path, force: bool) -> None:
    """Move ``tmp`` to ``output``: refuse an output that appeared meanwhile unless ``force``;
    with ``force`` swap atomically and remove the old one."""
    exists = output.exists() or output.is_symlink()
    if not exists:
        try:
            if _renameat2(tmp, output, _RENAME_NOREPLACE):
                return
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            exists = True
        if not exists:
            if output.exists() or output.is_symlink():
                exists = True
            else:
                os.rename(tmp, output)
                return
    if not force:
        raise OutputExistsError(f"output {output} appeared while this command ran (another writer?); nothing was "
                                f"replaced. Pass `force=True` to replace it.", path=output)
    old = output.parent / _tmp_name(output, OLD_TAG)
    if output.is_dir() == tmp.is_dir() and not output.is_symlink() and _renameat2(tmp, output, _RENAME_EXCHANGE):
        # tmp now holds the old output
        os.rename(tmp, old)
    else:
        os.rename(output, old)
        os.rename(tmp, output)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            old.unlink()
        except OSError:
            pass


def _output_error(output: Path, exc: OSError) -> OutputError:
    what = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        what = "no space left on the device"
    elif exc.errno == errno.EFBIG:
        what = "a file would exceed the file-size limit"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"permission denied ({exc.strerror})"
    elif exc.errno == errno.ENAMETOOLONG:
        what = "the path is too long"
    return OutputError(f"cannot write {output}: {what}; nothing was written and any earlier output is unchanged.",
                       path=output)


@contextmanager
def atomic_output(output: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``output`` in one rename.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and
    ``output`` is left exactly as it was.

    Raises:
        UsageError, OutputExistsError: see :func:`check_output`.
        OutputError: The operating system refused a write (full disk, read-only, ...).
    """
    output = check_output(output, force=force, inputs=list(inputs), kind="folder")
    parent = output.parent
    tmp = parent / _tmp_name(output)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(parent)
        tmp.mkdir()
    except OSError as exc:
        raise _output_error(output, exc) from exc
    try:
        yield tmp
        _honour_umask(tmp)
        _fsync_dir(tmp)
        _commit(tmp, output, force)
        _fsync_dir(parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _output_error(output, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


RUN_TAG = "surgery-run"
STEPS_TAG = "surgery-steps"
RUN_LOCK = ".surgery-run.lock"
RUN_FILES = (RUN_LOCK, ".surgery-run.jsonl")


def run_folder(output: str | os.PathLike, key: str) -> Path:
    """The hidden sibling a resumable run of ``output`` writes into: ``.NAME.surgery-run-KEY``."""
    output = Path(output).expanduser()
    return output.parent / f".{output.name}.{RUN_TAG}-{key[:16]}"


def _try_lock(path: Path) -> int | None:
    """An exclusive, non-blocking lock on ``path`` (created if needed); None when another
    process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


# Errors after which a kept run folder is worth resuming: the run was interrupted, the
# cluster failed, or the disk filled up. Anything else (a bad input, a failed check, a
# defect) would fail the same way again, so its folder is removed.
def _resumable(exc: BaseException) -> bool:
    from .errors import ClusterError

    return isinstance(exc, (KeyboardInterrupt, SystemExit, ClusterError, OutputError, OSError))


def _claim(folder: Path, prefix: str, output: Path, *, require: bool, fresh: bool, what: str) -> tuple[int, bool]:
    """Create or reuse the run folder ``folder`` and lock it; remove unlocked siblings that
    start with ``prefix`` (older, different commands). Returns (lock fd, resumed)."""
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(parent)
        if fresh and folder.is_dir():
            shutil.rmtree(folder)
        resumed = folder.is_dir()
        if require and not resumed:
            raise UsageError(f"there is no interrupted run of this command to resume for {output} (no {folder.name} "
                             f"beside it; a run of a different command or on changed inputs does not count); drop "
                             f"`resume_run` to start one.", path=output)
        for entry in os.scandir(parent):
            if entry.name.startswith(prefix) and entry.name != folder.name and entry.is_dir(follow_symlinks=False):
                fd = _try_lock(Path(entry.path) / RUN_LOCK)
                if fd is not None:          # nobody runs it: an older, different command's leftover
                    shutil.rmtree(entry.path, ignore_errors=True)
                    os.close(fd)
        folder.mkdir(exist_ok=True)
        lock = _try_lock(folder / RUN_LOCK)
    except OSError as exc:
        raise _output_error(output, exc) from exc
    if lock is None:
        raise UsageError(f"another process is {what} {output} with the same command right now ({folder.name} is "
                         f"locked); wait for it to finish.", path=output)
    return lock, resumed


def _abandon(folder: Path, output: Path, exc: BaseException) -> None:
    """A resumable run ended with ``exc``: keep its folder when resuming makes sense, and re-raise
    (an OS failure as an OutputError line)."""
    if not _resumable(exc):
        shutil.rmtree(folder, ignore_errors=True)
    if isinstance(exc, OSError):
        raise _output_error(output, exc) from exc
    raise exc


@contextmanager
def resumable_output(output: str | os.PathLike, *, key: str, force: bool, inputs: Iterable[str | os.PathLike] = (),
                     require: bool = False, fresh: bool = False) -> Iterator[tuple[Path, bool]]:
    """Like :func:`atomic_output`, for runs that can be interrupted and continued (Ray runs).

    The temporary sibling is named after ``key`` (a digest of everything that decides the
    output: operation, parameters, tensor plan, inputs), so running the same command again
    finds it. It is locked while a run writes into it. On success its run files are removed and
    it is renamed into place like any output. When the run is interrupted, the cluster fails or
    the disk fills up, it is kept for the next run; after other errors it is removed. Run
    folders of ``output`` with another key (an older, different command) are removed when no
    process holds them.

    Yields:
        ``(folder, resumed)``: resumed is True when the folder held an earlier run's work.

    Raises:
        UsageError: ``require`` and there is no interrupted run to continue; another process is
            running the same command right now.
        OutputExistsError, OutputError: as :func:`atomic_output`.
    """
    output = check_output(output, force=force, inputs=list(inputs), kind="folder")
    folder = run_folder(output, key)
    lock, resumed = _claim(folder, f".{output.name}.{RUN_TAG}-", output, require=require, fresh=fresh,
                           what="writing")
    try:
        yield folder, resumed
        for name in RUN_FILES:
            _unlink(folder / name)
        _fsync_dir(folder)
        _commit(folder, output, force)
        _fsync_dir(output.parent)
    except BaseException as exc:
        _abandon(folder, output, exc)
    finally:
        os.close(lock)


@contextmanager
def resumable_scratch(near: str | os.PathLike, *, key: str, fresh: bool = False) -> Iterator[tuple[Path, bool]]:
    """A working folder for intermediate results of a resumable run (a merge's per-step state):
    ``.NAME.surgery-steps-KEY`` beside ``near`` (the output), locked while used, kept when the
    block is interrupted (as :func:`resumable_output` keeps its folder) and removed when it ends
    any other way, success included.

    Yields:
        ``(folder, resumed)``.
    """
    near = Path(near).expanduser()
    folder = near.parent / f".{near.name}.{STEPS_TAG}-{key[:16]}"
    lock, resumed = _claim(folder, f".{near.name}.{STEPS_TAG}-", near, require=False, fresh=fresh, what="running")
    try:
        yield folder, resumed
    except BaseException as exc:
        _abandon(folder, near, exc)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(lock)


@contextmanager
def atomic_file(path: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write one file to; on success it is fsynced
    and renamed onto ``path`` (refused if ``path`` appeared meanwhile, unless ``force``).
    A symbolic link at ``path`` is replaced, never written through."""
    path = check_output(path, force=force, inputs=list(inputs), kind="file")
    parent = path.parent
    tmp = parent / _tmp_name(path)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(parent)
    except OSError as exc:
        raise _output_error(path, exc) from exc
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, "nothing was written", str(tmp))
        _honour_umask(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path, force)
        _fsync_dir(parent)
    except OSError as exc:
        _unlink(tmp)
        raise _output_error(path, exc) from exc
    except BaseException:
        _unlink(tmp)
        raise


def write_file(path: str | os.PathLike, data: str | bytes, *, force: bool,
               inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_file`; returns the path."""
    with atomic_file(path, force=force, inputs=inputs) as tmp:
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
            fh.write(data)
    return Path(path).expanduser()


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


@contextmanager
def scratch_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``near`` (same file system, so large scratch files never go
    to a small /tmp), removed when the block ends; leftovers of dead processes are removed
    when the next one is made."""
    parent = Path(os.path.abspath(os.path.expanduser(os.fspath(near)))).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(parent)
        path = parent / f"{SCRATCH_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
    except OSError as exc:
        raise _output_error(Path(near), exc) from exc
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
