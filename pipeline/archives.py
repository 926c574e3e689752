"""Reading gzip files and tar archives from untrusted sources, in memory, without extracting anything.

Nothing from an archive is ever written to disk under a name the archive chose, so path traversal is
impossible by construction; the checks below still refuse hostile or malformed members outright, so a bad
archive is reported rather than quietly half-used.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import zlib
from pathlib import Path, PurePosixPath


class ArchiveError(ValueError):
    """A gzip file or tar archive is corrupt, truncated or has a member it must not have."""


def gunzip(data: bytes, name: str) -> bytes:
    """Decompress a whole gzip stream; a corrupt or truncated one is an error naming ``name``."""
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{name}: not a valid gzip file ({e})") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_member_name(archive: str, name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or ".." in path.parts or "\\" in name or not path.parts:
        raise ArchiveError(f"{archive}: refusing member {name!r}: absolute or escaping path")


def read_tar_members(path: str | Path) -> dict[str, bytes]:
    """All members of a tar archive as ``{name: bytes}``.

    Refuses absolute names, ``..``, links, devices, directories' escapes and duplicate names. A leading
    ``./`` is dropped, so ``./im0001.ppm.gz`` and ``im0001.ppm.gz`` are the same member.
    """
    path = Path(path)
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for info in tar:
                check_member_name(path.name, info.name)
                if info.isdir():
                    continue
                if not info.isfile():
                    raise ArchiveError(f"{path.name}: refusing member {info.name!r}: not a regular file (link or device)")
                name = str(PurePosixPath(info.name))
                if name in members:
                    raise ArchiveError(f"{path.name}: member {name!r} appears twice")
                fileobj = tar.extractfile(info)
                data = fileobj.read() if fileobj is not None else b""
                if len(data) != info.size:
                    raise ArchiveError(f"{path.name}: member {name!r} is truncated")
                members[name] = data
    except tarfile.TarError as e:
        raise ArchiveError(f"{path.name}: not a valid tar archive ({e})") from None
    except (OSError, EOFError) as e:
        raise ArchiveError(f"{path.name}: cannot be read ({e})") from None
    return members
