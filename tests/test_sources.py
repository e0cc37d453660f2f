"""Sources: parsing what fal.toml / the CLI name, each kind's offline identity, and which Hub files a
pipeline download fetches (model_loader.diffusers_layout)."""

from __future__ import annotations

import hashlib
import logging
import os
import re

import pytest

from conversion.download.hub import select_hub_files
from conversion.errors import SourceError
from conversion.sources import (
    DemoCheckerSource,
    DemoSource,
    HubCheckerSource,
    HubConfigSource,
    HubFileSource,
    HubLora,
    HubSource,
    LocalCheckerSource,
    LocalSource,
    LoraPathError,
    RandomDemoSource,
    UrlSource,
    directory_fingerprint,
    parse_checker_source,
    parse_lora_path,
    parse_source,
)
from conversion.sources.demo import TRAINED_PIPELINE
from model_loader.diffusers_layout import (
    parse_weight_name,
    read_model_index,
    select_files,
    select_safety_checker_files,
)
from model_loader.errors import DiffusersLayoutError

SD_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# The file list of a typical SD 1.x repo on the Hub.
SD_REPO = [
    ".gitattributes", "README.md", "model_index.json",
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt", "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_flax_model.msgpack",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
    "vae_decoder/model.onnx", "vae_encoder/model.onnx", "text_encoder/model.onnx",
]
SIDE_FILES = [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "vae/config.json",
]


# ---------------------------------------------------------------------------------------------
# parse_source


def test_repo_id_is_a_hub_source_with_its_revision_and_variant():
    assert parse_source("org/name", revision="v1", variant="fp16") == HubSource("org/name", "v1", "fp16")


def test_inline_revision_after_at_sign():
    assert parse_source("org/name@dev").revision == "dev"


def test_conflicting_revisions_are_rejected():
    with pytest.raises(SourceError, match="revision given twice"):
        parse_source("org/name@dev", revision="main")


def test_https_url_is_a_single_file_source_whose_pipeline_class_is_left_to_detection():
    src = parse_source("https://example.com/models/x.safetensors?token=abc")
    assert src == UrlSource("https://example.com/models/x.safetensors?token=abc", pipeline_class=None, config=None)


def test_hub_file_path_is_a_single_file_source_of_that_repo():
    assert parse_source("org/name/unet/x.safetensors", revision="v1", pipeline_class="FluxPipeline") == HubFileSource(
        "org/name", "unet/x.safetensors", revision="v1", pipeline_class="FluxPipeline")
    assert parse_source("org/name@v2/x.sft") == HubFileSource("org/name", "x.sft", revision="v2")


def test_blob_page_url_of_a_hub_file_is_that_hub_file_at_its_revision():
    src = parse_source("https://huggingface.co/org/name/blob/main/sub/x.safetensors", config="org/base")
    assert src == HubFileSource("org/name", "sub/x.safetensors", revision="main", config="org/base")


def test_resolve_url_of_a_hub_file_is_downloaded_as_a_url():
    url = "https://huggingface.co/org/name/resolve/main/x.safetensors"
    assert parse_source(url) == UrlSource(url)


def test_hub_file_is_keyed_by_its_repo_and_path_and_a_commit_revision_is_its_identity():
    commit = "a" * 40

    class NoRefs:
        def read_ref(self, source):
            raise AssertionError("a commit needs no ref file")

    src = HubFileSource("org/name", "x.safetensors", revision=commit, config="org/base")
    assert src.key_fields() == {"kind": "hub-file", "ref": "org/name/x.safetensors", "variant": None,
                                "subfolder": None, "pipeline_class": None, "config": "org/base"}
    assert src.offline_identity(NoRefs()) == commit and not src.records_ref()
    assert HubFileSource("org/name", "x.safetensors", revision="main").records_ref()


@pytest.mark.parametrize("text", ["org/name", "."])
@pytest.mark.parametrize("key", ["pipeline_class", "config"])
def test_pipeline_class_and_config_are_refused_for_a_hub_repo_or_a_directory(text, key):
    with pytest.raises(SourceError, match="pipeline_class and config apply to single-file checkpoints"):
        parse_source(text, **{key: "StableDiffusionPipeline" if key == "pipeline_class" else "org/base"})


def test_a_config_directory_must_be_a_diffusers_pipeline(tmp_path):
    with pytest.raises(SourceError, match=re.escape(f"{tmp_path}: no model_index.json")):
        parse_source("https://example.com/x.safetensors", config=str(tmp_path))


