"""The report and the feature browser open in headless Chromium: they render, the plots load, and the
console stays free of errors."""

from __future__ import annotations

import os

import pytest

from tests.sae.test_cli import harvest, tiny_dir  # noqa: F401  (tiny_dir: a fixture)

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (CI installs it)")
def test_report_and_browser_render_in_chromium(tiny_dir):  # noqa: F811
    from playwright.sync_api import sync_playwright

    from sparseland.cli import main

    d = tiny_dir
    assert harvest(d, 400) == 0
    assert (
        main(
            [
                "sae",
                "sweep",
                "--cache",
                str(d / "cache"),
                "--archs",
                "topk,relu",
                "--ks",
                "2,4",
                "--width",
                "32",
                "--batch-size",
                "64",
                "--ce-text",
                str(d / "t.txt"),
                "--ce-windows",
                "2",
                "--seq-len",
                "16",
                "--out",
                str(d / "sweep"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sae",
                "browse",
                "--sae",
                str(d / "sweep" / "topk-k4"),
                "--features",
                "4",
                "--out",
                str(d / "sweep" / "features.html"),
            ]
        )
        == 0
    )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((d / "sweep" / "report.html").as_uri())
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 2 and min(widths) > 100, widths
        assert page.locator("table tr").count() == 1 + 4
        page.goto((d / "sweep" / "features.html").as_uri())
        assert page.locator("section").count() == 4
        assert page.locator("mark").count() > 0
        browser.close()
    assert errors == []
