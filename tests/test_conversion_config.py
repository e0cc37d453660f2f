"""ConversionConfig: every environment variable of the conversion package, parsed in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from conversion.config import ENV_VARS, ConversionConfig
from conversion.errors import ConversionError


def test_unset_or_empty_variables_give_the_defaults():
    assert ConversionConfig.from_env({}) == ConversionConfig.from_env({v.name: "" for v in ENV_VARS}) == ConversionConfig()


def test_each_variable_sets_its_field():
    config = ConversionConfig.from_env({
        "APP_DATA_ROOT": "/vol", "APP_STORE_VERIFY": "full", "APP_STORE_LOCK_TIMEOUT_S": "60",
        "APP_STORE_STALE_AFTER_S": "5", "APP_DOWNLOAD_STALL_TIMEOUT_S": "9.5", "APP_DOWNLOAD_ATTEMPTS": "4",
        "APP_DOWNLOAD_WORKERS": "8", "APP_PREREAD_WORKERS": "2", "APP_PROGRESS": "0",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "hf_x", "HF_HUB_CACHE": "/cache",
        "NOMAD_ALLOC_PORT_grpc": "31337",
    })
    assert config == ConversionConfig(
        data_root=Path("/vol"), store_verify="full", lock_timeout_s=60.0, stale_after_s=5.0, stall_timeout_s=9.5,
        download_attempts=4, download_workers=8, preread_workers=2, progress=False, hf_bars_disabled=True,
        hf_token="hf_x", hub_cache=Path("/cache"), on_fal_runner=True,
    )
    assert {v.name for v in ENV_VARS} == set(
        ["APP_DATA_ROOT", "APP_STORE_VERIFY", "APP_STORE_LOCK_TIMEOUT_S", "APP_STORE_STALE_AFTER_S", "APP_DOWNLOAD_STALL_TIMEOUT_S", "APP_DOWNLOAD_ATTEMPTS", "APP_DOWNLOAD_WORKERS", "APP_PREREAD_WORKERS", "APP_PROGRESS", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_TOKEN", "HF_HUB_CACHE", "NOMAD_ALLOC_PORT_grpc"]
    )


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("APP_STORE_VERIFY", "fast", "must be 'cheap' or 'full'"),
        ("APP_DOWNLOAD_ATTEMPTS", "three", "invalid literal for int"),
        ("APP_DOWNLOAD_ATTEMPTS", "0", "must be >= 1"),
        ("APP_STORE_LOCK_TIMEOUT_S", "-1", "must be > 0"),
        ("APP_PROGRESS", "yes", "must be 0 or 1"),
    ],
)
def test_a_malformed_value_is_an_error_naming_the_variable_and_what_it_means(name, value, problem):
    with pytest.raises(ConversionError, match=rf"^environment variable {name}='{value}' is invalid \(.*{problem}.*\): "):
        ConversionConfig.from_env({name: value})


def test_progress_bars_show_unless_either_switch_hides_them():
    assert ConversionConfig().show_progress
    assert not ConversionConfig(progress=False).show_progress
    assert not ConversionConfig(hf_bars_disabled=True).show_progress


def test_overrides_win_over_the_environment():
    assert ConversionConfig.from_env({"APP_DOWNLOAD_WORKERS": "8"}, download_workers=2).download_workers == 2
