"""GET /playground in a real browser: headless Chromium (Debian's chromium and chromium-driver, from
.ci/install-system) driven by selenium, against the real `fal run --local` demo server
(test_app_server.py's fixture). It types a prompt, watches the previews stream in, reads the final
image's pixels back (demo_training.shapes.read_picture), cancels a long request with fal's
cancellation call, shows a 422, inpaints with a mask painted on the canvas, places the shape with the
demo's ControlNet, builds an IP-Adapter row only from a schema that has one, and opens /docs offline.
A failing test saves a screenshot of the page under its tmp dir and names it in the failure."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageDraw
from test_app_server import server

from demo_training import shapes

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-test.txt)")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

__all__ = ["server"]  # test_app_server.py's `fal run --local` demo server, one for this module

REPO = Path(__file__).resolve().parents[1]
# A missing browser is installed by .ci/install-system (apt-get, as root), which takes minutes once.
pytestmark = pytest.mark.timeout(600)
WAIT_S = 60
PROMPT = "a red circle on a blue background"


def chromium() -> tuple[str, str]:
    """The paths of chromium and chromedriver, installed with .ci/install-system if missing; a skip
    saying why when they cannot be had."""
    def find() -> list[str | None]:
        return [shutil.which("chromium"), shutil.which("chromedriver")]

    if not all(find()) and os.geteuid() == 0 and shutil.which("apt-get"):
        print("chromium or chromedriver missing: running .ci/install-system")
        subprocess.run(["bash", str(REPO / ".ci" / "install-system")], check=False, timeout=540)
    browser, driver = find()
    if not (browser and driver):
        reason = ("Debian's chromium and chromium-driver are not installed and could not be (`bash .ci/install-system` "
                  "as root installs them)")
        print(reason)
        pytest.skip(reason)
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver_path = chromium()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: what a page was refused
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def evidence(driver, tmp_path: Path, name: str) -> Iterator[None]:
    """On a failure inside the block: a screenshot of the page under ``tmp_path``, named in the failure."""
    try:
        yield
    except BaseException as exc:
        path = tmp_path / f"{name}.png"
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(path))
            status = driver.find_element(By.ID, "status").text
            error = driver.find_element(By.ID, "error").text
            exc.add_note(f"page status: {status!r}; error box: {error!r}")
        print(f"screenshot of the page: {path}")
        exc.add_note(f"screenshot of the page: {path}")
        raise


def open_playground(driver, server) -> None:
    driver.get(f"{server['url']}/playground")
    wait(driver, lambda d: d.find_element(By.ID, "generate").is_enabled(), "the form built from /openapi.json")


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"waited {timeout} s for {what}") from None


def field(driver, name: str):
    return driver.find_element(By.NAME, name)


def type_into(driver, name: str, value) -> None:
    element = field(driver, name)
    element.clear()
    element.send_keys(str(value))


def choose(driver, name: str, value: str) -> None:
    Select(field(driver, name)).select_by_value(value)


def state(driver) -> str:
    return driver.find_element(By.ID, "status").get_attribute("data-state")


def finished(driver, timeout: float = WAIT_S) -> str:
    """Wait for the request to end; its final state (done, cancelled or error)."""
    return wait(driver, lambda d: state(d) in {"done", "cancelled", "error"} and state(d), "the request to end", timeout)


def decoded(data_uri: str) -> PILImage.Image:
    header, _, data = data_uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header[:40]
    return PILImage.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def result_images(driver) -> list[PILImage.Image]:
    return [decoded(img.get_attribute("src")) for img in driver.find_elements(By.CSS_SELECTOR, "#results img.result")]


def record_requests(driver) -> None:
    """From now on the page's fetch calls with a body are kept, as [url, parsed body], in window.sent."""
    driver.execute_script("""
        const fetch = window.fetch;
        window.sent = [];
        window.fetch = (url, options) => {
          if (options && options.body) window.sent.push([url, JSON.parse(options.body)]);
          return fetch(url, options);
        };""")


def sent(driver) -> list[tuple[str, dict]]:
    return [tuple(request) for request in driver.execute_script("return window.sent")]


def request_body(driver) -> dict:
    """What the form would send now (the page's requestBody())."""
    return driver.execute_script("return requestBody()")


def show_mode(driver, name: str) -> None:
    driver.find_element(By.XPATH, f"//input[@name='mode'][@value='{name}']/..").click()


