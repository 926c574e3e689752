"""The download stage, on tiny files of every kind made here (plain files in folders, gzip files, tar, compressed
tar and zip archives), served from directories and HTTP, and on hostile ones: decompression bombs, sparse,
oversized, linked, encrypted and escaping members, servers that drip, hang, never end or redirect, URLs with
credentials. A copy is refused by its whole-file sha256 before anything is decompressed; a copy that the
manifest accepts (as if it had been edited by hand) still has its members checked and its unpacking capped."""

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

from pipeline import archives, fetch
from pipeline import download as dl
from pipeline.archives import list_files
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


def entry(*copies: bytes, size: int | None = None) -> dict:
    """The manifest entry of a file whose accepted copies are ``copies``; ``size``: what it unpacks to."""
    return {"copies": {sha(data): len(data) for data in copies}, **({} if size is None else {"size": size})}


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


GOOD_MEMBERS = {"a.ppm.gz": gz(IMAGE), "b.ppm.gz": gz(MASK)}
GOOD_FILES = {"labels.gz": gz(LABELS), "images.tar": tar(GOOD_MEMBERS)}
MANIFEST = {
    "files": {
        "labels.gz": entry(GOOD_FILES["labels.gz"], size=len(LABELS)),
        "images.tar": entry(GOOD_FILES["images.tar"], size=len(IMAGE) + len(MASK)),  # its gzip members' content
    }
}


def manifest_with(**files: dict) -> dict:
    """MANIFEST with some files' entries replaced."""
    return {"files": {**MANIFEST["files"], **files}}


def accepting(manifest: dict, name: str, data: bytes) -> dict:
    """``manifest`` with ``data`` an accepted copy of ``name`` too, as a hand-edited manifest might say."""
    files = json.loads(json.dumps(manifest["files"]))
    files[name]["copies"][sha(data)] = len(data)
    return {"files": files}


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_BACKOFF_S", 0.0)


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


def bad_copy(name: str, served: bytes, good: bytes) -> str:
    """What refuses a copy that is not the accepted one: its length, where it is longer, else its sha256."""
    if len(served) > len(good):
        return f"{Path(name).name}: more than the {len(good):,} bytes the manifest allows (stopped there)"
    return f"{name}: sha256 is {sha(served)}, expected {sha(good)}"


@pytest.fixture
def decompressed(monkeypatch) -> list[str]:
    """The sha256 of every file that the download stage decompresses, recorded as it starts to; and no
    decompressor (gzip, tarfile, zipfile) may be opened anywhere else."""
    seen, inside = [], []
    unpacked_size = archives.unpacked_size

    def spy(path, name, limit=None):
        seen.append(sha(Path(path).read_bytes()))
        inside.append(True)
        try:
            return unpacked_size(path, name, limit)
        finally:
            inside.pop()

    def guarded(opener, mode_at: int):
        def open_only_inside(*args, **kwargs):
            mode = kwargs.get("mode", args[mode_at] if len(args) > mode_at else "r")
            assert inside or not mode.startswith("r"), "a file was decompressed outside the check of a verified copy"
            return opener(*args, **kwargs)

        return open_only_inside

    monkeypatch.setattr(archives, "unpacked_size", spy)
    monkeypatch.setattr(archives.gzip, "GzipFile", guarded(gzip.GzipFile, 1))  # (filename, mode, ...)
    monkeypatch.setattr(archives.tarfile, "open", guarded(tarfile.open, 1))
    monkeypatch.setattr(archives.zipfile, "ZipFile", guarded(zipfile.ZipFile, 1))
    return seen


# ------------------------------------------------------------------------------------------ local sources


def test_relative_directory_mirror(tmp_path, monkeypatch, capsys):
    make_source(tmp_path / "mirror" / DATASET, GOOD_FILES)
    monkeypatch.chdir(tmp_path)
    assert_downloaded(run(tmp_path, base_urls=[], mirror="mirror"))
    assert f"labels.gz: 31 bytes verified, from file://{tmp_path}/mirror/{DATASET}/labels.gz" in capsys.readouterr().out


def test_file_url_mirror(tmp_path):
    make_source(tmp_path / "mirror" / DATASET, GOOD_FILES)
    assert_downloaded(run(tmp_path, base_urls=[], mirror=(tmp_path / "mirror").as_uri()))


