"""app.py without a model: fal.toml validation, the pyproject registration, the public OpenAPI
schema, and a property-based sweep of that schema (schemathesis) against a stand-in pipeline."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import re
import resource
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage

REPO = Path(__file__).resolve().parents[1]
FAL_TOML = (REPO / "fal.toml").read_text()


@pytest.fixture(scope="module")
def app_module():
    """app.py imported with the demo profile (the schema's bounds are fixed at import)."""
    previous = os.environ.get("APP_PROFILE")
    os.environ["APP_PROFILE"] = "demo"
    try:
        sys.modules.pop("app", None)
        return importlib.import_module("app")
    finally:
        if previous is None:
            os.environ.pop("APP_PROFILE", None)
        else:
            os.environ["APP_PROFILE"] = previous


def settings_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fal.toml"
    path.write_text(text)
    return path


def edited(old: str, new: str) -> str:
    assert old in FAL_TOML, f"fal.toml no longer contains {old!r}"
    return FAL_TOML.replace(old, new, 1)


# --------------------------------------------------------------------------------------------------
# fal.toml


def test_default_profile_serves_pinned_sdxl(app_module):
    settings = app_module.load_settings(REPO / "fal.toml", profile="")
    assert settings.profile == "default"
    assert settings.model.source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert re.fullmatch(r"[0-9a-f]{40}", settings.model.revision)
    assert settings.model.variant == "fp16"
    assert settings.serving.output == "cdn"
    assert settings.serving.presets.square_hd.width == 1024


def test_demo_profile_replaces_model_and_shrinks_presets(app_module):
    settings = app_module.load_settings(REPO / "fal.toml", profile="demo")
    assert settings.model.source == "demo"
    assert settings.model.revision is None and settings.model.variant is None  # replaced whole
    assert settings.model.device == "cpu"
    assert settings.serving.output == "data_uri"
    assert (settings.serving.presets.square_hd.width, settings.serving.presets.square_hd.height) == (256, 256)
    assert settings.deploy.request_timeout == 300  # merged key by key from [deploy]


def test_app_profile_env_selects_profile(app_module, monkeypatch):
    monkeypatch.setenv("APP_PROFILE", "demo")
    assert app_module.load_settings(REPO / "fal.toml").profile == "demo"


def test_unknown_profile_is_named_with_the_known_ones(app_module, tmp_path):
    with pytest.raises(app_module.SettingsError, match=r"APP_PROFILE='staging'.*known: default, demo"):
        app_module.load_settings(settings_file(tmp_path, FAL_TOML), profile="staging")


def test_unknown_key_is_named(app_module, tmp_path):
    path = settings_file(tmp_path, edited("max_steps = 60", "max_stepz = 60"))
    with pytest.raises(app_module.SettingsError) as err:
        app_module.load_settings(path, profile="")
    assert "serving.max_stepz: unknown key" in str(err.value)
    assert "serving.max_steps: required key is missing" in str(err.value)


def test_wrong_type_is_named(app_module, tmp_path):
    path = settings_file(tmp_path, edited("keep_alive = 300", 'keep_alive = "300"'))
    with pytest.raises(app_module.SettingsError, match=r"deploy\.keep_alive: Input should be a valid integer"):
        app_module.load_settings(path, profile="")


def test_unknown_profile_table_is_named(app_module, tmp_path):
    path = settings_file(tmp_path, edited("[profiles.demo.serving]\n", "[profiles.demo.servng]\n"))
    with pytest.raises(app_module.SettingsError, match=r"unknown table \[profiles\.demo\.servng\]"):
        app_module.load_settings(path, profile="demo")


def test_preset_off_the_pixel_grid_is_named(app_module, tmp_path):
    path = settings_file(tmp_path, edited("square = { width = 512, height = 512 }",
                                          "square = { width = 500, height = 512 }"))
    with pytest.raises(app_module.SettingsError, match=r"presets\.square: width 500 is not a multiple of 8"):
        app_module.load_settings(path, profile="")


def test_default_steps_above_max_steps_is_refused(app_module, tmp_path):
    path = settings_file(tmp_path, edited("default_steps = 30", "default_steps = 90"))
    with pytest.raises(app_module.SettingsError, match=r"default_steps \(90\) exceeds max_steps \(60\)"):
        app_module.load_settings(path, profile="")


def test_bad_device_is_named(app_module, tmp_path):
    path = settings_file(tmp_path, edited('device = "auto"', 'device = "gpu"'))
    with pytest.raises(app_module.SettingsError, match=r"model\.device: String should match pattern"):
        app_module.load_settings(path, profile="")


def with_model(lines: str) -> str:
    """fal.toml with its default [model] table replaced by ``lines``."""
    start = FAL_TOML.index("[model]\n")
    end = FAL_TOML.index("\n[serving]\n")
    return FAL_TOML[:start] + f"[model]\n{lines}\n" + FAL_TOML[end:]


BAD_MODELS = [
    ('source = "http://example.com/model.safetensors"', "model.source: http://example.com/model.safetensors: only https:// URLs"),
    ('source = "not a repo!!"', "model.source: 'not a repo!!' is neither a Hub repo id"),
    ('source = "org/../etc"', "model.source: 'org/../etc' is neither a Hub repo id"),
    ('source = "/no/such/model"', "model.source: /no/such/model: no such directory"),
    ('source = "https://example.com/model.safetensors"\nrevision = "main"',
     "model.revision: https://example.com/model.safetensors: revision, variant and subfolder apply to Hub repos"),
    ('source = "https://example.com/model.safetensors"\nvariant = "fp16"',
     "model.variant: https://example.com/model.safetensors: revision, variant and subfolder apply to Hub repos"),
    ('source = "org/model"\nvariant = "fp16!"', "model.variant: variant 'fp16!' is not a weight variant name"),
    ('source = "org/model@v1"\nrevision = "v2"', "model.revision: org/model@v1: revision given twice ('v1' and 'v2')"),
    ('source = "demo"\nrevision = "main"', "model.revision: the 'demo' source has no revisions"),
]


@pytest.mark.parametrize(("lines", "message"), BAD_MODELS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD_MODELS)])
def test_unusable_model_source_is_refused_when_settings_load_naming_the_key(app_module, tmp_path, lines, message):
    path = settings_file(tmp_path, with_model(lines))
    with pytest.raises(app_module.SettingsError) as err:
        app_module.load_settings(path, profile="")
    assert str(err.value).startswith(f"{path} (profile 'default'): {message}")


