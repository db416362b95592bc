"""The published report in headless Chromium: the table and the figure show, at desktop and phone width."""

from __future__ import annotations

import os
import shutil

import pytest
from test_report import make_run

from servinglab import report
from servinglab.report.table import ROWS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (CI installs it)", allow_module_level=True)

MEASURED_BACKGROUND = (0xE6, 0xF4, 0xEA)  # the colour of a measured cell


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )  # fmt: skip
        yield browser
        browser.close()


@pytest.mark.parametrize("width, height", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_table_and_figure_render(browser, tmp_path, width, height):
    from PIL import Image

    published = report.publish(make_run(tmp_path, "complete"), tmp_path / "reports")
    page = browser.new_page(viewport={"width": width, "height": height})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(published.as_uri())
    page.wait_for_load_state("load")

    table = page.locator("#decision-table")
    assert table.is_visible()
    groups = [h.strip() for h in table.locator("thead tr").nth(0).locator("th").all_inner_texts()]
    assert groups == ["Dimension", "raw vLLM", "KServe InferenceService", "LLMInferenceService (llm-d)"]
    headers = [h.strip() for h in table.locator("thead tr").nth(1).locator("th").all_inner_texts()]
    assert [h.split("\n")[0] for h in headers] == ["raw", "kserve", "llm-d"]
    assert table.locator("tbody tr").count() == len(ROWS)
    assert "41.7 s" in table.locator("#row-model_lifecycle").inner_text()

    for anchor in ("fig-time-to-ready", "fig-latency-throughput", "fig-distributions", "fig-goodput"):
        box = page.locator(f"#{anchor} svg").bounding_box()
        assert box and box["width"] > 200 and box["height"] > 50, anchor
    assert page.locator("#latency-stages tbody tr").count() == 3
    assert "1600.0" in page.locator("#row-ttft").inner_text()

    # The page itself never scrolls sideways; the wide table scrolls inside its own box.
    scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll_width <= inner_width

    # Self-contained: the file is the only thing loaded.
    assert requests == [published.as_uri()]

    shot = tmp_path / f"report-{width}.png"
    table.scroll_into_view_if_needed()
    page.screenshot(path=str(shot), full_page=True)
    image = Image.open(shot).convert("RGB")
    assert image.width == width and image.height > height
    assert MEASURED_BACKGROUND in {c for _, c in image.getcolors(maxcolors=1 << 20)}
    page.close()


@pytest.mark.parametrize("width, height", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_cluster_report_renders(browser, tmp_path, width, height):
    """A full cluster run: two KServe layers under one column, every cell measured or observed, every figure."""
    from PIL import Image
    from test_report_cluster import RUNS

    run = tmp_path / "runs" / "cluster-full"
    shutil.copytree(RUNS / "cluster-full", run)
    published = report.publish(run, tmp_path / "reports")
    page = browser.new_page(viewport={"width": width, "height": height})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(published.as_uri())
    page.wait_for_load_state("load")

    table = page.locator("#decision-table")
    kserve = table.locator("thead tr").nth(0).locator("th", has_text="KServe InferenceService")
    assert kserve.get_attribute("colspan") == "2"
    layers = [h.split("\n")[0].strip() for h in table.locator("thead tr").nth(1).locator("th").all_inner_texts()]
    assert layers == ["raw", "kserve-standard", "kserve-knative", "llm-d"]
    assert table.locator("tbody td .tag").count() == 4 * len(ROWS)
    # Every cell measured or observed (but routing: the cluster example does not run that experiment), and
    # every one says its numbers were made by a script.
    statuses = table.locator("tbody tr:not(#row-routing) td .tag").all_inner_texts()
    assert len(statuses) == 4 * (len(ROWS) - 1) and {s.lower().split(" · ")[0] for s in statuses} == {"measured", "observed"}
    assert all(s.lower().endswith("· synthetic") for s in statuses)
    assert page.locator("#provenance").is_visible() and "Synthetic data" in page.locator("#provenance").inner_text()
    assert "21.3 % observed" in table.locator("#row-rollout_canary").inner_text()
    for anchor in ("fig-lifecycle-ready", "fig-update-timeline", "fig-cold-start", "fig-canary", "fig-cost"):
        box = page.locator(f"#{anchor} svg").bounding_box()
        assert box and box["width"] > 200 and box["height"] > 50, anchor
    assert page.locator("#recommendations tbody tr").count() >= 6
    assert page.locator("#lifecycle-table tbody tr").count() == 28

    # An evidence link lands on its figure.
    table.locator("#row-scale_to_zero a", has_text="evidence").nth(2).click()  # kserve-knative
    assert page.evaluate("location.hash") == "#fig-cold-start"

    scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll_width <= inner_width
    assert requests == [published.as_uri()]
    shot = tmp_path / f"cluster-{width}.png"
    page.screenshot(path=str(shot), full_page=True)
    image = Image.open(shot).convert("RGB")
    assert image.width == width and MEASURED_BACKGROUND in {c for _, c in image.getcolors(maxcolors=1 << 20)}
    page.close()


def test_comparison_renders_at_phone_width(browser, tmp_path):
    from test_report_compare import make_run as make_compared_run

    from servinglab.report.compare import publish_comparison

    runs = [make_compared_run(tmp_path, "20261126T000000Z"),
            make_compared_run(tmp_path, "20261127T000000Z", ttft=11.0, version="0.33.0")]  # fmt: skip
    published = publish_comparison(runs, tmp_path / "reports")
    page = browser.new_page(viewport={"width": 390, "height": 844})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(published.as_uri())
    page.wait_for_load_state("load")

    assert page.locator("#run-context tr.differs").count() == 2  # engine version and fingerprint
    ttft = page.locator('#latency-table-raw tr[data-load="c=1"][data-metric="median_ttft_ms"]')
    assert ttft.is_visible() and "+10.0 %" in ttft.inner_text()
    box = page.locator("#fig-compare-latency-throughput svg").bounding_box()
    assert box and 200 < box["width"] <= 390 and box["height"] > 50
    scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll_width <= inner_width  # wide tables scroll inside their own box
    assert requests == [published.as_uri()]
    page.screenshot(path=str(tmp_path / "compare-390.png"), full_page=True)
    page.close()