def test_falls_back_to_next_source_when_a_file_is_corrupt_and_warns(tmp_path, capsys, decompressed):
    mirror = make_source(tmp_path / "mirror" / DATASET, {**GOOD_FILES, "labels.gz": gz(b"other bytes")})
    official = make_source(tmp_path / "official", GOOD_FILES)
    assert_downloaded(run(tmp_path, base_urls=[official.as_uri()], mirror=str(tmp_path / "mirror")))
    out, err = capsys.readouterr()
    assert f"labels.gz: 31 bytes verified, from {official.as_uri()}/labels.gz" in out
    assert f"images.tar: {len(GOOD_FILES['images.tar']):,} bytes verified, from file://{tmp_path}/mirror/" in out
    assert err == (
        f"download {DATASET}: warning: labels.gz: {mirror.as_uri()}/labels.gz served a bad copy "
        f"({bad_copy('labels.gz', gz(b'other bytes'), GOOD_FILES['labels.gz'])}); "
        f"used the copy from {official.as_uri()}/labels.gz\n"
    )
    assert sorted(decompressed) == sorted(map(sha, GOOD_FILES.values()))  # the bad copy was never decompressed


def test_every_accepted_copy_is_accepted(tmp_path, capsys):
    """A mirror that re-gzips and repacks serves other bytes with the same content: listed, they are kept."""
    mirrored = {"labels.gz": gzip.compress(LABELS, compresslevel=1, mtime=1), "images.tar": tar(GOOD_MEMBERS)[:-512]}
    manifest = accepting(accepting(MANIFEST, "labels.gz", mirrored["labels.gz"]), "images.tar", mirrored["images.tar"])
    make_source(tmp_path / "mirror" / DATASET, mirrored)
    official = make_source(tmp_path / "official", GOOD_FILES)
    assert_downloaded(run(tmp_path, [official.as_uri()], str(tmp_path / "mirror"), manifest), mirrored)
    assert capsys.readouterr().err == ""


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
        f"sha256 is {sha(gz(b'other bytes'))}, expected {sha(GOOD_FILES['labels.gz'])}",
        base_urls=[source.as_uri()],
    )


@pytest.mark.parametrize(
    "data", [gz(LABELS[:-1]), GOOD_FILES["labels.gz"][:-6]], ids=["content-of-another-size", "truncated-gzip"]
)
def test_a_gzip_file_of_other_bytes_is_refused_before_it_is_decompressed(tmp_path, data, decompressed):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": data})
    assert_fails(tmp_path, bad_copy("labels.gz", data, GOOD_FILES["labels.gz"]), base_urls=[source.as_uri()])
    assert decompressed == []


@pytest.mark.parametrize(
    "data, expected",
    [
        (gz(LABELS + b"!"), "labels.gz: decompresses to more than 11 bytes (stopped there)"),
        (GOOD_FILES["labels.gz"][:-6], "labels.gz: not a valid gzip file (Compressed file ended before the end"),
        (b"not gzip", "labels.gz: not a valid gzip file (Not a gzipped file (b'no'))"),
    ],
    ids=["longer", "truncated", "not-gzip"],
)
def test_an_accepted_gzip_file_must_still_unpack_within_its_size(tmp_path, data, expected):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": data})
    assert_fails(tmp_path, expected, base_urls=[source.as_uri()], manifest=accepting(MANIFEST, "labels.gz", data))


def test_a_failure_leaves_an_existing_output_as_it_was(tmp_path):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": b"not a tar"})
    old = tmp_path / "data" / "raw" / DATASET / "old.gz"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    with pytest.raises(dl.DownloadError, match="images.tar: not a valid tar archive"):
        run(tmp_path, base_urls=[source.as_uri()], manifest=accepting(MANIFEST, "images.tar", b"not a tar"))
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
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": repacked})
    assert_fails(
        tmp_path,
        f"images.tar: sha256 is {sha(repacked)}, expected {sha(GOOD_FILES['images.tar'])}",
        base_urls=[source.as_uri()],
    )


