"""diffusekit serve, web page: a real headless Chromium (Debian's package, driven by Playwright) types a prompt,
clicks Generate, sees progress with previews, and gets the image with its parameters; then inpaints a painted mask."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
playwright_api = pytest.importorskip("playwright.sync_api")
requests = pytest.importorskip("requests")

from serve_helpers import random_lora, running_server, wait_idle  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not shutil.which("chromium"),
                                reason="needs Debian's chromium: bash scripts/setup.sh --test")


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    (models / "Lora").mkdir()
    random_lora(models / "Lora" / "redder.safetensors")
    with running_server(models_dir=models) as (url, app):
        wait_idle(app)
        yield url, app


def wait_images_loaded(page, count: int) -> None:
    """Wait until the gallery has ``count`` cards and every card's image has loaded (not just been added)."""
    page.wait_for_function(
        "n => { const imgs = [...document.querySelectorAll('#gallery .card img')];"
        " return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0); }", arg=count,
        timeout=120_000)


def _library_image(prompt, seed, steps, size, cfg, sampler, **kwargs):
    import torch

    import diffusekit
    from diffusekit import DiffusionPipeline, get_scheduler

    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-sd")
    cls = getattr(diffusekit, "StableDiffusionInpaintPipeline" if "mask_image" in kwargs else "StableDiffusionPipeline")
    run = cls.from_pipe(pipe, scheduler=get_scheduler(sampler, pipe.scheduler.config))
    run.set_progress_bar_config(disable=True)
    return run(prompt=[prompt], num_inference_steps=steps, guidance_scale=cfg, height=size, width=size,
               generator=[torch.Generator("cpu").manual_seed(seed)], **kwargs).images[0]


def test_page_generates_with_progress_and_shows_parameters(server, browser):
    from PIL import Image

    url, _ = server
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    external = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 5")
    assert page.locator("#model").input_value() == "diffusekit-fashion-sd"
    page.fill("#prompt", "a photo of a purple ankle boot")
    page.select_option("#sampler_name", "DPM++ 2M")
    page.fill("#steps", "40")
    page.fill("#cfg_scale", "4")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#seed", "123")
    page.click("#generate")
    wait_images_loaded(page, 1)
    log = page.evaluate("window.dkLog")
    running = [e for e in log if e["state"] == "running" and e["step"]]
    assert running and any(e["preview"] for e in running) and running[-1]["steps"] == 40
    assert page.locator("#progress-text").inner_text() == "done"
    assert page.locator("#preview").get_attribute("src").startswith("data:image/png;base64,")
    text = page.locator("#gallery .card pre").first.inner_text()
    assert text.startswith("a photo of a purple ankle boot\n")
    assert "Steps: 40, Sampler: DPM++ 2M, CFG scale: 4, Seed: 123, Size: 64x64" in text
    size = page.evaluate("(() => { const i = document.querySelector('#gallery .card img');"
                         " return [i.naturalWidth, i.naturalHeight]; })()")
    assert size == [64, 64]
    link = page.locator("#gallery .card a").first
    assert link.get_attribute("download") == "diffusekit-123.png"
    png = requests.get(url + link.get_attribute("href"), timeout=30).content
    got = Image.open(io.BytesIO(png))
    assert got.info["parameters"] == text
    want = _library_image("a photo of a purple ankle boot", 123, 40, 64, 4.0, "DPM++ 2M")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    page.click("#gallery .card button")  # "Use seed"
    assert page.locator("#seed").input_value() == "123"
    assert not errors and not external
    page.close()


def test_page_inpaints_a_painted_mask(server, browser, tmp_path):
    from PIL import Image, ImageDraw

    url, app = server
    wait_idle(app)
    init = Image.new("RGB", (32, 32), (10, 10, 10))
    ImageDraw.Draw(init).ellipse((6, 4, 26, 28), fill=(200, 30, 40))
    init.save(tmp_path / "init.png")
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 5")
    page.set_input_files("#init-image", str(tmp_path / "init.png"))
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.locator("#width").input_value() == "32"
    page.locator("#mask-canvas").scroll_into_view_if_needed()  # as a user scrolls to paint (the form is tall)
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] - 5, steps=10)
    page.mouse.up()
    page.fill("#prompt", "a photo of a blue dress")
    page.fill("#steps", "5")
    page.fill("#seed", "8")
    page.fill("#denoising_strength", "0.9")
    page.click("#generate")
    wait_images_loaded(page, 1)
    text = page.locator("#gallery .card pre").first.inner_text()
    assert "Denoising strength: 0.9" in text and "Seed: 8" in text
    jobs = [j for j in app.state.serve.queue._jobs.values() if j.source == "jobs"]
    job = jobs[-1]
    assert job.request.task == "inpainting"
    mask = np.asarray(job.request.mask)
    assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
    assert 0.02 < (mask == 255).mean() < 0.6  # the painted stroke, not the whole image
    page.close()


def test_page_lora_picker_adds_the_prompt_tag(server, browser):
    url, app = server
    wait_idle(app)
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_selector("#loras .chip")
    assert page.locator("#loras .chip").all_inner_texts() == ["redder"]
    page.fill("#prompt", "a photo of a dress")
    page.click("#loras .chip")
    assert page.locator("#prompt").input_value() == "a photo of a dress <lora:redder:1>"
    page.fill("#steps", "3")
    page.fill("#batch_size", "2")
    page.click("#generate")
    wait_images_loaded(page, 2)  # every card of the batch shows its image
    text = page.locator("#gallery .card pre").first.inner_text()
    assert text.startswith("a photo of a dress <lora:redder:1>\n") and 'Lora hashes: "redder: ' in text
    page.close()


def test_page_sends_the_step_savings(server, browser):
    """The page's "Guidance interval", "Deep cache" and "FreeU" inputs reach the job and its infotext."""
    url, app = server
    wait_idle(app)
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 5")
    page.fill("#prompt", "a photo of a red bag")
    page.fill("#steps", "4")
    page.fill("#guidance_interval", "0.2-0.8")
    page.fill("#deep_cache", "3")
    page.fill("#freeu", "0.9, 0.2 1.5,1.6,")  # spaces, commas, a trailing comma
    page.click("#generate")
    wait_images_loaded(page, 1)
    text = page.locator("#gallery .card pre").first.inner_text()
    assert "Guidance interval: 0.2-0.8, Deep cache interval: 3, Deep cache branch: 0, " \
           "FreeU: b1=1.5 b2=1.6 s1=0.9 s2=0.2" in text
    page.close()
