"""The ``download`` stage: fetch a dataset's original files and verify them against a checksum manifest.

``python -m pipeline.download <dataset>`` writes ``data/raw/<dataset>/``. Nothing here is specific to a
dataset: the file names, sizes and checksums come from ``pipeline/checksums/<dataset>.json``, the sources
from ``params.yaml`` (``<dataset>.download.base_urls``: http, https or file URLs, or absolute paths of local
directories) and, first, from ``$SEGPIPE_MIRROR``. Files are stored as they were served, archives unextracted,
each under its name in the manifest, which may be a relative path (``images/0001.png``): a local directory
of a user's dataset is described file by file, and fetched as ``<base URL>/images/0001.png``.

Manifest format (``python -m pipeline.manifest [--dataset NAME] <directory | file | URL>...`` writes one)::

    {"files": {
        "<file>.gz":       {"gunzip_sha256": "<sha256 of the decompressed content>", "size": <its length>},
        "images/0001.png": {"sha256": "<sha256 of the file>", "bytes": <its length>},
        "<file>.zip":      {"sha256": "<optional>", "bytes": <optional>,
                            "members": {"masks/0001.png": {"sha256": "...", "bytes": ...},
                                        "im0001.ppm.gz":  {"gunzip_sha256": "...", "size": ...}, ...}}}}

The keys mean the same everywhere: ``sha256`` and ``bytes`` are the checksum and length of the bytes as they
are stored (a file as served; a member as its archive holds it once unpacked, whatever the zip compression),
``gunzip_sha256`` and ``size`` those of the decompressed content of a gzip file or member, ``members`` an
archive's regular members. What an entry must hold follows from its name (pipeline/archives.py): a name
ending in ``.tar``, ``.tar.gz`` / ``.tgz`` or ``.zip`` is an archive and needs ``members``; any other ``.gz``
is a gzip file and needs ``gunzip_sha256`` and ``size``; anything else is a plain file and needs ``sha256``
and ``bytes``. An archive's member is a gzip member if its name ends in ``.gz`` (``gunzip_sha256``,
``size``) and a plain one otherwise (``sha256``, ``bytes``). Suffixes are compared case-insensitively.
File and member names are relative POSIX paths in normal form: no ``..``, no leading ``/``, no ``./``, no
``//``, no backslash.

Checksums of gzip files are taken over decompressed content because mirrors re-gzip and repack files: only the
content is the same everywhere. A whole-file ``sha256`` is listed for a gzip file or an archive only where
every source serves identical bytes. An archive must hold exactly the members listed (folders aside).

Sources are untrusted, so everything they send is bounded. A file is streamed to disk and verified a chunk
at a time; its body may not exceed ``bytes`` (or, where that is not listed, the largest file that its listed
content could make: :func:`download_bound`); decompressed content may not exceed ``size``; a tar member is
refused by its header (name, type, size), and a zip member by its central-directory entry (name, type,
encryption, compression, declared size), before its body is read; a ``.tar.gz`` is inflated through a
stream that stops at the largest tar its members could make; a zip's central directory, which zipfile reads
whole, may not exceed what its members' entries can take. Reading stops at the first byte past a bound, so
memory does not grow with what a source sends and a decompression bomb or an endless response costs no more
than a good file. Each attempt also has a deadline (``deadline_s``) besides the per-read ``timeout_s``, so
that a server sending a byte now and then cannot hold the stage forever.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline.archives import (
    ARCHIVES,
    CHUNK_SIZE,
    GZIP,
    KIND_NAMES,
    PLAIN,
    TAR,
    TAR_GZ,
    ZIP,
    ArchiveError,
    check_member_name,
    file_digest,
    file_kind,
    gunzip_digest,
    member_kind,
    stream_digest,
    walk_archive,
    zip_directory_size,
)
from pipeline.atomic import atomic_path
from pipeline.params import load_params, require
from pipeline.stage import DatasetPaths, StageError, run

CHECKSUMS_DIR = Path(__file__).parent / "checksums"
MIRROR_ENV = "SEGPIPE_MIRROR"
SCHEMES = ("http", "https", "file")  # what a source may be; redirects may lead to http and https only
MAX_RETRIES = 10
RETRY_BACKOFF_S = 1.0  # the wait after the first failed attempt, doubled after each further one; tests set 0
MAX_BACKOFF_S = 30.0
# The largest gzip file that ``size`` bytes of content can make, where the manifest lists no ``bytes``: deflate
# expands incompressible data by well under 1 % (zlib's deflateBound is about 4 % for its most wasteful
# settings), and the gzip header's optional name, comment and extra fields take a few bytes to 64 KiB.
GZIP_EXPANSION, GZIP_HEADER_ROOM = 1 / 8, 64 * 1024
# A tar member takes a 512-byte header, perhaps a long-name or pax header and its data blocks before it (the
# name, and TAR_PAX_ROOM for other pax records: times, owner, and the extended attributes that bsdtar records,
# a few hundred bytes on macOS), and its body padded to 512 bytes; a folder, its headers alone; the archive
# ends with two zero blocks padded to a 10 KiB record. A compressed tar is a gzip file of that tar.
TAR_BLOCK, TAR_HEADER_BLOCKS, TAR_PAX_ROOM, TAR_END = 512, 2, 1024, 20 * 512
# A zip member takes a local header and a central-directory entry (30 and 46 bytes, ZIP_HEADER counts 46 for
# both), each with the member's name and extra fields (zip64 sizes, times, owner: under 100 bytes in practice;
# ZIP_HEADER_ROOM counts 1 KiB, a comment included), perhaps a 24-byte data descriptor, and its data, stored or
# deflated (deflate adds well under 1/8, as in gzip; the header room covers a tiny member's few bytes more); a
# folder, its headers alone. The archive ends with the end record, its comment (up to 64 KiB), and the zip64
# end record and locator. The central directory, which zipfile reads whole into memory, may take one header
# per member and folder: about 10 KiB of memory per listed member at worst.
ZIP_HEADER, ZIP_HEADER_ROOM, ZIP_DESCRIPTOR, ZIP_END = 46, 1024, 24, 22 + 0xFFFF + 56 + 20

_HASH = re.compile(r"[0-9a-f]{64}")
# A URL in a message: a scheme, then anything up to a space, less the quotes and brackets that may close it.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*?(?=['\")\]}>,;:.]*(?:\s|$))")
_USERINFO = re.compile(r"(?<=://).*@")  # user:password@, up to the last "@": a password may hold "/", "?" or "#"
_QUERY_VALUE = re.compile(r"(?<=[?&])([^=&#\s'\"]*)=[^&#\s'\"]*")  # ?X-Amz-Signature=..., &token=...


def _redact_url(url: str) -> str:
    url = _USERINFO.sub("***@", url)
    url, sharp, fragment = url.partition("#")
    url, question, query = url.partition("?")
    query = re.sub(r"(^|&)([^=&]*)=[^&]*", r"\1\2=***", query)
    return url + question + query + sharp + ("***" if fragment else "")


def redact(text: str) -> str:
    """``text`` (a URL, or a message quoting URLs) fit to print: userinfo (``user:password@``) and fragments
    (``#access_token=...``) replaced by ``***``, and so are the values of query parameters (``X-Amz-Signature=``,
    ``token=``), whose names stay, to tell which parameter was sent.

    Userinfo is everything up to the URL's last ``@``: a password that holds a raw ``/``, ``?`` or ``#`` (which
    urllib takes for the end of the host) is hidden whole, and an ``@`` in a path hides the host and path before
    it, which is safe. A query outside a URL (``GET /a?token=...``) has its values hidden too."""
    return _QUERY_VALUE.sub(r"\1=***", _URL.sub(lambda match: _redact_url(match.group()), text))


@dataclass(frozen=True)
class DownloadParams:
    base_urls: list[str]
    timeout_s: float = 60.0  # per socket read: how long a silent connection is waited for
    deadline_s: float = 600.0  # per attempt: connecting, the response and its whole body
    retries: int = 3  # attempts per source, for transient failures (timeouts, dropped connections, HTTP 5xx)

    def validate(self, key: str) -> None:
        require(self.timeout_s > 0, f"{key}.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.deadline_s > 0, f"{key}.deadline_s", f"must be > 0, got {self.deadline_s}")
        require(
            1 <= self.retries <= MAX_RETRIES,
            f"{key}.retries",
            f"must be between 1 and {MAX_RETRIES}, got {self.retries}",
        )
        for i, url in enumerate(self.base_urls):
            # A directory given by its path must be absolute: `dvc exp run --queue` (and --temp) runs the stage in
            # a temporary copy of the repository under .dvc/tmp/exps/, where a relative path points elsewhere.
            require(
                _scheme(url) in SCHEMES if "://" in url else Path(url).is_absolute(),
                f"{key}.base_urls[{i}]",
                f"must be an http, https or file URL, or the absolute path of a local directory, got "
                f"{redact(url)!r} (not a relative path: `dvc exp run --queue` runs the stages in a temporary "
                "copy of the repository, where it would point elsewhere)",
            )


class DownloadError(StageError):
    """A file could not be obtained and verified from any source, the manifest is unusable, or the output
    cannot be written."""


class SourceError(Exception):
    """One source could not deliver one file (after retrying, where retrying made sense)."""


class _TransientError(SourceError):
    """A failure worth another attempt at the same source: a timeout, a dropped connection, HTTP 5xx."""


# ------------------------------------------------------------------------------------------ manifest

# What an entry must and may hold, by its kind (from its name: pipeline.archives.file_kind and member_kind).
FILE_KEYS = {  # kind: (required, optional)
    PLAIN: ({"sha256", "bytes"}, set()),
    GZIP: ({"gunzip_sha256", "size"}, {"sha256", "bytes"}),
    **{kind: ({"members"}, {"sha256", "bytes"}) for kind in ARCHIVES},
}
MEMBER_KEYS = {PLAIN: ({"sha256", "bytes"}, set()), GZIP: ({"gunzip_sha256", "size"}, {"bytes"})}


def _mapping(value: object, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise DownloadError(f"{where}: expected a non-empty mapping, got {value!r}")
    return value


def _check_entry(entry: object, where: str, what: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    entry = _mapping(entry, where)
    allowed = required | optional
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise DownloadError(f"{where}: unknown key {unknown[0]!r} for {what} (known: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(entry))
    if missing:
        raise DownloadError(f"{where}: missing {missing[0]!r}")
    for key in ("sha256", "gunzip_sha256"):
        if key in entry and not (isinstance(entry[key], str) and _HASH.fullmatch(entry[key])):
            raise DownloadError(f"{where}.{key}: expected 64 lowercase hex digits, got {entry[key]!r}")
    # A plain file may be empty; the optional ``bytes`` of a gzip file or an archive bounds a download.
    for key, minimum in (("size", 0), ("bytes", 0 if "bytes" in required else 1)):
        value = entry.get(key, minimum)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DownloadError(f"{where}.{key}: expected a whole number of bytes >= {minimum}, got {value!r}")
    return entry


def _check_name(name: str, where: str, inside: str) -> None:
    """A name becomes a path in the output directory (or is compared with an archive's members, which walk_tar
    and walk_zip give in normal form): it must be a relative POSIX path inside it, in normal form."""
    try:
        check_member_name(inside, name)
    except ArchiveError:
        raise DownloadError(f"{where}: {name!r} is not a relative path inside {inside}") from None
    if (normal := str(PurePosixPath(name))) != name:
        raise DownloadError(f"{where}: {name!r} is not in normal form ({normal!r})")


def check_files(files: object, where: str) -> dict[str, dict]:
    """Validate a manifest's ``files`` mapping (``where`` names the manifest in errors); returns it."""
    files = _mapping(files, f"{where}: files")
    for name, entry in files.items():
        at, kind = f"{where}: files.{name}", file_kind(name)
        _check_name(name, f"{where}: files", "the dataset's directory")
        entry = _check_entry(entry, at, f"{KIND_NAMES[kind]}, as its name says", *FILE_KEYS[kind])
        if kind not in ARCHIVES:
            continue
        for member, member_entry in _mapping(entry["members"], f"{at}.members").items():
            _check_name(member, f"{at}.members", "the archive")
            member_type = member_kind(member)
            _check_entry(member_entry, f"{at}.members.{member}", f"a {member_type} member", *MEMBER_KEYS[member_type])
    for name in files:
        # ``a`` and ``a/b.png`` cannot both be files.
        if folder := next((str(p) for p in PurePosixPath(name).parents if str(p) in files), None):
            raise DownloadError(f"{where}: files.{name}: {folder!r} is listed as a file, so it cannot be a folder")
    return files