def row_shown(driver, name: str) -> bool:
    return driver.find_element(By.CSS_SELECTOR, f"[data-field='{name}']").is_displayed()


def test_the_form_takes_its_defaults_and_bounds_from_the_demo_profile(browser, server, tmp_path):
    with evidence(browser, tmp_path, "form"):
        open_playground(browser, server)
        steps = field(browser, "num_inference_steps")
        assert (steps.get_attribute("value"), steps.get_attribute("max")) == ("20", "25")  # [profiles.demo.serving]
        assert Select(field(browser, "image_size")).first_selected_option.text == "square_hd (64x64)"
        assert field(browser, "prompt").get_attribute("maxlength") == "500"
        browser.find_element(By.XPATH, "//input[@name='mode'][@value='image-to-image']/..").click()
        sizes = Select(field(browser, "image_size"))
        assert sizes.first_selected_option.text == "the input image's size"  # ImageToImageInput's default
        assert "landscape_4_3 (64x48)" in [option.text for option in sizes.options]
        assert field(browser, "strength").get_attribute("value") == "0.95"


def test_generate_streams_previews_then_a_red_circle_on_blue(browser, server, tmp_path):
    with evidence(browser, tmp_path, "generate"):
        open_playground(browser, server)
        record_requests(browser)
        field(browser, "prompt").send_keys(PROMPT)
        type_into(browser, "seed", 0)
        choose(browser, "output_format", "png")
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#previews img.preview"), "a preview")
        [(url, body)] = sent(browser)
        assert url == "stream" and "controlnets" not in body and "ip_adapter" not in body, body  # no control image
        assert finished(browser) == "done"
        progress = browser.find_element(By.ID, "progress")
        assert progress.get_attribute("data-step") == "20"  # every step's event arrived
        previews = browser.find_elements(By.CSS_SELECTOR, "#previews img.preview")
        assert [decoded(p.get_attribute("src")).size for p in previews] == [(16, 16)]  # the latents' size
        [image] = result_images(browser)
        assert image.size == (shapes.SIDE, shapes.SIDE)
        reading = shapes.read_picture(image)
        assert (reading.background, reading.colour) == ("blue", "red"), reading
        meta = browser.find_element(By.ID, "meta").text
        assert meta.startswith("seed 0 · ") and "inference" in meta, meta
        assert browser.find_element(By.ID, "error").is_displayed() is False


def test_cancel_stops_a_long_request_through_fals_cancel_call(browser, server, tmp_path):
    with evidence(browser, tmp_path, "cancel"):
        open_playground(browser, server)
        field(browser, "prompt").send_keys(PROMPT)
        choose(browser, "image_size", "custom")
        type_into(browser, "width", 256)  # 25 steps at 256x256: seconds of work on the CPU
        type_into(browser, "height", 256)
        type_into(browser, "num_inference_steps", 25)
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: d.find_element(By.ID, "progress").get_attribute("data-step"), "the first step")
        browser.find_element(By.ID, "cancel").click()
        assert finished(browser) == "cancelled"
        status = browser.find_element(By.ID, "status").text
        match = re.fullmatch(r"Cancelled: cancelled after (\d+) of 25 steps \(cancelled through POST /stream/cancel\)",
                             status)
        assert match and int(match[1]) < 25, status
        assert result_images(browser) == []
        assert browser.find_element(By.ID, "generate").is_enabled()


def test_an_invalid_request_shows_the_apis_422_detail(browser, server, tmp_path):
    with evidence(browser, tmp_path, "invalid"):
        open_playground(browser, server)
        field(browser, "prompt").send_keys(PROMPT)
        choose(browser, "image_size", "custom")
        type_into(browser, "width", 512)
        type_into(browser, "height", 512)  # 262144 pixels: over the demo's 131072
        browser.find_element(By.ID, "generate").click()
        assert finished(browser) == "error"
        error = browser.find_element(By.ID, "error")
        assert error.is_displayed()
        assert browser.find_element(By.ID, "error-title").text == "422 Invalid request"
        detail = browser.find_element(By.ID, "error-detail").text
        assert detail.startswith("image_size") and "more than the limit of 131072" in detail, detail


