"""Writing outputs so that a crash never leaves a half-made artifact.

Every output is first written under a temporary name in the same directory and then renamed into place
(``os.replace`` is atomic within one filesystem). An interrupted stage leaves at most a ``.<name>.tmp-*``
entry, which DVC does not track and git ignores (``.gitignore``), never a truncated file under the declared
name; the next write of the same output removes what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the ``.<name>.tmp-<pid>-*`` siblings of ``path`` whose writer is no longer running.

    Only temporaries of this very output are considered, and no two stages write the same output, so the
    only other writer that could own one is a second run of the same stage: its temporary is kept for as
    long as its process lives. (Not its age: a training run keeps its curves' temporary for hours.) A name
    without a pid comes from a version that did not record one, and its writer is long gone.
    """
    prefix = f".{path.name}.tmp-"
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and _is_running(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Works for a file or a directory (the block creates whichever it needs at the yielded path). The
    temporary directory holding it is named after ``path`` and this process (``.<name>.tmp-<pid>-<random>``)
    so that a later write can tell a killed writer's leftovers from a live one's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
