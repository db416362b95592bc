"""Regenerate the README's picture of a report's first screen.

    python docs/screenshot.py RUN_DIR_OR_REPORT --out docs/report-first-screen.png

RUN_DIR_OR_REPORT is a run directory (``runs/<study>/<run-id>``, rendered here as ``servinglab report`` would)
or a published report (``reports/<study>.html``). The first screen, 1280 × 900 px as a reader's browser shows
it, is taken in headless Chromium (Debian's ``chromium`` when installed, else Playwright's own) and saved as a
palette PNG, small enough to keep in git.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
MAX_BYTES = 150_000  # a picture in the README, not a download
PALETTE_COLOURS = 256  # the report's flat colours and anti-aliased text survive this; the file shrinks ~3×


def report_page(source: Path, folder: Path) -> Path:
    """The HTML page to photograph: ``source`` itself, or ``source`` (a run directory) rendered into ``folder``.

    Raises RunDirError when ``source`` is neither a report nor a run directory.
    """
    from servinglab.errors import RunDirError
    from servinglab.report import render_html

    if source.is_file() and source.suffix == ".html":
        return source.resolve()
    if not (source / "run.json").is_file():
        raise RunDirError(f"{source}: neither a report (.html) nor a run directory (no run.json in it)")
    page = folder / "report.html"
    page.write_text(render_html(source), encoding="utf-8")
    return page


def first_screen_png(page: Path) -> bytes:
    """The first ``VIEWPORT`` of ``page`` in headless Chromium, as PNG bytes."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            view = browser.new_page(viewport=VIEWPORT)
            view.goto(page.as_uri())
            view.wait_for_load_state("load")
            return view.screenshot(full_page=False)
        finally:
            browser.close()


def small_png(png: bytes) -> bytes:
    """``png`` as an optimised palette PNG (Pillow), the same pixels to the eye at a fraction of the bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    quantized = image.quantize(colors=PALETTE_COLOURS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    out = io.BytesIO()
    quantized.save(out, format="PNG", optimize=True)
    return out.getvalue()


def screenshot(source: str | Path, out: str | Path) -> Path:
    """Write the first screen of ``source``'s report to ``out`` (PNG) and return ``out``.

    Parameters
    ----------
    source : path
        A run directory or a published report.
    out : path
        Where the PNG goes; its folder is created.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="servinglab-screenshot-") as folder:
        data = small_png(first_screen_png(report_page(Path(source), Path(folder))))
    if len(data) > MAX_BYTES:
        print(f"{out}: {len(data):,} bytes, over the {MAX_BYTES:,} a README picture should take", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def main(argv: list[str] | None = None) -> int:
    from servinglab.errors import ServinglabError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run directory (runs/<study>/<run-id>) or a published report (.html)")
    parser.add_argument("--out", default="docs/report-first-screen.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.source, args.out)
    except ServinglabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
