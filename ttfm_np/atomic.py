"""Atomic file writes: a file the project writes is either the old one or the whole new one.

    with atomic.write("runs/x/eval/eval.json", "w") as f:     # text or binary ("wb") file object
        json.dump(rows, f)
    atomic.save_with(path, lambda tmp: img.save(tmp, format="PNG"))   # for writers that want a file name

How: the bytes go to a temp file in the SAME folder (`.<name>.tmp-<pid>`), which is
flushed and fsync'ed, then os.replace'd over the target (a rename within one file
system is atomic), then the folder is fsync'ed so the rename survives a power cut.
Any failure on the way (disk full, permission, an exception in the caller's code,
Ctrl-C) removes the temp file and leaves the old file exactly as it was.

A file-system failure is raised as AtomicWriteError (an OSError with the errno)
whose message names the file and the fix, instead of a bare "[Errno 28] No space
left on device".

Checkpoints have their own writer with the same protocol (ckpt.py: checksums and
a previous generation); appended logs (metrics.jsonl) are not rewritten here.
"""
from __future__ import annotations

import contextlib
import errno
import os


class AtomicWriteError(OSError):
    """Writing `filename` failed in the file system; the previous file (if any) is intact."""

    def __str__(self):                      # the message, not OSError's "[Errno n] strerror: filename"
        return str(self.args[0])


def fix_for(errno_value) -> str:
    """What a user can do about a write that failed with this errno."""
    if errno_value in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk (or write somewhere else) and run the command again"
    if errno_value in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable or choose another output path"
    return "check the disk and run the command again"


def write_error(path: str, exc: OSError, had_old: bool) -> AtomicWriteError:
    """An AtomicWriteError naming the file, what happened to the old one, and the fix."""
    reason = exc.strerror or str(exc)
    kept = f"the previous {path} is intact" if had_old else "nothing was written there"
    err = AtomicWriteError(f"could not write {path}: {reason}; {kept}; {fix_for(exc.errno)}")
    err.errno, err.strerror, err.filename = exc.errno, exc.strerror, path
    return err


def _fsync_folder(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return                              # (folders cannot be opened on some systems)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """The temp file beside `path` that a write goes to first (hidden, unique per process)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def _replace(tmp: str, path: str):
    """os.replace (its own function so tests can make the final step fail)."""
    os.replace(tmp, path)


def save_with(path, writer) -> str:
    """Call writer(tmp_path) to write the whole file under a temp name, then rename it over `path`.

    writer must write the file at the given name completely (and may pick the format from the
    target's extension itself: the temp name ends in .tmp-<pid>). Returns path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    had_old = os.path.isfile(path)
    tmp = temp_name(path)
    try:
        os.makedirs(folder, exist_ok=True)
        writer(tmp)
        with open(tmp, "rb+") as fh:        # the bytes on disk before the rename makes them visible
            os.fsync(fh.fileno())
        _replace(tmp, path)
    except BaseException as exc:            # KeyboardInterrupt too: never a half-written file or a stray temp
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, AtomicWriteError):
            raise write_error(path, exc, had_old) from exc
        raise
    _fsync_folder(folder)
    return path


@contextlib.contextmanager
def write(path, mode: str = "w", **open_kwargs):
    """`with write(path, "w") as f:` like open(), but the file appears only complete (see module doc)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic.write writes whole files: mode 'w' or 'wb', got {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    had_old = os.path.isfile(path)
    tmp = temp_name(path)
    f = None
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(tmp, mode, **open_kwargs)
        yield f
        f.flush()
        os.fsync(f.fileno())                # on disk now (a late ENOSPC/EIO surfaces here)
        f.close()
        _replace(tmp, path)
    except BaseException as exc:            # the caller's own exception too: the old file stays
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, AtomicWriteError):
            raise write_error(path, exc, had_old) from exc
        raise
    _fsync_folder(folder)
