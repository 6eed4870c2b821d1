"""sha256 of input files for the provenance record, hashed from the reads the operation makes anyway.

Every output records its inputs' sha256 (model card and ``__metadata__``). Hashing an input
as a pass of its own reads the file twice, and on a file that is not in the page cache the
two readers fight over the disk. :class:`InputDigest` instead follows the reads: each reader
(:func:`surgery.checkpoint.reader.read_into`, the writer's raw copy) reports the byte range
it has just read with :func:`note_read`, and a background thread hashes that range from a
read-only map of the file, whose pages the read has just brought into the page cache. sha256
must see a file's bytes in order, so the thread keeps one position per file: a report past
the position first hashes the gap (the header, padding, tensors stored out of name order),
a report behind it is already hashed, and what no one read is hashed at the end. Each hashed
chunk is dropped from the map at once, so memory stays one chunk whatever the file size.

A digest already known is not hashed at all: a file in the Hugging Face cache is a link to
``blobs/<sha256>``, and other files' digests are cached by file identity (see
:func:`file_sha256`).
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import threading
from pathlib import Path

HASH_CHUNK = 1 << 24
_HEX64 = frozenset("0123456789abcdef")
_CACHE_LOCK = threading.Lock()

# file -> the digests following its reads (usually one; two when one file is two inputs)
_FOLLOWED: dict[Path, list[tuple["InputDigest", int]]] = {}
_FOLLOW_LOCK = threading.Lock()


def note_read(path: Path, start: int, stop: int) -> None:
    """Tell the digests following ``path`` that its bytes ``[start, stop)`` were just read."""
    if _FOLLOWED:
        for digest, index in _FOLLOWED.get(path, ()):
            digest.feed(index, start, stop)


# ------------------------------------------------------------------------------ one file, once

def _sha_cache_path() -> Path:
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery")) / "sha256.json"


def _use_cache() -> bool:
    return os.environ.get("SURGERY_NO_HASH_CACHE", "") in ("", "0")


def _identity(path: Path) -> tuple[Path, str]:
    """The file behind ``path`` and its cache key (device, inode, size, mtime_ns, ctime_ns).

    Any write to a file changes its ctime, and so does restoring its mtime with
    ``touch``/``utime`` afterwards; ctime cannot be set back without changing the system
    clock. So an in-place edit of the same size with the mtime restored misses the cache,
    where a (size, mtime) key would keep the old digest."""
    real = Path(os.path.realpath(path))
    st = real.stat()
    return real, f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def known_sha256(paths: list[Path]) -> list[tuple[str | None, str]]:
    """``(digest, key)`` per file: its sha256 when it is known without reading the file (a
    Hugging Face blob's name, or the digest cache, read once), else None; ``key`` is what
    :func:`remember_sha256` stores a digest under."""
    cache: dict | None = None
    found: list[tuple[str | None, str]] = []
    for path in paths:
        real, key = _identity(path)
        if real.parent.name == "blobs" and len(real.name) == 64 and set(real.name) <= _HEX64:
            found.append((real.name, key))
            continue
        if cache is None:
            cache = {}
            if _use_cache():
                try:
                    loaded = json.loads(_sha_cache_path().read_text())
                    cache = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):
                    pass
        cached = cache.get(key)
        found.append((cached if isinstance(cached, str) and cached else None, key))
    return found


def remember_sha256(key: str, digest: str) -> None:
    """Store a digest in ``$SURGERY_CACHE/sha256.json`` (atomically; a read-only home is fine)."""
    if not _use_cache():
        return
    cache_file = _sha_cache_path()
    with _CACHE_LOCK:
        try:
            try:
                data = json.loads(cache_file.read_text())
                data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                data = {}
            data[key] = digest
            if len(data) > 10000:  # keep the cache small: drop the oldest entries
                data = dict(list(data.items())[-5000:])
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.{threading.get_native_id()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home must not break the operation


class _FileHash:
    """sha256 of one file fed in file order from a read-only map: ``advance(stop)`` hashes
    ``[position, stop)`` and drops each hashed chunk from the map (the page cache keeps it)."""

    def __init__(self, path: Path):
        import hashlib  # here, not at module level: header-only commands need not load OpenSSL

        self.path = path
        self.h = hashlib.sha256()
        self.pos = 0
        self._fh = open(path, "rb")
        self.size = os.fstat(self._fh.fileno()).st_size
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        if self.size:
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._mm)

    def advance(self, stop: int) -> None:
        stop = min(stop, self.size)
        page = mmap.PAGESIZE
        while self.pos < stop:
            end = min(stop, self.pos + HASH_CHUNK)
            self.h.update(self._view[self.pos:end])  # releases the GIL: runs beside the operation
            if hasattr(self._mm, "madvise"):
                lo, hi = self.pos - self.pos % page, end - end % page
                if hi > lo:
                    self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            self.pos = end

    def hexdigest(self) -> str:
        self.advance(self.size)
        return self.h.hexdigest()

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
        if self._mm is not None:
            self._mm.close()
        self._fh.close()


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes, always read (no cache): for integrity checks.

    The file is hashed straight from its page-cache pages (a read-only map), so it is not
    copied into a buffer first; each hashed chunk is dropped from this process's mapping at
    once, so peak memory stays one chunk whatever the file size.
    """
    f = _FileHash(path)
    try:
        if f._mm is not None and hasattr(f._mm, "madvise"):
            f._mm.madvise(mmap.MADV_SEQUENTIAL)
        return f.hexdigest()
    finally:
        f.close()


def file_sha256(path: Path) -> str:
    """sha256 of one file, without re-reading it when the answer is already known (a Hugging
    Face blob's name, or ``$SURGERY_CACHE/sha256.json``; ``SURGERY_NO_HASH_CACHE=1`` turns
    that cache off)."""
    [(digest, key)] = known_sha256([path])
    if digest is None:
        digest = hash_file(Path(os.path.realpath(path)))
        remember_sha256(key, digest)
    return digest


def combine(files: list[Path], digests: list[str]) -> str:
    """Identity of a checkpoint made of ``files``: the single file's sha256, or for shards the
    sha256 of their ``sha256sum``-format manifest (sorted by file name)."""
    import hashlib

    if len(files) == 1:
        return digests[0]
    manifest = "".join(f"{d}  {f.name}\n" for d, f in sorted(zip(digests, files), key=lambda x: x[1].name))
    return hashlib.sha256(manifest.encode()).hexdigest()


def files_sha256(files: list[Path]) -> str:
    """Identity of a checkpoint made of ``files`` (see :func:`combine`), hashed here and now."""
    return combine(files, [file_sha256(f) for f in files])


# ------------------------------------------------------------------------------ following the reads

class InputDigest:
    """The identity (:func:`combine`) of ``files``, hashed on a background thread.

    Args:
        files: The checkpoint's weight files.
        follow_reads: Hash what this process's readers report (:func:`note_read`), in file
            order, and the rest when :meth:`result` is called. False: hash every file from
            start to end at once (the reads happen elsewhere, e.g. in Ray tasks).
    """

    def __init__(self, files: list[Path], follow_reads: bool = True):
        self.files = list(files)
        known = known_sha256(self.files)
        self._digests: list[str | None] = [d for d, _ in known]
        self._keys = [k for _, k in known]
        self._todo = [i for i, d in enumerate(self._digests) if d is None]
        self._events: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._followed: list[Path] = []
        self._result: str | None = None
        self._cancelled = False
        self._hashes: dict[int, _FileHash] = {}  # file index -> its running hash (positions: tests)
        if not self._todo:
            return
        if follow_reads:
            with _FOLLOW_LOCK:
                for i in self._todo:
                    path = self.files[i]
                    _FOLLOWED[path] = _FOLLOWED.get(path, []) + [(self, i)]
                    self._followed.append(path)
        else:
            for i in self._todo:
                self._events.put((i, 0, 1 << 62))
        self._thread = threading.Thread(target=self._run, name="surgery-input-sha256", daemon=True)
        self._thread.start()

    def feed(self, index: int, start: int, stop: int) -> None:
        """Bytes ``[start, stop)`` of file ``index`` were read (called by :func:`note_read`)."""
        self._events.put((index, start, stop))

    def _run(self) -> None:
        try:  # Linux: nice this thread only, so the hash yields to the operation and fills its waits
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        hashes = self._hashes
        try:
            for i in self._todo:
                hashes[i] = _FileHash(self.files[i])
            while True:
                event = self._events.get()
                if event is None or self._cancelled:
                    break
                i, _, stop = event
                h = hashes[i]
                stop = min(stop, h.size)
                while h.pos < stop and not self._cancelled:  # a gap before ``start`` goes first: in order
                    h.advance(min(stop, h.pos + HASH_CHUNK))
            if self._cancelled:
                return
            for i in self._todo:
                self._digests[i] = hashes[i].hexdigest()
        except BaseException as exc:  # reported by result(), which hashes again and raises there
            self._error = exc
        finally:
            for h in hashes.values():
                h.close()

    def _unfollow(self) -> None:
        with _FOLLOW_LOCK:
            for path in self._followed:
                rest = [e for e in _FOLLOWED.get(path, []) if e[0] is not self]
                if rest:
                    _FOLLOWED[path] = rest
                else:
                    _FOLLOWED.pop(path, None)
            self._followed = []

    def result(self) -> str:
        """The identity; waits for the thread to hash what is left. Cached."""
        if self._result is None:
            self._unfollow()
            if self._thread is not None:
                self._events.put(None)
                self._thread.join()
                self._thread = None
                if self._error is None:
                    for i in self._todo:
                        remember_sha256(self._keys[i], self._digests[i])  # type: ignore[arg-type]
            if self._error is not None or any(d is None for d in self._digests):
                self._error = None
                self._digests = [file_sha256(f) for f in self.files]  # raises the real problem, if any
            self._result = combine(self.files, self._digests)  # type: ignore[arg-type]
        return self._result

    @property
    def done(self) -> bool:
        """True once :meth:`result` has the identity."""
        return self._result is not None

    def cancel(self) -> None:
        """Stop following reads and hashing, without a digest (the operation failed)."""
        if self._result is None:
            self._unfollow()
            self._cancelled = True
            if self._thread is not None:
                self._events.put(None)
                self._thread = None
