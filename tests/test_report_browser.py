"""The published report in headless Chromium, at desktop (1280 × 900) and phone (390 × 844) width, for a local run
and for the four-layer cluster run: the answer on the first screen, no sideways scroll, every fold opens, every
data link resolves, nothing is fetched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import CHROMIUM
from test_report import make_run

from servinglab import report
from servinglab.report.table import ROWS

if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (CI installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MEASURED_BACKGROUND = (0xE6, 0xF4, 0xEA)  # the colour of a measured cell
DESKTOP, PHONE = {"width": 1280, "height": 900}, {"width": 390, "height": 844}
FIRST_SCREEN_PX = 900
CLUSTER_LAYERS = ["raw", "kserve-standard", "kserve-knative", "llm-d"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Both reports, each published once into reports/ beside the runs/ it was made from (as `servinglab run`
    leaves them), so the data section's relative links can be followed."""
    from test_report_cluster import RUNS

    local_root = tmp_path_factory.mktemp("local")
    cluster_root = tmp_path_factory.mktemp("cluster")
    cluster_run = cluster_root / "runs" / "qwen-cluster" / "cluster-full"
    shutil.copytree(RUNS / "cluster-full", cluster_run)
    local_run = make_run(local_root, "complete")
    return {
        "local": report.publish(local_run, local_root / "reports"),
        "cluster": report.publish(cluster_run, cluster_root / "reports"),
        "local run": local_run,
    }


def open_page(browser, path: Path, viewport: dict):
    """The page at ``viewport``, with every request it made recorded in ``page.requests``."""
    page = browser.new_page(viewport=viewport)
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page


def bottom(locator) -> float:
    """Where an element ends on the page (px from its top), scrolled wherever the page is."""
    box = locator.bounding_box()
    assert box, locator
    return box["y"] + box["height"] + locator.page.evaluate("window.scrollY")


def only_the_page_itself(page, path: Path) -> bool:
    return all(url == path.as_uri() or url.startswith("data:") for url in page.requests)


@pytest.mark.parametrize("name", ["local", "cluster"])
def test_the_first_screen_holds_the_verdict_and_the_whole_decision_table(browser, published, name):
    page = open_page(browser, published[name], DESKTOP)
    verdict = page.locator("#verdict")
    assert verdict.is_visible() and "For these objectives (" in verdict.inner_text()
    assert "on this platform (" in verdict.inner_text()
    for line in ("#provenance-line", "#validity"):
        assert page.locator(line).is_visible()
        assert page.locator(line).bounding_box()["height"] < 40, line  # one line (two at most)
    table = page.locator("#decision-table")
    assert table.is_visible() and bottom(verdict) <= FIRST_SCREEN_PX and bottom(table) <= FIRST_SCREEN_PX
    assert table.locator("tbody tr").count() == len(ROWS)
    # One line a cell: its badge and the start of its text, the rest behind the cell's <details>.
    summaries = table.locator("tbody td > details.cell > summary")
    layers = len(table.locator("thead tr").nth(1).locator("th").all())
    assert summaries.count() == layers * len(ROWS)
    heights = page.evaluate("[...document.querySelectorAll('#decision-table tbody td summary')]"
                            ".map(s => s.getBoundingClientRect().height)")  # fmt: skip
    assert max(heights) < 24, max(heights)
    assert page.locator("#decision-cards").is_hidden()  # the phone's rendering of the same table
    assert only_the_page_itself(page, published[name])
    page.close()


def test_local_first_screen_cells(browser, published):
    page = open_page(browser, published["local"], DESKTOP)
    table = page.locator("#decision-table")
    groups = [h.strip() for h in table.locator("thead tr").nth(0).locator("th").all_inner_texts()]
    assert groups == ["Dimension", "raw vLLM", "KServe InferenceService", "LLMInferenceService (llm-d)"]
    headers = [h.strip() for h in table.locator("thead tr").nth(1).locator("th").all_inner_texts()]
    assert [h.split(" ")[0] for h in headers] == ["raw", "kserve", "llm-d"]
    lifecycle = table.locator("#row-model_lifecycle td").first
    assert lifecycle.locator(".tag").inner_text() == "measured"
    ttft = table.locator("#row-ttft td").first
    assert ttft.locator(".tag").inner_text() == "measured · synthetic"  # its stages were made by a script
    assert lifecycle.locator(".full").is_hidden()
    lifecycle.locator("summary").click()
    assert lifecycle.locator(".full").is_visible() and "41.7 s" in lifecycle.locator(".full").inner_text()
    assert "raw fits so far" in page.locator("#verdict").inner_text()
    assert "kserve, llm-d unknown: no measurement on this run's platform" in page.locator("#verdict").inner_text()
    for anchor in ("fig-time-to-ready", "fig-latency-throughput", "fig-distributions", "fig-goodput"):
        box = page.locator(f"#{anchor} svg").bounding_box()
        assert box and box["width"] > 200 and box["height"] > 50, anchor
    page.close()


@pytest.mark.parametrize("name", ["local", "cluster"])
def test_at_phone_width_each_layer_is_a_card_and_nothing_scrolls_sideways(browser, published, name):
    from PIL import Image

    page = open_page(browser, published[name], PHONE)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
    assert page.locator("#verdict").bounding_box()["y"] < PHONE["height"]
    assert page.locator("#decision-table").is_hidden()
    cards = page.locator("#decision-cards > section.card")
    names = [h.split(" ")[0] for h in cards.locator("h3").all_inner_texts()]
    assert names == (CLUSTER_LAYERS if name == "cluster" else ["raw", "kserve", "llm-d"])
    for i in range(cards.count()):  # every layer, every row: nothing hidden, nothing wider than the screen
        rows = cards.nth(i).locator(".card-row")
        assert rows.count() == len(ROWS)
        for box in (rows.nth(j).bounding_box() for j in range(rows.count())):
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    shot = page.screenshot(full_page=False)
    image = Image.open(__import__("io").BytesIO(shot)).convert("RGB")
    assert image.width == PHONE["width"]
    assert only_the_page_itself(page, published[name])
    page.close()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