BAD_TARS = {  # id: (members, symlinks, what refuses the copy when the manifest accepts it; None: nothing)
    "missing": ({"a.ppm.gz": gz(IMAGE)}, {}, None),
    "extra": ({**GOOD_MEMBERS, "c.ppm.gz": gz(b"c")}, {}, "images.tar: decompresses to more than 27 bytes"),
    "duplicate": (
        {"./a.ppm.gz": gz(IMAGE), "b.ppm.gz": gz(MASK), "a.ppm.gz": gz(IMAGE)},
        {},
        "images.tar: member 'a.ppm.gz' appears twice",
    ),
    "other-size": ({**GOOD_MEMBERS, "b.ppm.gz": gz(b"other")}, {}, None),
    "corrupt": ({**GOOD_MEMBERS, "b.ppm.gz": gz(b"P5 mask byteZ")}, {}, None),
    "not-gzip": ({**GOOD_MEMBERS, "b.ppm.gz": b"not gzip"}, {}, "images.tar: member b.ppm.gz: not a valid gzip file"),
    "dotdot": ({**GOOD_MEMBERS, "../x": gz(b"x")}, {}, "images.tar: refusing member '../x': absolute or escaping path"),
    "absolute": (
        {**GOOD_MEMBERS, "/etc/x": gz(b"x")},
        {},
        "images.tar: refusing member '/etc/x': absolute or escaping path",
    ),
    "symlink": (GOOD_MEMBERS, {"c.ppm.gz": "a.ppm.gz"}, "images.tar: refusing member 'c.ppm.gz': not a regular file"),
}


@pytest.mark.parametrize("members, symlinks, _", BAD_TARS.values(), ids=BAD_TARS.keys())
def test_bad_tar_archives_are_refused_before_anything_is_decompressed(tmp_path, members, symlinks, _, decompressed):
    bad = tar(members, symlinks)
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": bad})
    expected = bad_copy("images.tar", bad, GOOD_FILES["images.tar"])
    assert_fails(tmp_path, "images.tar: could not be obtained", expected, base_urls=[source.as_uri()])
    assert sha(bad) not in decompressed


@pytest.mark.parametrize("members, symlinks, expected", BAD_TARS.values(), ids=BAD_TARS.keys())
def test_a_bad_tar_the_manifest_accepts_is_still_refused_by_its_members(tmp_path, members, symlinks, expected):
    bad = tar(members, symlinks)
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": bad})
    manifest = accepting(MANIFEST, "images.tar", bad)
    if expected is None:  # nothing wrong with it but that it is not the file: the manifest says it is
        assert_downloaded(run(tmp_path, [source.as_uri()], manifest=manifest), {**GOOD_FILES, "images.tar": bad})
        return
    assert_fails(
        tmp_path, "images.tar: could not be obtained", expected, base_urls=[source.as_uri()], manifest=manifest
    )


def test_a_compressed_tar_is_refused(tmp_path):
    compressed = gz(GOOD_FILES["images.tar"])
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": compressed})
    assert_fails(tmp_path, bad_copy("images.tar", compressed, GOOD_FILES["images.tar"]), base_urls=[source.as_uri()])
    manifest = accepting(MANIFEST, "images.tar", compressed)  # a .tar is read as a tar, whatever its bytes
    assert_fails(tmp_path, "images.tar: not a valid tar archive", base_urls=[source.as_uri()], manifest=manifest)


# ------------------------------------------------------------------------------------------ every kind of file

PNG, MASK_PNG, NOTES = b"\x89PNG scan 1", b"\x89PNG mask 1", b"notes"
B_TAR, C_TAR = tar({"x/m.png": MASK, "y.ppm.gz": gz(IMAGE)}), tar({"m.png": MASK})
# One file of each kind, in folders, a name with a space (quoted in URLs), members in folders, a zip folder entry.
KINDS = {
    "images/scan 1.png": PNG,
    "images/masks/0001_mask.png": MASK_PNG,
    "labels.gz": gz(LABELS),
    "archives/plain.tar": tar({"a.ppm.gz": gz(IMAGE), "sub/b.txt": NOTES}),
    "b.tar.gz": gz(B_TAR),
    "c.TGZ": gz(C_TAR),
    "d.zip": zip_bytes({"inner/m.png": MASK, "inner/g.ppm.gz": gz(IMAGE)}, folders=("inner/",)),
}
# size: what a decompressor outputs -- a gzip file's or member's content, a compressed tar's tar, a zip's members.
SIZES = {
    "labels.gz": len(LABELS),
    "archives/plain.tar": len(IMAGE),
    "b.tar.gz": len(B_TAR) + len(IMAGE),
    "c.TGZ": len(C_TAR),
    "d.zip": len(MASK) + len(gz(IMAGE)) + len(IMAGE),
}
KINDS_MANIFEST = {"files": {name: entry(KINDS[name], size=SIZES.get(name)) for name in sorted(KINDS)}}


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


