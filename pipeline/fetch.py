"""Fetching one file from untrusted sources (http(s) with aiohttp, file URLs, directories), hashed as it is streamed
to disk and never past a limit, and the checksum manifest that says which copies are accepted. Nothing here
decompresses anything; URLs are printed only through :func:`redact`. Format, threat model, why aiohttp:
docs/download.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline import archives
from pipeline.atomic import OutputError
from pipeline.params import require
from pipeline.stage import StageError

CHECKSUMS_DIR = Path(__file__).parent / "checksums"
MIRROR_ENV = "SEGPIPE_MIRROR"
SCHEMES = ("http", "https", "file")  # what a source may be; redirects may lead to http and https only
MAX_RETRIES, MAX_REDIRECTS = 10, 10
RETRY_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0  # the wait after a first failed attempt, doubled after each; tests set 0
INVALID_URL = (
    "not a valid URL: its host or port is malformed (in a user name or password, '/', '?', '#' and '@' must be "
    "percent-encoded: %2F, %3F, %23, %40)"
)
# A URL in a message: a scheme, then anything up to a space, less the quotes and brackets that may close it.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*?(?=['\")\]}>,;:.]*(?:\s|$))")
_USERINFO = re.compile(r"(?<=://).*@")  # up to the last "@": a password may hold a raw "/", "?" or "#"
_QUERY_VALUE = re.compile(r"(?<=[?&])([^=&#\s'\"]*)=[^&#\s'\"]*")  # ?X-Amz-Signature=..., &token=...


def _redact_url(url: str) -> str:
    url, sharp, fragment = _USERINFO.sub("***@", url).partition("#")
    url, question, query = url.partition("?")
    query = re.sub(r"(^|&)([^=&]*)=[^&]*", r"\1\2=***", query)
    return url + question + query + sharp + ("***" if fragment else "")


def redact(text: str) -> str:
    """``text`` with every URL's userinfo, fragment and query values (not names) replaced by ``***``."""
    return _QUERY_VALUE.sub(r"\1=***", _URL.sub(lambda match: _redact_url(match.group()), text))


def scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


