"""The download stage, on tiny files of every kind made here (plain files in folders, gzip files, tar, compressed
tar and zip archives), served from directories and HTTP, and on hostile ones: decompression bombs, sparse,
oversized, linked, encrypted and escaping members, servers that drip, hang, never end or redirect, URLs with
credentials."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import re
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import tracemalloc
import types
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline import download as dl
from pipeline.archives import GZIP, PLAIN, TAR, TAR_GZ, ZIP, list_files
from pipeline.download import DownloadParams
from pipeline.stage import StageError
from pipeline.stage import main as run_stage
from tests.synthetic import (
    finished_pid,
    sparse_tar,
    write_gzip_bomb,
    write_tar_gz_bomb,
    write_zip_bomb,
    zip_bytes,
    zip_patched,
    zip_with_duplicate,
)

REPO = Path(__file__).resolve().parents[1]
DATASET = "toy"
LABELS, IMAGE, MASK = b"label bytes", b"P5 image bytes", b"P5 mask bytes"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def content(data: bytes) -> dict:
    """The manifest entry of a gzip file (or tar member) holding ``data``."""
    return {"gunzip_sha256": sha(data), "size": len(data)}


def plain(data: bytes) -> dict:
    """The manifest entry of a plain file (or member) holding ``data``."""
    return {"sha256": sha(data), "bytes": len(data)}


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
    "labels.gz": gz(LABELS),
    "images.tar": tar({"a.ppm.gz": gz(IMAGE), "b.ppm.gz": gz(MASK)}),
}
MANIFEST = {
    "files": {
        "labels.gz": content(LABELS),
        "images.tar": {"members": {"a.ppm.gz": content(IMAGE), "b.ppm.gz": content(MASK)}},
    }
}


def manifest_with(**files: dict) -> dict:
    """MANIFEST with some files' entries replaced."""
    return {"files": {**MANIFEST["files"], **files}}


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)


def make_source(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_manifest(tmp_path: Path, manifest: dict = MANIFEST) -> Path:
    path = tmp_path / "checksums" / f"{DATASET}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def run(
    tmp_path: Path,
    base_urls: list[str],
    mirror: str | None = None,
    manifest: dict = MANIFEST,
    retries: int = 1,
    timeout_s: float = 5.0,
    deadline_s: float = 30.0,
) -> Path:
    out = tmp_path / "data" / "raw" / DATASET
    params = DownloadParams(base_urls=base_urls, timeout_s=timeout_s, deadline_s=deadline_s, retries=retries)
    params.validate(f"{DATASET}.download")
    dl.download(DATASET, params, write_manifest(tmp_path, manifest), out, mirror)
    return out


