"""The ``download`` stage: fetch a dataset's original files and verify them against a checksum manifest.

``python -m pipeline.download <dataset>`` writes ``data/raw/<dataset>/``. Nothing here is specific to a
dataset: the file names and their checksums come from ``pipeline/checksums/<dataset>.json``, the sources
from ``params.yaml`` (``<dataset>.download.base_urls``) and, first, from ``$SEGPIPE_MIRROR``.

Manifest format::

    {"files": {
        "<file>.gz":  {"gunzip_sha256": "<sha256 of the decompressed content>"},
        "<file>.tar": {"sha256": "<optional: sha256 of the archive itself>",
                       "members": {"<member>.gz": {"gunzip_sha256": "..."}, ...}}}}

Checksums are taken over decompressed content because mirrors re-gzip and repack files: only the content
is the same everywhere. A whole-file ``sha256`` is listed only where every source serves identical bytes.
A tar archive must hold exactly the members listed, each a gzip file.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline import params as params_module
from pipeline.archives import ArchiveError, gunzip, read_tar_members, sha256
from pipeline.artifacts import DatasetPaths, atomic_path
from pipeline.params import DownloadParams, ParamError

CHECKSUMS_DIR = Path(__file__).parent / "checksums"
MIRROR_ENV = "SEGPIPE_MIRROR"
RETRY_BACKOFF_S = 1.0  # doubled after each failed attempt; tests set it to 0

_HASH = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A file could not be obtained and verified from any source, or the manifest is unusable."""


class SourceError(Exception):
    """One source could not deliver one file (after retrying, where retrying made sense)."""


# ------------------------------------------------------------------------------------------ manifest


def _mapping(value: object, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise DownloadError(f"{where}: expected a non-empty mapping, got {value!r}")
    return value


def _check_entry(entry: object, where: str, allowed: set[str]) -> dict:
    entry = _mapping(entry, where)
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise DownloadError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    for key in ("sha256", "gunzip_sha256"):
        if key in entry and not (isinstance(entry[key], str) and _HASH.fullmatch(entry[key])):
            raise DownloadError(f"{where}.{key}: expected 64 lowercase hex digits, got {entry[key]!r}")
    return entry


def load_manifest(path: Path) -> dict[str, dict]:
    """Read and validate a checksum manifest; returns its ``files`` mapping."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise DownloadError(f"{path}: no checksum manifest for this dataset (manifests exist for: {known})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DownloadError(f"{path}: not a readable JSON manifest: {e}") from None
    files = _mapping(_check_entry(manifest, str(path), {"files"}).get("files"), f"{path}: files")
    for name, entry in files.items():
        where = f"{path}: files.{name}"
        # A file name becomes a path in the output directory: it must not be able to leave it.
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise DownloadError(f"{where}: a file name must not contain a path")
        _check_entry(entry, where, {"sha256", "gunzip_sha256", "members"})
        if ("gunzip_sha256" in entry) == ("members" in entry):
            raise DownloadError(f"{where}: needs exactly one of 'gunzip_sha256' (a gzip file) or 'members' (a tar archive)")
        if "members" in entry:
            for member, member_entry in _mapping(entry["members"], f"{where}.members").items():
                _check_entry(member_entry, f"{where}.members.{member}", {"gunzip_sha256"})
    return files


# ------------------------------------------------------------------------------------------ verification


def _check_gzip(data: bytes, name: str, expected: str) -> None:
    actual = sha256(gunzip(data, name))
    if actual != expected:
        raise ArchiveError(f"{name}: sha256 of decompressed content is {actual}, expected {expected}")


def verify(path: Path, entry: dict) -> None:
    """Raise ArchiveError unless the file at ``path`` matches its manifest entry."""
    data = path.read_bytes()
    if "sha256" in entry and (actual := sha256(data)) != entry["sha256"]:
        raise ArchiveError(f"{path.name}: sha256 is {actual}, expected {entry['sha256']}")
    if "gunzip_sha256" in entry:
        _check_gzip(data, path.name, entry["gunzip_sha256"])
        return
    members = read_tar_members(path)
    missing, extra = sorted(set(entry["members"]) - set(members)), sorted(set(members) - set(entry["members"]))
    if missing or extra:
        raise ArchiveError(f"{path.name}: members differ from the manifest: missing {missing}, unexpected {extra}")
    for member, member_entry in entry["members"].items():
        _check_gzip(members[member], f"{path.name}: member {member}", member_entry["gunzip_sha256"])


# ------------------------------------------------------------------------------------------ fetching


def source_urls(dataset: str, base_urls: list[str], mirror: str | None) -> list[str]:
    """Base URLs to try in order: the mirror (``<mirror>/<dataset>``), then each of ``base_urls``."""
    urls = []
    if mirror:
        # A mirror is a URL or a directory; a relative directory is relative to the current directory.
        base = mirror if "://" in mirror else Path(mirror).resolve().as_uri()
        urls.append(f"{base.rstrip('/')}/{urllib.parse.quote(dataset)}")
    return urls + [url.rstrip("/") for url in base_urls]


def _is_transient(error: Exception) -> bool:
    """Worth retrying the same source: a timeout, a dropped connection or a server-side error."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500
    if isinstance(error, urllib.error.URLError):
        error = error.reason  # urlopen wraps socket errors
    return isinstance(error, (TimeoutError, ConnectionError, http.client.IncompleteRead))


def _describe(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}"


def fetch(url: str, params: DownloadParams) -> bytes:
    """The whole body at ``url``; transient failures are retried, ``params.retries`` attempts in all."""
    attempt = 1
    while True:
        try:
            with urllib.request.urlopen(url, timeout=params.timeout_s) as response:
                return response.read()
        except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: a malformed URL
            if not _is_transient(e):
                raise SourceError(_describe(e)) from None
            if attempt >= params.retries:
                raise SourceError(f"{_describe(e)} (after {attempt} attempts)") from None
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
            attempt += 1


def _obtain(name: str, entry: dict, sources: list[str], params: DownloadParams, target: Path) -> str:
    """Write a verified copy of ``name`` to ``target``; returns the URL it came from."""
    failures = []
    for base in sources:
        url = f"{base}/{urllib.parse.quote(name)}"
        try:
            target.write_bytes(fetch(url, params))
            verify(target, entry)
            return url
        except (SourceError, ArchiveError) as e:
            failures.append(f"  {url}: {e}")  # a later source overwrites the rejected copy
    tried = "\n".join(failures) if failures else "  (no sources: set base_urls or $SEGPIPE_MIRROR)"
    raise DownloadError(f"{name}: could not be obtained from any source:\n{tried}")


def download(dataset: str, params: DownloadParams, manifest_path: Path, out_dir: Path, mirror: str | None) -> None:
    """Fetch every file of ``manifest_path`` into ``out_dir``: all verified, or ``out_dir`` untouched."""
    files = load_manifest(manifest_path)
    sources = source_urls(dataset, params.base_urls, mirror)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, entry in files.items():
            url = _obtain(name, entry, sources, params, tmp / name)
            print(f"{name}: {(tmp / name).stat().st_size:,} bytes verified, from {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset")
    args = parser.parse_args(argv)
    try:
        params = params_module.load(args.dataset, "download")
        download(args.dataset, params, CHECKSUMS_DIR / f"{args.dataset}.json", DatasetPaths(args.dataset).raw,
                 os.environ.get(MIRROR_ENV) or None)
    except (DownloadError, ParamError) as e:
        print(f"download: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