def test_inpaint_repaints_only_where_the_brush_painted(browser, server, tmp_path):
    source = shapes.draw(shapes.Scene("circle", "orange", "blue", "center", shapes.SIZES["large"]))
    source_path = tmp_path / "source.png"
    source.save(source_path)
    with evidence(browser, tmp_path, "inpaint"):
        open_playground(browser, server)
        browser.find_element(By.XPATH, "//input[@name='mode'][@value='inpaint']/..").click()
        browser.find_element(By.ID, "image-file").send_keys(str(source_path))
        canvas = browser.find_element(By.ID, "mask-canvas")
        wait(browser, lambda d: canvas.is_displayed() and canvas.get_attribute("width") == str(shapes.SIDE), "the mask canvas")
        # A vertical stroke near the left edge (offsets from the canvas's centre, in CSS pixels).
        half = canvas.size["width"] / 2
        ActionChains(browser).move_to_element_with_offset(canvas, -half + 12, -half + 6).click_and_hold() \
            .move_to_element_with_offset(canvas, -half + 12, half - 6).release().perform()
        mask = decoded(browser.execute_script("return arguments[0].toDataURL('image/png')", canvas)).convert("L")
        levels = np.asarray(mask)
        assert levels[:, :2].mean() > 200 and levels[:, 16:].max() == 0  # white where painted, black elsewhere
        field(browser, "prompt").send_keys("a green square on a yellow background")
        type_into(browser, "seed", 0)
        choose(browser, "output_format", "png")
        browser.find_element(By.ID, "generate").click()
        assert finished(browser) == "done"
        [image] = result_images(browser)
        kept = np.asarray(image)[:, 16:]
        assert np.array_equal(kept, np.asarray(source.convert("RGB"))[:, 16:])  # black in the mask: as sent