def assert_fails(tmp_path: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(dl.DownloadError) as error:
        run(tmp_path, **kwargs)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message
    # Nothing written: no output, and no temporary directory left beside it.
    assert not (tmp_path / "data" / "raw").exists() or not any((tmp_path / "data" / "raw").iterdir())
    return message


def assert_downloaded(out: Path, files: dict[str, bytes] = GOOD_FILES) -> None:
    assert list_files(out) == sorted(files)  # the same layout, folders included
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


def test_falls_back_to_next_source_when_a_file_is_corrupt_and_warns(tmp_path, capsys):
    mirror = make_source(tmp_path / "mirror" / DATASET, {**GOOD_FILES, "labels.gz": gz(b"other bytes")})
    official = make_source(tmp_path / "official", GOOD_FILES)
    assert_downloaded(run(tmp_path, base_urls=[official.as_uri()], mirror=str(tmp_path / "mirror")))
    out, err = capsys.readouterr()
    assert f"labels.gz: 31 bytes verified, from {official.as_uri()}/labels.gz" in out
    assert f"images.tar: {len(GOOD_FILES['images.tar']):,} bytes verified, from file://{tmp_path}/mirror/" in out
    assert err == (
        f"download {DATASET}: warning: labels.gz: {mirror.as_uri()}/labels.gz served a bad copy "
        f"(labels.gz: sha256 of decompressed content is {sha(b'other bytes')}, expected {sha(LABELS)}); "
        f"used the copy from {official.as_uri()}/labels.gz\n"
    )


def test_a_missing_file_falls_back_without_a_warning(tmp_path, capsys):
    make_source(tmp_path / "mirror" / DATASET, {"images.tar": GOOD_FILES["images.tar"]})
    official = make_source(tmp_path / "official", GOOD_FILES)
    assert_downloaded(run(tmp_path, base_urls=[official.as_uri()], mirror=str(tmp_path / "mirror")))
    assert capsys.readouterr().err == ""


def test_checksum_mismatch_names_file_and_both_hashes(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": gz(b"other bytes")})
    assert_fails(
        tmp_path,
        "labels.gz: could not be obtained",
        f"{source.as_uri()}/labels.gz",
        f"sha256 of decompressed content is {sha(b'other bytes')}, expected {sha(LABELS)}",
        base_urls=[source.as_uri()],
    )


def test_content_of_another_size(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": gz(LABELS[:-1])})
    assert_fails(tmp_path, "labels.gz: decompresses to 10 bytes, expected 11", base_urls=[source.as_uri()])


def test_a_failure_leaves_an_existing_output_as_it_was(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": b"not a tar"})
    old = tmp_path / "data" / "raw" / DATASET / "old.gz"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    with pytest.raises(dl.DownloadError, match="images.tar: not a valid tar archive"):
        run(tmp_path, base_urls=[source.as_uri()])
    assert [p.name for p in old.parent.iterdir()] == ["old.gz"]
    assert [p.name for p in old.parent.parent.iterdir()] == [DATASET]  # no temporary directory left


def test_what_a_killed_download_left_is_removed_by_the_next(tmp_path):
    raw = tmp_path / "data" / "raw"
    for leftover in (f".{DATASET}.tmp-{finished_pid()}-k1ll3d", f".{DATASET}.tmp-abc123de"):  # the second: no pid
        (raw / leftover / DATASET).mkdir(parents=True)
        (raw / leftover / DATASET / "labels.gz").write_bytes(b"half a file")
    source = make_source(tmp_path / "source", GOOD_FILES)
    assert_downloaded(run(tmp_path, base_urls=[source.as_uri()]))
    assert [p.name for p in raw.iterdir()] == [DATASET]


def test_truncated_gzip(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": GOOD_FILES["labels.gz"][:-6]})
    assert_fails(tmp_path, "labels.gz: not a valid gzip file", base_urls=[source.as_uri()])


def test_missing_file_lists_every_source(tmp_path):
    mirror = make_source(tmp_path / "mirror" / DATASET, {"labels.gz": GOOD_FILES["labels.gz"]})
    empty = make_source(tmp_path / "empty", {})
    message = assert_fails(
        tmp_path, "images.tar: could not be obtained", base_urls=[empty.as_uri()], mirror=str(tmp_path / "mirror")
    )
    assert f"{mirror.as_uri()}/images.tar: [Errno 2] No such file" in message
    assert f"{empty.as_uri()}/images.tar: [Errno 2] No such file" in message


def test_whole_file_sha256_is_checked(tmp_path):
    repacked = tar({"b.ppm.gz": gz(MASK), "a.ppm.gz": gz(IMAGE)})  # same members, different archive
    manifest = json.loads(json.dumps(MANIFEST))
    manifest["files"]["images.tar"]["sha256"] = sha(GOOD_FILES["images.tar"])
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": repacked})
    assert_fails(
        tmp_path,
        f"images.tar: sha256 is {sha(repacked)}, expected {sha(GOOD_FILES['images.tar'])}",
        base_urls=[source.as_uri()],
        manifest=manifest,
    )


GOOD_MEMBERS = {"a.ppm.gz": gz(IMAGE), "b.ppm.gz": gz(MASK)}


@pytest.mark.parametrize(
    "members, symlinks, expected",
    [
        ({"a.ppm.gz": gz(IMAGE)}, {}, "images.tar: members missing from the archive: ['b.ppm.gz']"),
        ({**GOOD_MEMBERS, "c.ppm.gz": gz(b"c")}, {}, "images.tar: unexpected member 'c.ppm.gz' (not in the manifest)"),
        ({"./a.ppm.gz": gz(IMAGE), "b.ppm.gz": gz(MASK), "a.ppm.gz": gz(IMAGE)}, {}, "member 'a.ppm.gz' appears twice"),
        ({**GOOD_MEMBERS, "b.ppm.gz": gz(b"other")}, {}, "member b.ppm.gz: decompresses to 5 bytes, expected 13"),
        (
            {**GOOD_MEMBERS, "b.ppm.gz": gz(b"P5 mask byteZ")},
            {},
            f"member b.ppm.gz: sha256 of decompressed content is {sha(b'P5 mask byteZ')}",
        ),
        ({**GOOD_MEMBERS, "b.ppm.gz": b"not gzip"}, {}, "member b.ppm.gz: not a valid gzip file"),
        ({**GOOD_MEMBERS, "../x": gz(b"x")}, {}, "refusing member '../x': absolute or escaping path"),
        ({**GOOD_MEMBERS, "/etc/x": gz(b"x")}, {}, "refusing member '/etc/x': absolute or escaping path"),
        (GOOD_MEMBERS, {"c.ppm.gz": "a.ppm.gz"}, "refusing member 'c.ppm.gz': not a regular file"),
    ],
    ids=["missing", "extra", "duplicate", "other-size", "corrupt", "not-gzip", "dotdot", "absolute", "symlink"],
)
def test_bad_tar_archives(tmp_path, members, symlinks, expected):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": tar(members, symlinks)})
    assert_fails(tmp_path, "images.tar: could not be obtained", "images.tar: ", expected, base_urls=[source.as_uri()])


def test_a_compressed_tar_is_refused(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": gz(GOOD_FILES["images.tar"])})
    assert_fails(tmp_path, "images.tar: not a valid tar archive", base_urls=[source.as_uri()])


# ------------------------------------------------------------------------------------------ every kind of file

PNG, MASK_PNG, NOTES = b"\x89PNG scan 1", b"\x89PNG mask 1", b"notes"
# One file of each kind, in folders, a name with a space (quoted in URLs), members in folders, a zip folder entry.
KINDS = {
    "images/scan 1.png": PNG,
    "images/masks/0001_mask.png": MASK_PNG,
    "labels.gz": gz(LABELS),
    "archives/plain.tar": tar({"a.ppm.gz": gz(IMAGE), "sub/b.txt": NOTES}),
    "b.tar.gz": gz(tar({"x/m.png": MASK, "y.ppm.gz": gz(IMAGE)})),
    "c.TGZ": gz(tar({"m.png": MASK})),
    "d.zip": zip_bytes({"inner/m.png": MASK, "inner/g.ppm.gz": gz(IMAGE)}, folders=("inner/",)),
}
KINDS_MANIFEST = {
    "files": {
        "archives/plain.tar": {"members": {"a.ppm.gz": content(IMAGE), "sub/b.txt": plain(NOTES)}},
        "b.tar.gz": {"members": {"x/m.png": plain(MASK), "y.ppm.gz": content(IMAGE)}},
        "c.TGZ": {"members": {"m.png": plain(MASK)}},
        "d.zip": {"members": {"inner/m.png": plain(MASK), "inner/g.ppm.gz": content(IMAGE)}},
        "images/masks/0001_mask.png": plain(MASK_PNG),
        "images/scan 1.png": plain(PNG),
        "labels.gz": content(LABELS),
    }
}


@pytest.mark.parametrize("how", ["file URL", "absolute path", "mirror"])
def test_every_kind_from_a_directory(tmp_path, how, capsys):
    source = make_source(tmp_path / "mirror" / DATASET, KINDS)
    base_urls, mirror = {
        "file URL": ([source.as_uri()], None),
        "absolute path": ([str(source)], None),
        "mirror": ([], str(tmp_path / "mirror")),
    }[how]
    assert_downloaded(run(tmp_path, base_urls=base_urls, mirror=mirror, manifest=KINDS_MANIFEST), KINDS)
    quoted = f"{source.as_uri()}/images/scan%201.png"
    assert f"images/scan 1.png: 11 bytes verified, from {quoted}" in capsys.readouterr().out


def flip(data: bytes) -> bytes:
    """``data`` with its last byte changed."""
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize(
    "name, data, expected",
    [
        ("images/scan 1.png", flip(PNG), f"images/scan 1.png: sha256 is {sha(flip(PNG))}, expected {sha(PNG)}"),
        (
            "images/scan 1.png",
            PNG + b"x",
            "scan 1.png: the server announces 12 bytes, more than the 11 the manifest allows",
        ),
        ("labels.gz", gz(flip(LABELS)), f"labels.gz: sha256 of decompressed content is {sha(flip(LABELS))}"),
        (
            "archives/plain.tar",
            tar({"a.ppm.gz": gz(IMAGE), "sub/b.txt": flip(NOTES)}),
            f"archives/plain.tar: member sub/b.txt: sha256 is {sha(flip(NOTES))}, expected {sha(NOTES)}",
        ),
        (
            "archives/plain.tar",
            tar({"a.ppm.gz": gz(flip(IMAGE)), "sub/b.txt": NOTES}),
            f"archives/plain.tar: member a.ppm.gz: sha256 of decompressed content is {sha(flip(IMAGE))}",
        ),
        (
            "archives/plain.tar",
            tar({"a.ppm.gz": gz(IMAGE), "sub/b.txt": NOTES + b"!"}),
            "archives/plain.tar: member sub/b.txt: its header claims 6 bytes, expected 5",
        ),
        (
            "b.tar.gz",
            gz(tar({"x/m.png": flip(MASK), "y.ppm.gz": gz(IMAGE)})),
            f"b.tar.gz: member x/m.png: sha256 is {sha(flip(MASK))}",
        ),
        (
            "b.tar.gz",
            gz(tar({"x/m.png": MASK, "y.ppm.gz": gz(flip(IMAGE))})),
            f"b.tar.gz: member y.ppm.gz: sha256 of decompressed content is {sha(flip(IMAGE))}",
        ),
        (
            "b.tar.gz",
            flip(KINDS["b.tar.gz"][:-4]) + KINDS["b.tar.gz"][-4:],  # the gzip trailer's CRC-32
            "b.tar.gz: not a valid gzip file (CRC check failed",
        ),
        ("c.TGZ", gz(tar({"m.png": flip(MASK)})), f"c.TGZ: member m.png: sha256 is {sha(flip(MASK))}"),
        (
            "d.zip",
            zip_bytes({"inner/m.png": flip(MASK), "inner/g.ppm.gz": gz(IMAGE)}),
            f"d.zip: member inner/m.png: sha256 is {sha(flip(MASK))}",
        ),
        (
            "d.zip",
            zip_bytes({"inner/m.png": MASK, "inner/g.ppm.gz": gz(flip(IMAGE))}),
            f"d.zip: member inner/g.ppm.gz: sha256 of decompressed content is {sha(flip(IMAGE))}",
        ),
        (
            "d.zip",
            zip_bytes({"inner/m.png": MASK + b"!", "inner/g.ppm.gz": gz(IMAGE)}),
            f"d.zip: member inner/m.png: its header claims {len(MASK) + 1} bytes, expected {len(MASK)}",
        ),
    ],
    ids=[
        "plain",
        "plain-longer",
        "gzip",
        "tar-plain",
        "tar-gzip",
        "tar-size",
        "tgz-plain",
        "tgz-gzip",
        "tgz-crc",
        "tgz-suffix",
        "zip-plain",
        "zip-gzip",
        "zip-size",
    ],
)
def test_a_wrong_byte_is_refused_naming_file_and_member(tmp_path, name, data, expected):
    source = make_source(tmp_path / "source", {**KINDS, name: data})
    url = f"{source.as_uri()}/{name.replace(' ', '%20')}"
    assert_fails(
        tmp_path,
        f"{name}: could not be obtained from any source:\n  {url}: ",
        expected,
        base_urls=[source.as_uri()],
        manifest=KINDS_MANIFEST,
    )


GOOD_ZIP = {"inner/m.png": MASK, "inner/g.ppm.gz": gz(IMAGE)}


@pytest.mark.parametrize(
    "archive, expected",
    [
        (zip_bytes({"inner/m.png": MASK}), "d.zip: members missing from the archive: ['inner/g.ppm.gz']"),
        (zip_bytes({**GOOD_ZIP, "c.png": b"c"}), "d.zip: unexpected member 'c.png' (not in the manifest)"),
        (zip_with_duplicate("inner/m.png", MASK, MASK), "d.zip: member 'inner/m.png' appears twice"),
        (zip_bytes({**GOOD_ZIP, "../x": b"x"}), "d.zip: refusing member '../x': absolute or escaping path"),
        (zip_bytes({**GOOD_ZIP, "/etc/x": b"x"}), "d.zip: refusing member '/etc/x': absolute or escaping path"),
        (zip_bytes({**GOOD_ZIP, "inner\\x": b"x"}), "d.zip: refusing member 'inner\\\\x': absolute or escaping path"),
        (
            zip_bytes(GOOD_ZIP, symlinks={"inner/l.png": "/etc/passwd"}),
            "d.zip: refusing member 'inner/l.png': a symbolic link",
        ),
        (
            zip_patched(zip_bytes(GOOD_ZIP), "inner/m.png", flag_bits=1),
            "d.zip: refusing member 'inner/m.png': encrypted",
        ),
        (
            zip_bytes(GOOD_ZIP, compression=zipfile.ZIP_BZIP2),
            "d.zip: refusing member 'inner/m.png': compression method 12 (only stored and deflated members are read)",
        ),
        (zip_bytes(GOOD_ZIP)[:-30], "d.zip: not a valid zip archive"),
        (tar(GOOD_ZIP), "d.zip: not a valid zip archive"),
    ],
    ids=[
        "missing",
        "extra",
        "duplicate",
        "dotdot",
        "absolute",
        "backslash",
        "symlink",
        "encrypted",
        "bzip2",
        "truncated",
        "a-tar",
    ],
)
def test_bad_zip_archives(tmp_path, archive, expected):
    source = make_source(tmp_path / "source", {**KINDS, "d.zip": archive})
    assert_fails(
        tmp_path, "d.zip: could not be obtained", expected, base_urls=[source.as_uri()], manifest=KINDS_MANIFEST
    )


def test_a_stored_zip_is_read_as_a_deflated_one(tmp_path):
    source = make_source(tmp_path / "source", {**KINDS, "d.zip": zip_bytes(GOOD_ZIP, compression=zipfile.ZIP_STORED)})
    run(tmp_path, base_urls=[source.as_uri()], manifest=KINDS_MANIFEST)


def test_a_zip_directory_larger_than_its_members_can_take_is_refused_before_zipfile_reads_it(tmp_path):
    folders = tuple(f"folder{i:04}/" for i in range(200))  # 200 entries that no listed member needs
    source = make_source(tmp_path / "source", {**KINDS, "d.zip": zip_bytes(GOOD_ZIP, folders=folders)})
    bound = dl.zip_directory_bound(KINDS_MANIFEST["files"]["d.zip"]["members"])
    assert_fails(
        tmp_path,
        "d.zip: its central directory claims 11,517 bytes, more than the "
        f"{bound:,} that the 2 listed members and their folders can take",
        base_urls=[source.as_uri()],
        manifest=KINDS_MANIFEST,
    )


def test_an_archive_kind_follows_from_the_name(tmp_path):
    # A zip archive served under a tar's name is read as a tar (and refused), never guessed from its bytes.
    manifest = {"files": {"d.tar": KINDS_MANIFEST["files"]["d.zip"]}}
    source = make_source(tmp_path / "source", {"d.tar": KINDS["d.zip"]})
    assert_fails(tmp_path, "d.tar: not a valid tar archive", base_urls=[source.as_uri()], manifest=manifest)


# ------------------------------------------------------------------------------------------ hostile files


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory) -> bytes:
    """128 MiB of zeros, 130 KB of gzip."""
    return write_gzip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.gz", 128 << 20).read_bytes()


def test_gzip_bomb_stops_at_the_manifests_size(tmp_path, gzip_bomb):
    expected = b"\1" * (1 << 20)  # the real file: 1 MiB of content, so the 130 KB bomb passes the download bound
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": gzip_bomb})
    assert_fails(
        tmp_path,
        f"{source.as_uri()}/labels.gz: labels.gz: decompresses to more than 1,048,576 bytes (stopped there)",
        base_urls=[source.as_uri()],
        manifest=manifest_with(**{"labels.gz": content(expected)}),
    )


def test_gzip_bomb_inside_a_tar_stops_at_the_members_size(tmp_path, gzip_bomb):
    manifest = manifest_with(
        **{"images.tar": {"members": {"a.ppm.gz": content(bytes(1 << 20)[:-1] + b"\1"), "b.ppm.gz": content(MASK)}}}
    )
    source = make_source(
        tmp_path / "source", {**GOOD_FILES, "images.tar": tar({**GOOD_MEMBERS, "a.ppm.gz": gzip_bomb})}
    )
    assert_fails(
        tmp_path,
        "images.tar: member a.ppm.gz: decompresses to more than 1,048,576 bytes (stopped there)",
        base_urls=[source.as_uri()],
        manifest=manifest,
    )


def test_a_file_larger_than_its_content_can_make_is_not_downloaded(tmp_path, gzip_bomb):
    # 11 bytes of content make a gzip file of at most 64 KiB and change: the 130 KB bomb is refused by its
    # announced length (an HTTP body without one is cut at the bound: test_an_endless_body_stops_at_the_bound).
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": gzip_bomb})
    limit = dl.download_bound(MANIFEST["files"]["labels.gz"], GZIP)
    assert_fails(
        tmp_path,
        f"labels.gz: the server announces {len(gzip_bomb):,} bytes, more than the {limit:,} the manifest allows",
        base_urls=[source.as_uri()],
    )


def test_the_manifests_bytes_bound_the_download(tmp_path):
    source = make_source(tmp_path / "source", GOOD_FILES)
    manifest = manifest_with(**{"labels.gz": {**content(LABELS), "bytes": 30}})
    assert_fails(
        tmp_path,
        "labels.gz: the server announces 31 bytes, more than the 30 the manifest allows",
        base_urls=[source.as_uri()],
        manifest=manifest,
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.ppm.gz", "images.tar: refusing member 'a.ppm.gz': a sparse file"),
        ("evil.gz", "images.tar: refusing member 'evil.gz': a sparse file"),
    ],
)
def test_sparse_tar_member_is_refused_by_its_header(tmp_path, name, expected):
    # 2 KiB of archive whose member claims 3 GiB: read, it would be 3 GiB of zeros.
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": sparse_tar(name, 3 << 30)})
    assert_fails(tmp_path, expected, base_urls=[source.as_uri()])


def huge_member_tar(name: str, claimed: int) -> bytes:
    """A member header claiming ``claimed`` bytes, followed by only a few: reading the body would fail."""
    info = tarfile.TarInfo(name)
    info.size = claimed
    return info.tobuf(format=tarfile.GNU_FORMAT) + gz(IMAGE)


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "a.ppm.gz",
            "images.tar: member a.ppm.gz: its header claims 3,221,225,472 bytes, "
            "more than the 65,551 that 14 bytes of content can take",
        ),
        ("evil.gz", "images.tar: unexpected member 'evil.gz' (not in the manifest)"),
    ],
)
def test_tar_member_is_refused_by_its_header_before_its_body_is_read(tmp_path, name, expected):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": huge_member_tar(name, 3 << 30)})
    message = assert_fails(tmp_path, expected, base_urls=[source.as_uri()])
    assert "unexpected end of data" not in message  # what reading the body would have said


def peak_memory(function) -> int:
    """The most memory Python held while ``function`` ran (its allocations, bytes objects from zlib included)."""
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


BIG = bytes(range(256)) * 4096  # 1 MiB of content, as the manifest lists it: the bombs below fit its download bound


def test_zip_bomb_stops_at_the_size_it_declares(tmp_path):
    """A member whose directory entry declares the listed 1 MiB but whose data inflates to 128 MiB: zipfile
    stops at the declared size, where the CRC-32 (or else the checksum) fails, in bounded memory."""
    bomb = write_zip_bomb(tmp_path / "bomb.zip", "inner/m.png", 128 << 20)
    hostile = zip_patched(bomb.read_bytes(), "inner/m.png", file_size=len(BIG))
    manifest = {"files": {"d.zip": {"members": {"inner/m.png": plain(BIG)}}}}
    source = make_source(tmp_path / "source", {"d.zip": hostile})
    peak = peak_memory(
        lambda: assert_fails(
            tmp_path,
            "d.zip: not a valid zip archive (Bad CRC-32 for file 'inner/m.png')",
            base_urls=[source.as_uri()],
            manifest=manifest,
        )
    )
    assert peak < 16 << 20, f"{peak:,} bytes"


@pytest.mark.parametrize(
    "member, entry, expected",
    [
        (
            "inner/m.png",
            plain(BIG),
            "d.zip: member inner/m.png: its header claims 134,217,728 bytes, expected 1,048,576",
        ),
        (
            "inner/m.ppm.gz",
            content(BIG),
            "d.zip: member inner/m.ppm.gz: its header claims 134,217,728 bytes, more than "
            "the 1,245,184 that 1,048,576 bytes of content can take",
        ),
    ],
    ids=["plain", "gzip"],
)
def test_zip_member_declaring_more_than_the_manifest_allows_is_refused_before_it_is_read(
    tmp_path, member, entry, expected
):
    bomb = write_zip_bomb(tmp_path / "bomb.zip", member, 128 << 20)
    manifest = {"files": {"d.zip": {"members": {member: entry}}}}
    source = make_source(tmp_path / "source", {"d.zip": bomb.read_bytes()})
    peak = peak_memory(lambda: assert_fails(tmp_path, expected, base_urls=[source.as_uri()], manifest=manifest))
    assert peak < 8 << 20, f"{peak:,} bytes"


def test_tar_gz_bomb_stops_at_the_largest_tar_its_members_make(tmp_path):
    """A good tar, then 128 MiB of zeros in the same gzip stream: inflated up to the tar bound, no further."""
    members = {"x/m.png": plain(BIG)}
    bomb = write_tar_gz_bomb(tmp_path / "bomb.tar.gz", tar({"x/m.png": BIG}), 128 << 20)
    source = make_source(tmp_path / "source", {"b.tar.gz": bomb.read_bytes()})
    limit = dl.tar_bound(members)
    peak = peak_memory(
        lambda: assert_fails(
            tmp_path,
            f"b.tar.gz: decompresses to more than {limit:,} bytes (stopped there)",
            base_urls=[source.as_uri()],
            manifest={"files": {"b.tar.gz": {"members": members}}},
        )
    )
    assert peak < 16 << 20, f"{peak:,} bytes"


def test_tar_gz_member_is_refused_by_its_header_before_its_body_is_inflated(tmp_path):
    source = make_source(tmp_path / "source", {**KINDS, "b.tar.gz": gz(huge_member_tar("x/m.png", 3 << 30))})
    message = assert_fails(
        tmp_path,
        "b.tar.gz: member x/m.png: its header claims 3,221,225,472 bytes, expected 13",
        base_urls=[source.as_uri()],
        manifest=KINDS_MANIFEST,
    )
    assert "unexpected end of data" not in message


# ------------------------------------------------------------------------------------------ manifests


@pytest.mark.parametrize(
    "manifest, expected",
    [
        ({}, "expected a non-empty mapping"),
        ({"files": {}}, "files: expected a non-empty mapping"),
        (
            {"files": {"a.gz": {"gunzip_sha256": "abc", "size": 1}}},
            "files.a.gz.gunzip_sha256: expected 64 lowercase hex digits",
        ),
        (
            {"files": {"a.tar": {"gunzip_sha256": "0" * 64, "members": {}}}},
            "files.a.tar: unknown key 'gunzip_sha256' for a tar archive, "
            "as its name says (known: bytes, members, sha256)",
        ),
        ({"files": {"a.tar": {"members": {"m.gz": {"md5": "0"}}}}}, "files.a.tar.members.m.gz: unknown key 'md5'"),
        (
            {"files": {"../a.gz": {"gunzip_sha256": "0" * 64, "size": 1}}},
            "files: '../a.gz' is not a relative path inside the dataset's directory",
        ),
        ({"files": {"a.gz": {"gunzip_sha256": "0" * 64}}}, "files.a.gz: missing 'size'"),
        (
            {"files": {"a.gz": {"gunzip_sha256": "0" * 64, "size": -1}}},
            "files.a.gz.size: expected a whole number of bytes >= 0, got -1",
        ),
        ({"files": {"a.gz": {"gunzip_sha256": "0" * 64, "size": True}}}, "files.a.gz.size: expected a whole number"),
        (
            {"files": {"a.gz": {"gunzip_sha256": "0" * 64, "size": 1, "bytes": 0}}},
            "files.a.gz.bytes: expected a whole number of bytes >= 1, got 0",
        ),
        (
            {"files": {"a.tar": {"size": 1, "members": {"m.gz": {"gunzip_sha256": "0" * 64, "size": 1}}}}},
            "files.a.tar: unknown key 'size'",
        ),
        (
            {"files": {"a.tar": {"members": {"m.gz": {"gunzip_sha256": "0" * 64}}}}},
            "files.a.tar.members.m.gz: missing 'size'",
        ),
        (
            {"files": {"a.tar": {"members": {"../m.gz": {"gunzip_sha256": "0" * 64, "size": 1}}}}},
            "'../m.gz' is not a relative path inside the archive",
        ),
        (
            {"files": {"a.tar": {"members": {"./m.gz": {"gunzip_sha256": "0" * 64, "size": 1}}}}},
            "'./m.gz' is not in normal form ('m.gz')",
        ),
        # Names with folders: relative POSIX paths in normal form, nothing that could leave the output directory.
        (
            {"files": {"images/../../a.png": plain(b"a")}},
            "files: 'images/../../a.png' is not a relative path inside the dataset's directory",
        ),
        ({"files": {"images/../a.png": plain(b"a")}}, "files: 'images/../a.png' is not a relative path inside"),
        ({"files": {"/etc/a.png": plain(b"a")}}, "files: '/etc/a.png' is not a relative path inside"),
        ({"files": {"images\\a.png": plain(b"a")}}, "is not a relative path inside"),
        ({"files": {"./images/a.png": plain(b"a")}}, "files: './images/a.png' is not in normal form ('images/a.png')"),
        ({"files": {"images//a.png": plain(b"a")}}, "files: 'images//a.png' is not in normal form ('images/a.png')"),
        ({"files": {"images/": plain(b"a")}}, "files: 'images/' is not in normal form ('images')"),
        (
            {"files": {"images": plain(b"a"), "images/a.png": plain(b"a")}},
            "files.images/a.png: 'images' is listed as a file, so it cannot be a folder",
        ),
        (
            {"files": {"a.zip": {"members": {"x/../../m.png": plain(b"m")}}}},
            "files.a.zip.members: 'x/../../m.png' is not a relative path inside the archive",
        ),
        # What an entry needs follows from its name.
        ({"files": {"a.png": {"sha256": "0" * 64}}}, "files.a.png: missing 'bytes'"),
        (
            {"files": {"a.png": content(b"a")}},
            "files.a.png: unknown key 'gunzip_sha256' for a plain file, as its name says (known: bytes, sha256)",
        ),
        ({"files": {"a.gz": plain(b"a")}}, "files.a.gz: missing 'gunzip_sha256'"),
        (
            {"files": {"a.gz": {**content(b"a"), "members": {"m": plain(b"m")}}}},
            "files.a.gz: unknown key 'members' for a gzip file",
        ),
        ({"files": {"a.zip": plain(b"a")}}, "files.a.zip: missing 'members'"),
        (
            {"files": {"a.tgz": {"members": {"m.png": content(b"m")}}}},
            "files.a.tgz.members.m.png: unknown key 'gunzip_sha256' for a plain member",
        ),
        (
            {"files": {"a.zip": {"members": {"m.gz": plain(b"m")}}}},
            "files.a.zip.members.m.gz: unknown key 'sha256' for a gzip member",
        ),
        (
            {"files": {"a.png": {"sha256": "0" * 64, "bytes": -1}}},
            "files.a.png.bytes: expected a whole number of bytes >= 0, got -1",
        ),
    ],
)
def test_invalid_manifest(tmp_path, manifest, expected):
    assert_fails(tmp_path, expected, base_urls=[], manifest=manifest)


def test_no_sources(tmp_path):
    assert_fails(
        tmp_path,
        "labels.gz: could not be obtained from any source:\n  (no sources: set base_urls or $SEGPIPE_MIRROR)",
        base_urls=[],
    )


def test_missing_manifest(tmp_path):
    with pytest.raises(dl.DownloadError, match="nope.json: no checksum manifest"):
        dl.download(DATASET, DownloadParams(base_urls=[]), tmp_path / "nope.json", tmp_path / "out", None)


@pytest.mark.parametrize("dataset", ["mnist", "stare"])
def test_shipped_manifests_are_valid(dataset):
    files = dl.load_manifest(dl.CHECKSUMS_DIR / f"{dataset}.json")
    assert len(files) == {"mnist": 4, "stare": 3}[dataset]


def test_download_bound():
    gzip_entry = content(b"x" * 8000)
    assert dl.download_bound(gzip_entry, GZIP) == 8000 + 1000 + 64 * 1024
    assert dl.download_bound({**gzip_entry, "bytes": 10}, GZIP) == 10
    archive = {"members": {"a.gz": gzip_entry, "b.gz": {**gzip_entry, "bytes": 10}}}
    # Each member: a header, a pax header, 1 KiB of pax records and its name in blocks; its body padded to 512.
    tar_bytes = 20 * 512 + (5 * 512 + 146 * 512) + (5 * 512 + 512)
    assert dl.download_bound(archive, TAR) == tar_bytes
    assert dl.download_bound(archive, TAR_GZ) == tar_bytes + tar_bytes // 8 + 64 * 1024  # a gzip file of that tar
    assert dl.download_bound(plain(b"x" * 8000), PLAIN) == 8000
    # A member in a folder: the folder's own header too; a long name: more blocks for its pax header.
    nested = {"members": {"images/a.png": plain(b"x" * 600), "x" * 600 + ".png": plain(b"y")}}
    assert dl.download_bound(nested, TAR) == 20 * 512 + (5 * 512 + 1024) + (5 * 512) + (6 * 512 + 512)
    # A zip: each member's local and central headers, its data deflated, a data descriptor; the end records.
    zip_archive = {"members": {"images/a.png": plain(b"x" * 8000)}}
    headers = 2 * ((46 + 12 + 1024) + (46 + 7 + 1024))  # images/a.png and its folder images/
    assert dl.download_bound(zip_archive, ZIP) == (22 + 65535 + 56 + 20) + headers + (8000 + 1000 + 24)


# ------------------------------------------------------------------------------------------ parameters and messages


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"retries": 0}, "toy.download.retries: must be between 1 and 10, got 0"),
        ({"retries": 11}, "toy.download.retries: must be between 1 and 10, got 11"),
        ({"deadline_s": 0}, "toy.download.deadline_s: must be > 0"),
        ({"base_urls": ["ftp://example.org/x"]}, "toy.download.base_urls[0]: must be an http, https or file URL"),
        ({"base_urls": ["http://me:s3cret@example.org/x?token=t0ken"]}, None),
        ({"base_urls": ["/data/leaves", "file:///data/leaves"]}, None),  # a local directory, by path or URL
        (
            {"base_urls": ["https://example.org/x", "data/leaves"]},
            "toy.download.base_urls[1]: must be an http, https or file URL, or the absolute path of a local directory, "
            "got 'data/leaves' (not a relative path: `dvc exp run --queue` runs the stages in a temporary copy of the "
            "repository, where it would point elsewhere)",
        ),
    ],
)
def test_params_validation(changes, expected):
    params = {"base_urls": [], **changes}
    if expected is None:
        DownloadParams(**params).validate("toy.download")
        return
    with pytest.raises(dl.StageError) as error:
        DownloadParams(**params).validate("toy.download")
    assert expected in str(error.value)