def load_manifest(path: Path) -> dict[str, dict]:
    """Read and validate a checksum manifest; returns its ``files`` mapping."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise DownloadError(f"{path}: no checksum manifest for this dataset (manifests exist for: {known})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DownloadError(f"{path}: not a readable JSON manifest: {e}") from None
    return check_files(_check_entry(manifest, str(path), "a manifest", {"files"}).get("files"), str(path))


def _folders(names: Iterable[str]) -> set[str]:
    """The folders that hold ``names`` (``a`` and ``a/b`` for ``a/b/c.png``), which an archive may list too."""
    return {str(folder) for name in names for folder in PurePosixPath(name).parents if str(folder) != "."}


def _tar_headers(name: str) -> int:
    return (TAR_HEADER_BLOCKS + -(-(len(name.encode()) + TAR_PAX_ROOM) // TAR_BLOCK)) * TAR_BLOCK


def tar_bound(members: dict[str, dict]) -> int:
    """The largest tar that holds ``members`` (and their folders): a ``.tar``'s download bound, and how far a
    ``.tar.gz`` may inflate."""
    padded = {
        name: -(-download_bound(entry, member_kind(name)) // TAR_BLOCK) * TAR_BLOCK for name, entry in members.items()
    }
    return (
        TAR_END
        + sum(_tar_headers(name) + body for name, body in padded.items())
        + sum(_tar_headers(folder + "/") for folder in _folders(members))
    )


def _zip_header(name: str) -> int:
    return ZIP_HEADER + len(name.encode()) + ZIP_HEADER_ROOM


def zip_directory_bound(members: dict[str, dict]) -> int:
    """The largest central directory of a zip that holds ``members``: one header per member and folder."""
    return sum(_zip_header(name) for name in members) + sum(_zip_header(f + "/") for f in _folders(members))


def _zip_bound(members: dict[str, dict]) -> int:
    stored = [download_bound(entry, member_kind(name)) for name, entry in members.items()]
    deflated = sum(size + int(size * GZIP_EXPANSION) + ZIP_DESCRIPTOR for size in stored)
    return ZIP_END + 2 * zip_directory_bound(members) + deflated  # a local header for each central one


def _gzip_bound(size: int) -> int:
    return size + int(size * GZIP_EXPANSION) + GZIP_HEADER_ROOM


def download_bound(entry: dict, kind: str) -> int:
    """The most bytes a file or member of ``kind`` with this manifest entry may take: its ``bytes`` where listed
    (always, for a plain one), else the largest gzip file of ``size`` bytes of content, or the largest archive
    of such members."""
    if "bytes" in entry:
        return entry["bytes"]
    if kind == TAR:
        return tar_bound(entry["members"])
    if kind == TAR_GZ:
        return _gzip_bound(tar_bound(entry["members"]))
    if kind == ZIP:
        return _zip_bound(entry["members"])
    return _gzip_bound(entry["size"])


# ------------------------------------------------------------------------------------------ verification


def _check_gzip(stream: BinaryIO, name: str, entry: dict) -> None:
    actual, size = gunzip_digest(stream, name, limit=entry["size"])
    if size != entry["size"]:
        raise ArchiveError(f"{name}: decompresses to {size:,} bytes, expected {entry['size']:,}")
    if actual != entry["gunzip_sha256"]:
        raise ArchiveError(f"{name}: sha256 of decompressed content is {actual}, expected {entry['gunzip_sha256']}")


def _check_plain(stream: BinaryIO, name: str, entry: dict) -> None:
    actual, size = stream_digest(stream, name, limit=entry["bytes"])
    if size != entry["bytes"]:
        raise ArchiveError(f"{name}: {size:,} bytes, expected {entry['bytes']:,}")
    if actual != entry["sha256"]:
        raise ArchiveError(f"{name}: sha256 is {actual}, expected {entry['sha256']}")


def _check_header(where: str, size: int, entry: dict, kind: str) -> None:
    """Refuse a member by the size its header declares, before its body is read."""
    if "bytes" in entry and size != entry["bytes"]:
        raise ArchiveError(f"{where}: its header claims {size:,} bytes, expected {entry['bytes']:,}")
    if size > (bound := download_bound(entry, kind)):
        raise ArchiveError(
            f"{where}: its header claims {size:,} bytes, more than the {bound:,} that "
            f"{entry['size']:,} bytes of content can take"
        )


def _check_archive(path: Path, name: str, kind: str, members: dict[str, dict]) -> None:
    if kind == ZIP and (size := zip_directory_size(path, name)) > (bound := zip_directory_bound(members)):
        raise ArchiveError(
            f"{name}: its central directory claims {size:,} bytes, more than the {bound:,} that the "
            f"{len(members):,} listed members and their folders can take"
        )
    found = set()

    def check_member(member: str, size: int, body: BinaryIO) -> None:
        # Name and size come from the member's header: a member is refused before its body is read.
        if member not in members:
            raise ArchiveError(f"{name}: unexpected member {member!r} (not in the manifest)")
        entry, where, member_type = members[member], f"{name}: member {member}", member_kind(member)
        _check_header(where, size, entry, member_type)
        (_check_gzip if member_type == GZIP else _check_plain)(body, where, entry)
        found.add(member)

    walk_archive(path, kind, check_member, label=name, limit=tar_bound(members) if kind == TAR_GZ else None)
    missing = sorted(set(members) - found)
    if missing:
        raise ArchiveError(f"{name}: members missing from the archive: {missing}")


def verify(path: Path, entry: dict, name: str | None = None) -> None:
    """Raise ArchiveError unless the file at ``path`` matches its manifest entry; reads a chunk at a time.
    ``name``, its name in the manifest (``path``'s base name by default), says what kind of file it is."""
    name = name or path.name
    kind = file_kind(name)
    if kind == PLAIN:
        with open(path, "rb") as stream:
            _check_plain(stream, name, entry)
        return
    if "bytes" in entry and (size := path.stat().st_size) != entry["bytes"]:
        raise ArchiveError(f"{name}: {size:,} bytes, expected {entry['bytes']:,}")
    if "sha256" in entry and (actual := file_digest(path)[0]) != entry["sha256"]:
        raise ArchiveError(f"{name}: sha256 is {actual}, expected {entry['sha256']}")
    if kind in ARCHIVES:
        _check_archive(path, name, kind, entry["members"])
        return
    with open(path, "rb") as stream:
        _check_gzip(stream, name, entry)


# ------------------------------------------------------------------------------------------ fetching


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def _join(base: str, name: str) -> str:
    """``<base>/<name>``, keeping ``base``'s query (a token that some mirrors want on every request). Each segment
    of ``name`` (``images/scan 1.png``) is quoted on its own: ``images/scan%201.png``, the ``/`` kept."""
    path = "/".join(urllib.parse.quote(segment, safe="") for segment in name.split("/"))
    parts = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{path}"))


def base_url(source: str) -> str:
    """A base URL as given, or the file URL of a directory given by its (absolute) path."""
    return source if "://" in source else Path(source).as_uri()


def source_urls(dataset: str, base_urls: list[str], mirror: str | None) -> list[str]:
    """Base URLs to try in order: the mirror (``<mirror>/<dataset>``), then each of ``base_urls`` (a directory's
    absolute path as its file URL)."""
    urls = []
    if mirror:
        # A mirror is a URL or a directory. A relative directory is taken from the current directory: the
        # repository root under `dvc repro` and `dvc exp run` (DVC runs every stage in dvc.yaml's directory,
        # wherever dvc is started), but a temporary copy under .dvc/tmp/exps/ under `dvc exp run --queue` or
        # `--temp`, where only an absolute path works. A failure names the resolved file:// URL it tried.
        if "://" in mirror and _scheme(mirror) not in SCHEMES:
            raise DownloadError(
                f"${MIRROR_ENV}: {redact(mirror)!r} is not an http, https or file URL (nor a directory)"
            )
        base = mirror if "://" in mirror else Path(mirror).resolve().as_uri()
        urls.append(_join(base, dataset))
    return urls + [base_url(url).rstrip("/") for url in base_urls]


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): doubling, at most MAX_BACKOFF_S."""
    return min(MAX_BACKOFF_S, RETRY_BACKOFF_S * 2 ** (attempt - 1))


def _shut_down(fd: int, inode: int) -> None:
    """Shut down the socket open as ``fd``, if ``fd`` is still that socket (not closed, or reused since)."""
    try:
        duplicate = os.dup(fd)  # a descriptor of our own: ``fd`` may be closed by its owner meanwhile
    except OSError:
        return
    try:
        info = os.fstat(duplicate)
        if stat.S_ISSOCK(info.st_mode) and info.st_ino == inode:
            sock, duplicate = socket.socket(fileno=duplicate), -1
            with sock:  # closes the duplicate only; shutdown ends the connection for every descriptor
                sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the connection has ended already
    finally:
        if duplicate >= 0:
            os.close(duplicate)


class _Deadline:
    """Ends one attempt after ``seconds``, wherever it is blocked.

    ``timeout_s`` bounds each socket read only, so a server that sends a byte every few seconds would never
    time out. A timer thread shuts down the attempt's sockets when the deadline passes, which wakes a read
    blocked on them (it returns end-of-file or fails); :meth:`check` then reports the deadline. Sockets are
    recorded (descriptor and inode) as soon as they connect, before a TLS handshake: the TLS socket keeps the
    descriptor, so the handshake, the headers and the body are all covered. Name resolution is not: the C
    library's lookup cannot be interrupted, and its own timeouts apply.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.passed = False
        self._sockets: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def track(self, sock: socket.socket) -> socket.socket:
        fd = sock.fileno()
        try:
            inode = os.fstat(fd).st_ino
        except OSError:  # a platform whose sockets are not file descriptors: the deadline is checked between reads
            return sock
        with self._lock:
            self._sockets.append((fd, inode))
            if self.passed:
                _shut_down(fd, inode)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            for fd, inode in self._sockets:
                _shut_down(fd, inode)

    def check(self) -> None:
        if self.passed:
            raise SourceError(f"no complete response within the deadline of {self.seconds:g} s (deadline_s)")

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._sockets.clear()  # their descriptors may be reused once the attempt has closed them