WRONG_BYTES = {  # id: (file, its bytes) -- each refused by its sha256, whatever member the byte is in
    "plain": ("images/scan 1.png", flip(PNG)),
    "gzip": ("labels.gz", gz(flip(LABELS))),
    "tar-plain": ("archives/plain.tar", tar({"a.ppm.gz": gz(IMAGE), "sub/b.txt": flip(NOTES)})),
    "tar-gzip": ("archives/plain.tar", tar({"a.ppm.gz": gz(flip(IMAGE)), "sub/b.txt": NOTES})),
    "tar-size": ("archives/plain.tar", tar({"a.ppm.gz": gz(IMAGE), "sub/b.txt": NOTES + b"!"})),
    "tgz-plain": ("b.tar.gz", gz(tar({"x/m.png": flip(MASK), "y.ppm.gz": gz(IMAGE)}))),
    "tgz-gzip": ("b.tar.gz", gz(tar({"x/m.png": MASK, "y.ppm.gz": gz(flip(IMAGE))}))),
    "tgz-crc": ("b.tar.gz", flip(KINDS["b.tar.gz"][:-4]) + KINDS["b.tar.gz"][-4:]),  # the gzip trailer's CRC-32
    "tgz-suffix": ("c.TGZ", gz(tar({"m.png": flip(MASK)}))),
    "zip-plain": ("d.zip", zip_bytes({"inner/m.png": flip(MASK), "inner/g.ppm.gz": gz(IMAGE)})),
    "zip-gzip": ("d.zip", zip_bytes({"inner/m.png": MASK, "inner/g.ppm.gz": gz(flip(IMAGE))})),
    "zip-size": ("d.zip", zip_bytes({"inner/m.png": MASK + b"!", "inner/g.ppm.gz": gz(IMAGE)})),
}


@pytest.mark.parametrize("name, data", WRONG_BYTES.values(), ids=WRONG_BYTES.keys())
def test_a_wrong_byte_is_refused_naming_the_file(tmp_path, name, data, decompressed):
    source = make_source(tmp_path / "source", {**KINDS, name: data})
    url = f"{source.as_uri()}/{name.replace(' ', '%20')}"
    assert_fails(
        tmp_path,
        f"{name}: could not be obtained from any source:\n  {url}: {bad_copy(name, data, KINDS[name])}",
        base_urls=[source.as_uri()],
        manifest=KINDS_MANIFEST,
    )
    assert sha(data) not in decompressed


def test_a_longer_file_is_cut_at_its_largest_accepted_copy(tmp_path):
    source = make_source(tmp_path / "source", {**KINDS, "images/scan 1.png": PNG + b"x"})
    assert_fails(
        tmp_path,
        "scan 1.png: more than the 11 bytes the manifest allows (stopped there)",
        base_urls=[source.as_uri()],
        manifest=KINDS_MANIFEST,
    )


GOOD_ZIP = {"inner/m.png": MASK, "inner/g.ppm.gz": gz(IMAGE)}
BAD_ZIPS = {  # id: (archive, what refuses it when the manifest accepts it; None: nothing)
    "missing": (zip_bytes({"inner/m.png": MASK}), None),
    "extra": (zip_bytes({**GOOD_ZIP, "c.png": b"c"}), f"d.zip: decompresses to more than {SIZES['d.zip']} bytes"),
    "duplicate": (zip_with_duplicate("inner/m.png", MASK, MASK), "d.zip: member 'inner/m.png' appears twice"),
    "dotdot": (zip_bytes({**GOOD_ZIP, "../x": b"x"}), "d.zip: refusing member '../x': absolute or escaping path"),
    "absolute": (zip_bytes({**GOOD_ZIP, "/etc/x": b"x"}), "d.zip: refusing member '/etc/x': absolute or escaping"),
    "backslash": (zip_bytes({**GOOD_ZIP, "inner\\x": b"x"}), "d.zip: refusing member 'inner\\\\x': absolute or"),
    "symlink": (
        zip_bytes(GOOD_ZIP, symlinks={"inner/l.png": "/etc/passwd"}),
        "d.zip: refusing member 'inner/l.png': a symbolic link",
    ),
    "encrypted": (
        zip_patched(zip_bytes(GOOD_ZIP), "inner/m.png", flag_bits=1),
        "d.zip: refusing member 'inner/m.png': encrypted",
    ),
    "bzip2": (
        zip_bytes(GOOD_ZIP, compression=zipfile.ZIP_BZIP2),
        "d.zip: refusing member 'inner/m.png': compression method 12 (only stored and deflated members are read)",
    ),
    "truncated": (zip_bytes(GOOD_ZIP)[:-30], "d.zip: not a valid zip archive"),
    "a-tar": (tar(GOOD_ZIP), "d.zip: not a valid zip archive"),
}


