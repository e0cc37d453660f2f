"""conversion.download.lora_files: a request's LoRA files on the volume stay within a byte budget
shared by every runner, least recently used evicted first, safely while another runner reads one."""

from __future__ import annotations

import os
import time

from conversion.download.lora_files import IDENTITY_FILE, LORA_FILE, LoraFiles
from conversion.durable import temp_path

KB = 1024


def publish(files: LoraFiles, key: str, size: int, used_ago_s: float = 0.0):
    with files.building(key) as partial:
        (partial / LORA_FILE).write_bytes(os.urandom(size))
        found = files.publish(partial, key, f"identity of {key}")
    if used_ago_s:
        past = time.time() - used_ago_s
        os.utime(files.entry(key), (past, past))
    return found


def test_a_published_file_is_found_with_its_identity(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=100 * KB)
    published = publish(files, "url:a", 10 * KB)
    found = files.lookup("url:a")
    assert found == published and found.identity == "identity of url:a" and found.path.stat().st_size == 10 * KB
    assert files.lookup("url:other") is None


def test_the_least_recently_used_files_are_evicted_to_keep_the_budget(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=85 * KB)
    publish(files, "url:old", 40 * KB, used_ago_s=300)
    publish(files, "url:used", 40 * KB, used_ago_s=200)
    publish(files, "url:middle", 10 * KB, used_ago_s=100)
    files.touch(files.entry("url:used"))  # used again: now the most recent
    publish(files, "url:new", 40 * KB)
    assert [files.lookup(k) is not None for k in ("url:old", "url:middle", "url:used", "url:new")] == \
        [False, False, True, True]
    assert files.usage() == (80 * KB, 2)


def test_the_file_just_published_is_kept_even_when_it_alone_fills_the_budget(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=50 * KB)
    publish(files, "url:a", 30 * KB, used_ago_s=10)
    publish(files, "url:b", 50 * KB)
    assert files.lookup("url:a") is None and files.lookup("url:b") is not None


def test_a_reader_keeps_reading_a_file_evicted_under_it(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=60 * KB)
    found = publish(files, "url:a", 40 * KB, used_ago_s=60)
    expected = found.path.read_bytes()
    with open(found.path, "rb") as reader:
        publish(files, "url:b", 40 * KB)  # evicts url:a
        assert not found.path.exists() and files.lookup("url:a") is None
        assert reader.read() == expected


def test_a_runner_that_loses_the_race_to_publish_keeps_the_winners_file(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=100 * KB)
    with files.building("url:a") as mine:
        (mine / LORA_FILE).write_bytes(b"mine")
        winner = publish(files, "url:a", 1 * KB)
        found = files.publish(mine, "url:a", "identity of url:a")
    assert found.path.read_bytes() == winner.path.read_bytes() != b"mine"
    assert sorted(os.listdir(files.dir)) == [files.entry("url:a").name]


def test_a_failed_fetch_leaves_no_temporary_directory(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=100 * KB)
    try:
        with files.building("url:a") as partial:
            (partial / LORA_FILE).write_bytes(b"half")
            raise OSError("the fetch failed")
    except OSError:
        pass
    assert os.listdir(files.dir) == []


def test_dead_fetchers_temporary_directories_are_swept_and_live_ones_kept(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=100 * KB)
    files.dir.mkdir(parents=True)
    live = temp_path(files.entry("url:live"))
    live.mkdir()
    dead = files.dir / f".{files.entry('url:dead').name}.{live.name.split('.')[2]}.999999.0123abcd.tmp"
    dead.mkdir()
    (dead / LORA_FILE).write_bytes(b"x" * KB)
    trash = temp_path(files.entry("url:gone"), "trash")
    trash.mkdir()
    files.evict()
    assert sorted(os.listdir(files.dir)) == [live.name]


def test_a_discarded_file_is_gone(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=100 * KB)
    publish(files, "url:a", KB)
    files.discard("url:a")
    assert files.lookup("url:a") is None and os.listdir(files.dir) == []


def test_an_entry_without_its_identity_is_not_found(tmp_path):
    files = LoraFiles(tmp_path, budget_bytes=100 * KB)
    publish(files, "url:a", KB)
    (files.entry("url:a") / IDENTITY_FILE).unlink()
    assert files.lookup("url:a") is None
