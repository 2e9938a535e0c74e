"""End to end in headless Debian chromium: a real uvicorn server, the page, uploads, search and errors."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from provenance.indexer import BuildOptions, build

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PROVENANCE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "bench" / "results" / "web-page.png"
N_PHOTOS = 6


@pytest.fixture(scope="module")
def sync_playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium, or `make browser`)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) not installed")
    return playwright.sync_playwright


@pytest.fixture(scope="module")
def corpus(coco_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser-corpus")
    rows = {
        json.loads(line)["file_name"]: line
        for line in (coco_dir / "metadata.jsonl").read_text().splitlines()
        if line.strip()
    }
    photos = sorted(coco_dir.glob("*.jpg"))[:N_PHOTOS]
    for p in photos:
        shutil.copy(p, root / p.name)
    (root / "metadata.jsonl").write_text("\n".join(rows[p.name] for p in photos) + "\n")
    return root


@pytest.fixture(scope="module")
def server(corpus, tmp_path_factory):
    """A real uvicorn server (in a thread of this process) on a free loopback port; yields its base URL."""
    import uvicorn

    from provenance.api import ServerConfig, create_app

    index_dir = tmp_path_factory.mktemp("browser-index") / "idx"
    build(str(corpus), index_dir, BuildOptions(descriptors=["sscd", "pdq"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(ServerConfig(index_dir=index_dir)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if not thread.is_alive():
                pytest.fail("the server thread exited (see the log above)")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become ready in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def browser(sync_playwright):
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def console_errors() -> list[str]:
    """Script errors and failed loads the page logs; a test that provokes one removes it."""
    return []


@pytest.fixture
def page(browser, server, console_errors):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    errors = console_errors
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.goto(server + "/")
    expect(pg.locator("#server-status")).to_contain_text(f"{N_PHOTOS} images", timeout=30_000)
    yield pg
    context.close()
    assert not errors, errors  # no script errors, no CSP violations, no failed loads


def test_upload_finds_the_photo_as_top_match(page, corpus):
    from playwright.sync_api import expect

    photo = sorted(corpus.glob("*.jpg"))[2]
    page.set_input_files("#file-input", str(photo))
    top = page.locator("#grid li").first
    expect(top).to_have_attribute("data-id", photo.name, timeout=30_000)
    expect(top.locator(".badge")).to_have_text("exact")
    expect(page.locator("#upload-verdict")).to_have_text("exact")
    expect(page.locator("#results-summary")).to_contain_text("Exact copy")
    expect(page.locator("#evidence-list")).to_contain_text("C2PA")
    # the visible-watermark row is highlighted by the record's own flag (the detector's gate), not by p >= 0.5
    visible = page.locator("#evidence-list dt", has_text=re.compile("^Visible watermark$")).locator(
        "xpath=following-sibling::dd[1]"
    )
    expect(visible).to_contain_text("% likely")
    assert (visible.get_attribute("class") == "yes") == ("(flagged)" in visible.inner_text())
    assert "thorough" not in visible.inner_text()  # the 288 px head, the server's default
    # thumbnails really loaded from /v1/items/{id}/thumbnail
    expect(top.locator("img")).to_have_js_property("complete", True)
    assert top.locator("img").evaluate("img => img.naturalWidth") > 0
    page.wait_for_load_state("networkidle")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_thorough_box_scans_with_the_512_px_head(page, corpus):
    from playwright.sync_api import expect

    box = page.get_by_label(re.compile("^Thorough visible-watermark check"))
    expect(box).to_be_visible()
    expect(box).not_to_be_checked()
    box.check()
    page.set_input_files("#file-input", str(sorted(corpus.glob("*.jpg"))[1]))
    visible = page.locator("#evidence-list dt", has_text=re.compile("^Visible watermark$")).locator(
        "xpath=following-sibling::dd[1]"
    )
    expect(visible).to_contain_text("thorough check", timeout=60_000)


def test_screenshot_box_finds_a_photo_shown_small_in_a_window(page, corpus, window_screenshot, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    photo = sorted(corpus.glob("*.jpg"))[3]
    shot = tmp_path / "shot.jpg"
    window_screenshot(Image.open(photo).convert("RGB"), 0.4).save(shot, quality=85)
    box = page.get_by_label(re.compile("Look inside screenshots"))
    expect(box).to_be_visible()
    expect(box).not_to_be_checked()
    box.check()
    page.set_input_files("#file-input", str(shot))
    expect(page.locator("#upload-verdict")).to_have_text("replica", timeout=60_000)
    expect(page.locator("#grid li").first).to_have_attribute("data-id", photo.name)
    expect(page.locator("#evidence-list")).to_contain_text("the centre of the image")


def test_crops_box_reads_our_mark_in_a_cropped_generation(page, corpus, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    from provenance.watermarks.invisible import embed_provenance_mark

    generated = Image.open(sorted(corpus.glob("*.jpg"))[4]).convert("RGB").resize((512, 512))
    cropped = tmp_path / "cropped.jpg"
    embed_provenance_mark(generated, 0x5EED1234).crop((9, 14, 480, 430)).save(cropped, quality=85)
    invisible = page.locator("#evidence-list dt", has_text=re.compile("^Invisible watermarks$")).locator(
        "xpath=following-sibling::dd[1]"
    )
    page.set_input_files("#file-input", str(cropped))
    expect(invisible).to_have_text("none found", timeout=60_000)  # the crop moved the mark's block grid
    box = page.get_by_label(re.compile("Look for invisible marks in crops"))
    expect(box).to_be_visible()
    expect(box).not_to_be_checked()
    box.check()
    page.set_input_files("#file-input", str(cropped))
    expect(invisible).to_contain_text("provenance", timeout=60_000)
    expect(invisible).to_contain_text("5eed1234")


def test_caption_search_shows_results(page, corpus):
    from playwright.sync_api import expect

    caption = json.loads((corpus / "metadata.jsonl").read_text().splitlines()[0])["caption"]
    word = max(caption.strip(".").split(), key=len)
    expect(page.locator("#search-mode")).to_have_value("caption")  # no clip in this index
    page.fill("#search-input", word)
    page.press("#search-input", "Enter")
    expect(page.locator("#grid li").first).to_be_visible(timeout=30_000)
    expect(page.locator("#results-summary")).to_contain_text(word)
    assert page.locator("#grid li").count() >= 1
    expect(page.locator("#grid")).to_contain_text(word, ignore_case=True)


def test_text_file_shows_not_an_image_error(page, tmp_path, console_errors):
    from playwright.sync_api import expect

    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image")
    page.set_input_files("#file-input", str(notes))
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_contain_text("Not an image")
    expect(error).to_have_attribute("role", "alert")
    assert page.locator("#grid li").count() == 0
    # the browser logs the 415 it was sent; that one is expected
    console_errors[:] = [e for e in console_errors if "status of 415" not in e]


def test_drop_zone_is_keyboard_reachable_and_accepts_drops(page, corpus):
    from playwright.sync_api import expect

    for _ in range(5):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "drop-zone":
            break
    assert page.evaluate("document.activeElement.id") == "drop-zone"
    photo = sorted(corpus.glob("*.jpg"))[4]
    b64 = base64.b64encode(photo.read_bytes()).decode()
    page.evaluate(
        """([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "image/jpeg" }));
        document.getElementById("drop-zone").dispatchEvent(
            new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""",
        [b64, photo.name],
    )
    expect(page.locator("#grid li").first).to_have_attribute("data-id", photo.name, timeout=30_000)


def test_phone_layout_has_no_horizontal_scroll(browser, server):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        pg = context.new_page()
        pg.goto(server + "/")
        assert pg.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert pg.locator("#drop-zone").bounding_box()["width"] > 250
    finally:
        context.close()


def test_api_docs_render_offline(browser, server):
    """Swagger UI at /docs renders the routes with every request served by the app itself."""
    from playwright.sync_api import expect

    context = browser.new_context()
    outside: list[str] = []
    try:
        pg = context.new_page()
        pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server) else None)
        pg.goto(server + "/docs")
        expect(pg.locator(".swagger-ui .opblock-summary-path", has_text="/v1/scan/batch")).to_be_visible(timeout=30_000)
        expect(pg.locator(".swagger-ui .info .title")).to_contain_text("provenance")
    finally:
        context.close()
    assert not outside, outside


def test_thorough_check_box_reads_our_mark_in_a_crop(page, corpus, tmp_path):
    """The one switch a user understands: the page's first box turns on the crop search (and the centre view)."""
    from PIL import Image
    from playwright.sync_api import expect

    from provenance.watermarks.invisible import embed_provenance_mark

    generated = Image.open(sorted(corpus.glob("*.jpg"))[5]).convert("RGB").resize((512, 512))
    cropped = tmp_path / "cropped.jpg"
    embed_provenance_mark(generated, 0x7E57AB1E).crop((9, 14, 480, 430)).save(cropped, quality=85)
    boxes = page.locator("#scan-options input[type=checkbox]")
    expect(boxes.first).to_have_attribute("name", "thorough")  # first: the switch before the experts' ones
    box = page.get_by_label(re.compile("^Thorough check"))
    expect(box).not_to_be_checked()
    box.check()
    page.set_input_files("#file-input", str(cropped))
    invisible = page.locator("#evidence-list dt", has_text=re.compile("^Invisible watermarks$")).locator(
        "xpath=following-sibling::dd[1]"
    )
    expect(invisible).to_contain_text("7e57ab1e", timeout=60_000)
