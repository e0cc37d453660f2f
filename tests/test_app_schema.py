"""app.py without a model: the class fal builds from fal.toml (its secrets too), the pyproject
registration, the public OpenAPI, the request limits and billable units through fal's own app, and a
property-based sweep of that schema (schemathesis) against a stand-in pipeline. (fal.toml itself:
test_settings.py; the schema built for any profile: test_schema.py; the HTTP helpers alone:
test_http.py; billing alone: test_billing.py.)"""

from __future__ import annotations

import ast
import re
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage

from serving.cancel import InFlight
from serving.conditions import Conditions
from serving.img2img import ImagePipelines
from serving.prompts import Prompts
from serving.schedulers import Schedulers
from serving.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def test_app_class_takes_its_settings_from_fal_toml(app_module):
    app_cls = app_module.TextToImageApp
    demo = load_settings(REPO / "fal.toml", profile="demo")
    assert app_cls.machine_type == demo.deploy.machine_type
    assert app_cls.host_kwargs["keep_alive"] == demo.deploy.keep_alive
    assert app_cls.host_kwargs["max_concurrency"] == demo.deploy.max_concurrency
    assert app_cls.host_kwargs["startup_timeout"] == demo.deploy.startup_timeout
    assert app_cls.app_name == "flashpack-t2i"
    assert app_cls.app_files == ["model_loader", "conversion", "serving"]
    assert "torch==2.15.0" in app_cls.requirements
    assert app_cls.host_kwargs["health_check_config"].path == "/health"


def test_the_app_declares_the_secret_it_reads_so_fal_exposes_only_that_one(app_module):
    from conversion.config import ENV_VARS

    assert app_module.TextToImageApp.secrets == ["HF_TOKEN"]
    assert app_module.TextToImageApp.host_kwargs["secrets"] == ["HF_TOKEN"]  # what fal sends with the app
    assert "HF_TOKEN" in {var.name for var in ENV_VARS}  # and what conversion reads


def test_every_local_package_app_py_imports_travels_with_it_and_is_packaged(app_module):
    local = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    imported = set()
    for node in ast.walk(ast.parse((REPO / "app.py").read_text())):  # setup()'s lazy imports too
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.partition(".")[0])
    assert imported & local == set(app_module.LOCAL_PACKAGES) == {"model_loader", "conversion", "serving"}
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(f"{package}*" in include for package in app_module.LOCAL_PACKAGES)


def test_pyproject_registers_the_app_for_the_fal_cli(monkeypatch):
    from fal.cli._utils import get_app_data_from_toml

    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["fal"]["apps"]["flashpack-t2i"]
    assert table["ref"] == "app.py::TextToImageApp"
    monkeypatch.chdir(REPO)
    data = get_app_data_from_toml("flashpack-t2i")
    assert data.ref == f"{REPO / 'app.py'}::TextToImageApp"
    assert data.name == "flashpack-t2i"


# --------------------------------------------------------------------------------------------------
# The public schema


def openapi(app_module) -> dict:
    return app_module.TextToImageApp(_allow_init=True).openapi()


@pytest.mark.parametrize("model", ["TextToImageInput", "TextToImageOutput", "ImageSize", "HealthOutput",
                                   "StreamProgress", "StreamError", "CancelOutput", "LoraWeight",
                                   "ImageToImageInput", "InpaintInput", "ImageToImageOutput"])
def test_every_public_field_of_the_apps_openapi_has_a_description_and_an_example(app_module, model):
    properties = openapi(app_module)["components"]["schemas"][model]["properties"]
    undocumented = [name for name, prop in properties.items() if not prop.get("description")]
    without_example = [name for name, prop in properties.items() if not prop.get("examples")]
    assert undocumented == [] and without_example == []


def test_the_apps_openapi_carries_the_demo_bounds(app_module):
    schemas = openapi(app_module)["components"]["schemas"]
    props = schemas["TextToImageInput"]["properties"]
    assert props["num_inference_steps"]["maximum"] == 25
    assert props["prompt"]["maxLength"] == 500
    assert props["image_size"]["x-fal"] == {"min_width": 32, "max_width": 512, "min_height": 32,
                                            "max_height": 512, "max_area": 131072, "multiple_of": 8}
    assert schemas["TextToImageInput"]["required"] == ["prompt"]
    assert schemas["TextToImageInput"]["additionalProperties"] is False


