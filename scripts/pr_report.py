"""A pull request's report: this checkout's results against a base revision, as one markdown file with PNGs.

    python scripts/pr_report.py --base origin/main --out report    # then post report/report.md

report/report.html is the same page for a browser, rendered by markdown-it-py (installed with DVC's rich).

It holds `dvc metrics diff --md` and `dvc params diff --md`, and per dataset of params.yaml the training curves,
ROC (log false-positive axis) and precision-recall curves of both revisions drawn on one chart each, and a few
of render's pictures side by side. Everything is read offline: git for what git tracks, DVC (cache, then the
remote) for training's cached curves; what a revision does not have is said, not drawn.
"""

from __future__ import annotations

import argparse
import html
import io
import subprocess
import sys
from pathlib import Path

import dvc.api
import matplotlib
import pandas as pd
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
from PIL import Image  # noqa: E402

CURVES = {  # file under metrics/<dataset>/: x, y, the axes (as dvc.yaml's templates draw them)
    "roc.csv": ("fpr", "tpr", "log_x"),  # a near-perfect model's curve would lie on the frame otherwise
    "pr.csv": ("recall", "precision", "log_errors"),  # 1 - recall against 1 - precision, both logarithmic
}
TRAIN_CURVES = "train/plots/metrics"
PICTURES = 3  # render's pictures shown per dataset


def dvc_cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def git_bytes(rev: str | None, path: str) -> bytes | None:
    """``path`` at ``rev`` as git holds it (None: the working tree); None when it is not there."""
    if rev is None:
        return Path(path).read_bytes() if Path(path).is_file() else None
    result = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True)
    return result.stdout if result.returncode == 0 else None


def git_files(rev: str | None, directory: str) -> list[str]:
    if rev is None:
        return sorted(str(p) for p in Path(directory).rglob("*") if p.is_file())
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, directory], capture_output=True, text=True)
    return sorted(listed.stdout.split())


def dvc_text(rev: str | None, path: str) -> str | None:
    """A DVC-tracked file at ``rev`` (None: the working tree), from the cache or the remote."""
    if rev is None:
        return Path(path).read_text() if Path(path).is_file() else None
    try:
        return dvc.api.read(path, rev=rev)
    except Exception:  # noqa: BLE001 (not at that revision, or not pushed: the report says so)
        return None


def train_curves(rev: str | None, dataset: str) -> dict[str, pd.DataFrame]:
    """dvclive's curves of ``dataset``'s training at ``rev``, by name (val_dice, train_loss, ...)."""
    directory = f"metrics/{dataset}/{TRAIN_CURVES}"
    if rev is None and not Path(directory).is_dir():  # not pulled into this checkout: its commit's, through DVC
        rev = "HEAD"
    if rev is None:
        names = sorted(p.stem for p in Path(directory).rglob("*.tsv"))
    else:
        try:
            fs = dvc.api.DVCFileSystem(".", rev=rev)
            names = sorted(Path(p).stem for p in fs.find(directory) if p.endswith(".tsv"))
        except Exception:  # noqa: BLE001
            names = []
    curves = {}
    for name in names:
        text = dvc_text(rev, f"{directory}/{name}.tsv")
        if text:
            curves[name] = pd.read_csv(io.StringIO(text), sep="\t")
    return curves


def draw(out: Path, title: str, series: dict[str, pd.DataFrame], x: str, y: str, axes_kind: str = "linear") -> str:
    figure, axes = plt.subplots(figsize=(5, 3.6), dpi=100)
    # This branch wide and solid, the base thin and dashed on top: where they coincide, both stay visible; a
    # curve of a single point (a model that ranks every pixel alike) still shows as a dot.
    for (label, frame), style in zip(reversed(series.items()), ({"lw": 3, "alpha": 0.6}, {"lw": 1.2, "ls": "--"})):
        axes.plot(frame[x], frame[y], label=label, marker="o" if len(frame) == 1 else None, **style)
    if axes_kind in ("log_x", "log_errors"):
        axes.set_xscale("log")
    if axes_kind == "log_errors":
        axes.set_yscale("log")
    axes.set(title=title, xlabel=x, ylabel=y)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out.name


