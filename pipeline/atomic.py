"""Writing outputs so that a crash never leaves a half-made artifact.

Every output is written under a temporary name in its directory and renamed into place (``os.replace``); a
directory is replaced by two renames (the old aside, the new in), so a kill leaves the old, the new or
(between the two) none, never a mix. A write that fails for a reason outside the program (no space, a
read-only directory) is an :class:`OutputError`: one line naming the output, nothing left behind.
"""

from __future__ import annotations

import contextlib
import errno
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
    """Whether ``error``, raised while the output was being made in ``tmp``, is about writing it: it names a
    file in ``tmp``, or names none and is a write's errno. An error naming another file (an input that cannot
    be read) is not, and keeps its own kind."""
    if error.filename is None:
        return error.errno in WRITE_ERRNOS
    return Path(os.path.abspath(os.fsdecode(error.filename))).is_relative_to(tmp.absolute())


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _aside(tmp: Path, path: Path) -> Path:
    """Where the output ``path`` is moved while its replacement, made in ``tmp``, is moved in."""
    return tmp / f"{path.name}.old"


def remove_stale_temporaries(path: Path) -> None:
    """Remove the ``.<name>.tmp-<pid>-*`` siblings of ``path`` whose writer is no longer running.

    Only temporaries of this very output are considered, and no two stages write the same output, so the
    only other writer that could own one is a second run of the same stage: its temporary is kept for as
    long as its process lives. (Not its age: a training run keeps its curves' temporary for hours.) A name
    without a pid comes from a version that did not record one, and its writer is long gone.

    A writer killed between moving the old directory aside and moving the new one in left no output at all:
    the old one, still aside in its temporary, is put back first.
    """
    prefix = f".{path.name}.tmp-"
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and _is_running(int(pid)):
            continue
        if _aside(entry, path).is_dir() and not os.path.lexists(path):
            os.rename(_aside(entry, path), path)
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Works for a file or a directory (the block creates whichever it needs at the yielded path). The
    temporary directory holding it is named after ``path`` and this process (``.<name>.tmp-<pid>-<random>``)
    so that a later write can tell a killed writer's leftovers from a live one's.
    """
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
        _replace(target, path, _aside(tmp, path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # with the old directory, if one was moved aside


def _replace(target: Path, path: Path, aside: Path) -> None:
    """Move ``target`` onto ``path``. A file is replaced in one rename. A directory cannot be (rename(2) only
    replaces an empty one), and deleting it first would leave a mix of its files under its name if the stage
    were killed meanwhile: it is moved ``aside`` (into the temporary, which is deleted afterwards) and the new
    one moved in, two renames. A kill between them leaves no output, and the old one aside, which the next
    write of ``path`` puts back (:func:`remove_stale_temporaries`); a failed second rename puts it back at once.
    """
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


class _KeptErrors:
    """The file torch.save writes through, keeping the OSError of a failed write: torch's C++ writer turns it into
    a RuntimeError ("unexpected pos"), which would not be recognised as a full disk."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def write_torch(path: str | os.PathLike, obj) -> None:
    """``torch.save(obj)`` to ``path``, atomically; a failed write (a full disk) is an :class:`OutputError`."""
    import torch  # here: most stages that write outputs do not need it

    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        out = _KeptErrors(file)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