def test_the_apps_openapi_has_the_safety_checker_switch_and_the_per_image_verdicts(app_module):
    schemas = openapi(app_module)["components"]["schemas"]
    switch = schemas["TextToImageInput"]["properties"]["enable_safety_checker"]
    assert (switch["type"], switch["default"]) == ("boolean", True)
    assert switch["description"].startswith("Run the safety checker on the images: an image it flags is replaced by "
                                            "a black image of the same size")
    verdicts = schemas["TextToImageOutput"]["properties"]["has_nsfw_concepts"]
    assert verdicts["type"] == "array" and verdicts["items"] == {"type": "boolean"}
    assert "has_nsfw_concepts" in schemas["TextToImageOutput"]["required"]


def test_the_apps_openapi_has_fals_loras_field_with_the_demo_bounds(app_module):
    schemas = openapi(app_module)["components"]["schemas"]
    loras = schemas["TextToImageInput"]["properties"]["loras"]
    assert loras["type"] == "array" and loras["maxItems"] == 3
    assert loras["items"] == {"$ref": "#/components/schemas/LoraWeight"}
    weight = schemas["LoraWeight"]
    assert weight["required"] == ["path"] and weight["additionalProperties"] is False
    assert weight["properties"]["path"]["description"].startswith("URL or the path to the LoRA weights")
    assert "at most 16 MiB" in weight["properties"]["path"]["description"]  # the demo's [lora] max_file_mb
    scale = weight["properties"]["scale"]
    assert (scale["default"], scale["minimum"], scale["maximum"]) == (1.0, 0, 1.0)


