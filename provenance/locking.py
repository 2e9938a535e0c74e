"""One writer at a time: an exclusive `fcntl.flock` on `<index>/.lock`, with who holds it written inside.

The kernel holds the lock, not the file: when the writing process dies (even by SIGKILL) the lock is
released, so a "stale" lock file left by a killed run is simply taken over by the next writer; the pid,
host, command and start time inside it only make the refusal message useful.

On NFS: Linux maps flock() to NFS byte-range locks (NFSv4 locks, or NLM/lockd for v3) since kernel 2.6.12,
so two hosts sharing an index over NFS do exclude each other, provided the mount has locking (not `nolock`,
and lockd/statd running for v3). A crashed client's lock is only freed when the server's lease expires
(NFSv4: typically 90 s), so the next writer is refused (or waits, with --wait) until then. On filesystems
without working locks (some FUSE or object-store mounts) flock either fails, which we report, or succeeds
on every host, which cannot be detected: run one writer per index there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from provenance.errors import IndexLockedError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class IndexWriteLock:
    """`with IndexWriteLock(index_dir, wait=0, action="append"):` holds the index's writer lock.

    wait: seconds to wait for another writer to finish (0 = refuse at once with IndexLockedError).
    """

    def __init__(self, index_dir: str | os.PathLike[str], wait: float = 0.0, action: str = "write"):
        self.path = Path(index_dir) / LOCK_FILE
        self.wait = float(wait)
        self.action = action
        self._fd: int | None = None

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its last holder ({} when empty or unreadable)."""
        try:
            held: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            return held
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        delay = 0.05
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise IndexLockedError(
                        f"cannot lock {self.path} ({e.strerror}): this filesystem does not support file locks; "
                        "run one writer at a time by other means"
                    ) from None
                if time.monotonic() >= deadline:
                    os.close(fd)
                    h = self.holder()
                    who = (
                        f"pid {h.get('pid')} on {h.get('host')} ({h.get('action')}, since {h.get('since')})"
                        if h
                        else "another process"
                    )
                    hint = f"it waited {self.wait:g} s; " if self.wait else ""
                    raise IndexLockedError(
                        f"the index at {self.path.parent} is being written by {who}; {hint}only one writer at a "
                        "time: wait for it to finish, or pass --wait SECONDS to wait for the lock"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        previous = self.holder()
        if previous.get("pid") and previous.get("state") == "held":
            logger.warning(
                "taking over the lock of %s left by pid %s on %s (%s since %s): that writer is gone",
                self.path.parent,
                previous.get("pid"),
                previous.get("host"),
                previous.get("action"),
                previous.get("since"),
            )
        info = {
            "state": "held",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "action": self.action,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            h = self.holder()
            h["state"] = "released"
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(h).encode("utf-8"), 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> IndexWriteLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