def test_existing_local_directory_is_a_valid_model_source(app_module, tmp_path):
    path = settings_file(tmp_path, with_model(f'source = "{tmp_path}"'))
    assert app_module.load_settings(path, profile="").model.source == str(tmp_path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("max_steps = 60", "max_steps = 9223372036854775807", "serving.max_steps: Input should be less than or equal to 1000"),
        ("max_guidance_scale = 20.0", "max_guidance_scale = inf", "serving.max_guidance_scale: must be a finite number, got inf"),
        ("max_guidance_scale = 20.0", "max_guidance_scale = 1000.0",
         "serving.max_guidance_scale: Input should be less than or equal to 100"),
        ("default_guidance_scale = 5.0\nmax_guidance_scale", "default_guidance_scale = nan\nmax_guidance_scale",
         "serving.default_guidance_scale: must be a finite number, got nan"),
        ("min_side = 256", "min_side = 260", "serving.min_side: Input should be a multiple of 8"),
        ("max_side = 2048", "max_side = 2044", "serving.max_side: Input should be a multiple of 8"),
        ("max_side = 2048", "max_side = 16384", "serving.max_side: Input should be less than or equal to 8192"),
        ("max_pixels = 2359296", "max_pixels = 9223372036854775807",
         "serving.max_pixels: Input should be less than or equal to 67108864"),
        ("max_prompt_length = 2000", "max_prompt_length = 10000000",
         "serving.max_prompt_length: Input should be less than or equal to 100000"),
        ("max_request_bytes = 1048576", "max_request_bytes = 100",
         "serving.max_request_bytes: Input should be greater than or equal to 1024"),
    ],
    ids=["huge-max-steps", "inf-guidance", "huge-guidance", "nan-guidance", "min-side-off-grid", "max-side-off-grid",
         "huge-max-side", "huge-max-pixels", "huge-prompt-length", "tiny-request-limit"],
)
def test_absurd_serving_setting_is_refused_naming_the_key(app_module, tmp_path, old, new, message):
    path = settings_file(tmp_path, edited(old, new))
    with pytest.raises(app_module.SettingsError) as err:
        app_module.load_settings(path, profile="")
    assert message in str(err.value)


def test_invalid_toml_names_the_file(app_module, tmp_path):
    path = settings_file(tmp_path, FAL_TOML + "\n[serving\n")
    with pytest.raises(app_module.SettingsError, match=r"fal\.toml: not valid TOML"):
        app_module.load_settings(path, profile="")


def test_missing_settings_file_is_named(app_module, tmp_path):
    with pytest.raises(app_module.SettingsError, match=r"nope\.toml: settings file not found"):
        app_module.load_settings(tmp_path / "nope.toml")


