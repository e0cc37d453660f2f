"""conversion.store.resolve_root: where the store lives. APP_DATA_ROOT wins everywhere; else fal's
volume (/data, ``ConversionConfig.fal_data_root`` here, so no real /data is needed); without it, an
error on a fal runner (a store off the volume is rebuilt on every cold start) and ``<repo>/.data``
with one warning elsewhere."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from conversion.config import FAL_DATA_ROOT, FAL_RUNNER_ENV, ConversionConfig
from conversion.errors import StoreError
from conversion.store import resolve_root

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, environ: dict[str, str], volume: str = "data") -> ConversionConfig:
    """The config ``environ`` gives, with fal's volume at ``tmp_path / volume``."""
    return ConversionConfig.from_env(environ, fal_data_root=tmp_path / volume)


RUNNER = {FAL_RUNNER_ENV: "31337"}  # what fal sets on its runners (the isolate agent's port)


def test_fals_runner_variable_is_what_tells_a_runner_and_the_volume_is_fals_data():
    assert ConversionConfig.from_env({}).on_fal_runner is False
    assert ConversionConfig.from_env(RUNNER).on_fal_runner is True
    assert ConversionConfig().fal_data_root == FAL_DATA_ROOT == Path("/data")


@pytest.mark.parametrize("state", ["missing", "a file"])
def test_on_a_runner_without_the_volume_the_store_is_refused_saying_what_it_costs(tmp_path, caplog, state):
    if state == "a file":
        (tmp_path / "data").write_text("")
    with caplog.at_level(logging.WARNING, logger="conversion.store"), pytest.raises(StoreError) as err:
        resolve_root(None, config(tmp_path, RUNNER))
    message = str(err.value)
    volume = tmp_path / "data"
    assert message.startswith(f"{volume} {'does not exist' if state == 'missing' else 'is not a directory'} "
                              "on this fal runner")
    assert "every cold start would download and convert again" in message
    assert f'data_mounts, e.g. ["{volume}"]' in message and "set APP_DATA_ROOT" in message
    assert not caplog.records


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_on_a_runner_a_read_only_volume_is_refused(tmp_path):
    volume = tmp_path / "data"
    volume.mkdir()
    volume.chmod(0o555)
    try:
        with pytest.raises(StoreError, match=rf"^{volume} is not writable on this fal runner"):
            resolve_root(None, config(tmp_path, RUNNER))
    finally:
        volume.chmod(0o755)


@pytest.mark.parametrize("environ", [RUNNER, {}], ids=["runner", "elsewhere"])
def test_a_writable_volume_is_the_root_on_a_runner_or_not(tmp_path, caplog, environ):
    (tmp_path / "data").mkdir()
    with caplog.at_level(logging.WARNING, logger="conversion.store"):
        assert resolve_root(None, config(tmp_path, environ)) == tmp_path / "data"
    assert not caplog.records


def test_off_a_runner_without_the_volume_the_store_goes_to_the_repo_with_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="conversion.store"):
        assert resolve_root(None, config(tmp_path, {})) == REPO / ".data"
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert f"{tmp_path / 'data'} does not exist" in record.getMessage()
    assert str(REPO / ".data") in record.getMessage() and "APP_DATA_ROOT" in record.getMessage()


@pytest.mark.parametrize("environ", [RUNNER, {}], ids=["runner", "elsewhere"])
def test_app_data_root_wins_everywhere_even_on_a_runner_without_the_volume(tmp_path, caplog, environ):
    chosen = tmp_path / "chosen"
    with caplog.at_level(logging.WARNING, logger="conversion.store"):
        assert resolve_root(None, config(tmp_path, {**environ, "APP_DATA_ROOT": str(chosen)})) == chosen
        assert resolve_root(tmp_path / "explicit", config(tmp_path, environ)) == tmp_path / "explicit"
    assert not caplog.records
