"""Writing outputs so that a crash never leaves a half-made artifact.

Every output is made under a temporary name beside it and renamed into place; a failed write (no space, a
read-only directory) is one :class:`OutputError` line naming the output. Design: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.stage import StageError

# What a failed write reports without naming a file (``write()`` on a full disk): about the output being written.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


class OutputError(StageError):
    """An output cannot be written where dvc.yaml puts it."""


def _cannot_write(path: Path, error: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write the output ({error.strerror or error})")


def _is_about(error: OSError, tmp: Path) -> bool:
    """Whether ``error`` is about writing into ``tmp`` (not, say, an input that cannot be read)."""
    if error.filename is None:
        return error.errno in WRITE_ERRNOS
    return Path(os.path.abspath(os.fsdecode(error.filename))).is_relative_to(tmp.absolute())


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the ``.<name>.tmp-<pid>-*`` siblings of ``path`` whose writer is gone (docs/reliability.md)."""
    prefix = f".{path.name}.tmp-"
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and _is_running(int(pid)):
            continue
        if (entry / f"{path.name}.old").is_dir() and not os.path.lexists(path):
            os.rename(entry / f"{path.name}.old", path)
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path (for a file or a directory) next to ``path``, renamed onto it if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        if blocking := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
            raise OutputError(f"{path}: cannot write the output: {blocking} is a file, not a directory") from e
        raise _cannot_write(path, e) from e
    target = tmp / path.name
    try:
        try:
            yield target
        except OSError as e:
            if not _is_about(e, tmp):
                raise
            raise _cannot_write(path, e) from e
        _replace(target, path, tmp / f"{path.name}.old")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # with the old directory, if one was moved aside


def _replace(target: Path, path: Path, aside: Path) -> None:
    """Move ``target`` onto ``path``; a directory by two renames, the old one ``aside`` first (and back on failure)."""
    try:
        moved = path.is_dir() and not path.is_symlink()
        if moved:
            os.rename(path, aside)
        try:
            os.replace(target, path)
        except OSError:
            if moved:
                os.rename(aside, path)
            raise
    except OSError as e:
        raise _cannot_write(path, e) from e


def write_torch(path: str | os.PathLike, obj) -> None:
    """``torch.save(obj)`` to ``path``, atomically; a failed write (a full disk) is an :class:`OutputError`."""
    import torch  # here: most stages that write outputs do not need it

    buffer = io.BytesIO()  # saved in memory first: torch's writer turns a failed write into a RuntimeError
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
