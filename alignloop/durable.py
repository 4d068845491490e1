"""Small helpers for writes that must survive a crash or power loss: fsync the data, rename, fsync the directory."""

import os
import tempfile
from pathlib import Path


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old bytes or the new ones, never a torn file."""
    make_dirs_durably(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable: the directory entry is data too."""
    fsync_file(path)


def make_dirs_durably(path: Path) -> None:
    """`mkdir -p path` whose new directories survive a power loss: each one it creates is fsync'd into its parent
    (a file fsync'd into a directory whose own entry was lost is lost with it). A folder another process has just
    made, and not yet synced, is taken as it is: the window is that process's mkdir-to-fsync, and a crash in it
    loses only folders made in that instant."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # another writer made it first (its entry may not be durable yet), or a file is there
            if not folder.is_dir():
                raise
        fsync_dir(folder.parent)
