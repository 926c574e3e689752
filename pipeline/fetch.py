"""Fetching one file from untrusted sources: the library under the download stage and the manifest command.

A source is an http(s) URL (read with aiohttp), a file URL or a local directory. A body is streamed to disk
and hashed as it comes, never past ``limit`` bytes; an attempt has a deadline besides its per-read timeout;
transient failures are retried with backoff. Nothing here decompresses anything. Credentials in URLs are
never printed (:func:`redact`). Why aiohttp, and the threat model: docs/download.md.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import OutputError
from pipeline.params import require
from pipeline.stage import StageError

CHUNK_SIZE = 1 << 20
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
_USERINFO = re.compile(r"(?<=://).*@")  # user:password@, up to the last "@": a password may hold "/", "?" or "#"
_QUERY_VALUE = re.compile(r"(?<=[?&])([^=&#\s'\"]*)=[^&#\s'\"]*")  # ?X-Amz-Signature=..., &token=...


def _redact_url(url: str) -> str:
    url, sharp, fragment = _USERINFO.sub("***@", url).partition("#")
    url, question, query = url.partition("?")
    query = re.sub(r"(^|&)([^=&]*)=[^&]*", r"\1\2=***", query)
    return url + question + query + sharp + ("***" if fragment else "")


def redact(text: str) -> str:
    """``text`` (a URL, or a message quoting URLs) fit to print: userinfo, fragments and the values of query
    parameters (not their names) replaced by ``***``. Userinfo runs to a URL's last ``@``: a password holding
    a raw ``/``, ``?`` or ``#`` is hidden whole; an ``@`` in a path hides more, which is safe."""
    return _QUERY_VALUE.sub(r"\1=***", _URL.sub(lambda match: _redact_url(match.group()), text))


def scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


