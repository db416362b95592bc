"""The comparison page in headless Chromium, at desktop and phone width: it answers on its first screen, never
scrolls sideways, every fold opens, and nothing is fetched."""

from __future__ import annotations

import os

import pytest
from conftest import CHROMIUM
from test_report_compare import add_lifecycle, sweep_run

from servinglab.report.compare import publish_comparison

if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (CI installs it)", allow_module_level=True)

WORSE_BACKGROUND = "rgb(252, 232, 230)"  # the page's --worse-bg: a change beyond the noise, for the worse
NO_BACKGROUND = "rgba(0, 0, 0, 0)"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Two runs of one layer at nine load points, B 20 % slower with two bursty stages and one that warned;
    their lifecycle with a model update that failed 58 of 59 requests, a refusal and a failed experiment."""
    root = tmp_path_factory.mktemp("compare")
    points = [1, 2, 4, 8, 16, 32, 48, 64, 96]
    first = sweep_run(root, "20261126T000000Z", points)
    second = sweep_run(root, "20261127T000000Z", points, slower=1.2, burst_at=(8, 16), warn_at=(64,))
    refused = {"status": "unsupported", "refused_by": "layer", "reason": "raw vLLM has no traffic split"}
    add_lifecycle(first, {"requests": 61, "failed": 0, "errors": {}, "change_to_served_s": 25.1}, canary=refused)
    add_lifecycle(second, {"requests": 59, "failed": 58, "errors": {"http_503": 58}, "change_to_served_s": 27.3},
                  canary=refused, gateway_hop={"status": "failed", "settled": "restored", "reason":
                  "LayerNotReadyError: CrashLoopBackOff after 3 restarts; last log lines:\n    RuntimeError: boom"})  # fmt: skip
    return publish_comparison([first, second], root / "reports")


def _open(browser, published, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(published.as_uri())
    page.wait_for_load_state("load")
    return page, requests


@pytest.mark.parametrize("width, height", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_the_first_screen_answers_and_the_page_never_scrolls_sideways(browser, published, width, height):
    page, requests = _open(browser, published, width, height)
    summary = page.locator("#summary + ul.summary li").first
    assert summary.is_visible() and "changed beyond the noise" in summary.inner_text()
    assert summary.bounding_box()["y"] < height  # the summary is on the first screen
    table = page.locator("#latency-table-raw")
    if width == 1280:  # and the first layer's table starts on it
        assert table.bounding_box()["y"] < 900
    assert table.locator("tbody tr").count() == 9 and table.locator("thead th").count() == 1 + 9

    # A change beyond the noise is coloured, one within it or at a stage not valid is not.
    worse = table.locator('tr[data-metric="median_ttft_ms"] td[data-load="c=1"] .chg')
    bursty = table.locator('tr[data-metric="median_ttft_ms"] td[data-load="c=8"] .chg')
    same = table.locator('tr[data-metric="request_throughput"] td[data-load="c=1"] .chg')
    for locator, background in ((worse, WORSE_BACKGROUND), (bursty, NO_BACKGROUND), (same, NO_BACKGROUND)):
        assert locator.evaluate("e => getComputedStyle(e).backgroundColor") == background
    assert "+20.0 %" in worse.inner_text()
    assert page.locator('#latency-table-raw th[data-load="c=8"] a.mark').inner_text() == "⚠1"

    # The page never scrolls sideways; a table wider than the screen scrolls in its own box, and says so.
    scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll_width <= inner_width
    box = page.locator("#latency-table-raw").locator("xpath=..")
    overflows = box.evaluate("e => e.scrollWidth > e.clientWidth")
    if width == 390:
        assert overflows and page.locator("#latency-raw + .cue").is_visible()
        box.evaluate("e => { e.scrollLeft = e.scrollWidth }")
        assert page.locator('#latency-table-raw th[data-load="c=96"]').is_visible()
    else:
        assert not overflows and not page.locator("#latency-raw + .cue").is_visible()

    # The lifecycle says what the update cost, without opening anything.
    update = page.locator('#lifecycle-table-raw tr[data-metric="change_to_served_s"]')
    assert update.is_visible() and "27.3 s" in update.inner_text() and "58 of 59 requests failed" in update.inner_text()
    assert requests == [published.as_uri()]  # self-contained: the file is the only thing loaded
    page.close()


@pytest.mark.parametrize("width, height", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_every_fold_opens(browser, published, width, height):
    page, requests = _open(browser, published, width, height)
    folds = page.locator("details")
    count = folds.count()
    # Grouped warnings (a failed experiment, bursty stages, a warned stage), 3 footnotes, the numbers, the trials
    # and the method.
    assert count == 3 + 3 + 1 + 1 + 1
    for i in range(count):
        fold = folds.nth(i)
        assert not fold.evaluate("e => e.open")
        fold.locator("summary").first.click()
        assert fold.evaluate("e => e.open")
        inside = fold.locator(":scope > :not(summary)").first
        assert inside.is_visible() and inside.inner_text().strip()
    trials = page.locator("#trials-raw").inner_text()
    assert "during: 58 of 59 requests failed (http_503 58)" in trials and "raw vLLM has no traffic split" in trials
    assert "RuntimeError: boom" in trials
    scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll_width <= inner_width  # opened, the folds still fit the width
    assert requests == [published.as_uri()]
    page.close()
