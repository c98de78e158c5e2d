"""Screenshots of the `diffusekit serve` web page for the docs (docs/images/serve-*.png).

    PYTHONPATH=src:tests .venv/bin/python scripts/serve_screenshots.py

Starts a server on a free loopback port, drives the page in Debian's headless chromium (as tests/test_serve_page.py
does) and writes the images.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
JOBS = [("a photo of a purple ankle boot", 1), ("a photo of a red dress", 7), ("a photo of a yellow bag", 3)]


def main() -> None:
    import torch
    from PIL import Image, ImageDraw
    from playwright.sync_api import sync_playwright
    from serve_helpers import random_lora, running_server, wait_idle
    from test_serve_page import wait_images_loaded

    torch.set_num_threads(1)
    out = ROOT / "docs" / "images"
    models = ROOT / "out" / "serve-models"  # a models folder with one (random) LoRA, to show the picker
    (models / "Lora").mkdir(parents=True, exist_ok=True)
    random_lora(models / "Lora" / "redder.safetensors")
    with running_server(models_dir=models) as (url, app), sync_playwright() as p:
        wait_idle(app)
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 5")
        page.fill("#steps", "25")
        page.fill("#cfg_scale", "4")
        page.fill("#batch_size", "2")
        page.select_option("#sampler_name", "DPM++ 2M")
        for prompt, seed in JOBS:
            page.fill("#prompt", prompt)
            page.fill("#seed", str(seed))
            count = page.locator("#gallery .card").count()
            page.click("#generate")
            wait_images_loaded(page, count + 2)
        page.screenshot(path=str(out / "serve-page.png"))
        init = Image.new("RGB", (32, 32), (0, 0, 0))
        ImageDraw.Draw(init).ellipse((6, 4, 26, 28), fill=(200, 30, 40))
        init_path = out.parent.parent / "out" / "serve-init.png"
        init_path.parent.mkdir(exist_ok=True)
        init.save(init_path)
        page.set_input_files("#init-image", str(init_path))
        page.wait_for_selector("#mask-canvas", state="visible")
        box = page.locator("#mask-canvas").bounding_box()
        page.mouse.move(box["x"] + 20, box["y"] + 20)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] - 20, steps=12)
        page.mouse.up()
        page.fill("#prompt", "a photo of a blue dress")
        page.fill("#batch_size", "1")
        page.fill("#denoising_strength", "0.9")
        count = page.locator("#gallery .card").count()
        page.click("#generate")
        wait_images_loaded(page, count + 1)
        page.screenshot(path=str(out / "serve-inpaint.png"), full_page=True)
        browser.close()
    print(f"wrote {out / 'serve-page.png'} and {out / 'serve-inpaint.png'}")


if __name__ == "__main__":
    main()