def test_the_openapi_documents_the_stream_as_server_sent_events_of_progress_result_and_error(app_module):
    spec = openapi(app_module)
    response = spec["paths"]["/stream"]["post"]["responses"]["200"]
    events = response["content"]["text/event-stream"]
    assert events["itemSchema"]["properties"]["event"]["enum"] == ["progress", "result", "error"]
    assert events["itemSchema"]["properties"]["data"]["contentSchema"]["oneOf"] == [
        {"$ref": "#/components/schemas/StreamProgress"}, {"$ref": "#/components/schemas/TextToImageOutput"},
        {"$ref": "#/components/schemas/StreamError"}]
    assert events["example"].startswith("event: progress\ndata: {") and "\n\nevent: result\ndata: {" in events["example"]
    assert spec["paths"]["/stream"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TextToImageInput"}
    assert set(spec["components"]["schemas"]["StreamProgress"]["required"]) == {"step", "total_steps", "previews"}


def test_the_openapi_has_fals_cancel_paths_for_every_generating_endpoint(app_module):
    paths = openapi(app_module)["paths"]
    assert {"/", "/cancel", "/stream", "/stream/cancel", "/image-to-image/cancel", "/inpaint/cancel"} <= set(paths)
    for path in ("/cancel", "/stream/cancel", "/image-to-image/cancel", "/inpaint/cancel"):
        schema = paths[path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/CancelOutput"}


@pytest.mark.parametrize(("path", "model", "required"), [
    ("/image-to-image", "ImageToImageInput", ["prompt", "image_url"]),
    ("/inpaint", "InpaintInput", ["prompt", "image_url", "mask_url"]),
])
def test_the_openapi_has_the_image_endpoints_with_fals_field_names_and_defaults(app_module, path, model, required):
    spec = openapi(app_module)
    operation = spec["paths"][path]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ImageToImageOutput"}
    schema = spec["components"]["schemas"][model]
    props = schema["properties"]
    assert schema["required"] == required and schema["additionalProperties"] is False
    assert props["strength"]["default"] == 0.95  # fal's fast-sdxl image-to-image and inpainting default
    assert (props["strength"]["exclusiveMinimum"], props["strength"]["maximum"]) == (0, 1)
    assert "default" not in props["image_size"] and "image_size" not in required  # absent: the input's size
    assert props["num_inference_steps"]["maximum"] == 25  # [serving]'s bounds, as for POST /
    assert schema["x-fal-order-properties"][:len(required)] == [*required[1:], "prompt"]  # images first, as fal's
    for field in required[1:]:
        assert props[field]["type"] == "string" and props[field]["pattern"] == "^(https://|data:)"
        assert props[field]["ui"] == {"field": "image"}  # fal.toolkit's ImageField: the playground's image input
    assert set(spec["components"]["schemas"]["TextToImageInput"]["properties"]) < set(props)  # the shared fields


# --------------------------------------------------------------------------------------------------
# Property-based sweep: nothing the schema allows or forbids makes the server answer 5xx


class NoisePipe:
    """Stands in for the diffusers pipeline: an image of the asked size, drawn from the seed (with a
    scheduler of SD's kind, so that every scheduler name the schema offers applies)."""

    calls = 0
    scheduler = None  # an EulerDiscreteScheduler, set by stub_asgi_app

    def __call__(self, *, width, height, generator, num_inference_steps, callback_on_step_end, **_):
        NoisePipe.calls += 1
        for index in range(num_inference_steps):
            callback_on_step_end(self, index, index, {"latents": None})
        rngs = [np.random.default_rng(g.initial_seed()) for g in generator]
        return SimpleNamespace(images=[PILImage.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                                       for rng in rngs])


def stub_asgi_app(app_module):
    """fal's FastAPI app of TextToImageApp, with NoisePipe in place of the model."""
    from diffusers import EulerDiscreteScheduler

    from conversion.config import ConversionConfig
    from serving.lora import LoraLibrary
    from serving.settings import LoraSettings

    NoisePipe.scheduler = EulerDiscreteScheduler()

    class StubApp(app_module.TextToImageApp):
        def setup(self):
            self.pipe, self._lock, self.device = NoisePipe(), threading.Lock(), "cpu"
            self._in_flight, self._preview = InFlight(), None
            self.model, self.phase_seconds = SimpleNamespace(path=Path("stub")), {}
            self.source = app_module.model_source(self.settings.model)
            self.safety_checker, self.checker = None, None
            self._image_pipes, self._fetch = ImagePipelines(NoisePipe(), NoisePipe()), refuse_network
            self._schedulers, self._prompts = Schedulers.for_pipeline(self.pipe), Prompts.for_pipeline(self.pipe)
            self._conditions = Conditions(None, None)  # no ControlNets or IP-Adapters configured
            # no pipeline to put LoRAs in: 422
            self._loras = LoraLibrary(LoraSettings(), Path("stub"), None, ConversionConfig())

    return StubApp(_allow_init=True)._build_app()


def refuse_network(url, timeout_s, max_bytes):
    """The stand-in for fetching an https image: the sweep's URLs are random, and no test reaches the network."""
    raise ConnectionError("offline test: no network")


@pytest.fixture(scope="module")
def stub_client(app_module):
    from starlette.testclient import TestClient

    with TestClient(stub_asgi_app(app_module)) as client:
        yield client


SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "output_format": "png"}
LIMIT = 1024 * 1024  # [serving] max_request_bytes in fal.toml


def test_body_over_the_limit_by_content_length_is_413_with_a_json_detail(stub_client):
    body = b'{"prompt": "' + b"x" * LIMIT + b'"}'
    response = stub_client.post("/", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"detail": f"the request body is {len(body)} bytes, more than the limit of {LIMIT} bytes "
                                         "([serving] max_request_bytes in fal.toml)"}
    assert len(response.content) < 200


def test_streamed_body_over_the_limit_without_content_length_is_413(stub_client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}'

    response = stub_client.post("/", content=chunks(), headers={"content-type": "application/json"})
    assert response.request.headers.get("content-length") is None
    assert response.status_code == 413
    assert response.json()["detail"] == (f"the request body exceeds the limit of {LIMIT} bytes "
                                         "([serving] max_request_bytes in fal.toml)")


def test_body_within_the_limit_is_served(stub_client):
    response = stub_client.post("/", json={"prompt": "a cat", "negative_prompt": "x" * 400, **SMALL})
    assert response.status_code == 200, response.text


def test_an_answer_is_billed_one_unit_per_started_megapixel_of_each_image(stub_client):
    response = stub_client.post("/", json={"prompt": "a cat", **SMALL, "num_images": 3})
    assert response.status_code == 200, response.text
    assert response.headers["x-fal-billable-units"] == "3"  # 3 images of 64x64, each under a megapixel


@pytest.mark.parametrize(
    ("body", "status"),
    [({"prompt": "a cat", **SMALL, "num_images": 9}, 422), ({"prompt": "x" * LIMIT}, 413)],
    ids=["invalid", "too-large"],
)
def test_a_refused_request_is_billed_zero(stub_client, body, status):
    response = stub_client.post("/", json=body)
    assert response.status_code == status
    assert response.headers.get_list("x-fal-billable-units") == ["0"]


def test_422_echoes_only_a_short_prefix_of_a_long_input(stub_client):
    response = stub_client.post("/", json={"prompt": "y" * 900_000, **SMALL})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "prompt"] and error["input"] == "y" * 100 + "..."
    assert len(response.content) < 1000