@pytest.mark.parametrize("archive, _", BAD_ZIPS.values(), ids=BAD_ZIPS.keys())
def test_bad_zip_archives_are_refused_before_anything_is_decompressed(tmp_path, archive, _, decompressed):
    source = make_source(tmp_path / "source", {**KINDS, "d.zip": archive})
    expected = bad_copy("d.zip", archive, KINDS["d.zip"])
    assert_fails(
        tmp_path, "d.zip: could not be obtained", expected, base_urls=[source.as_uri()], manifest=KINDS_MANIFEST
    )
    assert sha(archive) not in decompressed


@pytest.mark.parametrize("archive, expected", BAD_ZIPS.values(), ids=BAD_ZIPS.keys())
def test_a_bad_zip_the_manifest_accepts_is_still_refused_by_its_members(tmp_path, archive, expected):
    source = make_source(tmp_path / "source", {**KINDS, "d.zip": archive})
    manifest = accepting(KINDS_MANIFEST, "d.zip", archive)
    if expected is None:
        assert_downloaded(run(tmp_path, [source.as_uri()], manifest=manifest), {**KINDS, "d.zip": archive})
        return
    assert_fails(tmp_path, "d.zip: could not be obtained", expected, base_urls=[source.as_uri()], manifest=manifest)


def test_a_stored_zip_is_read_as_a_deflated_one(tmp_path):
    stored = zip_bytes(GOOD_ZIP, compression=zipfile.ZIP_STORED)
    source = make_source(tmp_path / "source", {**KINDS, "d.zip": stored})
    run(tmp_path, base_urls=[source.as_uri()], manifest=accepting(KINDS_MANIFEST, "d.zip", stored))


def test_a_zip_with_a_padded_central_directory_is_refused_before_zipfile_reads_it(tmp_path, decompressed):
    folders = tuple(f"folder{i:04}/" for i in range(200))  # 200 entries that no member needs: 11 KB of directory
    padded = zip_bytes(GOOD_ZIP, folders=folders)
    source = make_source(tmp_path / "source", {**KINDS, "d.zip": padded})
    expected = bad_copy("d.zip", padded, KINDS["d.zip"])
    assert_fails(tmp_path, expected, base_urls=[source.as_uri()], manifest=KINDS_MANIFEST)
    assert sha(padded) not in decompressed


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


def peak_memory(function) -> int:
    """The most memory Python held while ``function`` ran (its allocations, bytes objects from zlib included)."""
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


BIG = bytes(range(256)) * 4096  # 1 MiB of content


def test_a_gzip_bomb_is_cut_at_the_largest_accepted_copy_before_it_is_decompressed(tmp_path, gzip_bomb, decompressed):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": gzip_bomb})
    assert_fails(
        tmp_path,
        f"{source.as_uri()}/labels.gz: labels.gz: more than the 31 bytes the manifest allows (stopped there)",
        base_urls=[source.as_uri()],
    )
    assert decompressed == []


def test_an_accepted_gzip_bomb_stops_at_the_manifests_size(tmp_path, gzip_bomb):
    source = make_source(tmp_path / "source", {**GOOD_FILES, "labels.gz": gzip_bomb})
    manifest = manifest_with(**{"labels.gz": entry(gzip_bomb, size=len(BIG))})
    peak = peak_memory(
        lambda: assert_fails(
            tmp_path,
            f"{source.as_uri()}/labels.gz: labels.gz: decompresses to more than 1,048,576 bytes (stopped there)",
            base_urls=[source.as_uri()],
            manifest=manifest,
        )
    )
    assert peak < 16 << 20, f"{peak:,} bytes"


def test_an_accepted_gzip_bomb_inside_a_tar_stops_at_the_manifests_size(tmp_path, gzip_bomb):
    bombed = tar({**GOOD_MEMBERS, "a.ppm.gz": gzip_bomb})
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": bombed})
    manifest = manifest_with(**{"images.tar": entry(bombed, size=len(BIG))})
    peak = peak_memory(
        lambda: assert_fails(
            tmp_path,
            "images.tar: decompresses to more than 1,048,576 bytes (stopped there)",
            base_urls=[source.as_uri()],
            manifest=manifest,
        )
    )
    assert peak < 16 << 20, f"{peak:,} bytes"


def test_the_manifests_bytes_bound_the_download(tmp_path):
    source = make_source(tmp_path / "source", GOOD_FILES)
    manifest = manifest_with(**{"labels.gz": {"copies": {sha(GOOD_FILES["labels.gz"]): 30}, "size": len(LABELS)}})
    assert_fails(
        tmp_path,
        "labels.gz: more than the 30 bytes the manifest allows (stopped there)",
        base_urls=[source.as_uri()],
        manifest=manifest,
    )


