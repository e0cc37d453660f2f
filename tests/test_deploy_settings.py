"""fal.toml's [deploy] is what fal deploys: each key a fal.App class attribute of app.py's app, taken by
fal's own loader (the code `fal deploy flashpack-t2i` runs) over pyproject.toml's app table, which
only names the app. Strict: an unknown or ill-typed deploy key is refused, naming it.

The loader runs in a child process, as fal's CLI does: the app table through
``fal.api.deploy._resolve_deployment_reference`` (fal/cli/_utils.py ``get_app_data_from_toml``), the
class through ``fal.utils.load_function_from``, with a host that is never contacted. These are fal
1.83's internals (pinned in requirements-test.txt); a fal upgrade that changes them fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import get_args

import fal
import pytest

from serving.settings import DeploySettings, FalRegion, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]
FAL_TOML = (REPO / "fal.toml").read_text()
APPS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["fal"]["apps"]
# What a [tool.fal.apps.<name>] table may hold: where the app is, and whether a deploy applies the
# class's scaling. Anything else would either be ignored (fal takes the class's attribute) or, for
# auth, silently override fal.toml's.
TABLE_KEYS = {"ref", "app_scale_settings"}


def fal_attribute(key: str) -> str:
    """The fal.App class attribute a [deploy] key sets."""
    return "app_auth" if key == "auth" else key


# What `fal deploy <app name>` resolves, in a child process with the project dir as its cwd.
DEPLOYED = """
import json, os, sys
from fal.api import FalServerlessHost
from fal.api.deploy import _resolve_deployment_reference
from fal.utils import load_function_from

app, keys, profiles = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
out = {}
for profile in profiles:
    os.environ["APP_PROFILE"] = profile
    (file_path, func_name), app_data = _resolve_deployment_reference((app, None))
    loaded = load_function_from(FalServerlessHost(url="localhost:1"), file_path, func_name,
                                options=app_data.options, app_name=app_data.name, app_auth=app_data.auth)
    host = loaded.function.options.host
    out[profile] = {"host": {key: host.get(key) for key in keys if key != "auth"}, "auth": loaded.app_auth,
                    "app_name": loaded.app_name, "reset_scale": app_data.reset_scale}
print("DEPLOYED " + json.dumps(out))
"""


def deployed(project: Path, *profiles: str, app: str = "flashpack-t2i") -> dict:
    env = {**os.environ, "PYTHONPATH": str(project), "HF_HUB_OFFLINE": "1"}
    env.pop("APP_PROFILE", None)
    keys = json.dumps(list(DeploySettings.model_fields))
    result = subprocess.run([sys.executable, "-c", DEPLOYED, app, keys, *profiles], cwd=project, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("DEPLOYED "))
    return json.loads(line.removeprefix("DEPLOYED "))


def expected(settings: DeploySettings) -> dict:
    values = settings.model_dump()
    return {"host": {key: value for key, value in values.items() if key != "auth"}, "auth": values["auth"]}


def project_copy(tmp_path: Path, fal_toml: str, pyproject: str | None = None) -> Path:
    """This project with another fal.toml (and pyproject.toml): app.py copied (it finds fal.toml
    beside itself), the packages and requirements linked."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "app.py", project / "app.py")
    (project / "fal.toml").write_text(fal_toml)
    (project / "pyproject.toml").write_text(pyproject or (REPO / "pyproject.toml").read_text())
    for name in ("model_loader", "conversion", "serving", "requirements.txt"):
        (project / name).symlink_to(REPO / name)
    return project


# Every [deploy] key at a value that is not fal's default, so each one is seen to travel.
CUSTOM_DEPLOY = """[deploy]
machine_type = ["GPU-H100", "GPU-A100"]
keep_alive = 123
min_concurrency = 1
max_concurrency = 7
concurrency_buffer = 2
concurrency_buffer_perc = 25
scaling_delay = 15
max_multiplexing = 3
request_timeout = 456
startup_timeout = 789
regions = ["us-east", "eu-west"]
auth = "shared"
"""


def custom_fal_toml() -> str:
    start = FAL_TOML.index("[deploy]\n")
    end = FAL_TOML.index("\n[", start + 1)
    return FAL_TOML[:start] + CUSTOM_DEPLOY + FAL_TOML[end:]


# ---------------------------------------------------------------------------------------------
# One source: fal.toml -> the class -> what fal deploys


def test_pyproject_app_tables_only_say_where_each_app_is(monkeypatch):
    from fal.cli._utils import get_app_data_from_toml

    monkeypatch.chdir(REPO)
    assert set(APPS) == {"flashpack-t2i", "latent-decoder"}
    for name, table in APPS.items():
        assert set(table) <= TABLE_KEYS, f"[tool.fal.apps.{name}] holds {sorted(set(table) - TABLE_KEYS)}"
        data = get_app_data_from_toml(name)  # as fal reads it: no options, every deploy applies the class's scaling
        assert (data.options.host, data.options.environment, data.auth, data.reset_scale) == ({}, {}, None, True)


def test_each_deploy_key_is_a_fal_app_attribute_and_the_app_class_carries_it(app_module):
    cls, deploy = app_module.TextToImageApp, load_settings(REPO / "fal.toml", profile="demo").deploy
    for key, value in deploy.model_dump().items():
        # An attribute fal.App declares, or a key of its host_kwargs (keep_alive), which fal's
        # __init_subclass__ takes from a subclass's attribute of that name.
        attribute = fal_attribute(key)
        assert hasattr(fal.App, attribute) or attribute in fal.App.host_kwargs, f"fal.App has no {attribute!r}"
        assert getattr(cls, fal_attribute(key)) == value, key
    # What fal's wrap_app passes on besides machine_type and regions (its own arguments) and auth.
    for key in set(DeploySettings.model_fields) - {"machine_type", "regions", "auth"}:
        assert cls.host_kwargs[key] == getattr(deploy, key), key


