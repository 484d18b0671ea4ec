"""Durable files: written in full, flushed to the disk, readable as the user's umask says, and
swapped into place whole, so that a crash at any moment leaves the old copy or the new one.

``finish`` makes a freshly written file durable (its mode set from the umask: safetensors and
``tempfile`` create files and folders readable by their owner alone) and ``sync_directory`` makes
the renames inside a folder durable. ``swap_in`` replaces a directory by another in one step where
the system can (Linux ``renameat2`` with ``RENAME_EXCHANGE``), else by two renames, between which a
crash leaves the old copy as ``.<name>.old`` and the new one as ``.<name>.tmp`` for ``recover``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path


def umask() -> int:
    """This process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


def finish(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a new file (or folder) gets under the umask, and flush it to the disk."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())
    if directory:
        sync_directory(path)
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def finish_tree(directory: str | os.PathLike) -> None:
    """``finish`` every file and folder under ``directory``, and the directory itself."""
    for root, folders, files in os.walk(directory):
        for name in files:
            finish(os.path.join(root, name))
        for name in folders:
            finish(os.path.join(root, name), directory=True)
    finish(directory, directory=True)


def sync_directory(path: str | os.PathLike) -> None:
    """Flush a folder's entries (the renames and new files in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half, and
    a crash after the call keeps the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    finish(tmp)
    os.replace(tmp, path)
    sync_directory(path.parent)


def swap_in(new: Path, target: Path) -> None:
    """Put the complete, durable directory ``new`` in the place of ``target`` (which may not exist
    yet) and remove the old copy."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a crash, or by a recovery from the new copy
    if target.exists() and _exchange(new, target):
        old = new  # now holding the old copy
    else:
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
    sync_directory(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(target: Path, complete) -> None:
    """After a crash inside ``swap_in``'s two renames (``target`` missing), put back the newest copy
    that ``complete(path)`` accepts: the new one, else the old one."""
    if target.exists():
        return
    for copy in (target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")):
        if copy.is_dir() and complete(copy):
            os.replace(copy, target)
            sync_directory(target.parent)
            return


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or
    its file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd, exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))
