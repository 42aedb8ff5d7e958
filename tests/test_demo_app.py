"""The Gradio demo (demo/app.py): drawing helpers, one turn in-process, and a real browser session.

The browser test starts the app on localhost, drives Debian's Chromium through Playwright (no
browser download: `executable_path` points at the system binary), uploads a fixture image, asks a
question, and checks that the page shows the answer, the legend and the overlay image. It skips,
with the reason, when Gradio, Playwright or Chromium is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from flmm_hf.grounded_chat import GroundedAnswer

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in the image?"
MAX_NEW_TOKENS = 12  # also the app's slider value here, so the in-process answer equals the page's
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _load_app():
    spec = importlib.util.spec_from_file_location("flmm_demo_app", REPO_ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return _load_app()


@pytest.fixture(scope="module")
def tiny(app):
    return app.tiny_random_model()


@pytest.fixture(scope="module")
def image(fixtures_dir) -> Image.Image:
    return Image.open(fixtures_dir / "coco" / "images" / "000000039769.png").convert("RGB")


@pytest.fixture(scope="module")
def expected(tiny, image) -> GroundedAnswer:
    """The tiny model's greedy answer (deterministic: the app gives the same one)."""
    model, processor = tiny
    return model.chat(image, QUESTION, processor=processor, selector="none", max_new_tokens=MAX_NEW_TOKENS)


def test_legend_and_overlay(app):
    text = "a red circle and a blue square"
    answer = GroundedAnswer(
        text=text, phrases=["red circle", "blue square"], spans=[(2, 12), (19, 30)],
        masks=torch.zeros(2, 10, 12, dtype=torch.bool),
    )
    answer.masks[0, :5] = True
    segments, colours = app.legend_segments(answer)
    assert "".join(piece for piece, _ in segments) == text
    assert [label for _, label in segments if label] == ["1. red circle", "2. blue square"]
    assert colours == {"1. red circle": app.PALETTE[0], "2. blue square": app.PALETTE[1]}
    base = Image.new("RGB", (12, 10), (255, 255, 255))
    drawn = app.overlay_masks(base, answer.masks, [app.PALETTE[0], app.PALETTE[1]])
    assert drawn.size == base.size
    assert drawn.getpixel((5, 2)) != (255, 255, 255) and drawn.getpixel((5, 8)) == (255, 255, 255)


def test_respond_in_process(app, tiny, image, expected):
    model, processor = tiny
    first = expected
    word = first.text.split()[0]
    state = app.DemoState()
    messages, segments, colours, picture, status = app.respond(
        model, processor, image, QUESTION, f"{word}, a purple elephant", False, "auto", MAX_NEW_TOKENS, state
    )
    assert messages[-1] == {"role": "assistant", "content": first.text}
    assert state.last_answer.phrases == [word] and "purple elephant" in status
    assert f"1. {word}" in colours and picture.size == image.size
    assert app.respond(model, processor, None, QUESTION, "", False, "auto", 8)[-1] == "Upload an image first."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_browser_session(app, tiny, image, expected, fixtures_dir):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'flmm-hf[demo]')")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed (pip install playwright)")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("Chromium is not installed (apt-get install chromium)")

    model, processor = tiny
    word = expected.text.split()[0]  # greedy: the app's answer has it too

    demo = app.build_demo(model, processor, max_new_tokens=MAX_NEW_TOKENS)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.locator("#ask").wait_for(state="visible")
                page.locator("#image-input input[type=file]").set_input_files(
                    str(fixtures_dir / "coco" / "images" / "000000039769.png")
                )
                page.locator("#image-input img").first.wait_for(state="visible")  # the upload is shown
                page.locator("#question textarea").fill(QUESTION)
                page.locator("#phrases textarea").fill(word)
                page.locator("#ask").click()

                overlay = page.locator("#overlay img").first
                overlay.wait_for(state="visible")
                page.wait_for_function(
                    "() => { const i = document.querySelector('#overlay img'); return i && i.complete && i.naturalWidth > 0; }"
                )
                size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
                assert size == [image.width, image.height]
                page.locator("#legend").get_by_text(f"1. {word}").first.wait_for(state="visible")
                chat_text = page.locator("#chatbot").inner_text()
            finally:
                browser.close()
    finally:
        demo.close()
    assert demo.flmm_state.last_answer.text == expected.text
    assert QUESTION in chat_text
    assert " ".join(expected.text.split()[:3]) in " ".join(chat_text.split())