@dataclass(frozen=True)
class DownloadParams:
    """``<dataset>.download`` of config.yaml: where the files come from and how long to wait, never which bytes."""

    base_urls: list[str] = field(default_factory=list)  # tried in order after $SEGPIPE_MIRROR
    timeout_s: float = 60.0  # per socket read: how long a silent connection is waited for
    deadline_s: float = 600.0  # per attempt: connecting, the response and its whole body
    retries: int = 3  # attempts per source, for transient failures (timeouts, dropped connections, HTTP 5xx)

    def validate(self, key: str) -> None:
        require(self.timeout_s > 0, f"{key}.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.deadline_s > 0, f"{key}.deadline_s", f"must be > 0, got {self.deadline_s}")
        bounds = f"must be between 1 and {MAX_RETRIES}, got {self.retries}"
        require(1 <= self.retries <= MAX_RETRIES, f"{key}.retries", bounds)
        for i, url in enumerate(self.base_urls):
            require(
                scheme(url) in SCHEMES if "://" in url else Path(url).is_absolute(),
                f"{key}.base_urls[{i}]",
                f"must be an http, https or file URL, or the absolute path of a local directory, got {redact(url)!r} "
                "(not a relative path: `dvc exp run --queue` runs the stages in a temporary copy of the repository, "
                "where it would point elsewhere)",
            )


class DownloadError(StageError):
    """A file could not be obtained from any source, a manifest is unusable, or the output cannot be written."""


class SourceError(Exception):
    """One source could not deliver one file (after retrying, where retrying made sense)."""


class TransientError(SourceError):
    """Worth another attempt at the same source: a timeout, a dropped connection, HTTP 5xx."""


class BadCopy(SourceError):
    """The source answered with bytes that are not an accepted copy of the file."""


def join(base: str, name: str) -> str:
    """``<base>/<name>``, keeping ``base``'s query (a token some mirrors want), each segment of ``name`` quoted."""
    path = "/".join(urllib.parse.quote(segment, safe="") for segment in name.split("/"))
    parts = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{path}"))


def base_url(source: str) -> str:
    """A base URL as given, or the file URL of a directory given by its (absolute) path."""
    return source if "://" in source else Path(source).as_uri()


def local_path(url: str) -> Path | None:
    """The path that a file URL names on this machine; None for any other URL."""
    parts = urllib.parse.urlsplit(url)
    local = parts.scheme.lower() == "file" and parts.netloc in ("", "localhost")
    return Path(urllib.request.url2pathname(parts.path)) if local else None


def source_urls(dataset: str, base_urls: list[str], mirror: str | None) -> list[str]:
    """Base URLs in the order tried: ``<mirror>/<dataset>`` (a relative one from here), then ``base_urls``."""
    if mirror and "://" in mirror and scheme(mirror) not in SCHEMES:
        raise DownloadError(f"${MIRROR_ENV}: {redact(mirror)!r} is not an http, https or file URL (nor a directory)")
    mirrored = [join(mirror if "://" in mirror else Path(mirror).resolve().as_uri(), dataset)] if mirror else []
    return mirrored + [base_url(url).rstrip("/") for url in base_urls]


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): doubling, at most MAX_BACKOFF_S."""
    return min(MAX_BACKOFF_S, RETRY_BACKOFF_S * 2 ** (attempt - 1))


class _Sink:
    """The file a body is streamed to, hashed as it is written and cut at the first byte past ``limit``. A failed
    write is this machine's fault, which no other source mends: an OutputError naming the file."""

    def __init__(self, path: Path, limit: int, limited_by: str):
        self.path, self.limit, self.limited_by = path, limit, limited_by
        self.sha256, self.size, self.announced = hashlib.sha256(), 0, None
        self._file = self._io(open, path, "wb")

    def _io(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write the output ({e.strerror or e})") from None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise BadCopy(
                f"{self.path.name}: more than the {self.limit:,} bytes {self.limited_by} allows (stopped there)"
            )
        self.sha256.update(chunk)
        self._io(self._file.write, chunk)

    def close(self) -> None:
        self._io(self._file.close)