def test_backoff_doubles_up_to_a_cap(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 1.0)
    assert [dl.backoff_s(attempt) for attempt in range(1, 11)] == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]


def test_redact():
    assert (
        dl.redact("https://me:s3cret@host:8080/p/a.gz?X-Amz-Signature=abc&token=t0k&x")
        == "https://***@host:8080/p/a.gz?X-Amz-Signature=***&token=***&x"
    )
    assert (
        dl.redact("failed: 'http://tok@host/a' and http://h/b?sig=1")
        == "failed: 'http://***@host/a' and http://h/b?sig=***"
    )
    assert dl.redact("file:///tmp/mirror/a.gz") == "file:///tmp/mirror/a.gz"


def test_unsupported_mirror_scheme_is_redacted(tmp_path):
    assert_fails(
        tmp_path,
        "$SEGPIPE_MIRROR: 'ftp://***@host/m?token=***' is not an http, https or file URL",
        base_urls=[],
        mirror="ftp://me:s3cret@host/m?token=t0ken",
    )


def test_an_output_directory_that_cannot_be_made_is_one_error_naming_it(tmp_path):
    source = make_source(tmp_path / "source", GOOD_FILES)
    (tmp_path / "a-file").write_bytes(b"")
    params = DownloadParams(base_urls=[source.as_uri()], retries=1)
    blocked = re.escape(
        f"{tmp_path}/a-file/{DATASET}: cannot write the output: {tmp_path}/a-file is a file, not a directory"
    )
    with pytest.raises(StageError, match=f"^{blocked}$"):
        dl.download(DATASET, params, write_manifest(tmp_path), tmp_path / "a-file" / DATASET, None)


