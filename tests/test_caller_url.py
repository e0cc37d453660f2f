"""conversion.download.caller_url against a hostile https server (tests/https_server.py): a caller's
URL is fetched whole or refused with a reason, never retried, within its deadline, stopped when
cancelled, and leaves no file behind when it fails."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from conversion.download import caller_url
from conversion.download.caller_url import FetchLimits, data_uri_payload, fetch_to_file
from conversion.errors import CallerUrlError, FetchCancelled

LIMITS = FetchLimits(max_bytes=1024 * 1024, deadline_s=20.0, read_timeout_s=2.0)


def refused(url: str, target, limits: FetchLimits = LIMITS, cancelled=lambda: False) -> CallerUrlError:
    with pytest.raises(CallerUrlError) as raised:
        fetch_to_file(url, target, limits, cancelled)
    assert sorted(p.name for p in target.parent.iterdir()) == []  # nothing left behind, temporary files included
    return raised.value


def test_a_file_is_fetched_whole(hostile_https, tmp_path):
    data = bytes(range(256)) * 4000
    assert fetch_to_file(hostile_https.file_url("whole.bin", data), tmp_path / "out", LIMITS) == len(data)
    assert (tmp_path / "out").read_bytes() == data


def test_a_redirect_from_https_to_http_is_refused(hostile_https, tmp_path):
    hostile_https.files["plain.bin"] = b"served over http"
    error = refused(f"{hostile_https.url}/to-http/plain.bin", tmp_path / "out")
    assert (error.kind, str(error)) == ("not_https", "a URL or a redirect that is not https:// is refused")
    assert hostile_https.hits["/files/plain.bin"] == 0


def test_a_redirect_loop_is_refused_after_five_hops_and_not_retried(hostile_https, tmp_path):
    hostile_https.hits.clear()
    error = refused(f"{hostile_https.url}/loop", tmp_path / "out")
    assert (error.kind, str(error)) == ("redirects", "too many redirects (more than 5)")
    assert hostile_https.hits["/loop"] == 6


def test_a_server_error_is_refused_at_once_and_not_retried(hostile_https, tmp_path):
    hostile_https.hits.clear()
    started = time.monotonic()
    error = refused(f"{hostile_https.url}/status/500", tmp_path / "out")
    assert (error.kind, str(error)) == ("status", "the server answered HTTP 500")
    assert hostile_https.hits["/status/500"] == 1 and time.monotonic() - started < 3


def test_a_truncated_body_is_named_as_such(hostile_https, tmp_path):
    error = refused(f"{hostile_https.url}/truncated/5000", tmp_path / "out")
    assert (error.kind, str(error)) == ("truncated", "the server closed the connection before sending the whole body")


def test_a_declared_size_over_the_limit_is_refused_before_the_body(hostile_https, tmp_path):
    error = refused(f"{hostile_https.url}/huge", tmp_path / "out")
    assert (error.kind, str(error)) == ("too_large", f"larger than the limit of {LIMITS.max_bytes} bytes")


def test_a_server_that_sends_nothing_is_cut_off_by_the_read_timeout(hostile_https, tmp_path):
    started = time.monotonic()
    error = refused(f"{hostile_https.url}/hang", tmp_path / "out")
    assert error.kind == "timeout" and time.monotonic() - started < LIMITS.read_timeout_s + 3


def test_a_drip_that_beats_every_read_timeout_is_stopped_at_the_deadline(hostile_https, tmp_path):
    limits = FetchLimits(max_bytes=1024 * 1024, deadline_s=2.0, read_timeout_s=1.0)
    started = time.monotonic()
    error = refused(f"{hostile_https.url}/drip/100000/0.2", tmp_path / "out", limits)  # 1 KiB every 0.2 s
    assert (error.kind, str(error)) == ("deadline", "not fetched within 2 s")
    assert 2.0 <= time.monotonic() - started < 3.5


def test_a_cancelled_fetch_stops_at_once_and_kills_its_child(hostile_https, tmp_path, monkeypatch):
    children = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(caller_url.subprocess, "Popen", lambda *a, **k: children.append(real_popen(*a, **k))
                        or children[-1])
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(FetchCancelled):
        fetch_to_file(f"{hostile_https.url}/drip/100000/0.2", tmp_path / "out", LIMITS, cancel.is_set)
    assert time.monotonic() - started < 1.5
    assert [child.poll() for child in children] == [-9]  # killed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("url", "kind"), [
    ("https://127.0.0.1/lora.safetensors", "private_host"), ("https://localhost:8443/x", "private_host"),
    ("https://[::1]/x", "private_host"), ("https://169.254.169.254/latest/meta-data", "private_host"),
    ("https://10.0.0.1/x", "private_host"), ("https://no-such-host.invalid/x", "no_host"),
    ("http://example.com/x", "not_https"), ("https:///x", "bad_url"), ("https://example.com:port/x", "bad_url"),
])
def test_a_url_that_is_not_https_or_not_public_is_refused_in_process_without_a_child(tmp_path, monkeypatch, url, kind):
    monkeypatch.setattr(caller_url.subprocess, "Popen", lambda *a, **k: pytest.fail("a child was started"))
    assert refused(url, tmp_path / "out").kind == kind


def test_a_data_uri_gives_its_bytes_and_a_malformed_one_is_refused():
    assert data_uri_payload("data:application/octet-stream;base64,aGVsbG8=") == b"hello"
    assert data_uri_payload("data:,a%20b") == b"a b"
    with pytest.raises(CallerUrlError, match="base64 data is invalid"):
        data_uri_payload("data:;base64,@@@")
    with pytest.raises(CallerUrlError, match="no comma"):
        data_uri_payload("data:;base64")