class _DeadlineConnections:
    """Mixed into urllib's HTTP and HTTPS handlers: every connection they open is tracked by the attempt's
    deadline, through http.client's hook for opening the socket (``_create_connection``)."""

    def __init__(self, deadline: _Deadline, **kwargs):
        super().__init__(**kwargs)
        self._deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        deadline = self._deadline

        class TrackedConnection(http_class):
            def __init__(self, *args, **kw):
                super().__init__(*args, **kw)
                create = self._create_connection
                self._create_connection = lambda *a, **k: deadline.track(create(*a, **k))

        return super().do_open(TrackedConnection, req, **kwargs)


class _HTTPHandler(_DeadlineConnections, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineConnections, urllib.request.HTTPSHandler):
    pass


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https URLs only (urllib's own also follows them to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _scheme(newurl) not in ("http", "https"):
            raise urllib.error.HTTPError(
                req.full_url, code, f"{msg}, to {newurl!r}: not an http or https URL", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _request(url: str) -> urllib.request.Request:
    """A request for ``url``. Credentials in an http(s) URL (``user:password@host``) become an Authorization
    header (urllib would take them for part of the host), sent to that host only, never on a redirect."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return urllib.request.Request(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    user, _, password = userinfo.partition(":")
    credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    return request


def _attempt_error(error: Exception, timeout_s: float) -> SourceError:
    """A failed attempt as one line without credentials; a _TransientError where the same source may well
    succeed next time (a silent or dropped connection, a server-side error)."""
    if isinstance(error, urllib.error.HTTPError):
        transient, text = error.code >= 500, f"HTTP {error.code} {error.reason}"
    elif isinstance(error, http.client.InvalidURL):
        # Its text quotes the host or port as http.client split them: the head of a password that holds a raw
        # "/", "?" or "#", where urllib ends the host, so that what is left of the URL has no userinfo to redact.
        return SourceError(
            "not a valid URL: its host or port is malformed (in a user name or password, '/', '?', "
            "'#' and '@' must be percent-encoded: %2F, %3F, %23, %40)"
        )
    else:
        cause = error.reason if isinstance(error, urllib.error.URLError) else error  # urlopen wraps socket errors
        if isinstance(cause, TimeoutError):
            return _TransientError(f"no data for {timeout_s:g} s (timeout_s)")
        transient = isinstance(cause, (ConnectionError, http.client.IncompleteRead))
        text = str(cause) if isinstance(error, urllib.error.URLError) else f"{type(error).__name__}: {error}"
    return (_TransientError if transient else SourceError)(redact(" ".join(text.split())))


class _Output:
    """The file a download is streamed to. Failing to write it is this machine's problem (disk full, no
    permission), which no other source can solve: a DownloadError naming the path, not a SourceError."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "wb")
        except OSError as e:
            raise _write_error(path, e) from None

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise _write_error(self.path, e) from None

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._file.close()
        except OSError as e:
            raise _write_error(self.path, e) from None


def _write_error(path: str | os.PathLike, error: OSError) -> DownloadError:
    return DownloadError(f"{path}: cannot write the output ({error.strerror or error})")


def _fetch_once(url: str, target: Path, limit: int, params: DownloadParams, limited_by: str) -> None:
    deadline = _Deadline(params.deadline_s)
    opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline), _RedirectHandler)
    try:
        with _Output(target) as out, opener.open(_request(url), timeout=params.timeout_s) as response:
            length = response.headers.get("Content-Length", "").strip()
            announced = int(length) if length.isdigit() else None
            if announced is not None and announced > limit:
                raise ArchiveError(
                    f"{target.name}: the server announces {announced:,} bytes, more than the "
                    f"{limit:,} {limited_by} allows"
                )
            received = 0
            while True:
                chunk = response.read1(CHUNK_SIZE)  # returns what has arrived, so the deadline is checked often
                deadline.check()
                if not chunk:
                    break
                received += len(chunk)
                if received > limit:
                    raise ArchiveError(
                        f"{target.name}: more than the {limit:,} bytes {limited_by} allows (stopped there)"
                    )
                out.write(chunk)
            if announced is not None and received < announced:
                raise _TransientError(f"the connection closed after {received:,} of {announced:,} bytes")
    except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: a malformed URL
        deadline.check()  # a read that the deadline cut short fails or ends early: say why
        raise _attempt_error(e, params.timeout_s) from None
    finally:
        deadline.cancel()


