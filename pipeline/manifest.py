"""Write the checksum manifest of a dataset's files: ``python -m pipeline.manifest [--dataset NAME] SOURCE...``.

A SOURCE is a local directory (every file under it, at any depth, named by its path relative to it:
``images/0001.png``), a local file (named by its base name), or the http or https URL of one file (streamed
to a temporary file, at most ``--max-bytes``, described like a local file, then removed). Each file is
described as its name says (format: pipeline/download.py): a plain file by the sha256 and length of its
bytes, a ``.gz`` file by those of its decompressed content, an archive (``.tar``, ``.tar.gz``, ``.tgz``,
``.zip``) by its members, each a plain or a gzip member in turn. A whole-file ``sha256`` and ``bytes`` are
not written for gzip files and archives: add them by hand only for files that every source serves byte for
byte (as the official STARE label archives), since mirrors re-gzip and repack.

Without ``--dataset`` the manifest is printed. With ``--dataset NAME`` it is written to
``pipeline/checksums/NAME.json`` (atomically: an interrupted run leaves the old one), and one line says what
was described. With ``--dataset NAME`` and no SOURCE, the first local directory among
``NAME.download.base_urls`` in params.yaml (a file URL or an absolute path) is described: the directory the
download stage will read the files from.

Files are read a chunk at a time, so any size can be described in little memory. The manifest is checked as
the download stage checks it before it is printed or written, so that a name the stage would refuse (one with
a backslash, say) is reported here, not at the next ``dvc repro``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline import download as dl
from pipeline.archives import (
    ARCHIVES,
    GZIP,
    file_kind,
    gunzip_digest,
    list_files,
    member_kind,
    stream_digest,
    walk_archive,
)
from pipeline.atomic import write_json
from pipeline.params import PARAMS_FILE, load_params
from pipeline.stage import StageError, dataset_name

DEFAULT_MAX_BYTES = 20 << 30  # what a URL source may send: larger than any dataset this pipeline trains on
DEFAULT_TIMEOUT_S = 60.0  # per read
DEFAULT_DEADLINE_S = 6 * 3600.0  # the whole download: 20 GiB at 1 MB/s
URL_SCHEMES = ("http", "https")


def _content_entry(stream: BinaryIO, name: str, kind: str) -> dict:
    if kind == GZIP:
        digest, size = gunzip_digest(stream, name)
        return {"gunzip_sha256": digest, "size": size}
    digest, size = stream_digest(stream, name)
    return {"sha256": digest, "bytes": size}


def describe(path: Path, name: str | None = None) -> dict:
    """The manifest entry of the file at ``path``, of the kind that its ``name`` in the manifest says (its base
    name by default): ``sha256`` / ``bytes``, ``gunzip_sha256`` / ``size``, or ``members``."""
    name = name or path.name
    kind = file_kind(name)
    if kind in ARCHIVES:
        members = {}

        def add(member: str, size: int, body: BinaryIO) -> None:
            members[member] = _content_entry(body, f"{name}: member {member}", member_kind(member))

        walk_archive(path, kind, add, label=name)
        return {"members": members}
    try:
        with open(path, "rb") as stream:
            return _content_entry(stream, name, kind)
    except OSError as e:
        raise StageError(f"{path}: cannot be read ({e.strerror or e})") from None


def _url_file_name(url: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    name = PurePosixPath(path).name
    if not name or path.endswith("/"):  # a folder's URL, whose listing (if any) is no file of the dataset
        raise StageError(f"{dl.redact(url)}: names no file (give the URL of one file, e.g. the archive's)")
    return name


def _describe_url(url: str, max_bytes: int, timeout_s: float, deadline_s: float) -> tuple[str, dict]:
    """``(name, entry)`` of the file at ``url``, fetched to a temporary file that is removed afterwards."""
    name = _url_file_name(url)
    params = dl.DownloadParams(base_urls=[], timeout_s=timeout_s, deadline_s=deadline_s)
    with tempfile.TemporaryDirectory(prefix="segpipe-manifest-") as tmp:
        target = Path(tmp) / name
        try:
            dl.fetch(url, target, max_bytes, params, limited_by="--max-bytes")
        except dl.SourceError as e:
            raise StageError(f"{dl.redact(url)}: {e}") from None
        return name, describe(target, name)


def _local_path(url: str) -> Path | None:
    """The path that a file URL (``file:///data/leaves``) names on this machine; None for any other URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
        return None
    return Path(urllib.request.url2pathname(parts.path))


def _scheme(source: str) -> str:
    return urllib.parse.urlsplit(source).scheme.lower() if "://" in source else ""


def manifest_for(
    sources: Sequence[str | Path],
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> dict:
    """The manifest of ``sources``: directories (every file under them), files (paths or file URLs), or http(s)
    URLs of files; the files sorted by name."""
    files: dict[str, dict] = {}
    origins: dict[str, str] = {}

    def add(name: str, origin: str, entry: dict) -> None:
        if name in files:
            raise StageError(f"{name}: two files of that name, from {origins[name]} and {origin}")
        files[name], origins[name] = entry, origin

    for source in sources:
        text = str(source)
        if _scheme(text) in URL_SCHEMES:
            name, entry = _describe_url(text, max_bytes, timeout_s, deadline_s)
            add(name, dl.redact(text), entry)
            continue
        path = _local_path(text) if _scheme(text) else Path(source)
        if path is None:
            raise StageError(f"{dl.redact(text)}: not a directory, a file, a file URL nor an http or https URL")
        if path.is_dir():
            for name in list_files(path):
                add(name, str(path), describe(path / name, name))
        elif path.is_file():
            add(path.name, str(path), describe(path))
        else:
            raise StageError(f"{path}: no such file or directory")
    files = dict(sorted(files.items()))
    dl.check_files(files, "the manifest")  # what the download stage would refuse, refused now
    return {"files": files}


def params_source(dataset: str) -> Path:
    """The first local directory among ``<dataset>.download.base_urls`` in params.yaml."""
    settings = load_params(dataset, "download", dl.DownloadParams)
    local = [path for url in settings.base_urls if (path := _local_path(dl.base_url(url))) is not None]
    if found := next((path for path in local if path.is_dir()), None):
        return found
    key = f"{PARAMS_FILE}: {dataset}.download.base_urls"
    problem = (
        f"none of its local directories exists ({', '.join(map(str, local))})"
        if local
        else "lists no local directory (a file:// URL or an absolute path)"
    )
    raise StageError(
        f"{key}: {problem}; pass the source instead, e.g. the archive's URL: "
        f"python -m pipeline.manifest --dataset {dataset} https://example.org/{dataset}.zip"
    )


def write_manifest(dataset: str, sources: Sequence[str | Path], **options) -> str:
    """Describe ``sources`` (by default: :func:`params_source`) into ``pipeline/checksums/<dataset>.json``;
    returns the line to print."""
    dataset_name(dataset, "--dataset")
    sources = list(sources) or [params_source(dataset)]
    files = manifest_for(sources, **options)["files"]
    path = dl.CHECKSUMS_DIR / f"{dataset}.json"
    write_json(path, {"files": files})
    archives = [entry["members"] for entry in files.values() if "members" in entry]
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    return (
        f"manifest {dataset}: {len(files)} files ({len(archives)} archives, "
        f"{sum(map(len, archives))} members) from {', '.join(dl.redact(str(s)) for s in sources)} -> {shown}"
    )


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.manifest", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="a directory (every file under it), a file, or the http(s) URL of one file",
    )
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        help="write pipeline/checksums/NAME.json instead of printing the manifest; without a "
        "SOURCE, describe the first local directory in NAME.download.base_urls (params.yaml)",
    )
    parser.add_argument(
        "--max-bytes",
        type=_positive(int),
        default=DEFAULT_MAX_BYTES,
        help=f"the most a URL may send (default {DEFAULT_MAX_BYTES:,}: 20 GiB); it is saved in "
        "the temporary directory ($TMPDIR) while it is described",
    )
    parser.add_argument(
        "--timeout-s",
        type=_positive(float),
        default=DEFAULT_TIMEOUT_S,
        help=f"how long a URL's server may stay silent (default {DEFAULT_TIMEOUT_S:g} s)",
    )
    parser.add_argument(
        "--deadline-s",
        type=_positive(float),
        default=DEFAULT_DEADLINE_S,
        help=f"how long a URL's whole download may take (default {DEFAULT_DEADLINE_S:g} s)",
    )
    args = parser.parse_args(argv)
    if not args.sources and not args.dataset:
        parser.error("give a SOURCE, or --dataset NAME to describe the local directory of its base_urls")
    options = {"max_bytes": args.max_bytes, "timeout_s": args.timeout_s, "deadline_s": args.deadline_s}
    try:
        if args.dataset:
            print(write_manifest(args.dataset, args.sources, **options))
        else:
            print(json.dumps(manifest_for(args.sources, **options), indent=2))
    except StageError as e:
        print(f"manifest: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
