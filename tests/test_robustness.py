"""benchmarks.robustness on a tiny binary dataset: its clean row is evaluate's score, and every shift is scored."""

from __future__ import annotations

import json

import pytest

from benchmarks import robustness
from pipeline import evaluate
from tests.test_evaluate_render import binary, repeatable_setup  # noqa: F401 (fixtures)


def test_the_clean_row_is_evaluates_score_and_every_shift_is_scored(binary, tmp_path):  # noqa: F811
    evaluate.evaluate("eye")
    scores = json.loads((tmp_path / "metrics/eye/evaluation.json").read_text())["scores"]
    out = tmp_path / "robustness.json"
    assert robustness.main(["eye", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["shifts"]
    assert list(rows) == list(robustness.SHIFTS)
    assert rows["clean"]["f1"] == pytest.approx(scores["dice"], abs=1e-6)
    assert rows["clean"]["sensitivity"] == pytest.approx(scores["sensitivity"], abs=1e-6)
    assert rows["clean"]["best_f1"] >= rows["clean"]["f1"]
    for name, row in rows.items():
        assert 0 <= row["f1"] <= row["best_f1"] <= 1 and row["best_threshold"] < 1, name
    assert rows["JPEG quality 40"]["f1"] != rows["clean"]["f1"]  # a shift changes what the model sees