def test_fals_loader_deploys_each_profile_of_fal_toml_as_it_is():
    got = deployed(REPO, "default", "demo")
    for profile in ("default", "demo"):
        settings = load_settings(REPO / "fal.toml", profile=profile).deploy
        assert {k: got[profile][k] for k in ("host", "auth")} == expected(settings), profile
        assert got[profile]["app_name"] == "flashpack-t2i" and got[profile]["reset_scale"] is True


def test_every_deploy_key_travels_through_fals_loader(tmp_path):
    project = project_copy(tmp_path, custom_fal_toml())
    settings = load_settings(project / "fal.toml", profile="").deploy
    defaults = {**fal.App.host_kwargs, **{key: getattr(fal.App, key, None) for key in DeploySettings.model_fields}}
    assert all(value != defaults[fal_attribute(key)] for key, value in settings.model_dump().items()
               if fal_attribute(key) in defaults)
    got = deployed(project, "default")["default"]
    assert {k: got[k] for k in ("host", "auth")} == expected(settings)


def test_a_key_in_the_pyproject_table_loses_to_the_class_except_auth_which_is_why_the_table_holds_none(tmp_path):
    # Why TABLE_KEYS is what it is, in fal 1.83: fal/utils.py's load_function_from merges the table's
    # keys only where the App left fal's default (_toml_host_keys_overriding_app_defaults,
    # _merge_host_config), and takes the table's auth over the App's (`app_auth or found_app_auth`).
    pyproject = (REPO / "pyproject.toml").read_text().replace(
        'ref = "app.py::TextToImageApp"\n',
        'ref = "app.py::TextToImageApp"\nmachine_type = "GPU-B200"\nkeep_alive = 1\nconcurrency_buffer = 3\n'
        'scaling_delay = 99\nregions = ["eu-north"]\nauth = "public"\n', 1)
    project = project_copy(tmp_path, custom_fal_toml(), pyproject)
    settings = load_settings(project / "fal.toml", profile="").deploy
    got = deployed(project, "default")["default"]
    assert got["host"] == expected(settings)["host"]
    assert got["auth"] == "public" != settings.auth


def test_the_regions_are_fals_own():
    from fal.cli._utils import VALID_REGIONS

    assert set(get_args(FalRegion)) == VALID_REGIONS


# ---------------------------------------------------------------------------------------------
# Strict: a deploy key fal.toml cannot mean is refused, named


def settings_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fal.toml"
    path.write_text(text)
    return path


def with_deploy_line(line: str) -> str:
    """fal.toml with ``line`` (``key = value``) in [deploy], in place of that key's line if it has one."""
    start = FAL_TOML.index("[deploy]\n")
    end = FAL_TOML.index("\n[", start + 1)
    key = line.split("=", 1)[0].strip()
    table, count = re.subn(rf"^{key} = .*$", line, FAL_TOML[start:end], count=1, flags=re.MULTILINE)
    if not count:
        table = table.replace("[deploy]\n", f"[deploy]\n{line}\n", 1)
    return FAL_TOML[:start] + table + FAL_TOML[end:]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("concurrency_bufer = 1", r"deploy\.concurrency_bufer: unknown key"),
        ("region = [\"us-east\"]", r"deploy\.region: unknown key"),
        ('scaling_delay = "15"', r"deploy\.scaling_delay: Input should be a valid integer"),
        ("scaling_delay = -1", r"deploy\.scaling_delay: Input should be greater than or equal to 0"),
        ("concurrency_buffer = true", r"deploy\.concurrency_buffer: Input should be a valid integer"),
        ("concurrency_buffer_perc = 12.5", r"deploy\.concurrency_buffer_perc: Input should be a valid integer"),
        ("concurrency_buffer = 5", r"deploy: concurrency_buffer \(5\) exceeds max_concurrency \(4\)"),
        ('regions = "us-east"', r"deploy\.regions: Input should be a valid list"),
        ('regions = ["us-east", "mars"]', r"deploy\.regions\.1: Input should be 'us-west', 'us-central', 'us-east'"),
        ("regions = []", r"deploy\.regions: List should have at least 1 item"),
        ('regions = ["us-east", "us-east"]', r"deploy\.regions: names a region twice"),
    ],
)
def test_an_unknown_or_ill_typed_deploy_key_is_refused_naming_it(tmp_path, line, problem):
    with pytest.raises(SettingsError, match=problem):
        load_settings(settings_file(tmp_path, with_deploy_line(line)), profile="")


def test_a_profile_overlays_the_new_deploy_keys_and_is_checked_the_same(tmp_path):
    text = FAL_TOML.replace("[profiles.demo.deploy]\n", "[profiles.demo.deploy]\nscaling_delay = 5\n"
                            'regions = ["eu-west"]\n', 1)
    deploy = load_settings(settings_file(tmp_path, text), profile="demo").deploy
    assert (deploy.scaling_delay, deploy.regions, deploy.keep_alive) == (5, ["eu-west"], 60)
    assert load_settings(settings_file(tmp_path, text), profile="").deploy.scaling_delay == 0
    bad = FAL_TOML.replace("[profiles.demo.deploy]\n", "[profiles.demo.deploy]\nscaling_delay = -5\n", 1)
    with pytest.raises(SettingsError, match=r"\(profile 'demo'\): deploy\.scaling_delay: Input should be greater"):
        load_settings(settings_file(tmp_path, bad), profile="demo")
