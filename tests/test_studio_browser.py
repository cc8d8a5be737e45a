"""The studio page in real headless Chromium (Selenium + Debian's chromium-driver), on the tiny bundle.

Chromium is installed by the test set-up when missing (``apt-get install chromium
chromium-driver`` as root); when it cannot be made available the test fails.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf

from tests.bundle import build_tiny_bundle
from tests.studio_server import StudioProcess

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_CANDIDATES = ("chromedriver",)
WAVE_RGB = (0x7F, 0xB4, 0xFF)  # --wave in style.css


def _find(names) -> str | None:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages when missing (needs root)."""
    browser, driver = _find(CHROMIUM_CANDIDATES), _find(DRIVER_CANDIDATES)
    if (browser is None or driver is None) and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
        browser, driver = _find(CHROMIUM_CANDIDATES), _find(DRIVER_CANDIDATES)
    if browser is None or driver is None:
        pytest.fail("the browser test needs chromium and chromedriver: apt-get install chromium chromium-driver "
                    "(done automatically when the tests run as root on Debian/Ubuntu)")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                 "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(condition, timeout: float = 60, what: str = "condition", driver=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    page = "" if driver is None else driver.execute_script(
        "return document.getElementById('message').textContent + ' | jobs: ' + "
        "[...document.querySelectorAll('.job')].map(j => j.dataset.status).join(',')")
    raise AssertionError(f"timed out waiting for {what} ({page})")


def open_page(driver, studio: StudioProcess) -> None:
    driver.get(studio.url)
    wait(lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), what="the page to load")


def jobs(driver, status: str | None = None):
    from selenium.webdriver.common.by import By

    selector = ".job" + (f'[data-status="{status}"]' if status else "")
    return driver.find_elements(By.CSS_SELECTOR, f"#history {selector}")


