"""pipeline/archives.py: bounded reads of gzip streams and tar, compressed tar and zip archives, within a budget of
what they may unpack to, and RawTree, the prepare stage's view of a downloaded directory."""

from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc

import pytest

from pipeline import archives
from pipeline.archives import ArchiveError, RawTree
from tests.synthetic import (
    sparse_tar,
    write_gzip_bomb,
    write_tar,
    write_tar_gz_bomb,
    write_zip_bomb,
    zip_bytes,
    zip_patched,
)
from tests.test_download import tar


def test_gunzip_chunks_read_what_gzip_decompress_reads():
    # Two concatenated gzip members with zero padding after them, as some tools write.
    data = gzip.compress(b"first ", mtime=0) + gzip.compress(b"second", mtime=0) + bytes(16)
    assert b"".join(archives.gunzip_chunks(io.BytesIO(data), "x.gz")) == b"first second"
    assert archives.gunzip(data, "x.gz") == b"first second"


def test_a_bomb_is_read_only_up_to_the_limit(tmp_path):
    bomb = write_gzip_bomb(tmp_path / "bomb.gz", 64 << 20)
    with open(bomb, "rb") as stream:
        with pytest.raises(ArchiveError, match="bomb.gz: decompresses to more than 3,000,000 bytes"):
            for _ in archives.gunzip_chunks(stream, "bomb.gz", archives.Budget("bomb.gz", 3_000_000)):
                pass
        # It stopped at the limit: 4 MiB of 64 inflated (4 chunks), with gzip's 8 KiB read-ahead.
        assert stream.tell() < bomb.stat().st_size / 4
    with pytest.raises(ArchiveError, match="^bomb.gz: decompresses to more than 3,000,000 bytes"):
        archives.unpacked_size(bomb, "bomb.gz", limit=3_000_000)
    assert archives.unpacked_size(bomb, "bomb.gz") == 64 << 20


def test_chunks_are_bounded():
    data = gzip.compress(bytes(5 * archives.CHUNK_SIZE + 3), mtime=0)
    sizes = [len(chunk) for chunk in archives.gunzip_chunks(io.BytesIO(data), "z.gz")]
    assert max(sizes) <= archives.CHUNK_SIZE and sum(sizes) == 5 * archives.CHUNK_SIZE + 3


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", None),  # an empty file holds no gzip member: empty content, as gzip.decompress says
        (b"plain text", "z.gz: not a valid gzip file"),
        (gzip.compress(b"abc" * 100)[:-4], "z.gz: not a valid gzip file"),
    ],
)
def test_invalid_gzip(tmp_path, data, expected):
    (tmp_path / "z.gz").write_bytes(data)
    if expected is None:
        assert archives.unpacked_size(tmp_path / "z.gz", "z.gz") == 0
        return
    with pytest.raises(ArchiveError, match=expected):
        archives.unpacked_size(tmp_path / "z.gz", "z.gz")