def huge_member_tar(name: str, claimed: int) -> bytes:
    """A member header claiming ``claimed`` bytes, followed by only a few: reading the body would fail."""
    info = tarfile.TarInfo(name)
    info.size = claimed
    return info.tobuf(format=tarfile.GNU_FORMAT) + gz(IMAGE)


HEADERS = {  # id: (the tar, what refuses it when the manifest accepts it)
    "sparse-listed": (sparse_tar("a.ppm.gz", 3 << 30), "images.tar: refusing member 'a.ppm.gz': a sparse file"),
    "sparse-unlisted": (sparse_tar("evil.gz", 3 << 30), "images.tar: refusing member 'evil.gz': a sparse file"),
    "huge-header": (
        huge_member_tar("a.ppm.gz", 3 << 30),
        "images.tar: member a.ppm.gz: not a valid gzip file (unexpected end of data)",
    ),
    "huge-header-unlisted": (
        huge_member_tar("evil.txt", 3 << 30),
        "images.tar: not a valid tar archive (unexpected end",
    ),
}


@pytest.mark.parametrize("bad, expected", HEADERS.values(), ids=HEADERS.keys())
def test_a_tar_member_claiming_gigabytes_is_refused_in_bounded_memory(tmp_path, bad, expected, decompressed):
    # 2 KiB of archive whose member claims 3 GiB: read, it would be 3 GiB of zeros.
    source = make_source(tmp_path / "source", {**GOOD_FILES, "images.tar": bad})
    assert_fails(tmp_path, bad_copy("images.tar", bad, GOOD_FILES["images.tar"]), base_urls=[source.as_uri()])
    assert decompressed == [sha(GOOD_FILES["labels.gz"])]  # labels.gz comes first; images.tar never decompressed
    manifest = accepting(MANIFEST, "images.tar", bad)
    peak = peak_memory(lambda: assert_fails(tmp_path, expected, base_urls=[source.as_uri()], manifest=manifest))
    assert peak < 8 << 20, f"{peak:,} bytes"


def test_zip_bomb_is_refused_by_its_length_and_an_accepted_one_by_its_directory(tmp_path, decompressed):
    """128 MiB of zeros in one member: not the listed copy, it is cut at the listed length; accepted by a hand-edited
    manifest, it declares more than the manifest's size, and is refused before a byte of it is inflated."""
    bomb = write_zip_bomb(tmp_path / "bomb.zip", "inner/m.png", 128 << 20).read_bytes()
    source = make_source(tmp_path / "source", {**KINDS, "d.zip": bomb})
    listed = f"{len(KINDS['d.zip']):,} bytes the manifest allows (stopped there)"
    assert_fails(tmp_path, f"d.zip: more than the {listed}", base_urls=[source.as_uri()], manifest=KINDS_MANIFEST)
    assert sha(bomb) not in decompressed
    manifest = accepting(KINDS_MANIFEST, "d.zip", bomb)
    expected = f"d.zip: decompresses to more than {SIZES['d.zip']} bytes (stopped there)"
    peak = peak_memory(lambda: assert_fails(tmp_path, expected, base_urls=[source.as_uri()], manifest=manifest))
    assert peak < 8 << 20, f"{peak:,} bytes"


def test_tar_gz_bomb_is_never_inflated_past_its_tar(tmp_path):
    """A good tar, then 128 MiB of zeros in the same gzip stream: not the listed copy, cut at its length; accepted,
    read to the tar's end and no further, in bounded memory."""
    bomb = write_tar_gz_bomb(tmp_path / "bomb.tar.gz", B_TAR, 128 << 20).read_bytes()
    source = make_source(tmp_path / "source", {**KINDS, "b.tar.gz": bomb})
    listed = f"{len(KINDS['b.tar.gz']):,} bytes the manifest allows (stopped there)"
    assert_fails(tmp_path, f"b.tar.gz: more than the {listed}", base_urls=[source.as_uri()], manifest=KINDS_MANIFEST)
    manifest = accepting(KINDS_MANIFEST, "b.tar.gz", bomb)
    start = time.monotonic()
    peak = peak_memory(lambda: run(tmp_path, [source.as_uri()], manifest=manifest))
    assert peak < 8 << 20, f"{peak:,} bytes"
    assert time.monotonic() - start < 10  # inflating the 128 MiB would take longer