def test_requirements_drop_comments_and_refuse_pip_options(app_module, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# pins\ntorch==2.13.0  # cpu\n\ndiffusers==0.42.1\n")
    assert app_module.read_requirements(good) == ["torch==2.13.0", "diffusers==0.42.1"]
    bad = tmp_path / "bad.txt"
    bad.write_text("torch==2.13.0\n-r other.txt\n")
    with pytest.raises(app_module.SettingsError, match=r"bad\.txt:2: pip options"):
        app_module.read_requirements(bad)


def test_app_class_takes_its_settings_from_fal_toml(app_module):
    app_cls = app_module.TextToImageApp
    demo = app_module.load_settings(REPO / "fal.toml", profile="demo")
    assert app_cls.machine_type == demo.deploy.machine_type
    assert app_cls.host_kwargs["keep_alive"] == demo.deploy.keep_alive
    assert app_cls.host_kwargs["max_concurrency"] == demo.deploy.max_concurrency
    assert app_cls.host_kwargs["startup_timeout"] == demo.deploy.startup_timeout
    assert app_cls.app_name == "flashpack-t2i"
    assert app_cls.app_files == ["model_loader", "conversion"]
    assert "torch==2.13.0" in app_cls.requirements
    assert app_cls.host_kwargs["health_check_config"].path == "/health"


def _demo_source_with_file_size_limit(queue, app_module, root: Path, limit: int) -> None:
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        queue.put(("ok", str(app_module.ensure_demo_source(root))))
    except BaseException as exc:
        queue.put(("error", type(exc).__name__, str(exc)))


def test_full_disk_while_generating_the_demo_source_is_a_disk_full_error_naming_it(app_module, tmp_path):
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    proc = fork.Process(target=_demo_source_with_file_size_limit, args=(queue, app_module, tmp_path, 64 * 1024))
    proc.start()
    result = queue.get(timeout=120)
    proc.join(30)
    assert result[:2] == ("error", "DiskFullError"), result
    assert re.fullmatch(
        rf"no space left writing {re.escape(str(tmp_path / 'demo-source'))}/\.seed-0\.tmp-\S+ \(File too large\); "
        "free space there and retry",
        result[2],
    ), result[2]
    assert list((tmp_path / "demo-source").iterdir()) == []  # no half-written source left behind


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


@pytest.mark.parametrize("model", ["TextToImageInput", "TextToImageOutput", "ImageSize", "HealthOutput"])
def test_every_public_field_has_a_description_and_an_example(app_module, model):
    properties = openapi(app_module)["components"]["schemas"][model]["properties"]
    undocumented = [name for name, prop in properties.items() if not prop.get("description")]
    without_example = [name for name, prop in properties.items() if not prop.get("examples")]
    assert undocumented == [] and without_example == []


def test_schema_carries_the_demo_bounds(app_module):
    schemas = openapi(app_module)["components"]["schemas"]
    props = schemas["TextToImageInput"]["properties"]
    assert props["num_inference_steps"]["maximum"] == 25
    assert props["prompt"]["maxLength"] == 500
    assert props["image_size"]["x-fal"] == {"min_width": 32, "max_width": 512, "min_height": 32,
                                            "max_height": 512, "max_area": 131072, "multiple_of": 8}
    assert schemas["TextToImageInput"]["required"] == ["prompt"]
    assert schemas["TextToImageInput"]["additionalProperties"] is False


def test_image_seeds_wrap_inside_the_valid_range(app_module):
    assert app_module.image_seeds(7, 3) == [7, 8, 9]
    assert app_module.image_seeds(app_module.MAX_SEED, 2) == [app_module.MAX_SEED, 0]


# --------------------------------------------------------------------------------------------------
# Property-based sweep: nothing the schema allows or forbids makes the server answer 5xx


class NoisePipe:
    """Stands in for the diffusers pipeline: an image of the asked size, drawn from the seed."""

    calls = 0

    def __call__(self, *, width, height, generator, **_):
        NoisePipe.calls += 1
        rng = np.random.default_rng(generator.initial_seed())
        return SimpleNamespace(images=[PILImage.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))])


def stub_asgi_app(app_module):
    """fal's FastAPI app of TextToImageApp, with NoisePipe in place of the model."""

    class StubApp(app_module.TextToImageApp):
        def setup(self):
            self.pipe, self._lock, self.device = NoisePipe(), threading.Lock(), "cpu"
            self.store_path, self.phase_seconds = Path("stub"), {}
            self._store_checked, self._store_problem = threading.Event(), None
            self._store_checked.set()

    return StubApp(_allow_init=True)._build_app()


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


def test_streamed_body_is_counted_across_chunks_and_never_reaches_the_app(app_module):
    import asyncio

    reached, sent = [], []
    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True} for _ in range(3)]

    async def app(scope, receive, send):
        reached.append(scope)

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    limit = app_module.RequestBodyLimit(app, max_bytes=1000)
    asyncio.run(limit({"type": "http", "method": "POST", "path": "/", "headers": []}, receive, send))
    assert reached == [] and sent[0]["status"] == 413


def test_body_within_the_limit_is_served(stub_client):
    response = stub_client.post("/", json={"prompt": "a cat", "negative_prompt": "x" * 400, **SMALL})
    assert response.status_code == 200, response.text


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


def test_schema_sweep_finds_no_server_errors(app_module):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", stub_asgi_app(app_module))
    statuses: dict[tuple[str, int], int] = {}
    unexplained: list[str] = []
    started = time.perf_counter()
    runs = [("/", "POST", GenerationMode.POSITIVE, 60), ("/", "POST", GenerationMode.NEGATIVE, 60),
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
            # Inside the schema, only the two rules JSON Schema cannot say may refuse a request.
            if key[0] == "positive" and response.status_code == 422 and not re.search(
                r"non-whitespace text|more than the limit", response.text
            ):
                unexplained.append(f"schema-valid body refused: {case.body!r}: {response.text[:200]}")

        sweep()
    assert unexplained == []
    assert statuses.get(("positive", 200), 0) > 0 and statuses.get(("negative", 422), 0) > 0
    assert NoisePipe.calls > 0
    assert time.perf_counter() - started < 60