def red_centroid(image: PILImage.Image) -> tuple[float, float]:
    """The centre (x, y, fractions of the side) of the pixels nearer red than blue."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance = {name: ((pixels - shapes.COLOURS[name]) ** 2).sum(-1) for name in ("red", "blue")}
    ys, xs = np.nonzero(distance["red"] < distance["blue"])
    assert len(xs), "no red pixel"
    return (xs.mean() + 0.5) / pixels.shape[1], (ys.mean() + 0.5) / pixels.shape[0]


def test_the_controlnet_row_is_on_every_endpoint_and_the_ip_adapter_row_on_none_in_the_demo(browser, server, tmp_path):
    with evidence(browser, tmp_path, "condition-rows"):
        open_playground(browser, server)
        for mode in ("text-to-image", "image-to-image", "inpaint"):
            show_mode(browser, mode)
            assert (row_shown(browser, "controlnets"), row_shown(browser, "ip_adapter")) == (True, False), mode
        show_mode(browser, "text-to-image")
        assert [option.text for option in Select(field(browser, "controlnet-path")).options] == ["demo-controlnet"]
        scale = field(browser, "controlnet-scale")
        assert [scale.get_attribute(name) for name in ("value", "min", "max")] == ["1", "0", "2"]
        assert "controlnets" not in request_body(browser) and "ip_adapter" not in request_body(browser)


def test_the_controlnet_puts_the_red_circle_where_the_control_image_is_white(browser, server, tmp_path):
    side, (x, y), radius = 64, (0.3, 0.3), 10
    control = PILImage.new("RGB", (side, side), "black")
    ImageDraw.Draw(control).ellipse([x * side - radius, y * side - radius, x * side + radius, y * side + radius],
                                    fill="white")
    control_path = tmp_path / "control.png"
    control.save(control_path)
    with evidence(browser, tmp_path, "controlnet"):
        open_playground(browser, server)
        record_requests(browser)
        field(browser, "prompt").send_keys(PROMPT)
        type_into(browser, "seed", 0)
        type_into(browser, "num_inference_steps", 16)
        choose(browser, "output_format", "png")
        choose(browser, "controlnet-path", "demo-controlnet")
        browser.find_element(By.ID, "controlnet-file").send_keys(str(control_path))
        wait(browser, lambda d: d.find_element(By.ID, "controlnet-preview").is_displayed(), "the control image read")
        browser.find_element(By.ID, "generate").click()
        assert finished(browser) == "done"
        [(url, body)] = sent(browser)
        [entry] = body["controlnets"]
        assert (url, entry["path"], entry["conditioning_scale"]) == ("stream", "demo-controlnet", 1), body
        assert np.array_equal(np.asarray(decoded(entry["image_url"])), np.asarray(control))  # the file, as a data: URI
        [image] = result_images(browser)
        cx, cy = red_centroid(image)
        assert np.hypot(cx - x, cy - y) < 0.1, (cx, cy)
        browser.find_element(By.ID, "controlnet-remove").click()
        assert "controlnets" not in request_body(browser)


def test_an_ip_adapter_in_the_schema_gets_a_row_whose_image_sends_an_entry(browser, server, app_module, tmp_path):
    """The demo serves no IP-Adapter: the page is given the demo's schema with an ``ip_adapter`` field
    added, as serving.schema writes it for one configured adapter."""
    from serving.schema import ConditionChoices, request_models

    settings = app_module.SETTINGS
    models = request_models(settings.serving, settings.safety_checker.enabled, settings.lora,
                            ConditionChoices(("demo-controlnet",), ("demo-ip-adapter",)))
    spec = httpx.get(f"{server['url']}/openapi.json", timeout=10).json()
    for name in ("TextToImageInput", "ImageToImageInput", "InpaintInput"):
        written = getattr(models, name).model_json_schema(ref_template="#/components/schemas/{model}")
        spec["components"]["schemas"]["IPAdapterInput"] = written["$defs"]["IPAdapterInput"]
        spec["components"]["schemas"][name]["properties"]["ip_adapter"] = written["properties"]["ip_adapter"]
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": f"""{{
        const fetch = window.fetch, spec = {json.dumps(spec)};  // in a block: the page has its own spec
        window.fetch = (url, options) => url === "openapi.json"
          ? Promise.resolve(new Response(JSON.stringify(spec), {{headers: {{"Content-Type": "application/json"}}}}))
          : fetch(url, options);
    }}"""})
    prompt_path = tmp_path / "prompt.png"
    shapes.draw(shapes.Scene("star", "yellow", "purple", "center", shapes.SIZES["large"])).save(prompt_path)
    try:
        with evidence(browser, tmp_path, "ip-adapter"):
            open_playground(browser, server)
            for mode in ("text-to-image", "image-to-image", "inpaint"):
                show_mode(browser, mode)
                assert row_shown(browser, "ip_adapter"), mode
            show_mode(browser, "text-to-image")
            assert [option.text for option in Select(field(browser, "ip-adapter-path")).options] == ["demo-ip-adapter"]
            scale = field(browser, "ip-adapter-scale")
            assert [scale.get_attribute(name) for name in ("value", "min", "max")] == ["1", "0", "2"]
            assert "ip_adapter" not in request_body(browser)
            browser.find_element(By.ID, "ip-adapter-file").send_keys(str(prompt_path))
            wait(browser, lambda d: d.find_element(By.ID, "ip-adapter-preview").is_displayed(), "the image prompt read")
            type_into(browser, "ip-adapter-scale", 0.5)
            [entry] = request_body(browser)["ip_adapter"]
            assert (entry["path"], entry["scale"]) == ("demo-ip-adapter", 0.5), entry
            assert entry["ip_adapter_image_url"].startswith("data:image/png;base64,")
            assert "controlnets" not in request_body(browser)  # the ControlNet has no image
            browser.find_element(By.ID, "ip-adapter-remove").click()
            assert "ip_adapter" not in request_body(browser)
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


def test_docs_render_offline_from_the_apps_own_assets(browser, server, tmp_path):
    with evidence(browser, tmp_path, "docs"):
        browser.get(f"{server['url']}/docs")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"), "Swagger UI's operations")
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(url.startswith(server["url"]) for url in loaded), loaded


def test_redoc_renders_offline_and_fetches_nothing_from_elsewhere(browser, server, tmp_path):
    with evidence(browser, tmp_path, "redoc"):
        browser.get_log("browser")  # drop what earlier pages logged
        browser.get(f"{server['url']}/redoc")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-section-id]"), "ReDoc's operations")
        loaded = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus])")
        assert any(url.startswith(f"{server['url']}/docs/assets/") for url, _ in loaded), loaded
        external = [url for url, status in loaded if not url.startswith(server["url"])]
        # ReDoc's sidebar logo points at Redocly's CDN: the page's Content-Security-Policy refuses it.
        refused = " ".join(entry["message"] for entry in browser.get_log("browser"))
        assert all(f"image '{url}' violates the following Content Security Policy" in refused for url in external), \
            (external, refused)

