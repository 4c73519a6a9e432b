"""One writer per run folder: an exclusive lock on `<folder>/.lock`.

    with RunLock(out_dir):
        ...train, append to metrics.jsonl, save checkpoints...

Two processes writing the same run folder would interleave metrics.jsonl and
overwrite each other's checkpoints. The lock is `fcntl.flock(LOCK_EX | LOCK_NB)`
on the open lock file: the kernel holds it for the open file and drops it when
the file is closed, which also happens when the process dies (even by kill -9),
so a crash never leaves a stale lock behind. The lock file itself stays (it is
tiny); deleting it would let a second process lock a new file of the same name
while the first still holds the old one.

While held, the file says who holds it (JSON: pid, command line, host, start
time), so a refused second writer can name the holder:

    RunLocked: run folder runs/x is in use by PID 1234 (python cli.py distill ...);
    wait for it or choose another --out

flock works on local file systems; on NFS it may be emulated with fcntl locks
or be a no-op, depending on the mount.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder's lock."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}             # what the holder wrote: pid, command, host, since


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "another process (it has not written its PID yet)"
    pid = holder["pid"]
    cmd = holder.get("command")
    where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
    return f"PID {pid}{where}" + (f" ({cmd})" if cmd else "")


class RunLock:
    """Exclusive, non-blocking lock of a run folder (created if missing); a context manager.

    acquire() raises RunLocked when another process (or another RunLock in this
    process) holds it; release() is idempotent.
    """

    def __init__(self, folder, command: str | None = None):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.command = command if command is not None else " ".join([os.path.basename(sys.executable)] + sys.argv)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError(f"this RunLock already holds {self.path}")
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"run folder {self.folder} is in use by {_describe(holder)}; wait for it or choose "
                            f"another --out", holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            record = json.dumps({"pid": os.getpid(), "command": self.command, "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except BaseException:
            os.close(fd)                       # closing drops the lock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)                # nobody holds it now: no stale name in the file
        except OSError:
            pass
        os.close(fd)                           # closing the file releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def __del__(self):                         # a forgotten lock is released with its object
        try:
            self.release()
        except Exception:                      # at interpreter shutdown os may already be gone
            pass


def _read_holder(fd: int) -> dict:
    """What the holder wrote into the lock file ({} if it has not written yet or the text is unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        holder = json.loads(text) if text else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
