"""The download stage, on tiny gzip files and tar archives made here, served from directories and HTTP."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

from pipeline import download as dl
from pipeline.params import DownloadParams

DATASET = "toy"
IMAGE, MASK = b"P5 image bytes", b"P5 mask bytes"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def tar(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


GOOD_FILES = {
    "labels.gz": gz(b"label bytes"),
    "images.tar": tar({"a.ppm.gz": gz(IMAGE), "b.ppm.gz": gz(MASK)}),
}
MANIFEST = {"files": {
    "labels.gz": {"gunzip_sha256": sha(b"label bytes")},
    "images.tar": {"members": {"a.ppm.gz": {"gunzip_sha256": sha(IMAGE)}, "b.ppm.gz": {"gunzip_sha256": sha(MASK)}}},
}}


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)


def make_source(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def write_manifest(tmp_path: Path, manifest: dict = MANIFEST) -> Path:
    path = tmp_path / "checksums" / f"{DATASET}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def run(tmp_path: Path, base_urls: list[str], mirror: str | None = None, manifest: dict = MANIFEST,
        retries: int = 1) -> Path:
    out = tmp_path / "data" / "raw" / DATASET
    params = DownloadParams(base_urls=base_urls, timeout_s=5.0, retries=retries)
    dl.download(DATASET, params, write_manifest(tmp_path, manifest), out, mirror)
    return out


def assert_fails(tmp_path: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(dl.DownloadError) as error:
        run(tmp_path, **kwargs)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message
    assert not (tmp_path / "data" / "raw" / DATASET).exists()
    return message


def assert_downloaded(out: Path, files: dict[str, bytes] = GOOD_FILES) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (out / name).read_bytes() == data  # the original bytes, not decompressed or extracted


# ------------------------------------------------------------------------------------------ local sources


def test_relative_directory_mirror(tmp_path, monkeypatch, capsys):
    make_source(tmp_path / "mirror" / DATASET, GOOD_FILES)
    monkeypatch.chdir(tmp_path)
    assert_downloaded(run(tmp_path, base_urls=[], mirror="mirror"))
    assert f"labels.gz: 31 bytes verified, from file://{tmp_path}/mirror/{DATASET}/labels.gz" in capsys.readouterr().out


def test_file_url_mirror(tmp_path):
    make_source(tmp_path / "mirror" / DATASET, GOOD_FILES)
    assert_downloaded(run(tmp_path, base_urls=[], mirror=(tmp_path / "mirror").as_uri()))


def test_falls_back_to_next_source_when_a_file_is_corrupt(tmp_path, capsys):
    make_source(tmp_path / "mirror" / DATASET, {**GOOD_FILES, "labels.gz": gz(b"other bytes")})
    official = make_source(tmp_path / "official", GOOD_FILES)
    assert_downloaded(run(tmp_path, base_urls=[official.as_uri()], mirror=str(tmp_path / "mirror")))
    out = capsys.readouterr().out
    assert f"labels.gz: 31 bytes verified, from {official.as_uri()}/labels.gz" in out
    assert f"images.tar: {len(GOOD_FILES['images.tar']):,} bytes verified, from file://{tmp_path}/mirror/" in out


def test_checksum_mismatch_names_file_and_both_hashes(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": gz(b"other bytes")})
    assert_fails(tmp_path, "labels.gz: could not be obtained", f"{source.as_uri()}/labels.gz",
                 f"sha256 of decompressed content is {sha(b'other bytes')}, expected {sha(b'label bytes')}",
                 base_urls=[source.as_uri()])


def test_a_failure_leaves_an_existing_output_as_it_was(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": b"not a tar"})
    old = tmp_path / "data" / "raw" / DATASET / "old.gz"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    with pytest.raises(dl.DownloadError, match="images.tar: not a valid tar archive"):
        run(tmp_path, base_urls=[source.as_uri()])
    assert [p.name for p in old.parent.iterdir()] == ["old.gz"]


def test_truncated_gzip(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": GOOD_FILES["labels.gz"][:-6]})
    assert_fails(tmp_path, "labels.gz: not a valid gzip file", base_urls=[source.as_uri()])


def test_missing_file_lists_every_source(tmp_path):
    mirror = make_source(tmp_path / "mirror" / DATASET, {"labels.gz": GOOD_FILES["labels.gz"]})
    empty = make_source(tmp_path / "empty", {})
    message = assert_fails(tmp_path, "images.tar: could not be obtained", base_urls=[empty.as_uri()],
                           mirror=str(tmp_path / "mirror"))
    assert f"{mirror.as_uri()}/images.tar: [Errno 2] No such file" in message
    assert f"{empty.as_uri()}/images.tar: [Errno 2] No such file" in message


def test_whole_file_sha256_is_checked(tmp_path):
    repacked = tar({"b.ppm.gz": gz(MASK), "a.ppm.gz": gz(IMAGE)})  # same members, different archive
    manifest = json.loads(json.dumps(MANIFEST))
    manifest["files"]["images.tar"]["sha256"] = sha(GOOD_FILES["images.tar"])
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": repacked})
    assert_fails(tmp_path, f"images.tar: sha256 is {sha(repacked)}, expected {sha(GOOD_FILES['images.tar'])}",
                 base_urls=[source.as_uri()], manifest=manifest)


GOOD_MEMBERS = {"a.ppm.gz": gz(IMAGE), "b.ppm.gz": gz(MASK)}


@pytest.mark.parametrize("members, symlinks, expected", [
    ({"a.ppm.gz": gz(IMAGE)}, {}, "members differ from the manifest: missing ['b.ppm.gz'], unexpected []"),
    ({**GOOD_MEMBERS, "c.ppm.gz": gz(b"c")}, {}, "missing [], unexpected ['c.ppm.gz']"),
    ({"a.ppm.gz": gz(IMAGE), "c.ppm.gz": gz(MASK)}, {}, "missing ['b.ppm.gz'], unexpected ['c.ppm.gz']"),
    ({**GOOD_MEMBERS, "b.ppm.gz": gz(b"other")}, {}, f"member b.ppm.gz: sha256 of decompressed content is {sha(b'other')}"),
    ({**GOOD_MEMBERS, "b.ppm.gz": b"not gzip"}, {}, "member b.ppm.gz: not a valid gzip file"),
    ({**GOOD_MEMBERS, "../x": gz(b"x")}, {}, "refusing member '../x': absolute or escaping path"),
    ({**GOOD_MEMBERS, "/etc/x": gz(b"x")}, {}, "refusing member '/etc/x': absolute or escaping path"),
    (GOOD_MEMBERS, {"c.ppm.gz": "a.ppm.gz"}, "refusing member 'c.ppm.gz': not a regular file"),
], ids=["missing", "extra", "missing-and-extra", "corrupt", "not-gzip", "dotdot", "absolute", "symlink"])
def test_bad_tar_archives(tmp_path, members, symlinks, expected):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": tar(members, symlinks)})
    assert_fails(tmp_path, "images.tar: could not be obtained", "images.tar: ", expected, base_urls=[source.as_uri()])


# ------------------------------------------------------------------------------------------ manifests


@pytest.mark.parametrize("manifest, expected", [
    ({}, "expected a non-empty mapping"),
    ({"files": {}}, "files: expected a non-empty mapping"),
    ({"files": {"a.gz": {"gunzip_sha256": "abc"}}}, "files.a.gz.gunzip_sha256: expected 64 lowercase hex digits"),
    ({"files": {"a.tar": {"gunzip_sha256": "0" * 64, "members": {}}}}, "needs exactly one of"),
    ({"files": {"a.tar": {"members": {"m.gz": {"md5": "0"}}}}}, "files.a.tar.members.m.gz: unknown key 'md5'"),
    ({"files": {"../a.gz": {"gunzip_sha256": "0" * 64}}}, "a file name must not contain a path"),
])
def test_invalid_manifest(tmp_path, manifest, expected):
    assert_fails(tmp_path, expected, base_urls=[], manifest=manifest)


def test_no_sources(tmp_path):
    assert_fails(tmp_path, "labels.gz: could not be obtained from any source:\n  (no sources: set base_urls or $SEGPIPE_MIRROR)",
                 base_urls=[])


def test_missing_manifest(tmp_path):
    with pytest.raises(dl.DownloadError, match="nope.json: no checksum manifest"):
        dl.download(DATASET, DownloadParams(base_urls=[]), tmp_path / "nope.json", tmp_path / "out", None)


@pytest.mark.parametrize("dataset", ["mnist", "stare"])
def test_shipped_manifests_are_valid(dataset):
    files = dl.load_manifest(dl.CHECKSUMS_DIR / f"{dataset}.json")
    assert len(files) == {"mnist": 4, "stare": 3}[dataset]


# ------------------------------------------------------------------------------------------ HTTP


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server answering each path with a scripted list of (status, body), the last repeated."""
    routes: dict[str, list[tuple[int, bytes]]] = {}
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            script = routes.get(self.path, [(404, b"")])
            status, body = script.pop(0) if len(script) > 1 else script[0]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/data", routes, requests
    httpd.shutdown()
    httpd.server_close()


