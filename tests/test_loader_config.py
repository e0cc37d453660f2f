"""model_loader.config: every MODEL_LOADER_* variable read once, typed, defaulted, errors named."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from model_loader.config import LoaderConfig
from model_loader.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
VARIABLES = {
    "MODEL_LOADER_THREADS",
    "MODEL_LOADER_CHUNK_MB",
    "MODEL_LOADER_DIRECT_IO",
    "MODEL_LOADER_MAP",
    "MODEL_LOADER_HUGEPAGES",
    "MODEL_LOADER_PINNED_MAX_MB",
    "MODEL_LOADER_LAYOUT",
}


class RecordingEnv(Mapping[str, str]):
    """An environment that records every variable asked for."""

    def __init__(self, values: dict[str, str]):
        self.values = values
        self.asked: list[str] = []

    def __getitem__(self, name: str) -> str:
        self.asked.append(name)
        return self.values[name]

    def get(self, name: str, default=None):
        self.asked.append(name)
        return self.values.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def test_defaults_when_no_variable_is_set():
    assert LoaderConfig.from_env({}) == LoaderConfig(
        threads=None, chunk_bytes=32 << 20, direct_io=None, mapping="always", hugepages=False,
        pinned_max_bytes=4096 << 20, layout=None,
    )


def test_each_variable_is_read_exactly_once():
    env = RecordingEnv({})
    LoaderConfig.from_env(env)
    assert sorted(env.asked) == sorted(VARIABLES)


def test_every_variable_is_parsed_into_its_field():
    env = {
        "MODEL_LOADER_THREADS": "3",
        "MODEL_LOADER_CHUNK_MB": "2",
        "MODEL_LOADER_DIRECT_IO": "1",
        "MODEL_LOADER_MAP": "hot",
        "MODEL_LOADER_HUGEPAGES": "1",
        "MODEL_LOADER_PINNED_MAX_MB": "512",
        "MODEL_LOADER_LAYOUT": "split",
    }
    assert LoaderConfig.from_env(env) == LoaderConfig(3, 2 << 20, True, "hot", True, 512 << 20, "split")


def test_empty_values_mean_the_defaults():
    assert LoaderConfig.from_env(dict.fromkeys(VARIABLES, " ")) == LoaderConfig()


def test_words_are_case_insensitive_and_stripped():
    config = LoaderConfig.from_env({"MODEL_LOADER_MAP": " Never ", "MODEL_LOADER_DIRECT_IO": "FALSE",
                                    "MODEL_LOADER_HUGEPAGES": "True"})
    assert (config.mapping, config.direct_io, config.hugepages) == ("never", False, True)


def test_direct_io_auto_means_per_chunk():
    assert LoaderConfig.from_env({"MODEL_LOADER_DIRECT_IO": "auto"}).direct_io is None


def test_zero_pinned_memory_is_allowed():
    assert LoaderConfig.from_env({"MODEL_LOADER_PINNED_MAX_MB": "0"}).pinned_max_bytes == 0


def test_os_environ_is_read_by_default(monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_CHUNK_MB", "8")
    assert LoaderConfig.from_env().chunk_bytes == 8 << 20


def test_a_typo_in_the_map_mode_names_the_variable_and_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        LoaderConfig.from_env({"MODEL_LOADER_MAP": "hto"})
    assert str(err.value) == "MODEL_LOADER_MAP='hto': expected one of always, hot, never"


def test_an_unknown_direct_io_mode_names_the_variable_and_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        LoaderConfig.from_env({"MODEL_LOADER_DIRECT_IO": "yes"})
    assert str(err.value) == "MODEL_LOADER_DIRECT_IO='yes': expected one of auto, 1, 0, true, false"


def test_an_unknown_hugepages_setting_names_the_variable_and_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        LoaderConfig.from_env({"MODEL_LOADER_HUGEPAGES": "sometimes"})
    assert str(err.value) == "MODEL_LOADER_HUGEPAGES='sometimes': expected one of 1, 0, true, false"


def test_a_thread_count_that_is_not_an_integer_names_the_variable():
    with pytest.raises(ConfigError) as err:
        LoaderConfig.from_env({"MODEL_LOADER_THREADS": "many"})
    assert str(err.value) == "MODEL_LOADER_THREADS='many': expected an integer >= 1, or unset for the default"


def test_zero_threads_is_refused():
    with pytest.raises(ConfigError, match=r"^MODEL_LOADER_THREADS='0': expected an integer >= 1"):
        LoaderConfig.from_env({"MODEL_LOADER_THREADS": "0"})


def test_a_zero_chunk_size_is_refused():
    with pytest.raises(ConfigError, match=r"^MODEL_LOADER_CHUNK_MB='0': expected an integer >= 1"):
        LoaderConfig.from_env({"MODEL_LOADER_CHUNK_MB": "0"})


def test_a_bad_pinned_cap_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"^MODEL_LOADER_PINNED_MAX_MB='4GB': expected an integer >= 0"):
        LoaderConfig.from_env({"MODEL_LOADER_PINNED_MAX_MB": "4GB"})


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoaderConfig().threads = 4  # type: ignore[misc]


def test_reading_the_config_does_not_import_torch():
    code = (
        "import sys\n"
        "from model_loader.config import LoaderConfig\n"
        "LoaderConfig.from_env()\n"
        "print('torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_LOADER_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    assert out.stdout.split() == ["False"]


def test_the_docs_list_exactly_the_variables_the_config_reads():
    # The environment table lives in docs/architecture.md ("Environment variables").
    rows = re.findall(r"^\| `(MODEL_LOADER_[A-Z_]+)` \|", (ROOT / "docs" / "architecture.md").read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(VARIABLES)
