"""The README stays true to the code: its environment table and its layout table."""

from __future__ import annotations

import re
from pathlib import Path

from conversion.config import ENV_VARS, ConversionConfig
from serving.settings import PROFILE_ENV

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _env_rows() -> dict[str, tuple[str, str]]:
    section = README.split("\nEnvironment (", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| (.*) \| (.*) \|$", section, flags=re.MULTILINE)
    return {name: (meaning, default) for name, meaning, default in rows}


def _variables_read_in(package: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        names |= set(re.findall(r'"((?:APP|MODEL_LOADER|HF)_[A-Z0-9_]+)"', path.read_text(encoding="utf-8")))
    return names


def test_the_environment_table_lists_exactly_the_variables_the_code_declares():
    declared = {PROFILE_ENV} | {v.name for v in ENV_VARS} | _variables_read_in("model_loader")
    assert set(_env_rows()) == declared


def test_the_environment_table_gives_the_conversion_defaults_of_the_code():
    rows, config = _env_rows(), ConversionConfig()
    for var in ENV_VARS:
        value = getattr(config, var.field)
        if isinstance(value, bool | int | float) and not isinstance(value, str):
            assert rows[var.name][1] == f"`{int(value) if float(value).is_integer() else value}`", var.name
        elif isinstance(value, str):
            assert rows[var.name][1] == f"`{value}`", var.name


def test_the_layout_names_every_module_of_the_packages():
    layout = README.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    for package in ("conversion", "model_loader", "serving"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            rel = path.relative_to(ROOT / package)
            named = (f"`{package}/{rel.as_posix()}`" in layout or f"`{rel.as_posix()}`" in layout
                     or f"`{package}/{rel.parent.as_posix()}/`" in layout and f"`{rel.name}`" in layout
                     or f"`{rel.name}`" in layout)
            assert named, f"README's layout does not name {package}/{rel}"


def test_no_tracked_text_file_holds_a_merge_conflict_marker():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", flags=re.MULTILINE)
    for name in tracked:
        if name.endswith((".md", ".py", ".toml", ".txt", ".json", ".cfg", "Makefile")):
            text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
            assert not marker.search(text), f"{name} holds a merge conflict marker"
