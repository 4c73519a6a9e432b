"""The run-folder lock (ttfm_np/runlock.py): one writer per folder, the refusal names the holder,
and the lock dies with its process."""
import json
import os
import signal
import subprocess
import sys

import pytest

from ttfm_np.runlock import LOCK_NAME, RunLock, RunLocked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = """
import sys
from ttfm_np.runlock import RunLock
with RunLock(sys.argv[1], command="python cli.py distill --out " + sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()                      # hold until the test closes stdin (or kills us)
print("released", flush=True)
"""


def _start_holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    proc = _start_holder(run)
    try:
        with pytest.raises(RunLocked) as err:
            with RunLock(run):
                pytest.fail("the lock was taken twice")
        msg = str(err.value)
        assert msg == (f"run folder {run} is in use by PID {proc.pid} (python cli.py distill --out {run}); "
                       "wait for it or choose another --out")
        assert err.value.holder["pid"] == proc.pid and isinstance(err.value, RuntimeError)
    finally:
        proc.stdin.close()
        assert proc.stdout.readline().strip() == "released"
        proc.wait()
    with RunLock(run) as lock:                       # free again after a clean exit
        assert lock.held
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not lock.held and (run / LOCK_NAME).read_text() == ""          # no stale holder recorded


def test_lock_dies_with_a_killed_process(tmp_path):
    proc = _start_holder(tmp_path)
    with pytest.raises(RunLocked, match=f"PID {proc.pid}"):
        RunLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)                 # no cleanup code runs
    proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid   # the file still names it ...
    with RunLock(tmp_path):                          # ... but the kernel dropped the lock
        pass


def test_two_locks_in_one_process_conflict_and_release_is_idempotent(tmp_path):
    first = RunLock(tmp_path, command="first").acquire()
    with pytest.raises(RunLocked, match=f"in use by PID {os.getpid()} \\(first\\)"):
        RunLock(tmp_path).acquire()
    with pytest.raises(RuntimeError, match="already holds"):
        first.acquire()
    first.release()
    first.release()
    with RunLock(tmp_path):
        pass


def test_lock_of_a_folder_that_does_not_exist_yet_creates_it(tmp_path):
    run = tmp_path / "a" / "b"
    with RunLock(run):
        assert (run / LOCK_NAME).exists()


def test_holder_that_has_not_written_yet(tmp_path):
    import fcntl
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)          # locked, file still empty
        with pytest.raises(RunLocked, match="in use by another process"):
            RunLock(tmp_path).acquire()
    finally:
        os.close(fd)
