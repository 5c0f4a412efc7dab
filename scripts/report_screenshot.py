"""Regenerate docs/report.png: a screenshot of the demo's report.html in headless Chromium.

    PYTHONPATH=src python scripts/report_screenshot.py            # runs `netshrink demo` first
    PYTHONPATH=src python scripts/report_screenshot.py --report runs/r1/report.html

Needs a Chromium (Debian: ``apt-get install -y chromium``); without one it stops with exit code 2
and says so. Not part of ``make test``. The page is rendered 1280 CSS pixels wide, the width the
report is reviewed at; ``--height`` sets how much of it the picture shows (the top of the page:
headline, every stage against the baseline, the first figures).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "report.png"


def find_browser() -> str:
    """The first Chromium on PATH; exit 2 with a message naming the fix when there is none."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    print(
        f"error: no Chromium found on PATH (looked for {', '.join(BROWSERS)}); "
        "install one, e.g. `apt-get install -y chromium` on Debian, then run this again",
        file=sys.stderr,
    )
    sys.exit(2)


def demo_report(folder: Path) -> Path:
    """Run ``netshrink demo`` into ``folder`` and return its report.html."""
    command = [sys.executable, "-m", "netshrink", "demo", "--out", str(folder), "--quiet"]
    subprocess.run(command, check=True)
    return folder / "report.html"


def screenshot(browser: str, page: Path, out: Path, width: int, height: int) -> Path:
    """Render ``page`` at ``width`` x ``height`` CSS pixels into ``out`` (written atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.png")
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # needed when run as root (containers); the page is our own file
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={width},{height}",
        f"--screenshot={tmp}",
        page.resolve().as_uri(),
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            sys.exit(f"error: {browser} wrote no screenshot")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="report.html to render (default: run the demo)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="CSS pixels")
    parser.add_argument("--height", type=int, default=1060, help="CSS pixels")
    args = parser.parse_args()
    browser = find_browser()  # before the demo's minute of work
    with tempfile.TemporaryDirectory() as tmp:
        page = args.report if args.report is not None else demo_report(Path(tmp) / "demo")
        if not page.is_file():
            sys.exit(f"error: {page} is not a file; give the report.html of a netshrink run")
        print(screenshot(browser, page, args.out, args.width, args.height))


if __name__ == "__main__":
    main()
