"""One run per output folder: a second run on an ``OUTPUT_DIR`` that a live run holds is refused
(docs/multi_gpu.md#one-run-per-output-folder).

A run checks ``OUTPUT_DIR/.sgr_d2.lock`` first thing (:meth:`OutputLock.check`, reading only) and
takes it just before its first write (:meth:`OutputLock.acquire`), so a refused run writes nothing,
not even the lock. The main process decides; every worker raises the same error. The file is held
with ``flock`` and records its holder, whose thread touches it every :data:`HEARTBEAT_S` seconds.
A stale record is taken over with a warning; a fresh one of another host is honoured even where
``flock`` said the file was free (some network filesystems lock only within one machine).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import Optional

from detectron2.utils import comm

__all__ = ["HEARTBEAT_S", "LOCK_NAME", "STALE_AFTER_S", "OutputDirInUse", "OutputLock"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".sgr_d2.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class OutputDirInUse(RuntimeError):
    """Another live run holds the output folder."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (/proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _describe(record: dict, age: float) -> str:
    parts = [f"host {record.get('host')}, pid {record.get('pid')}"]
    if record.get("started"):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"])))
    if record.get("slurm_job"):
        parts.append(f"SLURM job {record['slurm_job']}")
    return ", ".join(parts + [f"heartbeat {age:.0f} s ago"])


class OutputLock(contextlib.AbstractContextManager):
    """The lock of ``output_dir`` (none where it is empty); a context manager that releases it."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME) if output_dir else ""
        self.held = False  # on every worker, once the main process holds the lock
        self._fd = None
        self._created_dir = False

    def _record(self):
        """(record, heartbeat age in seconds) of the lock file, or (None, 0) without one."""
        try:
            with open(self.path) as f:
                text = f.read()
            age = max(0.0, time.time() - os.stat(self.path).st_mtime)
        except FileNotFoundError:
            return None, 0.0
        try:
            record = json.loads(text) if text.strip() else None
        except ValueError:
            record = None
        return (record if isinstance(record, dict) else None), age

    def _live_holder(self, record: Optional[dict], age: float, kernel_locked: bool, announce=True) -> Optional[str]:
        """The live holder of ``record``, described; None when none or stale (``announce``: warn of the takeover)."""
        if kernel_locked:
            return "the file is locked (flock)" if record is None else _describe(record, age)
        if record is None:
            return None
        host, pid = record.get("host"), record.get("pid")
        if host == socket.gethostname():
            if isinstance(pid, int) and pid != os.getpid() and _pid_running(pid) \
                    and _process_start(pid) in (None, record.get("process_start")):
                return _describe(record, age)
            reason = f"pid {pid} is not running on this host"
        else:
            job, restart = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
            if job and record.get("slurm_job") == job and str(record.get("slurm_restart", "0")) != restart:
                reason = f"it is an earlier run of this SLURM job {job} (restart {record.get('slurm_restart')})"
            elif age < STALE_AFTER_S:
                return _describe(record, age)
            else:
                reason = f"its heartbeat is {age:.0f} s old (more than {STALE_AFTER_S:.0f} s)"
        if announce:
            logger.warning("Taking over the lock %s left by %s: %s", self.path, _describe(record, age), reason)
        return None

    def _refusal(self, holder: str) -> OutputDirInUse:
        return OutputDirInUse(
            f"OUTPUT_DIR {self.output_dir} is in use by another run ({holder}; lock file {self.path}). Two "
            "runs writing into one folder overwrite each other's checkpoints, last_checkpoint and logs. "
            "Wait for that run to end or give this one another OUTPUT_DIR; if that run is dead and its "
            f"machine unreachable, delete {self.path}.")

    def _agree(self, decide) -> None:
        """``decide()`` on the main process (an error message or None), the same outcome everywhere."""
        msg = None
        if comm.is_main_process():
            try:
                decide()
            except OutputDirInUse as e:
                msg = str(e)
        msg = comm.all_gather(msg)[0]  # (one worker: [msg])
        if msg:
            raise OutputDirInUse(msg)

    def check(self) -> None:
        """Refuse (:class:`OutputDirInUse`) if a live run holds the folder; reads only."""
        if self.path:
            self._agree(self._check)

    def _check(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            locked = False
        except BlockingIOError:
            locked = True
        except OSError:  # no flock on this filesystem: the record decides
            locked = False
        finally:
            os.close(fd)
        holder = self._live_holder(*self._record(), locked, announce=False)
        if holder:
            raise self._refusal(holder)

    def acquire(self) -> None:
        """Take the lock before the run's first write (idempotent); refuse like :meth:`check`."""
        if not self.path or self.held:
            return
        self._agree(self._acquire)
        self.held = True

    def _acquire(self) -> None:
        if not os.path.isdir(self.output_dir):
            os.makedirs(self.output_dir)
            self._created_dir = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                locked = True
            except OSError as e:
                logger.warning("%s cannot be locked (%s): only its record protects OUTPUT_DIR from a second "
                               "run", self.path, errno.errorcode.get(e.errno, e))
            try:  # the holder may have deleted the file between our open and our lock: try again
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same or locked:
                break
            os.close(fd)
        holder = self._live_holder(*self._record(), locked)
        if holder:
            os.close(fd)
            self._remove_created_dir()
            raise self._refusal(holder)
        self._fd = fd
        self._stop = threading.Event()
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "started": time.time(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
        threading.Thread(target=self._heartbeat, daemon=True, name="sgr_d2-output-lock").start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self._fd)

    def _remove_created_dir(self) -> None:
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.output_dir)  # only if empty
            self._created_dir = False

    def release(self) -> None:
        """Delete the lock file, give up the lock, remove the folder this run created if empty."""
        self.held = False
        if self._fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def __exit__(self, *exc):
        self.release()