def test_a_safety_checker_cannot_be_a_single_file():
    with pytest.raises(SourceError, match=re.escape(
            "org/name/x.safetensors: a safety checker is a Hub repo or a directory, not a single file")):
        parse_checker_source("org/name/x.safetensors")


FLUX_REPO = [
    "model_index.json", "flux1-dev.safetensors", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
FLUX_INDEX = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "text_encoder": ["transformers", "CLIPTextModel"], "transformer": ["diffusers", "FluxTransformer2DModel"],
              "vae": ["diffusers", "AutoencoderKL"]}


def test_a_config_repo_gives_its_configs_and_the_weights_of_what_the_checkpoint_lacks_only():
    configs = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
               "transformer/config.json", "vae/config.json"]
    assert select_hub_files(HubConfigSource("org/flux").hub_files(), FLUX_REPO, FLUX_INDEX, weights=True) == configs
    lacking = HubConfigSource("org/flux", weights_of=["vae", "text_encoder"]).hub_files()
    assert select_hub_files(lacking, FLUX_REPO, FLUX_INDEX, True) == sorted(
        [*configs, "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"])


def test_url_description_drops_the_query_string():
    info = parse_source("https://example.com/models/x.safetensors?token=SECRET").describe()
    assert info["ref"] == "https://example.com/models/x.safetensors"
    assert "SECRET" not in repr(info)


def test_plain_http_urls_are_refused():
    with pytest.raises(SourceError, match="only https://"):
        parse_source("http://example.com/x.safetensors")


def test_existing_directory_is_a_local_source(tmp_path):
    assert parse_source(str(tmp_path)) == LocalSource(str(tmp_path.resolve()))


def test_missing_directory_path_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="no such directory"):
        parse_source(str(tmp_path / "absent"))


def test_variant_on_a_local_directory_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="apply to Hub repos"):
        parse_source(str(tmp_path), variant="fp16")


class NoRefs:
    def read_ref(self, source):
        raise AssertionError("the demo needs no ref file")


def test_demo_random_is_the_seeded_random_demo_with_a_fixed_offline_identity():
    assert parse_source("demo-random") == RandomDemoSource(seed=0)
    assert RandomDemoSource().offline_identity(NoRefs()) == "demo-v1-seed0"


def test_demo_is_the_trained_model_keyed_by_the_digest_of_its_committed_files():
    digest = hashlib.sha256()
    for file in sorted(p for p in TRAINED_PIPELINE.rglob("*") if p.is_file()):
        digest.update(file.relative_to(TRAINED_PIPELINE).as_posix().encode() + b"\0" + file.read_bytes())
    assert parse_source("demo") == DemoSource()
    assert DemoSource().offline_identity(NoRefs()) == "demo-trained-" + digest.hexdigest()[:32]
    assert DemoSource().prepare(NoRefs(), None, refresh=False).path == TRAINED_PIPELINE


def test_demo_takes_no_revision():
    with pytest.raises(SourceError, match="the demo source takes no revision, variant or subfolder"):
        parse_source("demo", revision="main")


def test_store_key_fields_of_each_kind_are_what_earlier_stores_were_keyed_by(tmp_path):
    """Entries built before sources became strategy objects keep their keys (no rebuild)."""
    assert HubSource("org/name", "main", "fp16").key_fields() == {
        "kind": "hub", "ref": "org/name", "variant": "fp16", "subfolder": None, "pipeline_class": None, "config": None}
    # A URL's class was StableDiffusionPipeline by default then; saying so keeps its entry's key.
    assert UrlSource("https://h/x.safetensors?sig=1", pipeline_class="StableDiffusionPipeline").key_fields() == {
        "kind": "url", "ref": hashlib.sha256(b"https://h/x.safetensors?sig=1").hexdigest(), "variant": None,
        "subfolder": None, "pipeline_class": "StableDiffusionPipeline", "config": None}
    assert LocalSource(str(tmp_path)).key_fields() == {
        "kind": "local", "ref": str(tmp_path), "variant": None, "subfolder": None, "pipeline_class": None,
        "config": None}


@pytest.mark.parametrize("text", ["", "just-a-name", "a/b/c", "org/../x"])
def test_text_that_is_no_source_is_an_error(text):
    with pytest.raises(SourceError):
        parse_source(text)