def fetch(url: str, target: Path, limit: int, params: DownloadParams, limited_by: str = "the manifest") -> None:
    """Stream the body at ``url`` into ``target``, refusing more than ``limit`` bytes (an error says that
    ``limited_by`` sets that limit). Transient failures are retried, ``params.retries`` attempts in all, each
    within ``params.deadline_s``, with capped backoff."""
    for attempt in range(1, params.retries + 1):
        try:
            _fetch_once(url, target, limit, params, limited_by)
            return
        except _TransientError as e:
            if attempt == params.retries:
                raise SourceError(f"{e} (after {attempt} attempts)") from None
            time.sleep(backoff_s(attempt))


def _obtain(name: str, entry: dict, sources: list[str], params: DownloadParams, target: Path) -> tuple[str, list[str]]:
    """Write a verified copy of ``name`` to ``target``; returns the URL it came from and, for each source
    that served a bad copy before, a line saying which and what was wrong with it."""
    failures, bad_copies = [], []
    for base in sources:
        url = _join(base, name)
        try:
            fetch(url, target, download_bound(entry, file_kind(name)), params)
            verify(target, entry, name)
            return url, bad_copies
        except ArchiveError as e:  # the source answered, with a file that is not this one
            bad_copies.append(f"{redact(url)} served a bad copy ({e})")
            failures.append(f"  {redact(url)}: {e}")  # a later source overwrites the rejected copy
        except SourceError as e:
            failures.append(f"  {redact(url)}: {e}")
    tried = "\n".join(failures) if failures else f"  (no sources: set base_urls or ${MIRROR_ENV})"
    raise DownloadError(f"{name}: could not be obtained from any source:\n{tried}")


def download(dataset: str, params: DownloadParams, manifest_path: Path, out_dir: Path, mirror: str | None) -> None:
    """Fetch every file of ``manifest_path`` into ``out_dir``: all verified, or ``out_dir`` untouched."""
    files = load_manifest(manifest_path)
    sources = source_urls(dataset, params.base_urls, mirror)
    # atomic_path turns a failure to create, fill or rename the output into one error naming it.
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, entry in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # names may have folders: images/0001.png
            url, bad_copies = _obtain(name, entry, sources, params, tmp / name)
            for bad_copy in bad_copies:
                print(
                    f"download {dataset}: warning: {name}: {bad_copy}; used the copy from {redact(url)}",
                    file=sys.stderr,
                )
            print(f"{name}: {(tmp / name).stat().st_size:,} bytes verified, from {redact(url)}", flush=True)


def download_stage(dataset: str) -> str:
    settings = load_params(dataset, "download", DownloadParams)
    out_dir = DatasetPaths(dataset).raw
    download(dataset, settings, CHECKSUMS_DIR / f"{dataset}.json", out_dir, os.environ.get(MIRROR_ENV) or None)
    return f"download {dataset}: every file verified -> {out_dir}"


if __name__ == "__main__":
    run(download_stage)