def test_a_tar_gz_whose_member_claims_gigabytes_is_refused_before_it_is_inflated(tmp_path, decompressed):
    bad = gz(huge_member_tar("x/m.png", 3 << 30))
    source = make_source(tmp_path / "source", {**KINDS, "b.tar.gz": bad})
    expected = bad_copy("b.tar.gz", bad, KINDS["b.tar.gz"])
    assert_fails(tmp_path, expected, base_urls=[source.as_uri()], manifest=KINDS_MANIFEST)
    assert sha(bad) not in decompressed
    manifest = accepting(KINDS_MANIFEST, "b.tar.gz", bad)  # accepted: its body is read, and found missing
    peak = peak_memory(
        lambda: assert_fails(
            tmp_path, "b.tar.gz: not a valid tar archive", base_urls=[source.as_uri()], manifest=manifest
        )
    )
    assert peak < 8 << 20, f"{peak:,} bytes"


def test_an_accepted_zip_whose_member_inflates_past_its_declared_size_fails_its_crc_in_bounded_memory(tmp_path):
    """A member whose directory entry declares the listed 1 MiB but whose data inflates to 128 MiB: zipfile
    stops at the declared size, where its CRC-32 fails."""
    bomb = write_zip_bomb(tmp_path / "bomb.zip", "inner/m.png", 128 << 20)
    hostile = zip_patched(bomb.read_bytes(), "inner/m.png", file_size=len(BIG))
    source = make_source(tmp_path / "source", {"d.zip": hostile})
    manifest = {"files": {"d.zip": entry(hostile, size=len(BIG))}}
    expected = "d.zip: not a valid zip archive (Bad CRC-32 for file 'inner/m.png')"
    peak = peak_memory(lambda: assert_fails(tmp_path, expected, base_urls=[source.as_uri()], manifest=manifest))
    assert peak < 16 << 20, f"{peak:,} bytes"


# ------------------------------------------------------------------------------------------ manifests

H0 = "0" * 64


