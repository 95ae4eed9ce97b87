"""Who may write a folder, and how a command ends when the file system says no. No torch import.

One owner per folder: every command that writes a folder (training, SFT, evaluation, the instruct stage cache,
traces, merge) first takes an advisory lock on ``FOLDER/.lock`` with ``fcntl.flock`` and holds it until it ends.
The operating system drops the lock when the process dies, however it dies, so a lock left by a crash never blocks
anyone; the file itself stays and holds the PID of the last owner. A second process that finds the lock held
refuses (``FolderBusy``, naming the PID that holds it) or, where it only needs what the owner is making (the
instruct stage cache), waits for it.

OS errors: ``run_cli`` runs an entry point and turns an ``OSError`` (a read-only folder, a file where a folder is
expected, a full disk) into one line naming the operation and the path, exit status 1; ``--debug`` shows the
traceback instead. A refusal (``UsageError``: a folder held by another process or run, a resume with other
settings, an output that is an input) is one line too, exit status 2.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import traceback
from pathlib import Path

LOCK_NAME = ".lock"


class UsageError(RuntimeError):
    """A command asked for something it refuses before doing any work (exit status 2); the message says why and
    what works instead."""


class RunFolderError(UsageError):
    """A command was pointed at a folder it must not write (another run, its own input, a foreign model); the
    message says which command or flag works instead."""


class FolderBusy(RunFolderError):
    """Another live process holds the folder's lock."""


_held: dict[str, int] = {}  # resolved folder -> file descriptor of its lock, for the locks this process holds


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode(errors="replace").strip() or "?"
    except OSError:
        return "?"


def lock_folder(folder: str | os.PathLike, command: str, *, wait: bool = False, name: str = LOCK_NAME) -> Path:
    """Take the advisory lock ``folder/name`` (creating the folder) for the life of this process, or until
    ``unlock_folder``. Held already by this process: nothing to do. Held by another process: ``FolderBusy`` naming
    its PID, or with ``wait`` block until it is released (the message is printed first)."""
    folder = Path(folder)
    key = str((folder.resolve() / name))
    if key in _held:
        return folder
    if folder.exists() and not folder.is_dir():
        raise not_a_folder(folder, "creating the folder")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        if not wait:
            os.close(fd)
            raise FolderBusy(f"{command}: {folder} is in use by process {pid}, which holds {folder / name}; wait for "
                             f"it to end (or stop it: kill {pid}), or write elsewhere with --out NEW_DIR") from None
        print(f"[emor3] {folder} is in use by process {pid}: waiting for it to finish")
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    return folder


def folder_holder(folder: str | os.PathLike, name: str = LOCK_NAME) -> str | None:
    """The PID of the live process holding ``folder/name`` (as its lock file says), or None when nobody holds it.
    Reads only: creates nothing."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def unlock_folder(folder: str | os.PathLike, name: str = LOCK_NAME) -> None:
    """Release a lock this process took with ``lock_folder`` (a no-op where it holds none)."""
    fd = _held.pop(str(Path(folder).resolve() / name), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --------------------------------------------------------------------------------------------- OS errors

# the innermost call of a failed operation -> what it was doing, in words
_OPERATIONS = (("mkdir", "creating the folder"), ("makedirs", "creating the folder"), ("rmtree", "removing"),
               ("copytree", "copying to"), ("copyfile", "copying to"), ("copy2", "copying to"),
               ("write_text", "writing"), ("write_bytes", "writing"), ("read_text", "reading"),
               ("read_bytes", "reading"), ("save_file", "writing"), ("torch.save", "writing"), ("save", "writing"),
               ("replace", "renaming"), ("rename", "renaming"), ("unlink", "deleting"), ("fsync", "syncing"),
               ("write", "writing"), ("open", "opening"), ("iterdir", "listing"), ("stat", "reading"))


def not_a_folder(path: str | os.PathLike, operation: str) -> NotADirectoryError:
    """The error for a file found where a command writes a folder, carrying the operation for ``os_error_line``."""
    e = NotADirectoryError(errno.ENOTDIR, "a file is there, not a folder", str(path))
    e.operation = operation
    return e


def _operation(e: OSError) -> str:
    if getattr(e, "operation", None):
        return e.operation
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        for call, verb in _OPERATIONS:
            if f.name == call or f"{call}(" in (f.line or ""):
                return verb
    return "accessing"


def os_error_line(e: OSError) -> str:
    """One line for an OSError: the operation, the path(s) and the system's reason. One raised with a message of
    its own (no errno), such as a missing file named by emor3, is that message."""
    if e.errno is None:
        return f"error: {e}"
    path = e.filename if e.filename is not None else "?"
    where = f"{path} -> {e.filename2}" if e.filename2 is not None else f"{path}"
    reason = e.strerror or str(e)
    hint = {errno.ENOSPC: " (the disk is full: free space, or write elsewhere with --out)",
            errno.EROFS: " (a read-only file system: write elsewhere with --out)",
            errno.EACCES: " (no permission: write elsewhere with --out)",
            errno.ENOTDIR: " (a file where a folder is expected: give a folder's path)"}.get(e.errno, "")
    if getattr(e, "operation", None):  # raised by emor3 with its own words
        hint = ""
    return f"error: {_operation(e)} {where}: {reason}{hint}"


def run_cli(fn, *args, debug: bool = False):
    """Call ``fn(*args)`` for an entry point. A ``UsageError`` ends the process with its message and exit
    status 2; an ``OSError`` with one line naming the operation and path and exit status 1 (``debug``: the
    traceback instead)."""
    try:
        return fn(*args)
    except UsageError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        if debug:
            raise
        print(os_error_line(e) + "; --debug shows the traceback", file=sys.stderr)
        raise SystemExit(1) from None


def wants_debug(argv: list[str] | None) -> bool:
    """Whether ``--debug`` is among the arguments (every entry point accepts it)."""
    return "--debug" in (sys.argv[1:] if argv is None else argv)
