"""The streaming readers of pipeline/archives.py: bounded reads of gzip streams and tar archives."""

from __future__ import annotations

import gzip
import hashlib
import io

import pytest

from pipeline import archives
from pipeline.archives import ArchiveError
from tests.synthetic import sparse_tar, write_gzip_bomb


def test_gunzip_digest_reads_what_gzip_decompress_reads():
    # Two concatenated gzip members with zero padding after them, as some tools write.
    data = gzip.compress(b"first ", mtime=0) + gzip.compress(b"second", mtime=0) + bytes(16)
    assert archives.gunzip_digest(io.BytesIO(data), "x.gz") == (hashlib.sha256(b"first second").hexdigest(), 12)
    assert archives.gunzip(data, "x.gz") == b"first second"


def test_a_bomb_is_read_only_up_to_the_limit(tmp_path):
    bomb = write_gzip_bomb(tmp_path / "bomb.gz", 64 << 20)
    with open(bomb, "rb") as stream:
        with pytest.raises(ArchiveError, match="bomb.gz: decompresses to more than 3,000,000 bytes"):
            archives.gunzip_digest(stream, "bomb.gz", limit=3_000_000)
        # It stopped at the limit: 4 MiB of 64 inflated (4 chunks), with gzip's 8 KiB read-ahead.
        assert stream.tell() < bomb.stat().st_size / 4


def test_chunks_are_bounded():
    data = gzip.compress(bytes(5 * archives.CHUNK_SIZE + 3), mtime=0)
    sizes = [len(chunk) for chunk in archives.gunzip_chunks(io.BytesIO(data), "z.gz")]
    assert max(sizes) <= archives.CHUNK_SIZE and sum(sizes) == 5 * archives.CHUNK_SIZE + 3


@pytest.mark.parametrize("data, expected", [
    (b"", None),  # an empty file holds no gzip member: empty content, as gzip.decompress says
    (b"plain text", "z.gz: not a valid gzip file"),
    (gzip.compress(b"abc" * 100)[:-4], "z.gz: not a valid gzip file"),
])
def test_invalid_gzip(data, expected):
    if expected is None:
        assert archives.gunzip_digest(io.BytesIO(data), "z.gz")[1] == 0
        return
    with pytest.raises(ArchiveError, match=expected):
        archives.gunzip_digest(io.BytesIO(data), "z.gz")


def test_walk_tar_refuses_a_sparse_member_before_visiting_it(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(sparse_tar("a.gz", 3 << 30))
    visited = []
    with pytest.raises(ArchiveError, match="s.tar: refusing member 'a.gz': a sparse file"):
        archives.walk_tar(path, lambda name, size, body: visited.append(name))
    assert visited == []