def test_a_sparse_member_is_refused_before_it_is_visited(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(sparse_tar("a.gz", 3 << 30))
    visited = []
    with pytest.raises(ArchiveError, match="s.tar: refusing member 'a.gz': a sparse file"):
        archives.walk_archive(path, archives.TAR, lambda name, size, body: visited.append(name))
    assert visited == []


@pytest.mark.parametrize(
    "name, kind",
    [
        ("a/b.png", archives.PLAIN),
        ("x/im.ppm.gz", archives.GZIP),
        ("x.tar", archives.TAR),
        ("x.tar.gz", archives.TAR_GZ),
        ("x.tgz", archives.TAR_GZ),
        ("X.TGZ", archives.TAR_GZ),
        ("x.zip", archives.ZIP),
        ("notes.txt", archives.PLAIN),
        ("x.gz.png", archives.PLAIN),
        ("x.targz", archives.PLAIN),
    ],
)
def test_the_kind_follows_from_the_name(name, kind):
    assert archives.file_kind(name) == kind


def peak_of(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_compressed_tar_is_inflated_no_further_than_its_end_in_bounded_memory(tmp_path):
    path = write_tar_gz_bomb(tmp_path / "b.tar.gz", b"", 256 << 20)  # no members: zero blocks, then zeros
    budget = archives.Budget("b.tar.gz")
    peak = peak_of(lambda: archives.walk_archive(path, archives.TAR_GZ, lambda *member: None, budget=budget))
    assert budget.used <= 2 * tarfile.RECORDSIZE  # the tar's first zero block ends it; the 256 MiB are never read
    assert peak < 8 << 20, f"{peak:,} bytes"


def test_a_compressed_tar_is_inflated_only_up_to_its_limit_in_bounded_memory(tmp_path):
    path = tmp_path / "b.tar.gz"
    path.write_bytes(gzip.compress(tar({"a.png": bytes(16 << 20)}), mtime=0))  # a member of 16 MiB of zeros
    budget = archives.Budget("b.tar.gz", 3_000_000)

    def walk():
        with pytest.raises(ArchiveError, match=r"^b.tar.gz: decompresses to more than 3,000,000 bytes \(stopped"):
            archives.walk_archive(path, archives.TAR_GZ, lambda *member: None, budget=budget)

    peak = peak_of(walk)
    assert budget.used <= 3_000_000 + tarfile.RECORDSIZE  # the record that crossed the limit, no further
    assert peak < 8 << 20, f"{peak:,} bytes"


def test_a_zip_member_is_read_only_as_far_as_it_declares(tmp_path):
    bomb = write_zip_bomb(tmp_path / "bomb.zip", "m.png", 256 << 20)
    (tmp_path / "lying.zip").write_bytes(zip_patched(bomb.read_bytes(), "m.png", file_size=1000))
    inflated = []

    def visit(name, size, body):
        while chunk := body.read(archives.CHUNK_SIZE):
            inflated.append(len(chunk))

    with pytest.raises(ArchiveError, match=r"lying.zip: not a valid zip archive \(Bad CRC-32 for file 'm.png'\)"):
        archives.walk_archive(tmp_path / "lying.zip", archives.ZIP, visit)
    assert sum(inflated) <= 1000  # zipfile stopped where the member said it ends, and the CRC-32 failed there


def test_a_zip_member_declaring_more_than_the_limit_is_refused_before_its_body_is_read(tmp_path):
    bomb = write_zip_bomb(tmp_path / "bomb.zip", "m.png", 256 << 20)
    visited = []
    with pytest.raises(ArchiveError, match=r"^bomb.zip: decompresses to more than 1,000 bytes \(stopped there\)$"):
        archives.unpacked_size(bomb, "bomb.zip", limit=1000)
    budget = archives.Budget("bomb.zip", 1000)
    with pytest.raises(ArchiveError, match="bomb.zip: decompresses to more than 1,000 bytes"):
        archives.walk_archive(bomb, archives.ZIP, lambda *member: visited.append(member), budget=budget)
    assert visited == []


def test_the_top_folder_of_a_tar_is_skipped(tmp_path):
    # `tar -C dir -cf x.tar .` writes "./" first, then "./a.png".
    with tarfile.open(tmp_path / "x.tar", "w") as archive:
        archive.add(tmp_path, arcname=".", recursive=False)
        info = tarfile.TarInfo("./a.png")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"a"))
    assert archives.read_tar_members(tmp_path / "x.tar") == {"a.png": b"a"}


# ------------------------------------------------------------------------------------------ RawTree


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def tar_gz(members: dict[str, bytes]) -> bytes:
    return gzip.compress(tar(members), mtime=0)