def test_422_shortens_a_long_unknown_key_and_a_whole_body_echoed_as_input(stub_client):
    response = stub_client.post("/", json={"negative_prompt": "z" * 5000, "k" * 5000: 1})
    assert response.status_code == 422
    errors = {error["type"]: error for error in response.json()["detail"]}
    assert errors["missing"]["loc"] == ["body", "prompt"]
    assert errors["missing"]["input"].startswith('{"negative_prompt": "zzz') and len(errors["missing"]["input"]) == 103
    assert errors["extra_forbidden"]["loc"] == ["body", "k" * 100 + "..."]
    assert len(response.content) < 2000


def test_422_lists_at_most_20_errors_and_says_how_many_more(stub_client):
    body = {"prompt": "a cat", **{f"extra{i}": i for i in range(50)}}
    response = stub_client.post("/", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == 21
    assert detail[-1] == {"type": "too_many_errors", "loc": ["body"], "input": None, "msg": "30 more errors not shown"}


def _only_lora_paths(errors: list[dict]) -> bool:
    return bool(errors) and all(e["loc"][:2] == ["body", "loras"] and e["loc"][-1] == "path" for e in errors)


def _only_lora_paths_and_conditions(errors: list[dict]) -> bool:
    """Every error names a LoRA's path, or a ``controlnets``/``ip_adapter`` entry: its image URL
    (what it turns out to be), start_percentage before end_percentage (a rule across two fields), or
    the entry itself (the stub serves no ControlNet or IP-Adapter)."""
    def condition(error: dict) -> bool:
        field = str(error["loc"][1]) if len(error["loc"]) > 1 else ""
        return field.split("[")[0] in ("controlnets", "ip_adapter")

    return bool(errors) and all(_only_lora_paths([e]) or condition(e) for e in errors)


def test_schema_sweep_finds_no_server_errors(app_module):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", stub_asgi_app(app_module))
    statuses: dict[tuple[str, int], int] = {}
    unexplained: list[str] = []
    started = time.perf_counter()
    runs = [("/", "POST", GenerationMode.POSITIVE, 60), ("/", "POST", GenerationMode.NEGATIVE, 60),
            ("/stream", "POST", GenerationMode.POSITIVE, 15), ("/stream", "POST", GenerationMode.NEGATIVE, 15),
            ("/image-to-image", "POST", GenerationMode.POSITIVE, 20),
            ("/image-to-image", "POST", GenerationMode.NEGATIVE, 20),
            ("/inpaint", "POST", GenerationMode.POSITIVE, 20), ("/inpaint", "POST", GenerationMode.NEGATIVE, 20),
            ("/health", "POST", GenerationMode.POSITIVE, 3), ("/health", "GET", GenerationMode.POSITIVE, 3)]
    for path, method, mode, examples in runs:
        @given(case=schema[path][method].as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def sweep(case):
            response = case.call()
            key = (case.meta.generation.mode.value, response.status_code)
            statuses[key] = statuses.get(key, 0) + 1
            if response.status_code >= 500:
                unexplained.append(f"{key} {case.body!r}: {response.text[:200]}")
            # Inside the schema, only the rules JSON Schema cannot say may refuse a request: a visible prompt,
            # the pixel limit, a strength that runs a step, what the input images turn out to be, and a
            # LoRA's path (its syntax, and whether it can be fetched and fits the model: the stub has no
            # pipeline, so every LoRA is refused, naming loras[i]), and a ControlNet or IP-Adapter entry (the
            # demo profile configures demo-controlnet; the stub serves none, so each is refused, naming it).
            if key[0] == "positive" and response.status_code == 422 and not (re.search(
                r'non-whitespace text|more than the limit|runs no denoising step|"msg":"(image_url|mask_url)\b',
                response.text,
            ) or _only_lora_paths_and_conditions(response.json()["detail"])):
                unexplained.append(f"schema-valid body refused: {case.body!r}: {response.text[:200]}")

        sweep()
    assert unexplained == []
    assert statuses.get(("positive", 200), 0) > 0 and statuses.get(("negative", 422), 0) > 0
    assert NoisePipe.calls > 0
    assert time.perf_counter() - started < 60
