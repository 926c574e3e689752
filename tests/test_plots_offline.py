"""`dvc plots show` / `dvc plots diff` pages draw every curve with no network (.dvc/plots/offline.html).

A tiny git + DVC project gets three linear curves, one `simple` curve and a picture; DVC renders its plots
with this repository's `plots.html_template`, and headless Chromium, cut off from any network
(tests/browser.py), must find a drawn Vega view in every curve's div. As a control, DVC's default page --
which loads Vega from a CDN -- must draw none there: that shows the network really was off.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from configobj import ConfigObj
from dvc_render.base import Renderer
from dvc_render.vega import VegaRenderer

from tests.browser import RenderedPage, find_chromium, render_offline

REPO = Path(__file__).resolve().parents[1]
CURVES = ("Loss", "Validation Dice", "Learning rate", "ROC")
PICTURE = "pictures/sample.png"
DVC_YAML = """\
plots:
  - Loss:
      template: linear
      x: step
      y:
        curves/train_loss.tsv: train_loss
        curves/val_loss.tsv: val_loss
  - Validation Dice:
      template: linear
      x: step
      y:
        curves/val_dice.tsv: val_dice
  - Learning rate:
      template: linear
      x: step
      y:
        curves/lr.csv: lr
  - ROC:
      template: simple
      x: fpr
      y:
        curves/roc.csv: tpr
  - pictures:
"""


def div_id(name: str) -> str:
    """The id DVC gives a plot's <div>."""
    return Renderer.remove_special_chars(name)


def template_setting() -> tuple[str, Path]:
    """This repository's `plots.html_template` setting, and the file it names (relative to .dvc/, as DVC does)."""
    setting = ConfigObj(str(REPO / ".dvc" / "config"))["plots"]["html_template"]
    return setting, REPO / ".dvc" / setting


def png(width: int = 24, height: int = 16) -> bytes:
    """A small RGB gradient, as PNG bytes."""
    rows = b"".join(b"\0" + bytes(v for x in range(width) for v in (10 * x, 15 * y, 128)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_curves(root: Path, steps: int, scale: float) -> None:
    curves = root / "curves"
    curves.mkdir(exist_ok=True)
    for name, value in (
        ("train_loss", lambda s: scale / (s + 1)),
        ("val_loss", lambda s: scale / (s + 2) + 0.05),
        ("val_dice", lambda s: 1 - scale / (s + 2)),
    ):
        rows = "".join(f"{s}\t{value(s):.4f}\n" for s in range(steps))
        (curves / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")
    (curves / "lr.csv").write_text("step,lr\n" + "".join(f"{s},{0.01 * scale * 0.9**s:.6f}\n" for s in range(steps)))
    (curves / "roc.csv").write_text("fpr,tpr\n" + "".join(f"{f / 10},{(f / 10) ** scale:.4f}\n" for f in range(11)))


def run(*args: str, cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        reason = "Chromium is not installed (Debian: apt-get install chromium), so the offline plots check cannot run"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run it: .ci/run installs chromium", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    """A tiny git + DVC project with a committed and a changed set of curves, and the plot pages DVC made:
    `default` (DVC's own template), `show` and `diff` (`dvc plots diff HEAD`) with this repository's."""
    base = tmp_path_factory.mktemp("plots-offline")
    project = base / "project"
    project.mkdir()
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    dvc = (sys.executable, "-m", "dvc")

    (project / "dvc.yaml").write_text(DVC_YAML)
    write_curves(project, steps=6, scale=1.0)
    (project / PICTURE).parent.mkdir()
    (project / PICTURE).write_bytes(png())
    run("git", "init", "-q", cwd=project, env=env)
    run(*dvc, "init", "-q", cwd=project, env=env)
    run("git", "add", "-A", cwd=project, env=env)
    run("git", "commit", "-qm", "first run", cwd=project, env=env)
    write_curves(project, steps=8, scale=0.7)  # the workspace differs from HEAD

    run(*dvc, "plots", "show", "-o", str(base / "default"), cwd=project, env=env)

    # The same setting as this repository's .dvc/config, naming a copy of its template in the same place.
    setting, template = template_setting()
    (project / ".dvc" / setting).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template, project / ".dvc" / setting)
    config = ConfigObj(str(project / ".dvc" / "config"))
    config["plots"] = {"html_template": setting}
    config.write()
    run(*dvc, "plots", "show", "-o", str(base / "show"), cwd=project, env=env)
    run(*dvc, "plots", "diff", "HEAD", "-o", str(base / "diff"), cwd=project, env=env)
    return {name: base / name / "index.html" for name in ("default", "show", "diff")}


@pytest.fixture(scope="module")
def rendered(chromium, pages) -> dict[str, RenderedPage]:
    """Each page as offline headless Chromium drew it, with a screenshot beside it (three browsers at once:
    most of a run is Chromium starting up and shutting down)."""
    with ThreadPoolExecutor(len(pages)) as pool:
        futures = {
            name: pool.submit(render_offline, html, html.with_name("screenshot.png"), chromium=chromium)
            for name, html in pages.items()
        }
        return {name: future.result() for name, future in futures.items()}


def test_template_is_dvc_page_with_dvc_render_versions_inline():
    setting, template = template_setting()
    assert not Path(setting).is_absolute(), "keep plots.html_template relative (to .dvc/) so every clone finds it"
    text = template.read_text(encoding="utf-8")
    assert template.stat().st_size < 2 * 1024 * 1024
    assert text.count("{plot_divs}") == 1
    assert "{scripts}" not in text, "DVC would put its CDN <script src> tags there"
    assert not re.search(r"<script[^>]*\bsrc\s*=", text), "the template must load nothing"
    # The bundles are the versions DVC's own page loads from the CDN; after a dvc_render upgrade changes them,
    # rerun scripts/build_offline_plots_template.py.
    for name, version in re.findall(r"/npm/(vega(?:-lite|-embed)?)@([0-9.]+)", VegaRenderer.SCRIPTS):
        assert f"{name}@{version} build/{name}.min.js (BSD-3-Clause)" in text, (
            f"{template} does not carry {name}@{version}; run scripts/build_offline_plots_template.py"
        )


@pytest.mark.parametrize("page", ["show", "diff"])
def test_every_curve_is_drawn_offline(pages, rendered, page):
    html = pages[page].read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "the page still loads a script from elsewhere"
    if page == "diff":
        assert '"rev": "HEAD"' in html and '"rev": "workspace"' in html

    result = rendered[page]
    assert result.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    undrawn = [name for name in CURVES if div_id(name) not in result.divs or result.divs[div_id(name)].charts < 1]
    assert not undrawn, f"not drawn offline ({result.network}): {undrawn}; per div: {result.divs}\n{result.log[-3000:]}"
    assert result.divs[div_id(PICTURE)].img >= 1


def test_control_dvc_default_page_draws_no_curve_offline(pages, rendered):
    """DVC's own page, from the same project, loads Vega from a CDN: with the network off no curve appears,
    while the picture still does -- so the page was rendered and the network really was unreachable."""
    html = pages["default"].read_text(encoding="utf-8")
    assert re.search(r"<script[^>]*\bsrc\s*=\s*\"https://", html), "DVC's default page no longer uses a CDN"

    result = rendered["default"]
    assert all(div_id(name) in result.divs for name in CURVES)
    drawn = {
        name: counts for name in CURVES if (counts := result.divs[div_id(name)]).charts + counts.svg + counts.canvas > 0
    }
    assert not drawn, f"curves drawn although the CDN should be unreachable ({result.network}): {drawn}"
    assert result.divs[div_id(PICTURE)].img >= 1