def side_by_side(out: Path, left: bytes, right: bytes) -> str:
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in (left, right)]
    height = max(image.height for image in images)
    canvas = Image.new("RGB", (sum(image.width for image in images) + 8, height), "white")
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (images[0].width + 8, 0))
    canvas.save(out)
    return out.name


def dataset_section(dataset: str, base: str, out: Path) -> list[str]:
    lines = [f"## {dataset}", ""]
    labels = {base: base, None: "this branch"}
    for file, (column_x, column_y, axes_kind) in CURVES.items():
        x, y = (f"1 - {column_x}", f"1 - {column_y}") if axes_kind == "log_errors" else (column_x, column_y)
        series = {}
        for rev, label in labels.items():
            data = git_bytes(rev, f"metrics/{dataset}/{file}")
            if data:
                frame = pd.read_csv(io.BytesIO(data))
                frame = frame.assign(**{x: 1 - frame[column_x], y: 1 - frame[column_y]}) if x != column_x else frame
                series[label] = frame[(frame[x] > 0) & (frame[y] > 0)] if axes_kind != "linear" else frame
        if series:
            title = f"{dataset} test {y} against {x}"
            name = draw(out / f"{dataset}-{Path(file).stem}.png", title, series, x, y, axes_kind)
            lines.append(f"![{dataset} {Path(file).stem}]({name})")
    curves = {label: train_curves(rev, dataset) for rev, label in labels.items()}
    for name in sorted(set().union(*curves.values())):
        series = {label: frames[name] for label, frames in curves.items() if name in frames}
        picture = draw(out / f"{dataset}-train-{name}.png", f"{dataset} training: {name}", series, "step", name)
        lines.append(f"![{dataset} {name}]({picture})")
    missing = [label for label, frames in curves.items() if not frames]
    if missing:
        lines.append(f"\nTraining curves not available for: {', '.join(missing)} (not in the DVC cache or remote).")
    lines += ["", f"Pictures, {base} (left) and this branch (right):", ""]
    pictures = [p for p in git_files(None, f"metrics/{dataset}/render") if p.endswith((".png", ".jpg"))]
    new, shown = [], 0
    for path in pictures:  # the first PICTURES that both revisions have
        before = git_bytes(base, path)
        if not before:
            new.append(path)
        elif shown < PICTURES:
            name = f"{dataset}-{Path(path).parent.name}-{Path(path).stem}-pair.png"
            lines.append(f"![{Path(path).stem}]({side_by_side(out / name, before, git_bytes(None, path))})")
            shown += 1
    if new:
        lines.append(f"\n{len(new)} pictures not at {base}, e.g. `{new[0]}`.")
    return lines + [""]


def as_html(markdown: str, title: str) -> str:
    """The report as a standalone page: GitHub-flavoured tables, the PNGs beside it."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
    style += "td,th{border:1px solid #bbb;padding:2px 6px}"
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head>\n<body><div id='report'>\n{body}</div></body></html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="origin/main", help="the revision to compare against (default origin/main)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="directory for report.md and its PNGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    datasets = yaml.safe_load(Path("params.yaml").read_text())["datasets"]
    lines = [f"# Results against {args.base}", "", "## Metrics", ""]
    lines += [dvc_cli("metrics", "diff", args.base, "--md") or "No metric changed.", "", "## Params", ""]
    lines += [dvc_cli("params", "diff", args.base, "--md") or "No param changed.", ""]
    for dataset in datasets:
        lines += dataset_section(dataset, args.base, args.out)
    text = "\n".join(lines)
    (args.out / "report.md").write_text(text)
    (args.out / "report.html").write_text(as_html(text, f"Results against {args.base}"))
    print(f"report: {args.out / 'report.md'}, {args.out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