async def _get(url: str, sink: _Sink, timeout_s: float) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    # The bytes as stored: no Content-Encoding asked for or undone, so that nothing unverified is inflated.
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False, trust_env=True) as session:
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(url, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as response:
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    parts = urllib.parse.urlsplit(url)  # the credentials go to the first URL's host only
                    url = urllib.parse.urljoin(
                        parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(), response.headers["Location"]
                    )
                    if scheme(url) not in ("http", "https"):
                        why = f"HTTP {response.status} {response.reason}, to {url!r}: not an http or https URL"
                        raise SourceError(why)
                    continue
                if response.status >= 300:
                    error = TransientError if response.status >= 500 else SourceError
                    raise error(f"HTTP {response.status} {response.reason}")
                if (length := response.content_length) is not None and length > sink.limit:
                    raise BadCopy(
                        f"{sink.path.name}: the server announces {length:,} bytes, more than the {sink.limit:,} "
                        f"{sink.limited_by} allows"
                    )
                sink.announced = length
                async for chunk in response.content.iter_any():
                    sink.write(chunk)
                if sink.announced is not None and sink.size < sink.announced:
                    raise aiohttp.ClientPayloadError("short")
                return
    raise SourceError(f"more than {MAX_REDIRECTS} redirects")


def _http(url: str, sink: _Sink, timeout_s: float, deadline_s: float) -> None:
    """One attempt, its failure as one line: a TransientError where the same source may well succeed next."""
    import asyncio  # here: a stage reading local files only is spared their imports (docs/download.md)

    import aiohttp

    try:
        asyncio.run(asyncio.wait_for(_get(url, sink, timeout_s), deadline_s))
    except aiohttp.ClientPayloadError:
        of = f" of {sink.announced:,}" if sink.announced is not None else ""
        raise TransientError(f"the connection closed after {sink.size:,}{of} bytes") from None
    except aiohttp.ServerTimeoutError:  # before asyncio's: it is one
        raise TransientError(f"no data for {timeout_s:g} s (timeout_s)") from None
    except asyncio.TimeoutError:
        raise SourceError(f"no complete response within the deadline of {deadline_s:g} s (deadline_s)") from None
    except ValueError:  # aiohttp.InvalidURL among them: their text would quote the URL's malformed userinfo
        raise SourceError(INVALID_URL) from None
    except (aiohttp.ClientConnectionError, OSError) as e:
        raise TransientError(" ".join(str(e).split()) or type(e).__name__) from None
    except aiohttp.ClientError as e:
        raise SourceError(" ".join(str(e).split()) or type(e).__name__) from None


def fetch(
    url: str, target: Path, limit: int, params: DownloadParams, limited_by: str = "the manifest"
) -> tuple[str, int]:
    """Stream ``url`` into ``target``, refusing more than ``limit`` bytes (``limited_by`` says who set that);
    returns its ``(sha256, bytes)``. Transient failures are retried, ``params.retries`` attempts in all."""
    for attempt in range(1, params.retries + 1):
        try:
            with contextlib.closing(_Sink(target, limit, limited_by)) as sink:
                if scheme(url) != "file":
                    _http(url, sink, params.timeout_s, params.deadline_s)
                else:
                    try:
                        with open(local_path(url) or "", "rb") as source:
                            shutil.copyfileobj(source, sink, archives.CHUNK_SIZE)
                    except OSError as e:
                        raise SourceError(str(e)) from None
            return sink.sha256.hexdigest(), sink.size
        except TransientError as e:
            if attempt == params.retries:
                raise SourceError(f"{e} (after {attempt} attempts)") from None
            time.sleep(backoff_s(attempt))


# The manifest (pipeline/checksums/<dataset>.json): format in docs/download.md.
SHA256 = re.compile(r"[0-9a-f]{64}")


def _keys(value: object, where: str, keys: set[str] | None = None, what: str = "") -> dict:
    """``value``, a non-empty mapping with exactly ``keys`` (None: any); else a one-line error."""
    if not isinstance(value, dict) or not value:
        raise DownloadError(f"{where}: expected a non-empty mapping, got {value!r}")
    if keys is None:
        return value
    if unknown := sorted(set(value) - keys):
        raise DownloadError(f"{where}: unknown key {unknown[0]!r} for {what} (known: {', '.join(sorted(keys))})")
    if missing := sorted(keys - set(value)):
        raise DownloadError(f"{where}: missing {missing[0]!r}")
    return value


def _count(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DownloadError(f"{where}: expected a whole number of bytes >= 0, got {value!r}")


def check_files(files: object, where: str) -> dict[str, dict]:
    """Validate a manifest's ``files`` (``where`` names the manifest in errors); returns it."""
    for name, entry in _keys(files, f"{where}: files").items():
        if archives.escapes(name):
            raise DownloadError(f"{where}: files: {name!r} is not a relative path inside the dataset's directory")
        if (normal := str(PurePosixPath(name))) != name:
            raise DownloadError(f"{where}: files: {name!r} is not in normal form ({normal!r})")
        if folder := next((str(p) for p in PurePosixPath(name).parents if str(p) in files), None):
            raise DownloadError(f"{where}: files.{name}: {folder!r} is listed as a file, so it cannot be a folder")
        at, kind = f"{where}: files.{name}", archives.file_kind(name)
        keys = {"copies"} if kind == archives.PLAIN else {"copies", "size"}
        _keys(entry, at, keys, f"{archives.KIND_NAMES[kind]}, as its name says")
        for sha256, size in _keys(entry["copies"], f"{at}.copies").items():
            if not SHA256.fullmatch(sha256):
                raise DownloadError(f"{at}.copies: {sha256!r} is not a sha256 (64 lowercase hex digits)")
            _count(size, f"{at}.copies.{sha256}")
        if "size" in keys:
            _count(entry["size"], f"{at}.size")
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
    return check_files(_keys(manifest, str(path), {"files"}, "a manifest")["files"], str(path))
