"""serving.settings: fal.toml read and validated strictly, one profile at a time, nothing at import."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving.settings import SettingsError, load_settings, read_requirements

REPO = Path(__file__).resolve().parents[1]
FAL_TOML = (REPO / "fal.toml").read_text()


def test_importing_serving_reads_no_settings_and_no_environment_and_no_torch(tmp_path):
    env = {**os.environ, "APP_PROFILE": "no-such-profile", "PYTHONPATH": str(REPO)}
    code = ("import sys, serving, serving.settings, serving.schema, serving.http, serving.billing, serving.compile, "
            "serving.ports, serving.lora; assert 'torch' not in sys.modules, 'serving imported torch'")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    # app.py, by contrast, loads the settings once at import: fal builds the class from them.
    result = subprocess.run([sys.executable, "-c", "import app"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "SettingsError" in result.stderr and "APP_PROFILE='no-such-profile' is not a profile here" in result.stderr


def settings_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fal.toml"
    path.write_text(text)
    return path


def edited(old: str, new: str) -> str:
    assert old in FAL_TOML, f"fal.toml no longer contains {old!r}"
    return FAL_TOML.replace(old, new, 1)


def test_default_profile_serves_pinned_sdxl():
    settings = load_settings(REPO / "fal.toml", profile="")
    assert settings.profile == "default"
    assert settings.model.source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert re.fullmatch(r"[0-9a-f]{40}", settings.model.revision)
    assert settings.model.variant == "fp16"
    assert settings.serving.output == "cdn"
    assert settings.serving.presets.square_hd.width == 1024


def test_default_profile_checks_images_with_the_hub_checker_pinned_to_a_commit():
    checker = load_settings(REPO / "fal.toml", profile="").safety_checker
    assert checker.enabled and checker.source == "CompVis/stable-diffusion-safety-checker"
    assert checker.revision == "cb41f3a270d63d454d385fc2e4f571c487c253c5" and checker.subfolder is None


def test_demo_profile_replaces_the_safety_checker_whole_with_the_demo_checker():
    checker = load_settings(REPO / "fal.toml", profile="demo").safety_checker
    assert (checker.source, checker.revision, checker.subfolder) == ("demo", None, None)


def test_demo_profile_replaces_model_and_shrinks_presets():
    settings = load_settings(REPO / "fal.toml", profile="demo")
    assert settings.model.source == "demo"
    assert settings.model.revision is None and settings.model.variant is None  # replaced whole
    assert settings.model.device == "cpu"
    assert settings.serving.output == "data_uri"
    assert (settings.serving.presets.square_hd.width, settings.serving.presets.square_hd.height) == (64, 64)
    assert settings.deploy.request_timeout == 300  # merged key by key from [deploy]


def test_app_profile_env_selects_the_profile_each_time_settings_load_without_one(monkeypatch):
    monkeypatch.setenv("APP_PROFILE", "demo")
    assert load_settings(REPO / "fal.toml").profile == "demo"
    monkeypatch.delenv("APP_PROFILE")
    assert load_settings(REPO / "fal.toml").profile == "default"
    monkeypatch.setenv("APP_PROFILE", " ")
    assert load_settings(REPO / "fal.toml").profile == "default"


def test_an_explicit_profile_wins_over_app_profile(monkeypatch):
    monkeypatch.setenv("APP_PROFILE", "demo")
    assert load_settings(REPO / "fal.toml", profile="").profile == "default"
    monkeypatch.delenv("APP_PROFILE")
    assert load_settings(REPO / "fal.toml", profile="demo").profile == "demo"


def test_unknown_profile_is_named_with_the_known_ones(tmp_path):
    with pytest.raises(SettingsError, match=r"APP_PROFILE='staging'.*known: default, demo"):
        load_settings(settings_file(tmp_path, FAL_TOML), profile="staging")


def test_unknown_key_is_named(tmp_path):
    path = settings_file(tmp_path, edited("max_steps = 60", "max_stepz = 60"))
    with pytest.raises(SettingsError) as err:
        load_settings(path, profile="")
    assert "serving.max_stepz: unknown key" in str(err.value)
    assert "serving.max_steps: required key is missing" in str(err.value)


def test_wrong_type_is_named(tmp_path):
    path = settings_file(tmp_path, edited("keep_alive = 300", 'keep_alive = "300"'))
    with pytest.raises(SettingsError, match=r"deploy\.keep_alive: Input should be a valid integer"):
        load_settings(path, profile="")


def test_unknown_profile_table_is_named(tmp_path):
    path = settings_file(tmp_path, edited("[profiles.demo.serving]\n", "[profiles.demo.servng]\n"))
    with pytest.raises(SettingsError, match=r"unknown table \[profiles\.demo\.servng\]"):
        load_settings(path, profile="demo")


def test_preset_off_the_pixel_grid_is_named(tmp_path):
    path = settings_file(tmp_path, edited("square = { width = 512, height = 512 }",
                                          "square = { width = 500, height = 512 }"))
    with pytest.raises(SettingsError, match=r"presets\.square: width 500 is not a multiple of 8"):
        load_settings(path, profile="")


def test_default_steps_above_max_steps_is_refused(tmp_path):
    path = settings_file(tmp_path, edited("default_steps = 30", "default_steps = 90"))
    with pytest.raises(SettingsError, match=r"default_steps \(90\) exceeds max_steps \(60\)"):
        load_settings(path, profile="")


def test_bad_device_is_named(tmp_path):
    path = settings_file(tmp_path, edited('device = "auto"', 'device = "gpu"'))
    with pytest.raises(SettingsError, match=r"model\.device: String should match pattern"):
        load_settings(path, profile="")


def with_model(lines: str) -> str:
    """fal.toml with its default [model] table replaced by ``lines``."""
    start = FAL_TOML.index("[model]\n")
    end = FAL_TOML.index("\n[", start + 1)
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
    ('source = "demo"\nconfig = "org/base"', "model.config: the 'demo' source has no configs; remove config"),
    ('source = "org/model"\npipeline_class = "FluxPipeline"',
     "model.pipeline_class: org/model: pipeline_class and config apply to single-file checkpoints"),
    ('source = "org/model"\nconfig = "org/base"',
     "model.config: org/model: pipeline_class and config apply to single-file checkpoints"),
    ('source = "https://example.com/model.safetensors"\nsubfolder = "unet"',
     "model.subfolder: https://example.com/model.safetensors: revision, variant and subfolder apply to Hub repos"),
    ('source = "org/model/model.safetensors"\nsubfolder = "unet"',
     "model.subfolder: org/model/model.safetensors: variant and subfolder apply to Hub repos, not to a single file"),
    ('source = "org/model/model.safetensors"\nvariant = "fp16"',
     "model.variant: org/model/model.safetensors: variant and subfolder apply to Hub repos, not to a single file"),
    ('source = "org/model/model.safetensors"\npipeline_class = "NoSuchPipeline"',
     "model.pipeline_class: Input should be 'StableDiffusionPipeline', 'StableDiffusionXLPipeline' or 'FluxPipeline'"),
    ('source = "org/model/model.safetensors"\nconfig = "/no/such/config"',
     "model.config: config '/no/such/config': no such directory"),
    ('source = "org/model/model.safetensors"\nconfig = "https://example.com/configs"',
     "model.config: config 'https://example.com/configs' must be a local diffusers directory or a Hub repo id"),
    ('source = "org/model/../x.safetensors"',
     "model.source: org/model/../x.safetensors: '../x.safetensors' is not a checkpoint file in the repo"),
]


@pytest.mark.parametrize(("lines", "message"), BAD_MODELS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD_MODELS)])
def test_unusable_model_source_is_refused_when_settings_load_naming_the_key(tmp_path, lines, message):
    path = settings_file(tmp_path, with_model(lines))
    with pytest.raises(SettingsError) as err:
        load_settings(path, profile="")
    assert str(err.value).startswith(f"{path} (profile 'default'): {message}")


def test_a_hub_file_with_its_pipeline_class_and_config_is_the_source_the_app_converts(tmp_path):
    from conversion.sources import HubFileSource
    from serving.settings import model_source

    lines = ('source = "org/base/sd_xl_base_1.0.safetensors"\nrevision = "main"\n'
             'pipeline_class = "StableDiffusionXLPipeline"\nconfig = "org/base"\ndtype = "float16"')
    model = load_settings(settings_file(tmp_path, with_model(lines)), profile="").model
    assert model_source(model) == HubFileSource("org/base", "sd_xl_base_1.0.safetensors", revision="main",
                                                pipeline_class="StableDiffusionXLPipeline", config="org/base")


def test_a_local_config_directory_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    from serving.settings import model_source

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    lines = 'source = "https://example.com/model.safetensors"\nconfig = "./base"'
    model = load_settings(settings_file(tmp_path, with_model(lines)), profile="").model
    assert model_source(model).config == str(tmp_path / "base")


def test_subfolder_of_a_hub_repo_reaches_its_source(tmp_path):
    from conversion.sources import HubSource
    from serving.settings import model_source

    model = load_settings(settings_file(tmp_path, with_model('source = "org/model"\nsubfolder = "pipe"')), profile="").model
    assert model_source(model) == HubSource("org/model", subfolder="pipe")


def test_existing_local_directory_is_a_valid_model_source(tmp_path):
    path = settings_file(tmp_path, with_model(f'source = "{tmp_path}"'))
    assert load_settings(path, profile="").model.source == str(tmp_path)


def with_checker(lines: str | None) -> str:
    """fal.toml with its default [safety_checker] table replaced by ``lines`` (None: removed)."""
    start = FAL_TOML.index("[safety_checker]\n")
    end = FAL_TOML.index("\n[", start + 1)
    return FAL_TOML[:start] + (f"[safety_checker]\n{lines}\n" if lines is not None else "") + FAL_TOML[end:]


def test_a_missing_safety_checker_table_is_refused_saying_how_to_serve_without_one(tmp_path):
    path = settings_file(tmp_path, with_checker(None))
    with pytest.raises(SettingsError) as err:
        load_settings(path, profile="")
    assert str(err.value) == (
        f"{path} (profile 'default'): safety_checker: required table is missing; name the checker's source "
        '(e.g. source = "CompVis/stable-diffusion-safety-checker"), or source = "none" to serve without one')


def test_safety_checker_source_none_serves_without_a_checker(tmp_path):
    checker = load_settings(settings_file(tmp_path, with_checker('source = "none"')), profile="").safety_checker
    assert checker.source == "none" and not checker.enabled


def test_a_local_checker_directory_is_a_valid_checker_source(tmp_path):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (tmp_path / name).write_text("{}")
    path = settings_file(tmp_path, with_checker(f'source = "{tmp_path}"'))
    assert load_settings(path, profile="").safety_checker.source == str(tmp_path)


BAD_CHECKERS = [
    ('source = "none"\nrevision = "main"', "safety_checker.revision: source 'none' (no safety checker) has no revision"),
    ('source = "none"\nsubfolder = "x"', "safety_checker.subfolder: source 'none' (no safety checker) has no subfolder"),
    ('source = "https://example.com/checker.safetensors"',
     "safety_checker.source: https://example.com/checker.safetensors: a safety checker is a Hub repo or a directory"),
    ('source = "/no/such/checker"', "safety_checker.source: /no/such/checker: no such directory"),
    ('source = "demo"\nrevision = "main"', "safety_checker.revision: the demo safety checker takes no revision"),
    ('source = "org/checker"\nsubfolder = "../x"', "safety_checker.subfolder: subfolder '../x' must be a relative"),
    ('source = "org/checker@v1"\nrevision = "v2"', "safety_checker.revision: org/checker@v1: revision given twice"),
    ('source = ""', "safety_checker.source: String should have at least 1 character"),
    ('source = "org/checker"\nvariant = "fp16"', "safety_checker.variant: unknown key"),
]


@pytest.mark.parametrize(("lines", "message"), BAD_CHECKERS, ids=[f"checker-{i}" for i in range(len(BAD_CHECKERS))])
def test_unusable_safety_checker_is_refused_when_settings_load_naming_the_key(tmp_path, lines, message):
    path = settings_file(tmp_path, with_checker(lines))
    with pytest.raises(SettingsError) as err:
        load_settings(path, profile="")
    assert str(err.value).startswith(f"{path} (profile 'default'): {message}")


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
def test_absurd_serving_setting_is_refused_naming_the_key(tmp_path, old, new, message):
    path = settings_file(tmp_path, edited(old, new))
    with pytest.raises(SettingsError) as err:
        load_settings(path, profile="")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("max_loras = 3", "max_loras = 17", "lora.max_loras: Input should be less than or equal to 16"),
        ("max_scale = 1.0", "max_scale = 0.0", "lora.max_scale: Input should be greater than 0"),
        ("max_scale = 1.0", "max_scale = inf", "lora.max_scale: must be a finite number, got inf"),
        ("max_file_mb = 1024", "max_file_mb = 0", "lora.max_file_mb: Input should be greater than or equal to 1"),
        ("max_file_mb = 1024", 'max_file_mb = "1024"', "lora.max_file_mb: Input should be a valid integer"),
        ("cache_mb = 4096", "cache_mb = -1", "lora.cache_mb: Input should be greater than or equal to 0"),
        ("cache_mb = 4096", "cache_mb = 4096\nmax_lora = 2", "lora.max_lora: unknown key"),
    ],
    ids=["too-many-loras", "zero-max-scale", "inf-max-scale", "zero-file-limit", "text-file-limit", "negative-cache",
         "misspelt-key"],
)
def test_absurd_lora_setting_is_refused_naming_the_key(tmp_path, old, new, message):
    path = settings_file(tmp_path, edited(old, new))
    with pytest.raises(SettingsError) as err:
        load_settings(path, profile="")
    assert message in str(err.value)


def test_lora_settings_default_to_fals_bounds_and_the_demo_keeps_smaller_files():
    default, demo = (load_settings(REPO / "fal.toml", profile=p).lora for p in ("", "demo"))
    assert (default.max_loras, default.max_scale, default.max_file_mb, default.cache_mb) == (3, 1.0, 1024, 4096)
    assert (demo.max_loras, demo.max_scale, demo.max_file_mb, demo.cache_mb) == (3, 1.0, 16, 64)


@pytest.mark.parametrize(("lines", "message"), [
    ('source = "demo"\n[[model.loras]]\npath = "http://example.com/a.safetensors"',
     "model.loras[0].path: http://example.com/a.safetensors: http: URLs are not accepted"),
    ('source = "demo"\n[[model.loras]]\npath = "org/lora"\n[[model.loras]]\npath = "org/lora/w.ckpt"',
     "model.loras[1].path: 'org/lora/w.ckpt': a LoRA file in a repo must be a .safetensors file"),
    ('source = "demo"\n[[model.loras]]\npath = "org/lora"\nscale = 11.0',
     "model.loras.0.scale: Input should be less than or equal to 10"),
    ('source = "demo"\n[[model.loras]]\nscale = 1.0', "model.loras.0.path: required key is missing"),
])
def test_an_unusable_fused_lora_is_refused_naming_its_key(tmp_path, lines, message):
    path = settings_file(tmp_path, with_model(lines))
    with pytest.raises(SettingsError) as err:
        load_settings(path, profile="")
    assert str(err.value).startswith(f"{path} (profile 'default'): {message}")


def test_fused_loras_are_read_with_their_scales_and_default_to_scale_one(tmp_path):
    from conversion.sources import HubLora
    from serving.lora import fused_loras

    lines = 'source = "demo"\n[[model.loras]]\npath = "org/lora@v2/style.safetensors"\nscale = 0.5\n' \
            '[[model.loras]]\npath = "org/other"'
    model = load_settings(settings_file(tmp_path, with_model(lines)), profile="").model
    assert fused_loras(model) == [(HubLora("org/lora", "style.safetensors", "v2"), 0.5), (HubLora("org/other"), 1.0)]
    assert load_settings(REPO / "fal.toml", profile="").model.loras == []


BAD_CONDITIONS = [
    ('[[model.controlnets]]\nsource = "https://example.com/canny.safetensors"',
     "model.controlnets[0].source: https://example.com/canny.safetensors: a ControlNet is a model folder "
     "(config.json + weights): a Hub repo or a local directory, not a URL"),
    ('[[model.controlnets]]\nsource = "org/controlnets/canny.safetensors"',
     "model.controlnets[0].source: org/controlnets/canny.safetensors: a ControlNet is a model folder"),
    ('[[model.controlnets]]\nsource = "/no/such/controlnet"',
     "model.controlnets[0].source: /no/such/controlnet: no such directory"),
    ('[[model.controlnets]]\nsource = "org/canny"\n[[model.controlnets]]\nsource = "org/canny"\nvariant = "fp16"',
     "model.controlnets[1].source: 'org/canny' is configured twice: a request names each by its source"),
    ('[[model.controlnets]]\nsource = "org/canny"\npreprocess = "depth"',
     "model.controlnets.0.preprocess: Input should be 'none' or 'canny'"),
    ('[[model.controlnets]]\nsource = "org/canny"\nvariant = "fp16!"',
     "model.controlnets[0].source: variant 'fp16!' is not a weight variant name"),
    ('[[model.ip_adapters]]\nsource = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"',
     "model.ip_adapters.0.image_encoder: required key is missing"),
    ('[[model.ip_adapters]]\nsource = "h94/IP-Adapter/models/ip-adapter_sd15.bin"\nimage_encoder = "h94/IP-Adapter"',
     "model.ip_adapters[0].source: 'h94/IP-Adapter/models/ip-adapter_sd15.bin' is neither a Hub repo id (org/name), "
     "an https:// URL nor an existing directory; an IP-Adapter is one .safetensors file"),
    ('[[model.ip_adapters]]\nsource = "h94/IP-Adapter"\nimage_encoder = "h94/IP-Adapter"',
     "model.ip_adapters[0].source: h94/IP-Adapter: names a folder; an IP-Adapter is one .safetensors file"),
    ('[[model.ip_adapters]]\nsource = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"\n'
     'image_encoder = "https://example.com/encoder"',
     "model.ip_adapters[0].image_encoder: https://example.com/encoder: an image encoder is a model folder"),
    ('[[model.ip_adapters]]\nsource = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"\n'
     'image_encoder = "h94/IP-Adapter"\nimage_encoder_subfolder = "../up"',
     "model.ip_adapters[0].image_encoder: subfolder '../up' must be a relative folder inside the repo"),
]


@pytest.mark.parametrize(("lines", "message"), BAD_CONDITIONS, ids=[f"bad-condition-{i}" for i in range(len(BAD_CONDITIONS))])
def test_an_unusable_controlnet_or_ip_adapter_is_refused_naming_its_key(tmp_path, lines, message):
    path = settings_file(tmp_path, with_model('source = "demo"\n' + lines))
    with pytest.raises(SettingsError) as err:
        load_settings(path, profile="")
    assert str(err.value).startswith(f"{path} (profile 'default'): {message}")


def test_a_local_controlnet_folder_without_a_config_is_refused_when_settings_load(tmp_path):
    folder = tmp_path / "controlnet"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    path = settings_file(tmp_path, with_model(f'source = "demo"\n[[model.controlnets]]\nsource = "{folder}"'))
    with pytest.raises(SettingsError, match=r"model\.controlnets\[0\]\.source: /\S+/controlnet holds no model: no "
                                            r"config\.json \(a model folder has config\.json and its weights side by side"):
        load_settings(path, profile="")


def test_controlnets_and_ip_adapters_are_read_with_their_defaults(tmp_path):
    from conversion.sources import HubModelFolderSource
    from conversion.sources.module import ModuleSource
    from serving.settings import controlnet_source, ip_adapter_encoder, ip_adapter_weights

    lines = ('source = "demo"\n[[model.controlnets]]\nsource = "org/canny@abc"\nsubfolder = "sdxl"\n'
             '[[model.ip_adapters]]\nsource = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"\n'
             'image_encoder = "h94/IP-Adapter"\nimage_encoder_subfolder = "models/image_encoder"')
    model = load_settings(settings_file(tmp_path, with_model(lines)), profile="").model
    [net], [adapter] = model.controlnets, model.ip_adapters
    assert net.preprocess == "none"
    assert controlnet_source(net) == HubModelFolderSource("org/canny", revision="abc", subfolder="sdxl",
                                                          component="controlnet")
    assert isinstance(ip_adapter_weights(adapter), ModuleSource)
    assert ip_adapter_encoder(adapter) == HubModelFolderSource("h94/IP-Adapter", subfolder="models/image_encoder",
                                                               component="image_encoder")
    assert load_settings(REPO / "fal.toml", profile="").model.controlnets == []


def test_invalid_toml_names_the_file(tmp_path):
    path = settings_file(tmp_path, FAL_TOML + "\n[serving\n")
    with pytest.raises(SettingsError, match=r"fal\.toml: not valid TOML"):
        load_settings(path, profile="")


def test_missing_settings_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match=r"nope\.toml: settings file not found"):
        load_settings(tmp_path / "nope.toml")


def test_requirements_drop_comments_and_refuse_pip_options(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# pins\ntorch==2.13.0  # cpu\n\ndiffusers==0.42.1\n")
    assert read_requirements(good) == ["torch==2.13.0", "diffusers==0.42.1"]
    bad = tmp_path / "bad.txt"
    bad.write_text("torch==2.13.0\n-r other.txt\n")
    with pytest.raises(SettingsError, match=r"bad\.txt:2: pip options"):
        read_requirements(bad)
