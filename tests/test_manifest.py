"""``python -m pipeline.manifest``: the manifest it writes is the one the download stage verifies against, for
every kind of file, whether the files then come from a directory or over HTTP; ``--add`` accepts a second copy."""

from __future__ import annotations

import gzip
import json
import urllib.parse
from pathlib import Path

import pytest
import yaml

from pipeline import download as dl
from pipeline import manifest
from tests.test_download import (
    DATASET,
    GOOD_FILES,
    KINDS,
    KINDS_MANIFEST,
    LABELS,
    MANIFEST,
    assert_downloaded,
    make_source,
    run,
    server,
    sha,
)

__all__ = ["server"]  # the HTTP server fixture, imported to be used here


def test_manifest_of_a_directory_is_what_the_download_stage_expects(tmp_path, capsys):
    source = make_source(tmp_path / "source", GOOD_FILES)
    assert manifest.main([str(source)]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written == {"files": dict(sorted(MANIFEST["files"].items()))}
    (tmp_path / "toy.json").write_text(json.dumps(written))
    dl.download(
        "toy",
        dl.DownloadParams(base_urls=[source.as_uri()], retries=1),
        tmp_path / "toy.json",
        tmp_path / "out" / "toy",
        None,
    )


def test_files_can_be_named_one_by_one(tmp_path):
    source = make_source(tmp_path / "source", GOOD_FILES)
    assert manifest.manifest_for([source / "labels.gz"]) == {"files": {"labels.gz": MANIFEST["files"]["labels.gz"]}}


def test_errors_are_one_line(tmp_path, capsys):
    source = make_source(tmp_path / "source", {"notes.gz": b"not gzip"})
    assert manifest.main([str(source)]) == 1
    assert capsys.readouterr().err == "manifest: error: notes.gz: not a valid gzip file (Not a gzipped file (b'no'))\n"
    assert manifest.main([str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err == f"manifest: error: {tmp_path / 'nothing'}: no such file or directory\n"


# ------------------------------------------------------------------------------------------ every kind


def test_every_kind_is_described_by_its_name_at_any_depth(tmp_path, capsys):
    source = make_source(tmp_path / "source", KINDS)
    assert manifest.main([str(source)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == KINDS_MANIFEST
    assert list(json.loads(out)["files"]) == sorted(KINDS)  # sorted by name: a stable diff when a file changes


@pytest.mark.parametrize("how", ["file URL", "absolute path", "mirror", "http"])
def test_every_kind_round_trips(tmp_path, server, how):
    """The manifest command on a directory, then the download stage, from that directory or over HTTP: every
    file verified and written where its name says, with its original bytes."""
    source = make_source(tmp_path / "mirror" / DATASET, KINDS)
    written = manifest.manifest_for([source])
    for name, data in KINDS.items():
        server.routes[f"/data/{urllib.parse.quote(name)}"] = [(200, data)]
    base_urls, mirror = {
        "file URL": ([source.as_uri()], None),
        "absolute path": ([str(source)], None),
        "mirror": ([], str(tmp_path / "mirror")),
        "http": ([server.url], None),
    }[how]
    assert_downloaded(run(tmp_path, base_urls=base_urls, mirror=mirror, manifest=written), KINDS)
    if how == "http":
        assert "/data/images/scan%201.png" in server.requests


def test_a_name_the_download_stage_would_refuse_is_refused_here(tmp_path, capsys):
    make_source(tmp_path / "source", {"scans/a\\b.png": b"a"})
    assert manifest.main([str(tmp_path / "source")]) == 1
    assert capsys.readouterr().err == (
        "manifest: error: the manifest: files: 'scans/a\\\\b.png' is not a relative "
        "path inside the dataset's directory\n"
    )


def test_two_files_of_the_same_name_are_refused(tmp_path, capsys):
    one, two = make_source(tmp_path / "one", {"a.png": b"1"}), make_source(tmp_path / "two", {"a.png": b"2"})
    assert manifest.main([str(one), str(two / "a.png")]) == 1
    expected = f"manifest: error: a.png: two files of that name, from {one} and {two / 'a.png'}\n"
    assert capsys.readouterr().err == expected


def test_a_hostile_archive_is_refused(tmp_path, capsys):
    from tests.synthetic import zip_bytes

    make_source(tmp_path / "source", {"d.zip": zip_bytes({"a.png": b"a"}, symlinks={"l": "/etc/passwd"})})
    assert manifest.main([str(tmp_path / "source")]) == 1
    assert capsys.readouterr().err == "manifest: error: d.zip: refusing member 'l': a symbolic link\n"


# ------------------------------------------------------------------------------------------ URLs


def test_a_url_is_fetched_described_and_removed(tmp_path, server, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    server.routes["/data/d.zip"] = [(200, KINDS["d.zip"])]
    assert manifest.manifest_for([f"{server.url}/d.zip?token=t0ken"]) == {
        "files": {"d.zip": KINDS_MANIFEST["files"]["d.zip"]}
    }
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary copy is gone


def test_a_url_larger_than_max_bytes_is_refused(tmp_path, server, capsys):
    server.routes["/data/d.zip"] = [(200, KINDS["d.zip"])]
    assert manifest.main(["--max-bytes", "100", f"{server.url}/d.zip"]) == 1
    assert capsys.readouterr().err == (
        f"manifest: error: d.zip: the server announces {len(KINDS['d.zip']):,} bytes, "
        "more than the 100 --max-bytes allows\n"
    )


def test_a_url_that_fails_is_one_line_without_its_token(server, capsys):
    assert manifest.main([f"{server.url}/missing.zip?token=t0ken"]) == 1
    assert capsys.readouterr().err == f"manifest: error: {server.url}/missing.zip?token=***: HTTP 404 Not Found\n"
    assert manifest.main([f"{server.url}/"]) == 1
    assert "names no file (give the URL of one file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ --dataset


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with its own params.yaml and checksums directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(manifest, "CHECKSUMS_DIR", tmp_path / "pipeline" / "checksums")
    return tmp_path


def write_config(project: Path, base_urls: list[str]) -> None:
    (project / "config.yaml").write_text(yaml.safe_dump({"leaves": {"download": {"base_urls": base_urls}}}))


def test_dataset_writes_the_manifest(project, capsys):
    source = make_source(project / "source", KINDS)
    assert manifest.main(["--dataset", "leaves", str(source)]) == 0
    assert json.loads((project / "pipeline" / "checksums" / "leaves.json").read_text()) == KINDS_MANIFEST
    assert capsys.readouterr().out == (
        f"manifest leaves: 7 files, 7 accepted copies, from {source} -> pipeline/checksums/leaves.json\n"
    )
    # The download stage reads it as it is.
    assert len(dl.load_manifest(project / "pipeline" / "checksums" / "leaves.json")) == 7


@pytest.mark.parametrize("as_url", [True, False], ids=["file URL", "absolute path"])
def test_dataset_without_a_source_describes_the_local_directory_of_its_base_urls(project, capsys, as_url):
    source = make_source(project / "source", KINDS)
    write_config(
        project, ["https://example.org/leaves", str(project / "gone"), source.as_uri() if as_url else str(source)]
    )
    assert manifest.main(["--dataset", "leaves"]) == 0
    assert json.loads((project / "pipeline" / "checksums" / "leaves.json").read_text()) == KINDS_MANIFEST
    assert f"from {source} -> pipeline/checksums/leaves.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    "base_urls, expected",
    [
        (
            ["https://example.org/leaves"],
            "config.yaml: leaves.download.base_urls: lists no local directory (a file:// URL "
            "or an absolute path); pass the source instead, e.g. the archive's URL: "
            "python -m pipeline.manifest --dataset leaves https://example.org/leaves.zip",
        ),
        (
            ["/nowhere/leaves"],
            "config.yaml: leaves.download.base_urls: none of its local directories exists "
            "(/nowhere/leaves); pass the source instead",
        ),
        (
            ["leaves"],
            "config.yaml: leaves.download.base_urls[0]: must be an http, https or file URL, or the absolute "
            "path of a local directory, got 'leaves' (not a relative path",
        ),
    ],
)
def test_dataset_without_a_source_or_a_local_directory_is_one_line(project, capsys, base_urls, expected):
    write_config(project, base_urls)
    assert manifest.main(["--dataset", "leaves"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"manifest: error: {expected}") and err.count("\n") == 1
    assert not (project / "pipeline" / "checksums").exists()


def test_dataset_name_must_be_a_name(project, capsys):
    assert manifest.main(["--dataset", "../x", str(make_source(project / "s", {"a.png": b"a"}))]) == 1
    assert capsys.readouterr().err == (
        "manifest: error: --dataset: '../x' is not a dataset name (letters, digits, '_' and '-')\n"
    )


def test_add_accepts_another_copy_of_the_files_listed(project, capsys):
    """A mirror that re-gzips: its copies are added beside the first ones, and either source then passes."""
    official = make_source(project / "official", GOOD_FILES)
    regzipped = {"labels.gz": gzip.compress(LABELS, compresslevel=1, mtime=7)}
    mirror = make_source(project / "mirror", regzipped)
    assert manifest.main(["--dataset", "leaves", str(official)]) == 0
    assert manifest.main(["--dataset", "leaves", "--add", str(mirror)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"manifest leaves: 2 files, 3 accepted copies, from {mirror} -> pipeline/checksums/leaves.json"
    )
    written = json.loads((project / "pipeline" / "checksums" / "leaves.json").read_text())["files"]
    assert written["labels.gz"] == {
        "copies": {sha(GOOD_FILES["labels.gz"]): 31, sha(regzipped["labels.gz"]): len(regzipped["labels.gz"])},
        "size": len(LABELS),
    }
    assert written["images.tar"] == MANIFEST["files"]["images.tar"]
    for files in (GOOD_FILES, {**GOOD_FILES, **regzipped}):
        source = project / f"served-{len(files)}-{sha(files['labels.gz'])[:8]}"
        make_source(source, files)
        manifest_file = project / "pipeline" / "checksums" / "leaves.json"
        dl.download("leaves", dl.DownloadParams([source.as_uri()], retries=1), manifest_file, project / "out", None)
        assert (project / "out" / "labels.gz").read_bytes() == files["labels.gz"]


def test_add_refuses_a_file_the_manifest_does_not_list(project, capsys):
    assert manifest.main(["--dataset", "leaves", str(make_source(project / "one", {"a.png": b"a"}))]) == 0
    assert manifest.main(["--dataset", "leaves", "--add", str(make_source(project / "two", {"b.png": b"b"}))]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"manifest: error: b.png: not in {project / 'pipeline' / 'checksums' / 'leaves.json'} "
        "(--add accepts another copy of a file the manifest lists)\n"
    )
    with pytest.raises(SystemExit):
        manifest.main(["--add", str(project / "two")])  # --add needs --dataset
