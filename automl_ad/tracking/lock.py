"""Exclusive file locks (POSIX ``flock``) that say who holds them.

The holder writes its pid, host, command and start time into the lock file. The operating system releases the
lock when the holding process ends in any way (``kill -9`` included), so a lock left behind by a dead process is
simply taken over; the file itself stays and is reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path


class FileLock:
    """One exclusive lock on ``path`` (created with its folder when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def try_acquire(self) -> dict | None:
        """Take the lock without waiting: ``None`` when taken, else what the current holder wrote."""
        if self._fd is not None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self.holder()
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return None

    def acquire(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the lock; ``TimeoutError`` naming the holder when it stays taken."""
        deadline = time.monotonic() + timeout_s
        while (holder := self.try_acquire()) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path} is held by {describe_holder(holder)}")
            time.sleep(0.05)

    def holder(self) -> dict:
        """What the holder wrote (``{}`` when unreadable, e.g. while it is being written)."""
        for _ in range(20):
            try:
                return json.loads(self.path.read_text())
            except (OSError, ValueError):
                time.sleep(0.01)
        return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def describe_holder(holder: dict) -> str:
    """``pid 123 on host, started 2025-01-31 12:00:00 UTC (automl-ad search data/)``."""
    if not holder:
        return "a process that is just starting"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')} "
            f"({holder.get('command', '?')})")
