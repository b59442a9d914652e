"""The page in a real browser: headless Chromium (the Debian package, driven by Playwright)
uploads a synthetic film to the app served by uvicorn on loopback and shows its answer.

CI installs ``.[test]`` but no Debian packages: without /usr/bin/chromium this test is skipped
(with the reason). Playwright never downloads a browser here; it drives the system Chromium.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset
from spcxr.serve import ServeConfig, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Set to a path to keep the screenshot (docs/img/serve.png is made this way).
SCREENSHOT_ENV = "SPCXR_SERVE_SCREENSHOT"

# CI installs no Debian packages: there the test is skipped, before any fixture is built.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not found (apt-get install chromium)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served(serve_class_run, serve_seg_run):
    """The app on a free loopback port, in a uvicorn thread; yields its URL."""
    uvicorn = pytest.importorskip("uvicorn")
    config = ServeConfig(
        run=[str(serve_class_run), str(serve_seg_run)], device="cpu", heatmap_steps=4
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.mark.slow
def test_page_shows_prediction_heatmap_and_lung_overlay(served, tmp_path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} not found (apt-get install chromium); CI installs no Debian packages"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    write_synthetic_dataset(tmp_path / "synth", SyntheticConfig(n_patients=1, size=256, seed=7))
    film = sorted((tmp_path / "synth" / "images").glob("*.png"))[0]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 760},
        )
        try:
            page = browser.new_page()
            page.goto(served + "/")
            page.wait_for_selector("#cards h3", state="attached")  # the model list has arrived
            assert page.inner_text("#notice").startswith("Research use only. Not a medical device")
            assert "cls (classification" in page.inner_text("#models")
            page.set_input_files("#files", str(film))
            page.wait_for_selector(".film .probability", timeout=60_000)
            card = page.locator(".film").first
            assert card.locator("h2").inner_text() == film.name
            probabilities = card.locator(".probability").all_inner_texts()
            assert len(probabilities) == 3 and all(p.endswith(" %") for p in probabilities)
            assert abs(sum(float(p[:-2]) for p in probabilities) - 100.0) < 0.5
            assert card.locator(".predicted").inner_text() in (
                "normal",
                "consolidation",
                "bilateral_opacities",
            )
            assert "lung area" in card.locator(".lung-area").inner_text()
            for picture in (".film-image img", ".heatmap-image img", ".overlay-image img"):
                image = card.locator(picture)
                assert image.get_attribute("src").startswith("data:image/png;base64,")
                assert image.evaluate("img => img.complete && img.naturalWidth > 0")
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=False)
            assert shot.stat().st_size > 0
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
        finally:
            browser.close()
