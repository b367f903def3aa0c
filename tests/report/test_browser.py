"""The report in a real browser: headless Chromium (one start) opens a tiny run's and a tiny sweep's
report from file://, and the page loads without console errors, every <img> decodes and the
screenshot is not blank. A control page with a broken image and a script error must be caught.
Skips when no Chromium is installed (CI installs Debian's `chromium`)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report draws with matplotlib (pip install matplotlib)")

from loralab.report.commands import main

from .cdp import Browser, find_chromium
from .conftest import make_run, make_sweep

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")

IMAGES = "Array.from(document.images).map(i => ({src: i.src.slice(-40), w: i.naturalWidth, ok: i.complete}))"


def _pixels(png: bytes):
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")


def _check(page, url: str, shots: Path, name: str) -> None:
    page.goto(url)
    assert page.evaluate("document.readyState") == "complete"
    assert page.errors == [], f"{name}: {page.errors}"
    images = page.evaluate(IMAGES)
    assert images, f"{name}: no images"
    broken = [i for i in images if not (i["ok"] and i["w"] > 0)]
    assert broken == [], f"{name}: images that did not decode: {broken}"
    assert page.evaluate("document.querySelectorAll('div.verdict').length") >= 1
    png = page.screenshot()
    (shots / f"{name}.png").write_bytes(png)
    pixels = _pixels(png)[..., :3]
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    background = (pixels.reshape(-1, 3) == pixels[-1, -1]).all(axis=1).mean()
    assert pixels.std() > 0.05 and background < 0.9, f"{name}: the screenshot looks blank"


def test_reports_load_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "runs", "browser-run")
    sweep = make_sweep(tmp_path, ranks=(1, 4, 16), lrs=(1e-3,), seeds=(0, 1))
    assert main([str(run), "--out", str(tmp_path / "run-report")]) == 0
    assert main([str(sweep), "--out", str(tmp_path / "sweep-report")]) == 0
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>undefinedFunction()</script>'
                       "</body></html>")
    shots = Path(os.environ.get("LORALAB_REPORT_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    browser = Browser(CHROMIUM, tmp_path / "profile")
    try:
        page = browser.page()
        _check(page, (tmp_path / "run-report" / "index.html").as_uri(), shots, "run")
        _check(page, (tmp_path / "sweep-report" / "index.html").as_uri(), shots, "sweep")
        page.goto(control.as_uri())  # the checks can fail: a broken image and a script error are seen
        assert any("undefinedFunction" in e for e in page.errors), page.errors
        assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in page.errors), page.errors
        assert [i["w"] for i in page.evaluate(IMAGES)] == [0]
    finally:
        browser.close()
