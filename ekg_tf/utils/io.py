"""Atomic file writes: a reader (or a crash) never sees half a file."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager



@contextmanager
def atomic_path(path: str):
    """Yields a temp path in the same directory; renamed onto `path` on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False))


# Names of what a writer leaves behind when killed mid-write: atomic_path's temporary
# files, the exporter's build folders, TensorFlow's checkpoint shards before their merge.
TEMPORARY_PREFIXES = (".tmp-", ".edge-", ".dense-")
TEMPORARY_SUFFIXES = ("_temp",)


def is_temporary(name: str) -> bool:
    return name.startswith(TEMPORARY_PREFIXES) or name.endswith(TEMPORARY_SUFFIXES)


def remove_temporaries(directory: str) -> list[str]:
    """Deletes the temporary files and folders a killed writer left anywhere under
    `directory` (call it while holding the directory's lock); returns their paths."""
    import shutil
    removed = []
    if not os.path.isdir(directory):
        return removed
    for root, dirs, files in os.walk(directory):
        for name in list(dirs):
            if is_temporary(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(os.path.join(root, name))
                dirs.remove(name)
        for name in files:
            if is_temporary(name):
                os.remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


@contextmanager
def directory_lock(directory: str, what: str = "this directory"):
    """An exclusive lock on `directory` (a `.lock` file, released by the kernel when the
    process dies, SIGKILL included): a second writer is refused with a clear error."""
    import fcntl
    from ekg_tf.errors import UserError
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".lock")
    f = open(path, "a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is writing {what} ({directory}); wait for it to "
                            "finish or use another directory") from None
        yield
    finally:
        f.close()
