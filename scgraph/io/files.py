"""Writing files so that a kill or a full disk never leaves half of one, and I/O errors that name
the file (``write()`` on a full disk raises an OSError with no file name)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

#: Temporary files (a shard, a manifest, any file being replaced) end so; they never hold anything
#: complete, and a re-run removes those a killed one left.
TMP_SUFFIX = ".partial"


def named(err: OSError, path: str | Path) -> OSError:
    """``err`` with ``path`` as its file name, if it had none."""
    if err.filename is None and err.errno is not None:
        return type(err)(err.errno, err.strerror, str(path))
    return err


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` all at once: written to a temporary file beside it, fsynced,
    then renamed over it, so a reader sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise named(err, path) from None


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_directory(flag: str, path: str | Path) -> None:
    """Refuse, naming ``flag``, a folder a command will write into when it, or a folder above it,
    already exists as a file, or when it cannot be written (a read-only file system, no permission:
    a file is created and removed in it, or in the nearest folder above it that exists): checked
    before any work, where ``mkdir`` or the first write would only fail at the end."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = f"{flag} {path}" if folder == path else f"{flag} {path}: {folder}"
                raise NotADirectoryError(f"{where} is a file, not a folder")
            try:
                handle, name = tempfile.mkstemp(dir=folder, prefix=".scgraph-write-check-")
            except OSError as err:
                raise named(type(err)(err.errno, err.strerror), path) from None
            os.close(handle)
            os.unlink(name)
            return