def test_http_404_is_not_retried(tmp_path, server):
    url, routes, requests = server
    routes["/data/labels.gz"] = [(200, GOOD_FILES["labels.gz"])]
    assert_fails(tmp_path, f"images.tar: could not be obtained from any source:\n  {url}/images.tar: HTTP 404 Not Found",
                 base_urls=[url], retries=3)
    assert requests == ["/data/labels.gz", "/data/images.tar"]


def test_http_500_is_retried(tmp_path, server):
    url, routes, requests = server
    routes["/data/labels.gz"] = [(500, b""), (503, b""), (200, GOOD_FILES["labels.gz"])]
    routes["/data/images.tar"] = [(200, GOOD_FILES["images.tar"])]
    assert_downloaded(run(tmp_path, base_urls=[url], retries=3))
    assert requests == ["/data/labels.gz"] * 3 + ["/data/images.tar"]


def test_http_500_gives_up_after_retries(tmp_path, server):
    url, routes, requests = server
    routes["/data/labels.gz"] = [(500, b"")]
    assert_fails(tmp_path, f"{url}/labels.gz: HTTP 500 Internal Server Error (after 2 attempts)", base_urls=[url], retries=2)
    assert requests == ["/data/labels.gz"] * 2


# ------------------------------------------------------------------------------------------ command line


def test_main(tmp_path, monkeypatch, capsys):
    make_source(tmp_path / "mirror" / DATASET, GOOD_FILES)
    manifest = write_manifest(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dl, "CHECKSUMS_DIR", manifest.parent)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({DATASET: {"download": {"base_urls": [], "retries": 1}}}))

    monkeypatch.setenv(dl.MIRROR_ENV, "mirror")
    assert dl.main([DATASET]) == 0
    assert_downloaded(tmp_path / "data" / "raw" / DATASET)

    monkeypatch.setenv(dl.MIRROR_ENV, "elsewhere")
    assert dl.main([DATASET]) == 1
    err = capsys.readouterr().err
    assert err.startswith("download: labels.gz: could not be obtained from any source:\n  file://")
    assert "Traceback" not in err
