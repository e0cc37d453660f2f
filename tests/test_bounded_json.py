"""model_loader.bounded_json: JSON parsed within a size and a nesting limit, never RecursionError."""

from __future__ import annotations

import json

import pytest

from model_loader.bounded_json import load_file_bounded, loads_bounded
from model_loader.errors import JSONLimitError


def test_nesting_at_the_limit_parses():
    assert loads_bounded("[" * 64 + "]" * 64, max_bytes=1000) == json.loads("[" * 64 + "]" * 64)


def test_nesting_one_past_the_limit_is_refused():
    with pytest.raises(JSONLimitError, match=r"^nested more than 64 levels deep$"):
        loads_bounded("{" + '"a":[' * 64 + "]" * 64 + "}", max_bytes=1000)


def test_brackets_and_escaped_quotes_inside_strings_do_not_count():
    text = json.dumps({"name": "[" * 100 + '\\"{' * 100, "path": "C:\\\\"})
    assert loads_bounded(text, max_bytes=10_000) == json.loads(text)


def test_100000_unclosed_brackets_are_refused_as_too_deep():
    with pytest.raises(JSONLimitError, match="nested more than 64 levels deep"):
        loads_bounded(b"[" * 100_000, max_bytes=1 << 20)


def test_malformed_shallow_json_reports_the_syntax_error():
    with pytest.raises(json.JSONDecodeError, match="Expecting ',' delimiter"):
        loads_bounded("[1, 2", max_bytes=100)


def test_input_over_max_bytes_is_refused():
    with pytest.raises(JSONLimitError, match=r"^11 bytes, more than the limit of 10$"):
        loads_bounded('"123456789"', max_bytes=10)


def test_file_over_max_bytes_is_refused_after_reading_max_bytes_plus_one(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('"' + "x" * 100 + '"')
    with pytest.raises(JSONLimitError, match=r"^more than the limit of 10 bytes$"):
        load_file_bounded(path, max_bytes=10)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_file_bounded(tmp_path / "nope.json", max_bytes=10)