@pytest.fixture
def raw(tmp_path):
    """A downloaded directory holding a plain file in a folder, a gzip file, a zip with a folder in it, a tar of
    gzip members and a compressed tar."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "x").mkdir()
    (raw / "images" / "0001.png").write_bytes(b"png 1")
    (raw / "x" / "im.ppm.gz").write_bytes(gz(b"ppm"))
    (raw / "masks.zip").write_bytes(
        zip_bytes(
            {"masks/0001.png": b"mask 1", "masks/deep/0002.png": b"mask 2", "g.ppm.gz": gz(b"zipped ppm")},
            folders=("masks/", "masks/deep/"),
        )
    )
    write_tar(raw / "stare-images.tar", {"im0001.ppm.gz": gz(b"image 1"), "im0002.ppm.gz": gz(b"image 2")})
    (raw / "more.tar.gz").write_bytes(tar_gz({"a/b.png": b"b", "c.txt": b"c"}))
    return raw


def test_raw_tree_names_every_file_and_member(raw):
    assert RawTree(raw).names == [
        "images/0001.png",
        "masks.zip/g.ppm",
        "masks.zip/masks/0001.png",
        "masks.zip/masks/deep/0002.png",
        "more.tar.gz/a/b.png",
        "more.tar.gz/c.txt",
        "stare-images.tar/im0001.ppm",
        "stare-images.tar/im0002.ppm",
        "x/im.ppm",
    ]


def test_raw_tree_reads_what_it_is_asked_for_opening_each_archive_once(raw, monkeypatch):
    tree = RawTree(raw)
    opened = []
    walk = archives.walk_archive
    monkeypatch.setattr(archives, "walk_archive", lambda path, *a, **k: opened.append(path.name) or walk(path, *a, **k))
    wanted = [
        "stare-images.tar/im0002.ppm",
        "x/im.ppm",
        "masks.zip/masks/deep/0002.png",
        "images/0001.png",
        "stare-images.tar/im0001.ppm",
        "masks.zip/g.ppm",
        "more.tar.gz/a/b.png",
    ]
    contents = tree.read(wanted)
    assert list(contents) == wanted
    assert contents == {
        "stare-images.tar/im0002.ppm": b"image 2",
        "x/im.ppm": b"ppm",
        "masks.zip/masks/deep/0002.png": b"mask 2",
        "images/0001.png": b"png 1",
        "stare-images.tar/im0001.ppm": b"image 1",
        "masks.zip/g.ppm": b"zipped ppm",
        "more.tar.gz/a/b.png": b"b",
    }
    assert sorted(opened) == ["masks.zip", "more.tar.gz", "stare-images.tar"]
    assert tree.read(n for n in ["images/0001.png"]) == {"images/0001.png": b"png 1"}  # any iterable


def test_raw_tree_refuses_an_unknown_name(raw):
    with pytest.raises(ArchiveError, match=r"raw: no file or archive member makes 'masks.zip/nope.png'$"):
        RawTree(raw).read(["images/0001.png", "masks.zip/nope.png"])


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"x/im.ppm": b"plain"}, r"'x/im.ppm' is both x/im.ppm and x/im.ppm.gz"),
        ({"s.tar": None}, r"'s.tar/a.ppm' is both s.tar: member a.ppm and s.tar: member a.ppm.gz"),
    ],
)
def test_raw_tree_refuses_two_sources_of_one_name(raw, files, expected):
    for name, data in files.items():
        if data is None:
            write_tar(raw / name, {"a.ppm": b"plain", "a.ppm.gz": gz(b"gzip")})
        else:
            (raw / name).write_bytes(data)
    with pytest.raises(ArchiveError, match=expected):
        RawTree(raw)


@pytest.mark.parametrize(
    "name, data, expected",
    [
        (
            "bad.zip",
            zip_bytes({"a.png": b"a"}, symlinks={"l.png": "/etc/passwd"}),
            "bad.zip: refusing member 'l.png': a symbolic link",
        ),
        ("bad.zip", zip_bytes({"../a.png": b"a"}), "bad.zip: refusing member '../a.png': absolute or escaping path"),
        ("bad.tar", sparse_tar("a.gz", 3 << 30), "bad.tar: refusing member 'a.gz': a sparse file"),
        ("bad.tar.gz", gz(sparse_tar("a.gz", 3 << 30)), "bad.tar.gz: refusing member 'a.gz': a sparse file"),
    ],
)
def test_raw_tree_keeps_the_member_checks(raw, name, data, expected):
    (raw / name).write_bytes(data)
    with pytest.raises(ArchiveError, match=expected):
        RawTree(raw)