def test_a_failed_write_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    """A real write failure: the file size limit (RLIMIT_FSIZE) makes writes past 4 KiB fail with EFBIG."""
    source = make_source(tmp_path / "source", GOOD_FILES)
    manifest, out = write_manifest(tmp_path), tmp_path / "data" / "raw" / DATASET
    script = textwrap.dedent(f"""
        \"\"\"The download stage under a file size limit.\"\"\"
        import resource, signal, sys
        from pathlib import Path
        from pipeline import download
        from pipeline.stage import main

        def stage(dataset):
            params = download.DownloadParams(base_urls=[{source.as_uri()!r}], retries=1)
            download.download(dataset, params, Path({str(manifest)!r}), Path({str(out)!r}), None)
            return "downloaded"

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        sys.exit(main(stage, [{DATASET!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"/{DATASET}/images.tar: cannot write the output (File too large)" in result.stderr
    assert not any((tmp_path / "data" / "raw").iterdir())


# ------------------------------------------------------------------------------------------ HTTP


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server. ``routes`` maps a path (its query ignored) to a list of responses, the last one
    repeated: ``(status, body)``, or a function that writes the response itself from the request handler.
    ``requests`` and ``headers`` record each request; ``stop`` ends the functions' loops at teardown."""
    state = types.SimpleNamespace(routes={}, requests=[], headers=[], stop=threading.Event(), sent=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.partition("?")[0]
            state.requests.append(path)
            state.headers.append(dict(self.headers))
            script = state.routes.get(path, [(404, b"")])
            response = script.pop(0) if len(script) > 1 else script[0]
            try:
                if callable(response):
                    response(self)
                else:
                    status, body = response
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should have

        def log_message(self, *args):
            pass

    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.root = f"http://127.0.0.1:{httpd.server_port}"
    state.url = f"{state.root}/data"
    yield state
    state.stop.set()
    httpd.shutdown()
    httpd.server_close()


def serve_good_files(server, prefix: str = "/data") -> None:
    for name, data in GOOD_FILES.items():
        server.routes[f"{prefix}/{name}"] = [(200, data)]


def test_http_download(tmp_path, server, capsys):
    serve_good_files(server)
    assert_downloaded(run(tmp_path, base_urls=[server.url]))
    assert f"labels.gz: 31 bytes verified, from {server.url}/labels.gz" in capsys.readouterr().out


def test_http_404_is_not_retried(tmp_path, server):
    server.routes["/data/labels.gz"] = [(200, GOOD_FILES["labels.gz"])]
    assert_fails(
        tmp_path,
        f"images.tar: could not be obtained from any source:\n  {server.url}/images.tar: HTTP 404 Not Found",
        base_urls=[server.url],
        retries=3,
    )
    assert server.requests == ["/data/labels.gz", "/data/images.tar"]


def test_http_500_is_retried(tmp_path, server):
    server.routes["/data/labels.gz"] = [(500, b""), (503, b""), (200, GOOD_FILES["labels.gz"])]
    server.routes["/data/images.tar"] = [(200, GOOD_FILES["images.tar"])]
    assert_downloaded(run(tmp_path, base_urls=[server.url], retries=3))
    assert server.requests == ["/data/labels.gz"] * 3 + ["/data/images.tar"]


def test_http_500_gives_up_after_retries(tmp_path, server):
    server.routes["/data/labels.gz"] = [(500, b"")]
    assert_fails(
        tmp_path,
        f"{server.url}/labels.gz: HTTP 500 Internal Server Error (after 2 attempts)",
        base_urls=[server.url],
        retries=2,
    )
    assert server.requests == ["/data/labels.gz"] * 2


def drip(server, prefix: bytes, every_s: float = 0.1):
    """A response that sends ``prefix`` at once, then one byte every ``every_s`` seconds, forever."""

    def respond(handler):
        handler.wfile.write(prefix)
        while not server.stop.wait(every_s):
            handler.wfile.write(b"x")

    return respond


@pytest.mark.parametrize(
    "prefix",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n",  # the body drips
        b"HTTP/1.0 200 OK\r\nX-Slow: ",  # a header drips: http.client reads a header line whole, whatever it takes
    ],
    ids=["body", "headers"],
)
def test_a_dripping_server_fails_at_the_deadline(tmp_path, server, prefix):
    server.routes["/data/labels.gz"] = [drip(server, prefix)]
    start = time.monotonic()
    message = assert_fails(
        tmp_path,
        f"{server.url}/labels.gz: no complete response within the deadline of 1 s (deadline_s)",
        base_urls=[server.url],
        deadline_s=1.0,
        timeout_s=30.0,
        retries=3,
    )
    assert time.monotonic() - start < 30  # ended by the deadline: no read ever waits the 30 s timeout
    assert server.requests == ["/data/labels.gz"]  # a deadline is not retried
    assert len(message.splitlines()) == 2


def test_a_server_dripping_its_tls_handshake_fails_at_the_deadline(tmp_path):
    """The handshake happens inside the connection's set-up, before urllib hands anything back: the deadline
    must reach into it. The server starts a TLS record of 16 KiB, then sends it a byte at a time."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        connection, _ = listener.accept()
        with connection:
            try:
                connection.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record header: 16 KiB to come
                while not stop.wait(0.1):
                    connection.sendall(b"\x00")
            except OSError:
                pass  # the client hung up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/data"
    try:
        assert_fails(
            tmp_path,
            f"{url}/labels.gz: no complete response within the deadline of 1 s (deadline_s)",
            base_urls=[url],
            deadline_s=1.0,
            timeout_s=30.0,
        )
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_silent_server_times_out_and_is_retried(tmp_path, server):
    server.routes["/data/labels.gz"] = [lambda handler: server.stop.wait(30)]
    assert_fails(
        tmp_path,
        f"{server.url}/labels.gz: no data for 0.3 s (timeout_s) (after 2 attempts)",
        base_urls=[server.url],
        timeout_s=0.3,
        retries=2,
    )
    assert server.requests == ["/data/labels.gz"] * 2


def test_an_endless_body_stops_at_the_bound(tmp_path, server):
    def endless(handler):
        handler.send_response(200)
        handler.end_headers()  # no Content-Length: the body ends when the connection does
        chunk = bytes(64 * 1024)
        while not server.stop.is_set():
            handler.wfile.write(chunk)
            server.sent += len(chunk)

    server.routes["/data/labels.gz"] = [endless]
    limit = dl.download_bound(MANIFEST["files"]["labels.gz"], GZIP)
    assert_fails(
        tmp_path,
        f"{server.url}/labels.gz: labels.gz: more than the {limit:,} bytes the manifest allows (stopped there)",
        base_urls=[server.url],
    )
    server.stop.wait(0.5)
    assert server.sent < 32 << 20  # the bound, plus what the sockets' buffers took before the client hung up


def test_a_short_body_is_retried(tmp_path, server):
    def short(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        handler.wfile.write(b"0123456789")

    server.routes["/data/labels.gz"] = [short]
    assert_fails(
        tmp_path,
        "labels.gz: the connection closed after 10 of 100 bytes (after 2 attempts)",
        base_urls=[server.url],
        retries=2,
    )


def redirect(location: str):
    def respond(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def test_redirects_are_followed_without_the_credentials(tmp_path, server, capsys):
    serve_good_files(server, "/elsewhere")
    server.routes["/data/labels.gz"] = [redirect(f"{server.root}/elsewhere/labels.gz?X-Amz-Signature=s1g")]
    server.routes["/data/images.tar"] = [redirect("/elsewhere/images.tar")]
    base = server.url.replace("://", "://me:s3cret@")
    assert_downloaded(run(tmp_path, base_urls=[base]))
    assert server.requests == ["/data/labels.gz", "/elsewhere/labels.gz", "/data/images.tar", "/elsewhere/images.tar"]
    authorization = "Basic " + base64.b64encode(b"me:s3cret").decode()
    assert [h.get("Authorization") for h in server.headers] == [authorization, None, authorization, None]
    assert "s3cret" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "location, expected",
    [
        ("/data/labels.gz", "HTTP 302 The HTTP server returned a redirect error that would lead to an infinite loop."),
        (
            "ftp://127.0.0.1/labels.gz?token=t0ken",
            "HTTP 302 Found, to 'ftp://127.0.0.1/labels.gz?token=***': not an http or https URL",
        ),
        ("file:///etc/passwd", "HTTP 302"),
    ],
    ids=["loop", "ftp", "file"],
)
def test_bad_redirects_fail_in_one_line(tmp_path, server, location, expected):
    server.routes["/data/labels.gz"] = [redirect(location)]
    message = assert_fails(tmp_path, f"{server.url}/labels.gz: {expected}", base_urls=[server.url])
    assert len(message.splitlines()) == 2  # "could not be obtained from any source:" and this source's line
    assert "t0ken" not in message


def test_credentials_and_tokens_never_printed(tmp_path, server, capsys):
    authorization = "Basic " + base64.b64encode(b"me:s3cret").decode()

    def guarded(data: bytes):
        def respond(handler):
            ok = handler.headers.get("Authorization") == authorization
            handler.send_response(200 if ok else 401)
            handler.send_header("Content-Length", str(len(data) if ok else 0))
            handler.end_headers()
            handler.wfile.write(data if ok else b"")

        return respond

    server.routes[f"/m/{DATASET}/labels.gz"] = [guarded(gz(b"a bad copy"))]
    server.routes["/data/labels.gz"] = [guarded(GOOD_FILES["labels.gz"])]
    mirror = f"{server.root.replace('://', '://me:s3cret@')}/m?token=t0ken&X-Amz-Signature=s1g"
    official = f"{server.url.replace('://', '://me:s3cret@')}?token=t0ken"
    message = assert_fails(
        tmp_path,
        f"  {server.url.replace('://', '://***@')}/images.tar?token=***: HTTP 404",
        base_urls=[official],
        mirror=mirror,
    )
    out, err = capsys.readouterr()
    assert "from http://***@127.0.0.1:" in out and "/data/labels.gz?token=***" in out
    assert f"/m/{DATASET}/labels.gz?token=***&X-Amz-Signature=*** served a bad copy" in err
    assert server.requests[:2] == [f"/m/{DATASET}/labels.gz", "/data/labels.gz"]
    for text in (message, out, err):
        assert "s3cret" not in text and "t0ken" not in text and "s1g" not in text


# ------------------------------------------------------------------------------------------ command line


def test_main(tmp_path, monkeypatch, capsys):
    make_source(tmp_path / "mirror" / DATASET, GOOD_FILES)
    manifest = write_manifest(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dl, "CHECKSUMS_DIR", manifest.parent)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({DATASET: {"download": {"base_urls": [], "retries": 1}}}))

    monkeypatch.setenv(dl.MIRROR_ENV, "mirror")
    assert run_stage(dl.download_stage, [DATASET]) == 0
    assert_downloaded(tmp_path / "data" / "raw" / DATASET)

    monkeypatch.setenv(dl.MIRROR_ENV, "elsewhere")
    assert run_stage(dl.download_stage, [DATASET]) == 1
    err = capsys.readouterr().err
    assert err.startswith("download toy: error: labels.gz: could not be obtained from any source:\n  file://")
    assert "Traceback" not in err
