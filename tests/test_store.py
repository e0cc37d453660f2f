"""The store on the persistent volume: keyed once-only conversion, warm starts without network,
concurrent runners, full disks, corrupted entries, leftovers of killed builders."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conversion.convert
import conversion.download
from conversion.config import ConversionConfig
from conversion.download import hub as hub_download
from conversion.download import url as url_download
from conversion.durable import host_tag, temp_path
from conversion.errors import DiskFullError, SourceError
from conversion.manifest import VerificationError, read_manifest, verify_converted
from conversion.sources import DemoCheckerSource, Prepared, parse_checker_source, parse_source
from conversion.store import STORE_DIRNAME, Store, convert_source, ensure_converted, resolve_root
from model_loader import read_layout
from tests.hub_server import HubRepo, HubServer, use_hub
from tests.single_files import ldm_checkpoint
from tests.tiny_models import make_tiny_checker_repo, make_tiny_sd, make_tiny_sd_with_safety_checker

FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture
def local_src(tiny_sd, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_sd, src)
    return src


@pytest.fixture
def hub(tiny_sd, monkeypatch, tmp_path_factory):
    with HubServer([HubRepo.from_dir("org/tiny-sd", tiny_sd)]) as server:
        use_hub(monkeypatch, server, tmp_path_factory.mktemp("hf-home"))
        yield server


def entries(root: Path) -> list[str]:
    """Names in the store directory other than its bookkeeping (.locks, .refs)."""
    return sorted(p.name for p in (root / STORE_DIRNAME).iterdir() if p.name not in (".locks", ".refs"))


def files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Keys, warm starts, refs


def test_root_is_app_data_root_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("APP_DATA_ROOT", str(tmp_path))
    config = ConversionConfig.from_env()
    assert resolve_root(None, config) == tmp_path
    assert resolve_root(tmp_path / "explicit", config) == tmp_path / "explicit"


def test_warm_start_of_a_hub_source_makes_no_request_and_starts_no_download(hub, tmp_path, monkeypatch):
    cold = ensure_converted("org/tiny-sd", root=tmp_path)
    verify_converted(cold, full=True)
    assert cold.parent == tmp_path / STORE_DIRNAME
    hub.reset_counts()

    def no_fetch(*args, **kwargs):
        raise AssertionError("the warm path fetched")

    monkeypatch.setattr(conversion.download, "fetch_hub", no_fetch)
    assert ensure_converted("org/tiny-sd", root=tmp_path) == cold
    assert hub.count() == 0


def test_warm_start_works_with_the_hub_gone_and_imports_no_download_code(tiny_sd, tmp_path, monkeypatch):
    with HubServer([HubRepo.from_dir("org/tiny-sd", tiny_sd)]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        path = ensure_converted("org/tiny-sd", root=tmp_path)
    code = (
        "import sys; from conversion.store import ensure_converted; "
        f"print(ensure_converted('org/tiny-sd', root={str(tmp_path)!r})); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'huggingface_hub', 'fal', 'diffusers', 'transformers'}),"
        " 'conversion.download' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(path), "[] False"]


def test_warm_finds_the_entry_offline_only_once_it_exists(local_src, tmp_path):
    store, src = Store(tmp_path, ConversionConfig.from_env()), parse_source(str(local_src))
    assert store.warm(src, "float16") is None
    path = ensure_converted(src, root=tmp_path, dtype="float16")
    assert store.warm(src, "fp16") == path
    assert store.warm(src) is None  # another dtype, another entry


def test_branch_stays_on_its_recorded_commit_until_refresh(hub, tiny_sd, tmp_path):
    first = ensure_converted("org/tiny-sd", root=tmp_path)
    old_commit = read_manifest(first)["source"]["identity"]
    repo = hub.repos["org/tiny-sd"]
    new_files = dict(repo.commits[old_commit])
    new_files["scheduler/scheduler_config.json"] = new_files["scheduler/scheduler_config.json"].replace(b"1000", b"999")
    new_commit = repo.push(new_files)
    hub.reset_counts()
    assert ensure_converted("org/tiny-sd", root=tmp_path) == first
    assert hub.count() == 0
    refreshed = ensure_converted("org/tiny-sd", root=tmp_path, refresh=True)
    assert refreshed != first
    assert read_manifest(refreshed)["source"]["identity"] == new_commit
    hub.reset_counts()
    assert ensure_converted("org/tiny-sd", root=tmp_path) == refreshed  # the ref now names the new commit
    assert hub.count() == 0


def test_ref_file_nested_100000_deep_reads_as_no_ref(tmp_path):
    store, source = Store(tmp_path, ConversionConfig.from_env()), parse_source("org/tiny-sd")
    store.ref_path(source).parent.mkdir(parents=True)
    store.ref_path(source).write_text("[" * 100_000 + "]" * 100_000)
    assert store.read_ref(source) is None


def test_commit_revision_is_its_own_key_without_a_ref_file(hub, tmp_path):
    commit = hub.repos["org/tiny-sd"].branches["main"]
    path = ensure_converted(parse_source("org/tiny-sd", revision=commit), root=tmp_path)
    shutil.rmtree(tmp_path / STORE_DIRNAME / ".refs", ignore_errors=True)
    hub.reset_counts()
    assert ensure_converted(parse_source("org/tiny-sd", revision=commit), root=tmp_path) == path
    assert hub.count() == 0


def test_local_source_is_converted_once_and_again_when_it_changes(local_src, tmp_path, monkeypatch):
    calls = []
    real = conversion.convert.convert_pipeline
    monkeypatch.setattr(conversion.convert, "convert_pipeline", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = ensure_converted(str(local_src), root=tmp_path)
    assert ensure_converted(str(local_src), root=tmp_path) == first
    assert len(calls) == 1
    cfg = local_src / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace("1000", "999"))
    second = ensure_converted(str(local_src), root=tmp_path)
    assert second != first and len(calls) == 2
    assert "999" in (second / "scheduler" / "scheduler_config.json").read_text()


def test_building_an_entry_reads_no_pack_back_and_publishes_the_digests_of_its_bytes(local_src, tmp_path,
                                                                                      monkeypatch):
    import conversion.manifest

    hashed: list[str] = []
    real = conversion.manifest.hash_file
    monkeypatch.setattr(conversion.manifest, "hash_file",
                        lambda path, segments=False: hashed.append(str(path)) or real(path, segments))
    entry = ensure_converted(str(local_src), root=tmp_path)
    assert hashed and not [p for p in hashed if p.endswith(".flashpack")]
    monkeypatch.undo()
    verify_converted(entry, full=True)  # the digests written are those of the bytes on disk


def test_local_source_with_broken_symlinks_converts_and_skips_them(local_src, tmp_path):
    (local_src / "README.link").symlink_to(tmp_path / "nowhere")
    (local_src / "tokenizer" / "notes.link").symlink_to(tmp_path / "nowhere")
    path = ensure_converted(str(local_src), root=tmp_path / "volume")
    verify_converted(path, full=True)
    assert (path / "tokenizer" / "tokenizer.json").is_file()
    assert not os.path.lexists(path / "tokenizer" / "notes.link")


def test_local_directory_without_model_index_says_so_before_reading_anything_else(tmp_path):
    with pytest.raises(SourceError) as err:
        ensure_converted("/etc", root=tmp_path)
    assert str(err.value) == "/etc: no model_index.json; a local source must be a diffusers pipeline directory"


def test_dtype_is_part_of_the_key(local_src, tmp_path):
    native = ensure_converted(str(local_src), root=tmp_path)
    half = ensure_converted(str(local_src), root=tmp_path, dtype=torch.float16)
    assert half != native
    assert read_layout(half / "unet" / "model.flashpack").blocks[0].dtype == torch.float16
    assert read_layout(native / "unet" / "model.flashpack").blocks[0].dtype == torch.float32
    assert ensure_converted(str(local_src), root=tmp_path, dtype="fp16") == half


# ---------------------------------------------------------------------------------------------
# Bad entries are never served


def flip_payload_byte(pack: Path) -> None:
    data = bytearray(pack.read_bytes())
    data[1000] ^= 0x01
    pack.write_bytes(bytes(data))


def test_flipped_payload_byte_passes_the_cheap_check_and_full_verification_rebuilds(local_src, tmp_path, caplog):
    path = ensure_converted(str(local_src), root=tmp_path)
    good = files_of(path)
    flip_payload_byte(path / "unet" / "model.flashpack")
    # The warm check reads no pack (the loader's checksums catch this while it reads it)...
    assert ensure_converted(str(local_src), root=tmp_path) == path
    with pytest.raises(VerificationError, match="sha256 mismatch"):
        verify_converted(path, full=True)
    # ...verify="full" (or APP_STORE_VERIFY=full) sees it, moves the entry aside and rebuilds.
    caplog.set_level(logging.WARNING, logger="conversion.store")
    assert ensure_converted(str(local_src), root=tmp_path, verify="full") == path
    assert "sha256 mismatch" in caplog.text
    verify_converted(path, full=True)
    assert files_of(path).keys() == good.keys()
    assert files_of(path)["unet/model.flashpack"] == good["unet/model.flashpack"]
    assert [n for n in entries(tmp_path) if n.startswith(".")] == []


def test_full_verification_from_the_environment(local_src, tmp_path, monkeypatch):
    path = ensure_converted(str(local_src), root=tmp_path)
    flip_payload_byte(path / "vae" / "model.flashpack")
    monkeypatch.setenv("APP_STORE_VERIFY", "full")
    assert ensure_converted(str(local_src), root=tmp_path) == path
    verify_converted(path, full=True)


def test_truncated_pack_is_rebuilt_on_a_warm_start(local_src, tmp_path):
    path = ensure_converted(str(local_src), root=tmp_path)
    pack = path / "text_encoder" / "model.flashpack"
    os.truncate(pack, pack.stat().st_size - 10)
    assert ensure_converted(str(local_src), root=tmp_path) == path
    verify_converted(path, full=True)


def test_entry_from_before_pack_checksums_is_rebuilt_once_saying_why(local_src, tmp_path, caplog, monkeypatch):
    path = ensure_converted(str(local_src), root=tmp_path)
    manifest_path = path / "flashpack_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"].values():
        entry.pop("checksum", None)  # what the manifest of an older conversion looked like
    manifest_path.write_text(json.dumps(manifest))
    caplog.set_level(logging.WARNING, logger="conversion.store")
    assert ensure_converted(str(local_src), root=tmp_path) == path
    reasons = [r.getMessage() for r in caplog.records if "converted before packs carried load-time checksums" in r.getMessage()]
    assert len(reasons) == 2  # "rebuilding it" on the warm check, "moving aside" before the build
    assert "checksum" in read_manifest(path)["files"]["unet/model.flashpack"]
    caplog.clear()
    calls = []
    monkeypatch.setattr(conversion.convert, "convert_pipeline", lambda *a, **k: calls.append(a))
    assert ensure_converted(str(local_src), root=tmp_path) == path
    assert calls == [] and caplog.records == []


def test_entry_without_manifest_is_moved_aside_and_rebuilt(local_src, tmp_path):
    path = ensure_converted(str(local_src), root=tmp_path)
    (path / "flashpack_manifest.json").unlink()
    assert ensure_converted(str(local_src), root=tmp_path) == path
    verify_converted(path, full=True)
    assert entries(tmp_path) == [path.name]


# ---------------------------------------------------------------------------------------------
# Publication without a working lock, leftovers


def store_entry(local_src: Path, root: Path):
    store = Store(root, ConversionConfig.from_env())
    src = parse_source(str(local_src))
    return store, src, store.entry(src, src.offline_identity(store), "source")


def test_losing_the_publish_race_discards_the_own_copy(local_src, tmp_path):
    path = ensure_converted(str(local_src), root=tmp_path)
    inode = path.stat().st_ino
    store, src, entry = store_entry(local_src, tmp_path)
    # A second builder that did not see the lock: its rename onto the published entry fails.
    assert store.build(Prepared(local_src, entry.key["identity"], []), src, entry, None) == path
    assert path.stat().st_ino == inode
    assert entries(tmp_path) == [path.name]


def test_publishing_over_a_bad_entry_moves_it_aside(local_src, tmp_path):
    store, src, entry = store_entry(local_src, tmp_path)
    entry.path.mkdir(parents=True)
    (entry.path / "half-written").write_bytes(b"x")
    assert store.build(Prepared(local_src, entry.key["identity"], []), src, entry, None) == entry.path
    verify_converted(entry.path, full=True)
    assert entries(tmp_path) == [entry.path.name]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_or_silent_builders_are_removed_and_live_ones_kept(tmp_path):
    store = Store(tmp_path, ConversionConfig.from_env())
    name = "org--x-0123456789abcdef"
    dirs = {
        "dead": store.dir / f".{name}.{host_tag()}.{dead_pid()}.aaaaaaaa.tmp",
        "live": temp_path(store.dir / name),
        "other_host_fresh": store.dir / f".{name}.elsewhere.1.cccccccc.work",
        "other_host_silent": store.dir / f".{name}.elsewhere.2.dddddddd.tmp",
        "trash": store.dir / f".{name}.elsewhere.3.eeeeeeee.trash",
        "other_entry": store.dir / f".org--y-0123456789abcdef.{host_tag()}.{dead_pid()}.ffffffff.tmp",
        "legacy_silent_builder": store.dir / f".tmp-{name}.{host_tag()}.{os.getpid()}.aaaa",
        "legacy_trash": store.dir / f".trash-{name}.3.eeee",
    }
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "model.flashpack").write_bytes(b"partial")
    old = time.time() - 3 * 3600
    for silent in ("other_host_silent", "legacy_silent_builder"):
        for p in (dirs[silent], dirs[silent] / "model.flashpack"):
            os.utime(p, (old, old))
    store.cleanup_stale()
    assert {k for k, d in dirs.items() if d.exists()} == {"live", "other_host_fresh"}


def test_leftovers_that_are_symlinks_are_unlinked_and_their_targets_kept(tmp_path):
    store = Store(tmp_path, ConversionConfig.from_env())
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not the store's")
    store.dir.mkdir(parents=True)
    links = [store.dir / ".org--x-0123456789abcdef.elsewhere.3.eeeeeeee.trash",
             store.dir / f".org--x-0123456789abcdef.{host_tag()}.{dead_pid()}.aaaaaaaa.tmp",
             store.dir / ".org--x-0123456789abcdef.elsewhere.2.dddddddd.work"]
    for link in links:
        link.symlink_to(target)
    links[2].unlink()
    links[2].symlink_to(tmp_path / "missing")  # dangling, from a silent builder on another machine
    old = time.time() - 3 * 3600
    os.utime(links[2], (old, old), follow_symlinks=False)
    store.cleanup_stale()
    assert [link for link in links if os.path.lexists(link)] == []
    assert (target / "keep.txt").read_text() == "not the store's"


# ---------------------------------------------------------------------------------------------
# Many runners, full disks (forked processes: the parent has torch and diffusers imported)


def _forked(target, queue, *args) -> None:
    torch.set_num_threads(1)  # no OpenMP pool inherited across fork
    try:
        queue.put(("ok", str(target(*args))))
    except BaseException as exc:
        queue.put(("error", type(exc).__name__, str(exc)))


def _convert_when_started(start, src: str, root: str) -> str:
    start.wait(30)
    path = ensure_converted(src, root=root)
    digest = hashlib.sha256()
    for name, data in files_of(path).items():  # what this runner would load
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return f"{path} {digest.hexdigest()}"


def test_eight_runners_at_once_convert_once_and_all_get_the_same_files(local_src, tmp_path, monkeypatch):
    marker = tmp_path / "conversions.log"
    real = conversion.convert.convert_pipeline

    def counted(*args, **kwargs):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(conversion.convert, "convert_pipeline", counted)
    root = tmp_path / "volume"
    start, queue = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=_forked, args=(_convert_when_started, queue, start, str(local_src), str(root)))
             for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r[0] for r in results] == ["ok"] * 8, results
    assert len({r[1] for r in results}) == 1  # same directory, same bytes
    assert len(marker.read_text().splitlines()) == 1
    path = Path(results[0][1].split()[0])
    verify_converted(path, full=True)
    assert entries(root) == [path.name]


def _convert_with_file_size_limit(src: str, root: str, limit: int) -> Path:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return ensure_converted(src, root=root)


def test_full_disk_is_a_clear_error_and_leaves_no_partial_entry(local_src, tmp_path):
    root = tmp_path / "volume"
    queue = FORK.Queue()
    proc = FORK.Process(target=_forked, args=(_convert_with_file_size_limit, queue, str(local_src), str(root), 1 << 20))
    proc.start()
    result = queue.get(timeout=120)
    proc.join(30)
    assert result[0] == "error" and result[1] == DiskFullError.__name__, result
    assert "no space left" in result[2] and "free space" in result[2]
    assert entries(root) == []  # no entry, no .tmp-/.work- directory


# ---------------------------------------------------------------------------------------------
# The CLI's entry point


def _demo_with_file_size_limit(queue, root: str, limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    _forked(ensure_converted, queue, "demo-random", root)


def test_full_disk_while_generating_the_demo_source_is_a_disk_full_error_and_leaves_nothing(tmp_path):
    queue = FORK.Queue()
    proc = FORK.Process(target=_demo_with_file_size_limit, args=(queue, str(tmp_path), 64 * 1024))
    proc.start()
    result = queue.get(timeout=120)
    proc.join(30)
    assert result[:2] == ("error", "DiskFullError"), result
    assert re.fullmatch(
        rf"no space left writing {re.escape(str(tmp_path / STORE_DIRNAME))}/\.demo-random-seed0\.\S+\.work/pipeline "
        r"\(File too large\); free space there and retry",
        result[2],
    ), result[2]
    assert entries(tmp_path) == []  # no half-written demo or entry left behind


def test_demo_source_is_generated_in_scratch_converted_and_found_offline_after(tmp_path):
    path = ensure_converted("demo-random", root=tmp_path)
    assert read_manifest(path)["source"] == {**read_manifest(path)["source"], "kind": "demo-random", "ref": "demo-random", "seed": 0}
    assert entries(tmp_path) == [path.name]  # the generated pipeline was scratch
    assert Store(tmp_path, ConversionConfig.from_env()).warm(parse_source("demo-random")) == path


# ---------------------------------------------------------------------------------------------
# The safety checker: one more source through the same store, as a two-component directory

CHECKER_ENTRY = ["feature_extractor/preprocessor_config.json", "flashpack_manifest.json", "model_index.json",
                 "safety_checker/config.json", "safety_checker/model.flashpack"]
CHECKER_INDEX = {"_class_name": "StableDiffusionSafetyChecker",
                 "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                 "feature_extractor": ["transformers", "CLIPImageProcessor"]}


@pytest.fixture(scope="module")
def checker_repo(tmp_path_factory) -> Path:
    return make_tiny_checker_repo(tmp_path_factory.mktemp("checker") / "repo")


def no_conversion(*args, **kwargs):
    raise AssertionError("converted again")


def checker_verdicts(path: Path) -> list[bool]:
    """What the checker loaded from ``path`` says of a white and a mid-gray image."""
    from PIL import Image

    from serving.safety import load_safety_checker

    images = [Image.new("RGB", (64, 64), (level,) * 3) for level in (255, 128)]
    return load_safety_checker(path, "cpu").flags(images)


def test_demo_checker_is_generated_in_scratch_converted_once_and_found_offline_after(tmp_path, monkeypatch):
    path = ensure_converted(DemoCheckerSource(), root=tmp_path, dtype="float32")
    assert sorted(files_of(path)) == CHECKER_ENTRY
    assert json.loads((path / "model_index.json").read_text()) == CHECKER_INDEX
    assert read_manifest(path)["source"]["kind"] == "demo-safety-checker"
    assert entries(tmp_path) == [path.name]  # the generated checker was scratch
    monkeypatch.setattr(conversion.convert, "convert_pipeline", no_conversion)
    assert Store(tmp_path, ConversionConfig.from_env()).warm(DemoCheckerSource(), "float32") == path
    assert ensure_converted(DemoCheckerSource(), root=tmp_path, dtype="float32") == path
    assert checker_verdicts(path) == [True, False]


def test_hub_checker_repo_is_fetched_converted_from_its_bin_weights_and_loads_as_the_same_checker(
    checker_repo, tmp_path, monkeypatch
):
    with HubServer([HubRepo.from_dir("org/tiny-checker", checker_repo)]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        path = ensure_converted(parse_checker_source("org/tiny-checker"), root=tmp_path, dtype="float32")
        server.reset_counts()
        monkeypatch.setattr(conversion.convert, "convert_pipeline", no_conversion)
        assert ensure_converted(parse_checker_source("org/tiny-checker"), root=tmp_path, dtype="float32") == path
        assert server.count() == 0  # the branch's commit is in the store's ref file: found offline
    assert sorted(files_of(path)) == CHECKER_ENTRY
    assert read_manifest(path)["source"]["kind"] == "hub-safety-checker"
    assert entries(tmp_path) == [path.name]
    assert checker_verdicts(path) == [True, False]


def test_the_checker_of_an_sd_pipeline_repo_is_an_entry_of_its_own_beside_the_pipeline(tmp_path, monkeypatch):
    repo = make_tiny_sd_with_safety_checker(tmp_path / "sd")
    with HubServer([HubRepo.from_dir("org/sd", repo)]) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        pipeline = ensure_converted(parse_source("org/sd"), root=tmp_path / "volume")
        checker = ensure_converted(parse_checker_source("org/sd"), root=tmp_path / "volume")
    assert checker != pipeline and checker.parent == pipeline.parent
    assert sorted(files_of(checker)) == CHECKER_ENTRY
    assert (pipeline / "unet" / "model.flashpack").is_file()
    assert files_of(checker)["safety_checker/model.flashpack"] == files_of(pipeline)["safety_checker/model.flashpack"]


def test_a_damaged_checker_entry_fails_its_warm_check_and_is_rebuilt_from_its_source(tmp_path, caplog):
    path = ensure_converted(DemoCheckerSource(), root=tmp_path, dtype="float32")
    good = files_of(path)
    config = path / "feature_extractor" / "preprocessor_config.json"
    config.write_text(config.read_text().replace("32", "33"))
    caplog.set_level(logging.WARNING, logger="conversion.store")
    assert Store(tmp_path, ConversionConfig.from_env()).warm(DemoCheckerSource(), "float32") is None
    assert "preprocessor_config.json: sha256 mismatch" in caplog.text
    assert ensure_converted(DemoCheckerSource(), root=tmp_path, dtype="float32") == path
    assert files_of(path) == {**good, "flashpack_manifest.json": files_of(path)["flashpack_manifest.json"]}
    assert entries(tmp_path) == [path.name]


def test_local_checker_directory_is_converted_once_and_again_when_it_changes(checker_repo, tmp_path, monkeypatch):
    src = tmp_path / "checker"
    shutil.copytree(checker_repo, src)
    calls = []
    real = conversion.convert.convert_pipeline
    monkeypatch.setattr(conversion.convert, "convert_pipeline", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = ensure_converted(parse_checker_source(str(src)), root=tmp_path / "volume")
    assert ensure_converted(parse_checker_source(str(src)), root=tmp_path / "volume") == first
    assert len(calls) == 1 and read_manifest(first)["source"]["kind"] == "local-safety-checker"
    (src / "preprocessor_config.json").write_text((src / "preprocessor_config.json").read_text().replace("32", "40"))
    second = ensure_converted(parse_checker_source(str(src)), root=tmp_path / "volume")
    assert second != first and len(calls) == 2
    assert '"shortest_edge": 40' in (second / "feature_extractor" / "preprocessor_config.json").read_text()
    assert [p.name for p in src.iterdir() if p.is_symlink()] == []  # the source is read, never touched


def test_convert_source_into_a_new_directory(local_src, tmp_path):
    dst = tmp_path / "out" / "converted"
    assert convert_source(str(local_src), dst, root=tmp_path / "volume") == dst.resolve()
    verify_converted(dst, full=True)
    assert json.loads((dst / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_convert_source_again_returns_the_verified_conversion_without_converting(local_src, tmp_path, monkeypatch):
    dst = tmp_path / "out" / "converted"
    convert_source(str(local_src), dst, root=tmp_path / "volume")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion.convert, "convert_pipeline", no_conversion)
    assert convert_source(str(local_src), dst, root=tmp_path / "volume") == dst.resolve()


def test_convert_source_refuses_a_non_empty_destination(local_src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty"):
        convert_source(str(local_src), dst, root=tmp_path / "volume")
    assert (dst / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints from a URL


def test_single_file_url_is_converted_offline_with_a_local_config(tiny_sd, tmp_path, monkeypatch):
    from safetensors.torch import save

    from model_loader import load_state_dict

    config = tmp_path / "config"  # model_index.json, configs, tokenizer, scheduler: no weights
    shutil.copytree(tiny_sd, config, ignore=shutil.ignore_patterns("*.safetensors"))
    url = "data:application/octet-stream;base64," + base64.b64encode(save(ldm_checkpoint(tiny_sd))).decode()
    source = parse_source(url, config=str(config))
    path = ensure_converted(source, root=tmp_path / "volume")
    verify_converted(path, full=True)
    assert read_manifest(path)["source"]["ref"].startswith("data:...(")  # not the whole URL
    reference = ensure_converted(str(tiny_sd), root=tmp_path / "volume")
    for comp in ("unet", "vae", "text_encoder"):
        got, want = load_state_dict(path / comp / "model.flashpack"), load_state_dict(reference / comp / "model.flashpack")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), comp

    def no_download(*args, **kwargs):
        raise AssertionError("the warm path downloaded")

    monkeypatch.setattr(url_download, "run_child", no_download)
    monkeypatch.setattr(hub_download, "run_child", no_download)
    assert ensure_converted(source, root=tmp_path / "volume") == path


def test_unknown_pipeline_class_fails_before_any_download(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded despite a bad pipeline_class")

    monkeypatch.setattr(url_download, "run_child", no_download)
    monkeypatch.setattr(hub_download, "run_child", no_download)
    source = parse_source("https://example.com/model.safetensors", pipeline_class="NoSuchPipeline")
    with pytest.raises(SourceError, match="pipeline_class 'NoSuchPipeline' is not a diffusers pipeline"):
        ensure_converted(source, root=tmp_path)
