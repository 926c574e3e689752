"""Reading gzip files and tar archives from untrusted sources, in bounded memory, without extracting anything.

Nothing from an archive is ever written to disk under a name the archive chose, so path traversal is
impossible by construction; the checks below still refuse hostile or malformed members outright, so a bad
archive is reported rather than quietly half-used.

The download stage verifies files it has not yet trusted with the streaming readers (:func:`gunzip_chunks`,
:func:`gunzip_digest`, :func:`walk_tar`): they hold at most a chunk or two in memory whatever the file claims to
hold, and stop at the first byte past a limit, so a decompression bomb costs one chunk of memory and the time
to inflate the limit. The whole-content readers (:func:`gunzip`, :func:`read_tar_members`) are for files the
download stage has already verified, whose sizes the checksum manifest bounds.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from pipeline.stage import StageError

CHUNK_SIZE = 1 << 20  # bytes per read: what a streaming reader holds, whatever the size of the file


class ArchiveError(StageError):
    """A gzip file or tar archive is corrupt, truncated, too large or has a member it must not have."""


def gunzip(data: bytes, name: str) -> bytes:
    """Decompress a whole gzip stream; a corrupt or truncated one is an error naming ``name``."""
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{name}: not a valid gzip file ({e})") from None


def gunzip_chunks(stream: BinaryIO, name: str, limit: int | None = None) -> Iterator[bytes]:
    """The decompressed content of the gzip stream ``stream``, up to :data:`CHUNK_SIZE` bytes at a time.

    Raises ArchiveError as soon as more than ``limit`` bytes have come out, or when the stream is corrupt or
    truncated. ``gzip.GzipFile.read(n)`` inflates at most ``n`` bytes per call (zlib's ``max_length``), so
    memory stays at one chunk even for a stream that inflates a thousandfold. Concatenated gzip members and
    zero padding after the last one are read as ``gzip.decompress`` reads them.
    """
    total = 0
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as content:
            while chunk := content.read(CHUNK_SIZE):
                total += len(chunk)
                if limit is not None and total > limit:
                    raise ArchiveError(f"{name}: decompresses to more than {limit:,} bytes (stopped there)")
                yield chunk
    except (OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{name}: not a valid gzip file ({e})") from None


def gunzip_digest(stream: BinaryIO, name: str, limit: int | None = None) -> tuple[str, int]:
    """``(sha256, size)`` of the decompressed content of ``stream``, read as :func:`gunzip_chunks` reads it."""
    digest, size = hashlib.sha256(), 0
    for chunk in gunzip_chunks(stream, name, limit):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def file_digest(path: Path) -> tuple[str, int]:
    """``(sha256, size)`` of the bytes of the file at ``path``, read a chunk at a time."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_member_name(archive: str, name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or ".." in path.parts or "\\" in name or not path.parts:
        raise ArchiveError(f"{archive}: refusing member {name!r}: absolute or escaping path")


def walk_tar(path: str | Path, visit: Callable[[str, int, BinaryIO], None]) -> None:
    """Call ``visit(name, size, body)`` for each regular member of the uncompressed tar at ``path``, in order.

    Before ``visit`` sees a member, its header has been checked: absolute names, ``..``, links, devices, sparse
    files (whose header may claim gigabytes that the archive does not hold) and a second member of the same
    name are refused. ``visit`` gets the header's size and an unread stream of the body, so that it can refuse
    a member by its name or size before reading a byte of it. A leading ``./`` is dropped, so
    ``./im0001.ppm.gz`` and ``im0001.ppm.gz`` are the same member; directories are skipped.

    Only plain tar is accepted (mode ``r:``): a compressed tar would be one more decompression to bound.
    """
    path = Path(path)
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                check_member_name(path.name, info.name)
                if info.isdir():
                    continue
                if info.issparse():
                    raise ArchiveError(f"{path.name}: refusing member {info.name!r}: a sparse file")
                if not info.isfile():
                    raise ArchiveError(f"{path.name}: refusing member {info.name!r}: not a regular file (link or device)")
                name = str(PurePosixPath(info.name))
                if name in seen:
                    raise ArchiveError(f"{path.name}: member {name!r} appears twice")
                seen.add(name)
                visit(name, info.size, tar.extractfile(info))
    except tarfile.TarError as e:
        raise ArchiveError(f"{path.name}: not a valid tar archive ({e})") from None
    except (OSError, EOFError) as e:
        raise ArchiveError(f"{path.name}: cannot be read ({e})") from None


def read_tar_members(path: str | Path) -> dict[str, bytes]:
    """All members of a tar archive as ``{name: bytes}``, with the checks of :func:`walk_tar`."""
    path = Path(path)
    members: dict[str, bytes] = {}

    def keep(name: str, size: int, body: BinaryIO) -> None:
        data = body.read()
        if len(data) != size:
            raise ArchiveError(f"{path.name}: member {name!r} is truncated")
        members[name] = data

    walk_tar(path, keep)
    return members
