"""``python -m pipeline.manifest``: writes checksum manifests (format: docs/download.md).

``python -m pipeline.manifest [--dataset NAME [--add]] SOURCE...`` describes each file of each SOURCE -- a
directory (every file under it, named by its path relative to it), a file, or the http(s) URL of one file
(fetched to a temporary file) -- by its sha256 and length, and a ``.gz`` file or an archive also by the bytes
it unpacks to, with the member checks of pipeline/archives.py. It prints the manifest, or writes it to
pipeline/checksums/NAME.json; ``--add`` merges the files described into that manifest as further accepted
copies (a mirror that re-compresses them). Without SOURCE, config.yaml's NAME.download.base_urls' first local
directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from pipeline import archives, fetch
from pipeline.atomic import write_json
from pipeline.fetch import CHECKSUMS_DIR, check_files, load_manifest, redact
from pipeline.params import CONFIG_FILE, load_params
from pipeline.stage import StageError, dataset_name, plain

DEFAULT_MAX_BYTES = 20 << 30  # what a URL source may send: larger than any dataset this pipeline trains on


def describe(path: Path, name: str | None = None) -> dict:
    """The manifest entry of the file at ``path``, of the kind its ``name`` (its base name by default) says."""
    try:
        with open(path, "rb") as stream:
            digest = hashlib.file_digest(stream, "sha256")
    except OSError as e:
        raise StageError(f"{path}: cannot be read ({e.strerror or e})") from None
    entry = {"copies": {digest.hexdigest(): path.stat().st_size}}
    if archives.file_kind(name := name or path.name) != archives.PLAIN:
        entry["size"] = archives.unpacked_size(path, name)
    return entry


def _describe_url(url: str, params: fetch.DownloadParams, max_bytes: int) -> tuple[str, dict]:
    """``(name, entry)`` of the file at ``url``, fetched to a temporary file that is removed afterwards."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    if not (name := PurePosixPath(path).name) or path.endswith("/"):
        raise StageError(f"{redact(url)}: names no file (give the URL of one file, e.g. the archive's)")
    with tempfile.TemporaryDirectory(prefix="segpipe-manifest-") as tmp:
        try:
            fetch.fetch(url, Path(tmp) / name, max_bytes, params, limited_by="--max-bytes")
        except fetch.BadCopy as e:
            raise StageError(str(e)) from None
        except fetch.SourceError as e:
            raise StageError(f"{redact(url)}: {redact(str(e))}") from None
        return name, describe(Path(tmp) / name, name)


def manifest_for(sources: Sequence[str | Path], max_bytes: int = DEFAULT_MAX_BYTES, **timeouts) -> dict:
    """The manifest of ``sources`` (directories, files, file or http(s) URLs of files), its files sorted by name.
    ``timeouts``: DownloadParams' ``timeout_s`` and ``deadline_s``."""
    files, origins = {}, {}
    params = fetch.DownloadParams(base_urls=[], **timeouts)
    for source in map(str, sources):
        if fetch.scheme(source) in ("http", "https"):
            found = [(redact(source), *_describe_url(source, params, max_bytes))]
        elif (path := fetch.local_path(source) if "://" in source else Path(source)) is None:
            raise StageError(f"{redact(source)}: not a directory, a file, a file URL nor an http or https URL")
        elif path.is_dir():
            found = [(str(path), name, describe(path / name, name)) for name in archives.list_files(path)]
        elif path.is_file():
            found = [(str(path), path.name, describe(path))]
        else:
            raise StageError(f"{path}: no such file or directory")
        for origin, name, entry in found:
            if name in files:
                raise StageError(f"{name}: two files of that name, from {origins[name]} and {origin}")
            files[name], origins[name] = entry, origin
    return {"files": check_files(dict(sorted(files.items())), "the manifest")}


def params_source(dataset: str) -> Path:
    """The first local directory among ``<dataset>.download.base_urls`` in config.yaml."""
    settings = load_params(dataset, "download", fetch.DownloadParams, CONFIG_FILE)
    local = [path for url in settings.base_urls if (path := fetch.local_path(fetch.base_url(url))) is not None]
    if found := next((path for path in local if path.is_dir()), None):
        return found
    problem = (
        f"none of its local directories exists ({', '.join(map(str, local))})"
        if local
        else "lists no local directory (a file:// URL or an absolute path)"
    )
    raise StageError(
        f"{CONFIG_FILE}: {dataset}.download.base_urls: {problem}; pass the source instead, e.g. the archive's "
        f"URL: python -m pipeline.manifest --dataset {dataset} https://example.org/{dataset}.zip"
    )


def write_manifest(dataset: str, sources: Sequence[str | Path], add: bool = False, **options) -> str:
    """Describe ``sources`` (by default: :func:`params_source`) into ``pipeline/checksums/<dataset>.json``, or,
    with ``add``, merge them into it as more accepted copies of the files it lists; returns the line to print."""
    path = CHECKSUMS_DIR / f"{dataset_name(dataset, '--dataset')}.json"
    sources = list(sources) or [params_source(dataset)]
    files = manifest_for(sources, **options)["files"]
    if add:
        listed = load_manifest(path)
        for name, entry in files.items():
            if name not in listed:
                raise StageError(f"{name}: not in {path} (--add accepts another copy of a file the manifest lists)")
            listed[name]["copies"].update(entry["copies"])
            if "size" in entry:
                listed[name]["size"] = max(listed[name]["size"], entry["size"])
        files = listed
    write_json(path, {"files": files})
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    copies = sum(len(entry["copies"]) for entry in files.values())
    origin = ", ".join(redact(str(s)) for s in sources)
    return f"manifest {dataset}: {len(files)} files, {copies} accepted copies, from {origin} -> {shown}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.manifest", description=plain(__doc__.split("\n\n", 1)[1]))
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="a directory, a file, or the http(s) URL of one")
    parser.add_argument("--dataset", metavar="NAME", help="write pipeline/checksums/NAME.json instead of printing")
    parser.add_argument(
        "--add", action="store_true", help="with --dataset: accept these files as further copies of files it lists"
    )
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="the most a URL may send")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="how long a URL may stay silent")
    parser.add_argument("--deadline-s", type=float, default=6 * 3600.0, help="how long a URL's download may take")
    args = parser.parse_args(argv)
    if min(args.max_bytes, args.timeout_s, args.deadline_s) <= 0:
        parser.error("--max-bytes, --timeout-s and --deadline-s must be > 0")
    if not args.sources and not args.dataset:
        parser.error("give a SOURCE, or --dataset NAME to describe the local directory of its base_urls")
    if args.add and not args.dataset:
        parser.error("--add needs --dataset NAME: the manifest to add the copies to")
    options = {"max_bytes": args.max_bytes, "timeout_s": args.timeout_s, "deadline_s": args.deadline_s}
    try:
        if args.dataset:
            print(write_manifest(args.dataset, args.sources, add=args.add, **options))
        else:
            print(json.dumps(manifest_for(args.sources, **options), indent=2))
    except StageError as e:
        print(f"manifest: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
