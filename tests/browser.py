"""Render an HTML file in headless Chromium with the network cut off; count what got drawn in each plot div.

    from tests.browser import find_chromium, render_offline
    page = render_offline(Path("dvc_plots/index.html"), screenshot=Path("/tmp/plots.png"))
    page.divs["MNIST_loss"].charts   # > 0 once Vega has drawn the curve
    page.network                     # how the network was cut

The network is cut by running Chromium in a fresh network namespace (`unshare -n`: no interface but a
loopback that is down), so nothing -- DNS, a proxy, a CDN -- can be reached whatever Chromium does. Where
namespaces are not allowed (`unshare` missing, no privilege, not even as an unprivileged user namespace)
it falls back to Chromium flags: every host name resolves to nothing and every request goes to a proxy on
a closed local port. `RenderedPage.network` says which one ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cache
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
FALLBACK_FLAGS = [
    "--host-resolver-rules=MAP * ~NOTFOUND",  # every host name fails to resolve
    "--proxy-server=http://127.0.0.1:9",  # and every request goes to a closed port instead
    "--proxy-bypass-list=<-loopback>",  # loopback included
]


def find_chromium() -> str | None:
    """$CHROMIUM, else the first Chromium / Chrome on PATH; None when there is none."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


@cache
def network_cut() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(command prefix, extra Chromium flags, description) of the strongest way available to go offline."""
    unshare = shutil.which("unshare")
    if unshare:
        for options, what in (
            (("-n",), "network namespace (unshare -n)"),
            (("-r", "-n"), "network namespace in a user namespace (unshare -r -n)"),
        ):
            probe = subprocess.run([unshare, *options, "true"], capture_output=True, check=False)
            if probe.returncode == 0:
                return (unshare, *options), (), what
    return (
        (),
        tuple(FALLBACK_FLAGS),
        "Chromium flags only (no network namespace available): " + " ".join(FALLBACK_FLAGS),
    )


@dataclass
class DivCounts:
    """What one top-level <div id=...> of the page holds after rendering."""

    svg: int = 0
    canvas: int = 0
    charts: int = 0  # <svg class="marks"> / <canvas class="marks">: a Vega view that has been drawn
    img: int = 0


@dataclass
class RenderedPage:
    dom: str
    screenshot: Path | None
    network: str
    log: str
    divs: dict[str, DivCounts] = field(default_factory=dict)


class _PlotDivCounter(HTMLParser):
    """Count <svg>, <canvas>, Vega's drawn views and <img> under each <div id=...> directly in <body>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None]] = []  # (tag, id of the plot div it opens, if it does)
        self.divs: dict[str, DivCounts] = {}

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        open_divs = [div for _, div in self.stack if div]
        for div in open_divs:
            counts = self.divs[div]
            if tag in ("svg", "canvas", "img"):
                setattr(counts, tag, getattr(counts, tag) + 1)
            if tag in ("svg", "canvas") and "marks" in (attributes.get("class") or "").split():
                counts.charts += 1
        if tag in VOID:
            return
        plot_div = None
        if tag == "div" and attributes.get("id") and [t for t, _ in self.stack] in (["html", "body"], ["body"]):
            plot_div = attributes["id"]
            self.divs.setdefault(plot_div, DivCounts())
        self.stack.append((tag, plot_div))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):  # close up to the matching start tag
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return


def count_plot_divs(dom: str) -> dict[str, DivCounts]:
    parser = _PlotDivCounter()
    parser.feed(dom)
    parser.close()
    return parser.divs


def render_offline(
    html: Path,
    screenshot: Path | None = None,
    *,
    window_size: tuple[int, int] = (1280, 1600),
    virtual_time_ms: int = 10_000,
    timeout_s: float = 120,
    chromium: str | None = None,
) -> RenderedPage:
    """Load `html` in headless Chromium with no network, dump the DOM after rendering, optionally screenshot.

    `--virtual-time-budget` lets the page's scripts and timers run for that much virtual time before the
    DOM is dumped (Vega draws in a few hundred ms; failed network requests fail at once).
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium; or set $CHROMIUM)")
    prefix, flags, network = network_cut()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            *prefix,
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--disable-sync",
            "--mute-audio",
            "--hide-scrollbars",
            "--run-all-compositor-stages-before-draw",
            "--enable-logging=stderr",
            "--log-level=0",  # console messages and failed loads, for reports
            f"--virtual-time-budget={virtual_time_ms}",
            f"--window-size={window_size[0]},{window_size[1]}",
            *flags,
            *([f"--screenshot={screenshot}"] if screenshot else []),
            "--dump-dom",
            Path(html).resolve().as_uri(),
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False
        )
    if result.returncode != 0 or "</html>" not in result.stdout.lower():
        raise RuntimeError(f"Chromium failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-4000:]}")
    if screenshot and not Path(screenshot).is_file():
        raise RuntimeError(f"Chromium wrote no screenshot to {screenshot}:\n{result.stderr[-4000:]}")
    log = "\n".join(line for line in result.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line)
    return RenderedPage(
        dom=result.stdout, screenshot=screenshot, network=network, log=log, divs=count_plot_divs(result.stdout)
    )