def test_subfolder_is_part_of_a_hub_source():
    src = parse_source("org/name", revision="main", variant="fp16", subfolder="pipe")
    assert src == HubSource("org/name", "main", "fp16", "pipe")


def test_subfolder_cannot_leave_the_repo():
    with pytest.raises(SourceError, match="relative folder"):
        parse_source("org/name", subfolder="../x")


# ---------------------------------------------------------------------------------------------
# weight names and file selection


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("diffusion_pytorch_model.safetensors", ("diffusion_pytorch_model", None, "safetensors", False)),
        ("diffusion_pytorch_model.fp16.safetensors", ("diffusion_pytorch_model", "fp16", "safetensors", False)),
        ("model.fp16-00001-of-00002.safetensors", ("model", "fp16", "safetensors", True)),
        ("diffusion_pytorch_model-00001-of-00002.fp16.safetensors", ("diffusion_pytorch_model", "fp16", "safetensors", True)),
        ("pytorch_model.bin", ("pytorch_model", None, "bin", False)),
    ],
)
def test_parse_weight_name(name, parsed):
    w = parse_weight_name(name)
    assert (w.stem, w.variant, w.ext, w.sharded) == parsed


@pytest.mark.parametrize("name", ["config.json", "model.onnx", "flax_model.msgpack", "x.ckpt"])
def test_non_weight_names_are_not_weights(name):
    assert parse_weight_name(name) is None


def test_default_selection_takes_safetensors_configs_and_tokenizers_only():
    assert select_files(SD_REPO, SD_INDEX) == sorted(SIDE_FILES + [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ])


def test_fp16_variant_replaces_the_fp32_weights_where_it_exists():
    assert select_files(SD_REPO, SD_INDEX, variant="fp16") == sorted(SIDE_FILES + [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",  # no fp16 copy: its default weights
    ])


def test_bin_weights_are_taken_only_when_no_safetensors_exist():
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"]
    index = {"unet": ["diffusers", "UNet2DConditionModel"]}
    assert select_files(files, index) == files


def test_sharded_weights_come_with_their_index_of_the_same_variant():
    files = [
        "model_index.json", "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model.bf16-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.bf16-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.bf16.json",
    ]
    index = {"transformer": ["diffusers", "FluxTransformer2DModel"]}
    assert select_files(files, index, variant="bf16") == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.bf16-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.bf16-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.bf16.json",
    ]


def test_component_with_only_variant_weights_needs_the_variant():
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(DiffusersLayoutError, match=r"no default \(non-variant\) weights.*\['fp16'\]"):
        select_files(files, {"unet": ["diffusers", "UNet2DConditionModel"]})


def test_subfolder_selects_inside_it_only():
    files = ["model_index.json", "unet/config.json", "pipe/model_index.json", "pipe/unet/config.json",
             "pipe/unet/diffusion_pytorch_model.safetensors"]
    assert select_files(files, {"unet": ["diffusers", "UNet2DConditionModel"]}, subfolder="pipe") == [
        "pipe/model_index.json", "pipe/unet/config.json", "pipe/unet/diffusion_pytorch_model.safetensors",
    ]


def test_config_only_selection_skips_every_weight():
    assert select_files(SD_REPO, SD_INDEX, weights=False) == SIDE_FILES


# ---------------------------------------------------------------------------------------------
# the safety checker's sources and files

# The file list of CompVis/stable-diffusion-safety-checker at its pinned commit (fal.toml).
CHECKER_REPO = [".gitattributes", "README.md", "config.json", "preprocessor_config.json", "pytorch_model.bin"]


def checker_dir(path, files=("config.json", "model.safetensors", "preprocessor_config.json")):
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("{}")
    return path


def test_checker_demo_is_the_embedded_demo_checker_with_a_fixed_offline_identity():
    class NoRefs:
        def read_ref(self, source):
            raise AssertionError("the demo checker needs no ref file")

    assert parse_checker_source("demo") == DemoCheckerSource()
    assert DemoCheckerSource().offline_identity(NoRefs()) == "demo-safety-checker-v2"


def test_checker_repo_id_is_a_hub_checker_source_with_its_revision_and_subfolder():
    assert parse_checker_source("CompVis/stable-diffusion-safety-checker", revision="abc") == HubCheckerSource(
        "CompVis/stable-diffusion-safety-checker", "abc")
    assert parse_checker_source("org/sd-1@v2", subfolder="pipe") == HubCheckerSource("org/sd-1", "v2", None, "pipe")