@pytest.mark.parametrize("name", ["local", "cluster"])
def test_every_details_opens_when_clicked(browser, published, name, viewport):
    page = open_page(browser, published[name], viewport)
    # On a desktop every fold but the cards' (hidden there); on a phone the cards', the others being the same
    # elements at another width.
    shown = page.evaluate("""() => [...document.querySelectorAll('details')].map(d =>
        window.innerWidth > 760 ? !d.closest('#decision-cards') : !!d.closest('#decision-cards'))""")
    assert sum(shown) >= len(ROWS) * 3
    details = page.locator("details")
    for i, visible in enumerate(shown):  # in document order: a fold inside a fold opens after its parent
        if not visible:
            continue
        fold = details.nth(i)
        assert fold.get_attribute("open") is None
        fold.locator(":scope > summary").click()
        assert fold.get_attribute("open") is not None, i
        content = fold.locator(":scope > :not(summary)").first
        assert content.is_visible(), (i, fold.inner_html()[:200])
    assert only_the_page_itself(page, published[name])
    page.close()


@pytest.mark.parametrize("name", ["local", "cluster"])
def test_every_link_resolves(browser, published, name):
    path = published[name]
    page = open_page(browser, path, DESKTOP)
    data_links = page.locator("#data a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert len(data_links) >= 5  # run.json, the data files and the CSV tables
    for href in data_links:
        target = (path.parent / unquote(urlsplit(href).path)).resolve()
        assert target.is_file(), href
    anchors = page.locator("a[href^='#']").evaluate_all("links => links.map(a => a.getAttribute('href').slice(1))")
    missing = page.evaluate("ids => ids.filter(id => !document.getElementById(id))", sorted(set(anchors)))
    assert not missing
    toc = page.locator("#toc a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert "#table" in toc and "#warnings" in toc and "#data" in toc
    page.locator("#toc a[href='#lifecycle']").click()
    assert page.evaluate("location.hash") == "#lifecycle" and page.locator("#lifecycle h2").is_visible()
    assert only_the_page_itself(page, path)
    page.close()


def test_cluster_report_cells_and_figures(browser, published):
    """A full cluster run: two KServe layers under one column, every cell measured or observed, every figure."""
    from PIL import Image

    page = open_page(browser, published["cluster"], DESKTOP)
    table = page.locator("#decision-table")
    kserve = table.locator("thead tr").nth(0).locator("th", has_text="KServe InferenceService")
    assert kserve.get_attribute("colspan") == "2"
    assert table.locator("tbody td .tag").count() == 4 * len(ROWS)
    # Every cell measured or observed (but routing: the cluster example does not run that experiment), and
    # every one says its numbers were made by a script.
    statuses = table.locator("tbody tr:not(#row-routing) td .tag").all_inner_texts()
    assert len(statuses) == 4 * (len(ROWS) - 1) and {s.lower().split(" · ")[0] for s in statuses} == {"measured", "observed"}
    assert all(s.lower().endswith("· synthetic") for s in statuses)
    assert "synthetic: 16 latency stages" in page.locator("#provenance-line").inner_text()
    assert page.locator("#provenance").is_visible() and "Synthetic data" in page.locator("#provenance").inner_text()
    canary = table.locator("#row-rollout_canary td").nth(2)  # kserve-knative
    canary.locator("summary").click()
    assert "21.3 % observed" in canary.locator(".full").inner_text()
    for anchor in ("fig-lifecycle-ready", "fig-update-timeline", "fig-cold-start", "fig-canary", "fig-cost"):
        box = page.locator(f"#{anchor} svg").bounding_box()
        assert box and box["width"] > 200 and box["height"] > 50, anchor
    assert page.locator("#recommendations tbody tr").count() >= 6
    assert page.locator("#lifecycle-table tbody tr").count() == 28
    # An evidence link lands on its figure.
    cold = table.locator("#row-scale_to_zero td").nth(2)
    cold.locator("summary").click()
    cold.locator("a", has_text="evidence").click()
    assert page.evaluate("location.hash") == "#fig-cold-start"
    image = Image.open(__import__("io").BytesIO(page.screenshot(full_page=True))).convert("RGB")
    assert image.width == DESKTOP["width"] and MEASURED_BACKGROUND in {c for _, c in image.getcolors(maxcolors=1 << 20)}
    page.close()


def test_the_readme_screenshot_is_regenerated_by_its_script(published, tmp_path):
    from PIL import Image

    out = tmp_path / "first-screen.png"
    done = subprocess.run([sys.executable, str(REPO / "docs" / "screenshot.py"), str(published["local run"]),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = Image.open(out)
    assert image.size == (DESKTOP["width"], DESKTOP["height"]) and out.stat().st_size < 150_000
    missing = subprocess.run([sys.executable, str(REPO / "docs" / "screenshot.py"), str(tmp_path / "nowhere"),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr


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
    ttft = page.locator('#latency-table-raw tr[data-metric="median_ttft_ms"] td[data-load="c=1"]')
    assert ttft.is_visible() and "+10.0 %" in ttft.inner_text()
    box = page.locator("#fig-compare-latency-throughput svg").bounding_box()
    assert box and 200 < box["width"] <= 390 and box["height"] > 50
    scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll_width <= inner_width  # wide tables scroll inside their own box
    assert requests == [published.as_uri()]
    page.screenshot(path=str(tmp_path / "compare-390.png"), full_page=True)
    page.close()