def wave_pixels(png: bytes) -> int:
    """How many pixels of a screenshot have the waveform's colour."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(WAVE_RGB)).max(axis=-1) <= 24).sum())


def bright_pixels(png: bytes) -> int:
    """How many pixels of a screenshot are lit (a drawn spectrogram's cells are not black)."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int((pixels.max(axis=-1) > 60).sum())


def test_generate_inpaint_and_history_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = browser
    bundle = build_tiny_bundle(tmp_path / "bundle")
    studio = StudioProcess(tmp_path / "out", bundle)
    try:
        open_page(driver, studio)
        assert driver.title == "sa3 studio" and not jobs(driver)
        # Offline: every resource the page loaded came from the studio itself.
        sources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert sources and all(s.startswith(studio.url) for s in sources), sources

        driver.find_element(By.ID, "prompt").send_keys("glass shattering on stone")
        for field, value in (("seconds", "2"), ("steps", "2")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "dice").click()
        seed = int(driver.find_element(By.ID, "seed").get_attribute("value"))
        driver.find_element(By.ID, "generate").click()
        first = wait(lambda: jobs(driver, "done"), what="the first result", driver=driver)[0]
        assert f"seed {seed}" in first.find_element(By.CSS_SELECTOR, ".summary").text
        audio = first.find_element(By.CSS_SELECTOR, "audio")
        duration = driver.execute_async_script(
            "const [audio, done] = arguments; audio.preload = 'auto';"
            "audio.addEventListener('loadedmetadata', () => done(audio.duration)); audio.load();", audio)
        assert duration == pytest.approx(2.0, abs=0.01)  # the player really loads the WAV

        # Inpaint: take the result as input, drag over its second quarter, generate again.
        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "prompt").send_keys("drum fill")
        first.find_element(By.CSS_SELECTOR, ".use-input").click()
        canvas = driver.find_element(By.ID, "input-wave")
        width = canvas.size["width"]
        ActionChains(driver).move_to_element_with_offset(canvas, -width // 4 + 1, 0).click_and_hold() \
            .move_by_offset(width // 4, 0).release().perform()
        region = driver.find_element(By.CSS_SELECTOR, "#regions li").text
        start, end = (float(x) for x in region.split(" s")[0].split("–"))
        assert start == pytest.approx(0.5, abs=0.02) and end == pytest.approx(1.0, abs=0.02)
        assert "inpainting" in driver.find_element(By.ID, "input-name").text
        driver.find_element(By.ID, "generate").click()
        wait(lambda: len(jobs(driver, "done")) == 2, what="the inpainted result", driver=driver)
        inpainted = jobs(driver)[0]
        summary = inpainted.find_element(By.CSS_SELECTOR, ".summary").text
        assert summary.startswith("inpainting") and first.get_attribute("data-id") in summary
        regenerated = [float(x) for x in re.findall(r"regions ([0-9.]+)–([0-9.]+)", summary)[0]]
        assert regenerated == pytest.approx([start, end], abs=0.006)  # the list shows them to 0.01 s
        assert driver.find_element(By.ID, "message").text == ""

        # Variations: the same settings (input and regions too) with a new seed.
        inpainted.find_element(By.CSS_SELECTOR, ".variations").click()
        wait(lambda: len(jobs(driver, "done")) == 3, what="the variation", driver=driver)
        variation = jobs(driver)[0].find_element(By.CSS_SELECTOR, ".summary").text
        assert variation.split(" · seed ")[0] == summary.split(" · seed ")[0] and variation != summary

        # Cancel a long job while it samples.
        driver.find_element(By.ID, "clear-input").click()
        for field, value in (("seconds", "60"), ("steps", "100")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait(lambda: "sampling: step" in driver.find_element(By.ID, "stage").text, what="sampling progress")
        # The live preview: the spectrogram of what the latest step predicts, every 4 steps (the server's default).
        wait(lambda: driver.find_element(By.ID, "preview-box").is_displayed()
             and re.fullmatch(r"preview at step \d*[048]/100", driver.find_element(By.ID, "preview-label").text),
             what="a live preview", driver=driver)
        assert bright_pixels(driver.find_element(By.ID, "preview").screenshot_as_png) > 100
        driver.find_element(By.ID, "cancel").click()
        wait(lambda: driver.find_element(By.ID, "message").text == "Cancelled.", what="the cancellation")
        assert jobs(driver)[0].get_attribute("data-status") == "cancelled"

        # An uploaded file becomes the input, drawn with its length.
        upload = tmp_path / "loop.wav"
        sf.write(upload, 0.3 * np.sin(np.linspace(0, 2000, 3 * 22050)), 22050)
        driver.find_element(By.ID, "upload").send_keys(str(upload))
        wait(lambda: "loop.wav (3.00 s): audio-to-audio" in driver.find_element(By.ID, "input-name").text,
             what="the upload", driver=driver)
        assert driver.find_element(By.ID, "seconds").get_attribute("value") == "3"

        driver.save_screenshot(str(tmp_path / "studio.png"))
        shot = driver.get_screenshot_as_png()
        assert wave_pixels(shot) > 2000  # the drawn waveforms show in the page
        assert wave_pixels(inpainted.find_element(By.CSS_SELECTOR, "canvas.wave").screenshot_as_png) > 500
    finally:
        assert studio.stop() == 0

    studio = StudioProcess(tmp_path / "out", bundle)  # a restart: the history comes from the database
    try:
        open_page(driver, studio)
        assert [j.find_element(By.CSS_SELECTOR, ".prompt").text for j in jobs(driver, "done")] == \
            ["drum fill", "drum fill", "glass shattering on stone"]
        assert len(jobs(driver, "cancelled")) == 1
        search = driver.find_element(By.ID, "search")
        search.send_keys("glass")
        wait(lambda: len(jobs(driver)) == 1, what="the search to filter the history")
        jobs(driver)[0].find_element(By.CSS_SELECTOR, ".reuse").click()
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == "glass shattering on stone"
        assert driver.find_element(By.ID, "seed").get_attribute("value") == str(seed)
        jobs(driver)[0].find_element(By.CSS_SELECTOR, ".delete").click()
        wait(lambda: not jobs(driver), what="the deleted job to go")
        open_page(driver, studio)
        assert [j.find_element(By.CSS_SELECTOR, ".prompt").text for j in jobs(driver)] == ["drum fill"] * 3
    finally:
        assert studio.stop() == 0


def test_page_with_an_api_key_off_loopback(browser, tmp_path):
    """Bound off loopback, the page opened as /?key=KEY sends the key with every request it makes."""
    from selenium.webdriver.common.by import By

    driver = browser
    studio = StudioProcess(tmp_path / "out", build_tiny_bundle(tmp_path / "bundle"), host="0.0.0.0", api_key="k3y-for-tests")
    try:
        driver.get(studio.url)  # no key: refused
        assert "missing or wrong API key" in driver.find_element(By.TAG_NAME, "body").text
        driver.get(studio.url + "?key=k3y-for-tests")
        wait(lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), what="the page")
        driver.find_element(By.ID, "prompt").send_keys("bell")
        driver.find_element(By.ID, "seconds").clear()
        driver.find_element(By.ID, "seconds").send_keys("1")
        driver.find_element(By.ID, "generate").click()
        job = wait(lambda: jobs(driver, "done"), what="the result", driver=driver)[0]
        audio = job.find_element(By.CSS_SELECTOR, "audio")
        duration = driver.execute_async_script(
            "const [audio, done] = arguments; audio.preload = 'auto';"
            "audio.addEventListener('loadedmetadata', () => done(audio.duration));"
            "audio.addEventListener('error', () => done(-1)); audio.load();", audio)
        assert duration == pytest.approx(1.0, abs=0.01)
    finally:
        assert studio.stop() == 0


def test_sampling_and_guidance_controls_from_the_options(browser, tmp_path):
    """The form's sampler, CFG rescale, norm threshold, interval, shift and headroom come from /api/options'
    fields, reach the job, show in its summary, come back with "Reuse settings"; prompt weighting is
    explained, and a bad weight is the server's message."""
    import json
    import urllib.request

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    studio = StudioProcess(tmp_path / "out", build_tiny_bundle(tmp_path / "bundle"))
    try:
        open_page(driver, studio)
        with urllib.request.urlopen(studio.url + "api/options") as answer:
            fields = {f["name"]: f for f in json.load(answer)["fields"]}
        help_text = driver.find_element(By.ID, "weighting-help").text
        assert "(phrase:1.3)" in help_text and "\\(" in help_text
        assert "(phrase:W)" in driver.find_element(By.ID, "prompt").get_attribute("title")

        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        sampler = Select(driver.find_element(By.ID, "sampler"))
        assert [o.get_attribute("value") for o in sampler.options] == ["", *fields["sampler"]["choices"]]
        for name in ("cfg_rescale", "cfg_norm_threshold", "headroom"):
            element = driver.find_element(By.ID, name)
            assert float(element.get_attribute("max")) == fields[name]["maximum"]
            assert float(element.get_attribute("value")) == fields[name]["default"]
            assert element.find_element(By.XPATH, "..").get_attribute("title") == fields[name]["help"]
        assert [driver.find_element(By.ID, f"cfg_interval_{x}").get_attribute("value") for x in ("lo", "hi")] == \
            ["0", "1"]
        assert driver.find_element(By.ID, "shift").get_attribute("value") == ""

        def fill(name, value):
            element = driver.find_element(By.ID, name)
            element.clear()
            element.send_keys(value)

        driver.find_element(By.ID, "prompt").send_keys("(glass:1.5) shattering, (stone:0.5)")
        for name, value in (("seconds", "2"), ("steps", "3"), ("seed", "5"), ("cfg", "3"), ("cfg_rescale", "0.5"),
                            ("cfg_norm_threshold", "20"), ("cfg_interval_lo", "0.1"), ("cfg_interval_hi", "0.9"),
                            ("shift", "flux:alpha_min=2,alpha_max=2")):
            fill(name, value)
        sampler.select_by_value("pingpong")
        driver.find_element(By.ID, "generate").click()
        job = wait(lambda: jobs(driver, "done"), what="the result", driver=driver)[0]
        with urllib.request.urlopen(studio.url + f"api/jobs/{job.get_attribute('data-id')}") as answer:
            settings = json.load(answer)["settings"]
        assert (settings["prompt"], settings["sampler"], settings["cfg_rescale"], settings["cfg_norm_threshold"],
                settings["cfg_interval"], settings["shift"]) == ("(glass:1.5) shattering, (stone:0.5)", "pingpong",
                                                                 0.5, 20.0, [0.1, 0.9], "flux:alpha_min=2.0,alpha_max=2.0")
        assert bright_pixels(job.find_element(By.CSS_SELECTOR, "canvas.spectrogram").screenshot_as_png) > 500
        summary = job.find_element(By.CSS_SELECTOR, ".summary").text
        for words in ("pingpong", "rescale 0.5", "norm threshold 20", "guided at sigma 0.1–0.9",
                      "shift flux:alpha_min=2.0,alpha_max=2.0"):
            assert words in summary, summary

        # Reuse: a fresh page, the controls at their defaults, then the job's settings back in them.
        open_page(driver, studio)
        assert driver.find_element(By.ID, "cfg_rescale").get_attribute("value") == "0"
        jobs(driver)[0].find_element(By.CSS_SELECTOR, ".reuse").click()
        assert [driver.find_element(By.ID, n).get_attribute("value") for n in
                ("sampler", "cfg_rescale", "cfg_norm_threshold", "cfg_interval_lo", "cfg_interval_hi", "shift")] == \
            ["pingpong", "0.5", "20", "0.1", "0.9", "flux:alpha_min=2.0,alpha_max=2.0"]

        # A malformed weight, and a sampler this model does not take: the server's one-line messages.
        fill("prompt", "(glass:loud) shattering")
        driver.find_element(By.ID, "generate").click()
        wait(lambda: "the weight 'loud' is not a number" in driver.find_element(By.ID, "message").text,
             what="the weighting error", driver=driver)
        assert driver.find_element(By.ID, "message").text.startswith("prompt (glass:loud)")
        fill("prompt", "glass")
        Select(driver.find_element(By.ID, "sampler")).select_by_value("euler")
        driver.find_element(By.ID, "generate").click()
        wait(lambda: "euler does not suit" in driver.find_element(By.ID, "message").text,
             what="the sampler error", driver=driver)
        assert len(jobs(driver)) == 1
    finally:
        assert studio.stop() == 0


def test_a_prompt_list_upload_queues_a_job_per_item(browser, tmp_path):
    import json

    from selenium.webdriver.common.by import By

    driver = browser
    studio = StudioProcess(tmp_path / "out", build_tiny_bundle(tmp_path / "bundle"))
    try:
        open_page(driver, studio)
        for name, value in (("seconds", "1.5"), ("steps", "2")):
            driver.find_element(By.ID, name).clear()
            driver.find_element(By.ID, name).send_keys(value)
        listing = tmp_path / "list.jsonl"
        listing.write_text(json.dumps({"prompt": "rain", "seed": 4}) + "\n"
                           + json.dumps({"prompt": "(thunder:1.4) far", "seconds": 2}) + "\n")
        driver.find_element(By.ID, "prompt-list").send_keys(str(listing))
        wait(lambda: driver.find_element(By.ID, "message").text == "Queued 2 jobs from list.jsonl.",
             what="the list to be queued", driver=driver)
        wait(lambda: len(jobs(driver, "done")) == 2, what="both results", driver=driver)
        summaries = {j.find_element(By.CSS_SELECTOR, ".prompt").text: j.find_element(By.CSS_SELECTOR, ".summary").text
                     for j in jobs(driver)}
        assert set(summaries) == {"rain", "(thunder:1.4) far"}
        assert "1.5 s · 2 steps" in summaries["rain"] and "seed 4" in summaries["rain"]
        assert "2 s · 2 steps" in summaries["(thunder:1.4) far"]

        listing.write_text("fine\nwarm (pad\n")
        driver.find_element(By.ID, "prompt-list").send_keys(str(listing))
        wait(lambda: "1 bad line in the prompt list: line 2: prompt has an unbalanced '('"
             in driver.find_element(By.ID, "message").text, what="the list's error", driver=driver)
        assert len(jobs(driver)) == 2
    finally:
        assert studio.stop() == 0


def test_lora_picker_sends_named_adapters(browser, tmp_path):
    """With --lora-dir the page offers the folder's adapters by name; the chosen ones (strength, noise interval)
    reach the job, show in its summary and come back with "Reuse settings"."""
    import json
    import urllib.request

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.test_studio_loras import write_lora

    driver = browser
    folder = tmp_path / "loras"
    folder.mkdir()
    write_lora(folder / "my_style.safetensors")
    studio = StudioProcess(tmp_path / "out", build_tiny_bundle(tmp_path / "bundle"), "--lora-dir", str(folder))
    try:
        open_page(driver, studio)
        assert driver.find_element(By.ID, "lora-box").is_displayed()
        assert [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "lora-name")).options] == ["my_style"]
        for name, value in (("lora-strength", "0.7"), ("lora-lo", "0.3")):
            element = driver.find_element(By.ID, name)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "lora-add").click()
        assert "my_style:0.7@0.3-1" in driver.find_element(By.ID, "lora-list").text
        driver.find_element(By.ID, "prompt").send_keys("lofi")
        for name, value in (("seconds", "1"), ("steps", "2"), ("seed", "2")):
            element = driver.find_element(By.ID, name)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        job = wait(lambda: jobs(driver, "done"), what="the result", driver=driver)[0]
        with urllib.request.urlopen(studio.url + f"api/jobs/{job.get_attribute('data-id')}") as answer:
            assert json.load(answer)["settings"]["loras"] == ["my_style:0.7@0.3-1"]
        assert "LoRA my_style:0.7@0.3-1" in job.find_element(By.CSS_SELECTOR, ".summary").text
        open_page(driver, studio)
        assert driver.find_element(By.ID, "lora-list").text == ""
        jobs(driver)[0].find_element(By.CSS_SELECTOR, ".reuse").click()
        assert "my_style:0.7@0.3-1" in driver.find_element(By.ID, "lora-list").text
    finally:
        assert studio.stop() == 0