def test_checker_directory_is_a_local_checker_source(tmp_path):
    assert parse_checker_source(str(checker_dir(tmp_path / "c"))) == LocalCheckerSource(str(tmp_path / "c"))


def test_checker_directory_without_a_checker_is_refused_saying_what_it_should_hold(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SourceError, match=r"holds no safety checker: expected config.json \+ weights \+ "
                                          r"preprocessor_config.json side by side .* or safety_checker/ \+ "
                                          r"feature_extractor/"):
        parse_checker_source(str(tmp_path))


@pytest.mark.parametrize(("text", "revision", "subfolder", "message"), [
    ("https://h/checker.safetensors", None, None, "a safety checker is a Hub repo or a directory, not a URL"),
    ("demo", "main", None, "the demo safety checker takes no revision or subfolder"),
    ("org/x", None, "../up", "relative folder"),
    ("just-a-name", None, None, "neither a Hub repo id"),
    ("", None, None, "safety checker source is empty"),
])
def test_text_that_is_no_checker_source_is_an_error_saying_why(text, revision, subfolder, message):
    with pytest.raises(SourceError, match=re.escape(message)):
        parse_checker_source(text, revision=revision, subfolder=subfolder)


def test_checker_kinds_key_their_store_entries_apart_from_the_pipeline_kinds(tmp_path):
    assert HubCheckerSource("org/sd").key_fields()["kind"] == "hub-safety-checker"
    assert HubCheckerSource("org/sd").key_fields() == {**HubSource("org/sd").key_fields(), "kind": "hub-safety-checker"}
    assert LocalCheckerSource(str(tmp_path)).key_fields()["kind"] == "local-safety-checker"
    assert DemoCheckerSource().key_fields()["kind"] == "demo-safety-checker"


def test_checker_repo_files_are_its_config_weights_and_preprocessor_config():
    assert select_safety_checker_files(CHECKER_REPO) == {
        "safety_checker": ["config.json", "pytorch_model.bin"], "feature_extractor": ["preprocessor_config.json"]}
    with_safetensors = select_safety_checker_files([*CHECKER_REPO, "model.safetensors"])
    assert with_safetensors["safety_checker"] == ["config.json", "model.safetensors"]


def test_checker_files_of_an_sd_pipeline_repo_are_its_two_folders_only():
    assert select_safety_checker_files(SD_REPO) == {
        "safety_checker": ["safety_checker/config.json", "safety_checker/model.safetensors"],
        "feature_extractor": ["feature_extractor/preprocessor_config.json"]}


def test_checker_files_in_a_subfolder_and_without_weights():
    files = ["config.json", *(f"sc/{name}" for name in CHECKER_REPO)]
    assert select_safety_checker_files(files, subfolder="sc", weights=False) == {
        "safety_checker": ["sc/config.json"], "feature_extractor": ["sc/preprocessor_config.json"]}


def test_a_checker_without_weights_is_an_error_naming_where():
    with pytest.raises(DiffusersLayoutError, match="safety_checker: the safety checker has no weight files"):
        select_safety_checker_files(["safety_checker/config.json", "feature_extractor/preprocessor_config.json"])


# ---------------------------------------------------------------------------------------------
# local identity


def test_directory_fingerprint_skips_a_broken_symlink_warning_once(tmp_path, caplog):
    (tmp_path / "model_index.json").write_text("{}")
    without = directory_fingerprint(tmp_path)
    (tmp_path / "README.link").symlink_to(tmp_path / "nowhere")
    caplog.set_level(logging.WARNING, logger="conversion.sources")
    assert directory_fingerprint(tmp_path) == directory_fingerprint(tmp_path) == without
    assert [r.getMessage() for r in caplog.records] == [
        f"source: skipping the broken symlink {tmp_path / 'README.link'} (to {tmp_path / 'nowhere'})"
    ]


def test_directory_fingerprint_changes_when_a_file_changes(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    before = directory_fingerprint(tmp_path)
    assert directory_fingerprint(tmp_path) == before
    (tmp_path / "a.json").write_text('{"x": 1}')
    os.utime(tmp_path / "a.json", ns=(1, 1))
    assert directory_fingerprint(tmp_path) != before


# ---------------------------------------------------------------------------------------------
# model_index.json


def test_model_index_nested_100000_deep_is_a_source_error_naming_the_file(tmp_path):
    path = tmp_path / "model_index.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(
        DiffusersLayoutError, match=re.escape(f"{path}: not a readable model_index.json (nested more than 64 levels deep)")
    ):
        read_model_index(path)