@pytest.mark.parametrize(
    "manifest, expected",
    [
        ({}, "expected a non-empty mapping"),
        ({"files": {}}, "files: expected a non-empty mapping"),
        ({"files": MANIFEST["files"], "members": {}}, "unknown key 'members' for a manifest (known: files)"),
        (
            {"files": {"a.gz": {"copies": {"abc": 1}, "size": 1}}},
            "files.a.gz.copies: 'abc' is not a sha256 (64 lowercase hex digits)",
        ),
        (
            {"files": {"a.tar": {"copies": {H0: 1}, "size": 1, "members": {}}}},
            "files.a.tar: unknown key 'members' for a tar archive, as its name says (known: copies, size)",
        ),
        (
            {"files": {"a.tar": {"copies": {H0: 1}, "gunzip_sha256": H0}}},
            "files.a.tar: unknown key 'gunzip_sha256' for a tar archive",
        ),
        ({"files": {"a.gz": {"copies": {}, "size": 1}}}, "files.a.gz.copies: expected a non-empty mapping"),
        ({"files": {"a.gz": {"copies": [H0], "size": 1}}}, "files.a.gz.copies: expected a non-empty mapping"),
        (
            {"files": {"../a.gz": {"copies": {H0: 1}, "size": 1}}},
            "files: '../a.gz' is not a relative path inside the dataset's directory",
        ),
        ({"files": {"a.gz": {"copies": {H0: 1}}}}, "files.a.gz: missing 'size'"),
        (
            {"files": {"a.gz": {"copies": {H0: 1}, "size": -1}}},
            "files.a.gz.size: expected a whole number of bytes >= 0, got -1",
        ),
        ({"files": {"a.gz": {"copies": {H0: 1}, "size": True}}}, "files.a.gz.size: expected a whole number"),
        (
            {"files": {"a.gz": {"copies": {H0: -1}, "size": 1}}},
            f"files.a.gz.copies.{H0}: expected a whole number of bytes >= 0, got -1",
        ),
        ({"files": {"a.gz": {"copies": {H0: "1"}, "size": 1}}}, f"files.a.gz.copies.{H0}: expected a whole number"),
        # Names with folders: relative POSIX paths in normal form, nothing that could leave the output directory.
        (
            {"files": {"images/../../a.png": entry(b"a")}},
            "files: 'images/../../a.png' is not a relative path inside the dataset's directory",
        ),
        ({"files": {"images/../a.png": entry(b"a")}}, "files: 'images/../a.png' is not a relative path inside"),
        ({"files": {"/etc/a.png": entry(b"a")}}, "files: '/etc/a.png' is not a relative path inside"),
        ({"files": {"images\\a.png": entry(b"a")}}, "is not a relative path inside"),
        ({"files": {"./images/a.png": entry(b"a")}}, "files: './images/a.png' is not in normal form ('images/a.png')"),
        ({"files": {"images//a.png": entry(b"a")}}, "files: 'images//a.png' is not in normal form ('images/a.png')"),
        ({"files": {"images/": entry(b"a")}}, "files: 'images/' is not in normal form ('images')"),
        (
            {"files": {"images": entry(b"a"), "images/a.png": entry(b"a")}},
            "files.images/a.png: 'images' is listed as a file, so it cannot be a folder",
        ),
        # What an entry needs follows from its name.
        ({"files": {"a.png": {"size": 1}}}, "files.a.png: unknown key 'size' for a plain file, as its name says"),
        ({"files": {"a.png": {"sha256": H0, "bytes": 1}}}, "files.a.png: unknown key 'bytes' for a plain file"),
        ({"files": {"a.zip": entry(b"a")}}, "files.a.zip: missing 'size'"),
        ({"files": {"a.TGZ": entry(b"a")}}, "files.a.TGZ: missing 'size'"),
        ({"files": {"a.png": {}}}, "files.a.png: expected a non-empty mapping"),
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


@pytest.mark.parametrize("dataset, copies", [("mnist", [2, 2, 2, 2]), ("stare", [2, 1, 1])])
def test_shipped_manifests_list_each_accepted_copy(dataset, copies):
    """MNIST: the official files and the shared mirror's re-gzipped ones; STARE: the official tars, and the
    mirror's repacked image tar (its label tars are the official files)."""
    files = dl.load_manifest(dl.CHECKSUMS_DIR / f"{dataset}.json")
    assert [len(entry["copies"]) for entry in files.values()] == copies


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
    with pytest.raises(StageError) as error:
        DownloadParams(**params).validate("toy.download")
    assert expected in str(error.value)


def test_backoff_doubles_up_to_a_cap(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_BACKOFF_S", 1.0)
    assert [fetch.backoff_s(attempt) for attempt in range(1, 11)] == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]


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
    assert {h.get("Accept-Encoding") for h in server.headers} == {"identity"}  # the bytes as stored, not re-encoded


def test_a_content_encoding_is_not_undone(tmp_path, server, decompressed):
    """A server that gzips its answer serves other bytes than the file's: a bad copy, never inflated here."""
    sent = gz(GOOD_FILES["labels.gz"])

    def encoded(handler):
        handler.send_response(200)
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(sent)))
        handler.end_headers()
        handler.wfile.write(sent)

    server.routes["/data/labels.gz"] = [encoded]
    assert_fails(
        tmp_path, f"labels.gz: the server announces {len(sent)} bytes, more than the 31", base_urls=[server.url]
    )
    assert decompressed == []


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
        b"HTTP/1.0 200 OK\r\nContent-Length: 30\r\n\r\n",  # the body drips: 3 s for 30 bytes
        b"HTTP/1.0 200 OK\r\nX-Slow: ",  # a header drips: the parser waits for the header's end, whatever it takes
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
    """The handshake happens inside the connection's set-up, before the client hands anything back: the deadline
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
    limit = len(GOOD_FILES["labels.gz"])  # the largest accepted copy
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
        handler.send_header("Content-Length", "30")
        handler.end_headers()
        handler.wfile.write(b"0123456789")

    server.routes["/data/labels.gz"] = [short]
    assert_fails(
        tmp_path,
        "labels.gz: the connection closed after 10 of 30 bytes (after 2 attempts)",
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
        ("/data/labels.gz", "more than 10 redirects"),
        (
            "ftp://127.0.0.1/labels.gz?token=t0ken",
            "HTTP 302 Found, to 'ftp://127.0.0.1/labels.gz?token=***': not an http or https URL",
        ),
        ("file:///etc/passwd", "HTTP 302 Found, to 'file:///etc/passwd': not an http or https URL"),
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
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({DATASET: {"download": {"base_urls": [], "retries": 1}}}))

    monkeypatch.setenv(dl.MIRROR_ENV, "mirror")
    assert run_stage(dl.download_stage, [DATASET]) == 0
    assert_downloaded(tmp_path / "data" / "raw" / DATASET)

    monkeypatch.setenv(dl.MIRROR_ENV, "elsewhere")
    assert run_stage(dl.download_stage, [DATASET]) == 1
    err = capsys.readouterr().err
    assert err.startswith("download toy: error: labels.gz: could not be obtained from any source:\n  file://")
    assert "Traceback" not in err
