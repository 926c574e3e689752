"""``python -m pipeline.manifest``: the manifest it writes is the one the download stage verifies against."""

from __future__ import annotations

import json

from pipeline import download as dl
from pipeline import manifest
from tests.test_download import GOOD_FILES, MANIFEST, make_source


def test_manifest_of_a_directory_is_what_the_download_stage_expects(tmp_path, capsys):
    source = make_source(tmp_path / "source", GOOD_FILES)
    assert manifest.main([str(source)]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written == {"files": dict(sorted(MANIFEST["files"].items()))}
    (tmp_path / "toy.json").write_text(json.dumps(written))
    dl.download("toy", dl.DownloadParams(base_urls=[source.as_uri()], retries=1), tmp_path / "toy.json",
                tmp_path / "out" / "toy", None)


def test_files_can_be_named_one_by_one(tmp_path):
    source = make_source(tmp_path / "source", GOOD_FILES)
    assert manifest.manifest_for([source / "labels.gz"]) == {"files": {"labels.gz": MANIFEST["files"]["labels.gz"]}}


def test_errors_are_one_line(tmp_path, capsys):
    source = make_source(tmp_path / "source", {"notes.txt": b"not gzip"})
    assert manifest.main([str(source)]) == 1
    assert capsys.readouterr().err == "manifest: error: notes.txt: not a valid gzip file (Not a gzipped file (b'no'))\n"
    assert manifest.main([str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err == f"manifest: error: {tmp_path / 'nothing'}: no such file or directory\n"