def test_model_index_larger_than_a_mebibyte_is_a_source_error_naming_the_file(tmp_path):
    path = tmp_path / "model_index.json"
    path.write_text('{"_class_name": "' + "x" * (1 << 20) + '"}')
    with pytest.raises(
        DiffusersLayoutError, match=re.escape(f"{path}: not a readable model_index.json (more than the limit of 1048576 bytes)")
    ):
        read_model_index(path)


def test_demo_without_its_committed_weights_says_they_are_missing(tmp_path, monkeypatch):
    import conversion.sources.demo as demo

    monkeypatch.setattr(demo, "TRAINED_PIPELINE", tmp_path / "pipeline")
    with pytest.raises(SourceError, match=r"the demo model's committed weights are missing .*demo_training train"):
        DemoSource().offline_identity(NoRefs())


# ---------------------------------------------------------------------------------------------
# A LoRA's path: lengths the Hub and filesystems allow, caller input echoed in part


def test_a_lora_repo_at_the_hubs_length_limits_is_a_hub_lora():
    org, name, file = "o" * 96, "n" * 96, "f" * 243 + ".safetensors"
    assert parse_lora_path(f"{org}/{name}@{'r' * 255}/{file}") == HubLora(f"{org}/{name}", file, "r" * 255)


def test_a_lora_repo_name_longer_than_96_characters_is_refused_saying_the_limit():
    text = "org/" + "n" * 300
    with pytest.raises(LoraPathError) as refused:
        parse_lora_path(text)
    assert str(refused.value) == (f"{text[:100]!r}...: the repo name {'n' * 100!r}... is 300 characters long; "
                                  "Hugging Face allows at most 96")


def test_a_lora_repo_org_longer_than_96_characters_is_refused_saying_the_limit():
    text = "o" * 97 + "/name"
    with pytest.raises(LoraPathError) as refused:
        parse_lora_path(text)
    assert str(refused.value) == (f"{text[:100]!r}...: the repo owner {'o' * 97!r} is 97 characters long; "
                                  "Hugging Face allows at most 96")


def test_a_lora_file_path_component_longer_than_255_bytes_is_refused():
    text = "org/name/dir/" + "é" * 128 + ".safetensors"  # 128 characters of 2 bytes each, then 12
    with pytest.raises(LoraPathError) as refused:
        parse_lora_path(text)
    assert str(refused.value) == (f"{text[:100]!r}...: {('é' * 100)!r}... is 268 bytes long; a file or folder name "
                                  "in the repo is at most 255")


def test_a_lora_revision_longer_than_255_characters_is_refused():
    text = "org/name@" + "r" * 256
    with pytest.raises(LoraPathError) as refused:
        parse_lora_path(text)
    assert str(refused.value) == f"{text[:100]!r}...: the revision is 256 characters long; at most 255"


def test_a_lora_repo_path_longer_than_2048_characters_is_refused():
    text = "org/name/" + "d/" * 1020 + "f.safetensors"
    with pytest.raises(LoraPathError) as refused:
        parse_lora_path(text)
    assert str(refused.value) == (f"{text[:100]!r}...: a Hugging Face repo path is at most 2048 characters, this "
                                  f"one has {len(text)}")


def test_a_long_invalid_repo_part_is_echoed_cut_at_100_characters():
    text = "org/" + "!" * 150
    with pytest.raises(LoraPathError) as refused:
        parse_lora_path(text)
    assert str(refused.value).startswith(f"{text[:100]!r}...: {'!' * 100!r}... is not a valid Hugging Face repo id part;")


def test_a_long_invalid_revision_is_echoed_cut_at_100_characters():
    text = "org/name@" + "!" * 200
    with pytest.raises(LoraPathError) as refused:
        parse_lora_path(text)
    assert str(refused.value) == (f"{text[:100]!r}...: {'!' * 100!r}... is not a revision (a branch, tag or commit "
                                  "hash)")


def test_a_lora_https_url_longer_than_2048_characters_is_refused_echoing_100():
    with pytest.raises(LoraPathError) as refused:
        parse_lora_path("https://example.com/" + "x" * 3000 + ".safetensors")
    assert str(refused.value).endswith(": an https URL is at most 2048 characters")
    assert len(str(refused.value)) < 200
