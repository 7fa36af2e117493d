"""One run at a time in an output directory.

Two runs writing one directory would each generate every record (resume reads the keys only once,
at start) or, with ``overwrite_output_dir``, delete the other's records. So a run holds
``lgen.lock`` in the directory from before it touches anything until it ends. The file is held with
``flock``, which the kernel drops when its process dies, even by SIGKILL: a crashed run's lock never
blocks the next one. The file names its owner (host, pid, start time) for the error message. On a
filesystem without ``flock`` the owner's pid decides: a lock of a process that no longer runs on
this host is stale and is taken over; one from another host is refused, naming the file to delete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lgen.errors import OutputDirError

LOCK = "lgen.lock"


class DirectoryLock:
    """``lgen.lock`` in ``directory``, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self._fd: int | None = None
        self._created_directory = False

    def acquire(self) -> None:
        """Take the lock, creating the directory if need be; refuse a directory another run holds."""
        if self._fd is not None:
            return
        self._created_directory = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use(_read(self.path)) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                fd = self._acquire_by_pid()
                break
            try:  # the last owner may have removed the file between our open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode() + b"\n")
        os.fsync(fd)
        self._fd = fd

    def _acquire_by_pid(self) -> int:
        """Without ``flock``: create the file exclusively; a same-host owner that is gone gives way."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read(self.path)
                if owner.get("host") != socket.gethostname() or _alive(owner.get("pid")):
                    raise self._in_use(owner) from None
                self.path.unlink(missing_ok=True)  # its run is gone: a stale lock

    def _in_use(self, owner: dict[str, Any]) -> OutputDirError:
        who = (f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}" if owner
               else "owner unknown")
        return OutputDirError(f"output_dir={str(self.directory)!r} is in use by another lgen run ({who}); wait for "
                              f"it to end or choose another output_dir (if that run is gone, delete {self.path})")

    def release(self) -> None:
        """Remove the lock file and let go; an empty directory that :meth:`acquire` created goes too."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created_directory:
            try:
                self.directory.rmdir()
            except OSError:
                pass  # it holds files now

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def held(directory: str | Path) -> bool:
    """Whether a run holds ``directory``'s lock now (it may be writing there); True where that
    cannot be told."""
    try:
        fd = os.open(Path(directory) / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _read(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