@dataclass(frozen=True)
class DownloadParams:
    base_urls: list[str]
    timeout_s: float = 60.0  # per socket read: how long a silent connection is waited for
    deadline_s: float = 600.0  # per attempt: connecting, the response and its whole body
    retries: int = 3  # attempts per source, for transient failures (timeouts, dropped connections, HTTP 5xx)

    def validate(self, key: str) -> None:
        require(self.timeout_s > 0, f"{key}.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.deadline_s > 0, f"{key}.deadline_s", f"must be > 0, got {self.deadline_s}")
        bounds = f"must be between 1 and {MAX_RETRIES}, got {self.retries}"
        require(1 <= self.retries <= MAX_RETRIES, f"{key}.retries", bounds)
        for i, url in enumerate(self.base_urls):
            # Not relative: `dvc exp run --queue` runs the stage in a copy of the repository under .dvc/tmp/exps/.
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
    """``<base>/<name>``, keeping ``base``'s query (a token some mirrors want on every request); each segment of
    ``name`` quoted on its own (``images/scan%201.png``)."""
    path = "/".join(urllib.parse.quote(segment, safe="") for segment in name.split("/"))
    parts = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{path}"))


def base_url(source: str) -> str:
    """A base URL as given, or the file URL of a directory given by its (absolute) path."""
    return source if "://" in source else Path(source).as_uri()


def local_path(url: str) -> Path | None:
    """The path that a file URL (``file:///data/leaves``) names on this machine; None for any other URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
        return None
    return Path(urllib.request.url2pathname(parts.path))


def source_urls(dataset: str, base_urls: list[str], mirror: str | None) -> list[str]:
    """Base URLs in the order tried: ``<mirror>/<dataset>``, then ``base_urls``. A relative mirror directory is
    taken from the current directory (under DVC, the repository's root, or a copy of it for queued runs)."""
    if mirror and "://" in mirror and scheme(mirror) not in SCHEMES:
        raise DownloadError(f"${MIRROR_ENV}: {redact(mirror)!r} is not an http, https or file URL (nor a directory)")
    mirrored = [join(mirror if "://" in mirror else Path(mirror).resolve().as_uri(), dataset)] if mirror else []
    return mirrored + [base_url(url).rstrip("/") for url in base_urls]


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): doubling, at most MAX_BACKOFF_S."""
    return min(MAX_BACKOFF_S, RETRY_BACKOFF_S * 2 ** (attempt - 1))


class _Sink:
    """The file a body is streamed to, hashed as it is written and cut at the first byte past ``limit``. A write
    that fails is this machine's fault, which no other source mends: an OutputError naming the file."""

    def __init__(self, path: Path, limit: int, limited_by: str):
        self.path, self.limit, self.limited_by = path, limit, limited_by
        self.sha256, self.size, self.announced = hashlib.sha256(), 0, None
        self._file = self._io(open, path, "wb")

    def _io(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write the output ({e.strerror or e})") from None

    def announce(self, length: int | None) -> None:
        if (announced := length) is not None and announced > self.limit:
            raise BadCopy(
                f"{self.path.name}: the server announces {announced:,} bytes, more than the {self.limit:,} "
                f"{self.limited_by} allows"
            )
        self.announced = announced

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise BadCopy(
                f"{self.path.name}: more than the {self.limit:,} bytes {self.limited_by} allows (stopped there)"
            )
        self.sha256.update(chunk)
        self._io(self._file.write, chunk)

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        self._io(self._file.close)


def _redirect(url: str, response) -> str:
    """Where a redirect leads, without the credentials: they are sent to the first URL's host only."""
    parts = urllib.parse.urlsplit(url)
    target = urllib.parse.urljoin(
        parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(), response.headers["Location"]
    )
    if scheme(target) not in ("http", "https"):
        raise SourceError(f"HTTP {response.status} {response.reason}, to {target!r}: not an http or https URL")
    return target


async def _get(url: str, sink: _Sink, timeout_s: float) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    # The bytes as stored: no Content-Encoding asked for or undone, so that nothing unverified is inflated.
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False, trust_env=True) as session:
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(url, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as response:
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    url = _redirect(url, response)
                    continue
                if response.status >= 300:
                    error = TransientError if response.status >= 500 else SourceError
                    raise error(f"HTTP {response.status} {response.reason}")
                sink.announce(response.content_length)
                async for chunk in response.content.iter_any():
                    sink.write(chunk)
                if sink.announced is not None and sink.size < sink.announced:
                    raise aiohttp.ClientPayloadError("short")
                return
    raise SourceError(f"more than {MAX_REDIRECTS} redirects")


def _http(url: str, sink: _Sink, timeout_s: float, deadline_s: float) -> None:
    """One attempt, its failure as one line: a TransientError where the same source may well succeed next."""
    import asyncio  # here, as aiohttp: a stage reading local files only is spared their imports (docs/download.md)

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


def _copy(url: str, sink: _Sink) -> None:
    try:
        with open(local_path(url) or "", "rb") as source:
            while chunk := source.read(CHUNK_SIZE):
                sink.write(chunk)
    except OSError as e:
        raise SourceError(str(e)) from None


def fetch(
    url: str, target: Path, limit: int, params: DownloadParams, limited_by: str = "the manifest"
) -> tuple[str, int]:
    """Stream ``url`` into ``target``, refusing more than ``limit`` bytes (``limited_by`` says who set that);
    returns its ``(sha256, bytes)``. Transient failures are retried, ``params.retries`` attempts in all, each
    within ``params.deadline_s``, with capped doubling backoff."""
    for attempt in range(1, params.retries + 1):
        try:
            with _Sink(target, limit, limited_by) as sink:
                if scheme(url) == "file":
                    _copy(url, sink)
                else:
                    _http(url, sink, params.timeout_s, params.deadline_s)
            return sink.sha256.hexdigest(), sink.size
        except TransientError as e:
            if attempt == params.retries:
                raise SourceError(f"{e} (after {attempt} attempts)") from None
            time.sleep(backoff_s(attempt))
