"""Any torch nn.Module through our writer and loader: pack_module, build_empty_module, fill_module,
load_module (the counterparts of flashpack's pack_to_file and assign_from_file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flashpack
import pytest
import torch
from torch import nn

from conversion.errors import ConversionError
from conversion.writer import pack_module, pack_state_dict
from model_loader import (
    MODULE_DIR,
    StateDictMismatchError,
    build_empty_module,
    fill_module,
    load_module,
    read_pack,
    start_pack_reads,
)
from model_loader.diffusers_layout import PACK_NAME
from model_loader.errors import PipelineLoadError

VOCAB, WIDTH = 11, 8


class TinyNet(nn.Module):
    """Linear, Conv, LayerNorm, a tied pair, persistent float / int buffers, a non-persistent one."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.norm = nn.LayerNorm(WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter under two names
        self.register_buffer("scale", torch.tensor(0.5))  # persistent, float, 0-dim
        self.register_buffer("offsets", torch.arange(VOCAB) * 3001)  # persistent int64, above fp16's 2048
        self.register_buffer("positions", torch.linspace(0, 1, WIDTH), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed((ids + self.offsets[ids]) % VOCAB)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.norm(x + self.positions)
        return self.head(self.proj(x) * self.scale)


IDS = torch.tensor([[0, 3, 7, 10, 2]])


def _source(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def _packed(tmp_path, module: nn.Module | None = None):
    module = module if module is not None else _source()
    path = tmp_path / "tiny.flashpack"
    pack_module(module, path)
    return module, path


def _outputs(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(IDS)


def _persistent(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def test_round_trip_gives_equal_outputs_in_eval_mode(tmp_path):
    src, path = _packed(tmp_path)
    model = load_module(TinyNet, path)
    assert not any(m.training for m in model.modules())
    assert torch.equal(_outputs(model), _outputs(src))
    for name, tensor in src.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_parameters_and_buffers_are_views_of_the_pack_blocks(tmp_path):
    _, path = _packed(tmp_path)
    pack = read_pack(path)
    model = fill_module(build_empty_module(TinyNet), pack)
    spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in pack.blocks]
    for name, tensor in _persistent(model).items():
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
        assert any(lo <= start and end <= hi for lo, hi in spans), name


def test_tied_tensor_is_stored_once_under_its_first_name(tmp_path):
    src, path = _packed(tmp_path)
    layout = read_pack(path).layout
    assert sorted(layout.names()) == sorted(n for n in src.state_dict() if n != "head.weight")


def test_tied_weights_stay_one_parameter(tmp_path):
    src, path = _packed(tmp_path)
    model = load_module(TinyNet, path)
    assert isinstance(model.embed.weight, nn.Parameter)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.head.weight, src.embed.weight)


def test_non_persistent_buffer_comes_from_init_not_the_pack(tmp_path):
    _, path = _packed(tmp_path)
    assert "positions" not in read_pack(path).layout.names()
    model = load_module(TinyNet, path)
    assert not model.positions.is_meta
    assert torch.equal(model.positions, torch.linspace(0, 1, WIDTH))


def test_empty_module_has_meta_parameters_and_real_buffers_in_the_dtype_asked():
    model = build_empty_module(TinyNet, torch.float16)
    assert all(p.is_meta for p in model.parameters())
    assert model.positions.dtype == torch.float16 and not model.positions.is_meta
    assert torch.equal(model.offsets, torch.arange(VOCAB) * 3001)
    assert model.head.weight is model.embed.weight


def test_pack_module_writes_what_flashpack_writes_for_the_deduplicated_state_dict(tmp_path):
    src, path = _packed(tmp_path)
    untied = {n: t for n, t in src.state_dict().items() if n != "head.weight"}
    flashpack.pack_to_file(untied, str(tmp_path / "ref.flashpack"), None)
    assert path.read_bytes() == (tmp_path / "ref.flashpack").read_bytes()


def test_file_from_flashpack_pack_to_file_loads_and_keeps_the_tie(tmp_path):
    src = _source()
    path = tmp_path / "ref.flashpack"
    flashpack.pack_to_file(src, str(path), None)  # both tied names written
    model = load_module(TinyNet, path)
    assert model.head.weight is model.embed.weight
    assert torch.equal(_outputs(model), _outputs(src))


def test_file_from_pack_module_loads_with_flashpack_assign_from_file(tmp_path):
    src, path = _packed(tmp_path)
    model = _source(seed=1)
    flashpack.assign_from_file(model, str(path), device="cpu")
    # What flashpack fills: named_parameters lists a tied tensor once, under its first name (the
    # name pack_module stores it under); flashpack unties the second name (not ours to test).
    ref = dict(src.named_parameters()) | dict(src.named_buffers())
    loaded = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in ref.items():
        # flashpack's reader returns a 0-dim tensor as shape (1,)
        assert torch.equal(loaded[name].reshape(tensor.shape), tensor), name


def _bad_pack(tmp_path, src: nn.Module, drop=(), extra=(), reshape=()):
    sd = {n: t for n, t in src.state_dict().items() if n != "head.weight" and n not in drop}
    for name in extra:
        sd[name] = torch.zeros(3)
    for name in reshape:
        sd[name] = torch.zeros(WIDTH, 4)
    path = tmp_path / "bad.flashpack"
    pack_state_dict(sd, path)
    return path


def test_strict_names_missing_unexpected_and_mismatched_keys_before_assigning(tmp_path):
    path = _bad_pack(tmp_path, _source(), drop=["norm.bias"], extra=["extra.weight"], reshape=["proj.weight"])
    model = build_empty_module(TinyNet)
    with pytest.raises(StateDictMismatchError) as err:
        fill_module(model, path)
    message = str(err.value)
    assert f"{path}: tensors do not match TinyNet" in message
    assert "missing (1): norm.bias;" in message
    assert "unexpected (1): extra.weight;" in message
    assert "shape/dtype mismatch (1): proj.weight: stored [8, 4] float32, module wants [8, 8] float32" in message
    assert all(p.is_meta for p in model.parameters())


def test_strict_names_both_names_of_a_missing_tied_tensor(tmp_path):
    path = _bad_pack(tmp_path, _source(), drop=["embed.weight"])
    with pytest.raises(StateDictMismatchError, match=r"missing \(1\): embed\.weight = head\.weight$"):
        fill_module(build_empty_module(TinyNet), path)


def test_non_strict_keeps_a_real_missing_tensor_and_ignores_unexpected_names(tmp_path):
    src = _source()
    path = _bad_pack(tmp_path, src, drop=["norm.bias"], extra=["extra.weight"])
    model = _source(seed=1)
    own_bias = model.norm.bias
    fill_module(model, path, strict=False)
    assert model.norm.bias is own_bias
    assert not hasattr(model, "extra")
    assert torch.equal(model.proj.weight, src.proj.weight)
    assert torch.equal(model.norm.weight, src.norm.weight)


def test_non_strict_refuses_a_missing_tensor_on_the_meta_device(tmp_path):
    path = _bad_pack(tmp_path, _source(), drop=["norm.bias"])
    with pytest.raises(
        StateDictMismatchError, match=r"missing, and on the meta device \(no value to keep\) \(1\): norm\.bias$"
    ):
        fill_module(build_empty_module(TinyNet), path, strict=False)


def test_non_strict_still_refuses_a_shape_mismatch(tmp_path):
    path = _bad_pack(tmp_path, _source(), reshape=["proj.weight"])
    with pytest.raises(StateDictMismatchError, match=r"proj\.weight: stored \[8, 4\] float32, module wants \[8, 8\]"):
        fill_module(_source(seed=1), path, strict=False)


def test_torch_dtype_casts_floating_tensors_and_keeps_integers(tmp_path):
    src, path = _packed(tmp_path)
    model = load_module(TinyNet, path, torch_dtype=torch.bfloat16)
    for name, tensor in src.state_dict().items():
        loaded = model.state_dict()[name]
        if tensor.is_floating_point():
            assert loaded.dtype == torch.bfloat16, name
            assert torch.equal(loaded, tensor.bfloat16()), name
        else:
            assert loaded.dtype == torch.int64, name
            assert torch.equal(loaded, tensor), name
    assert model.positions.dtype == torch.bfloat16  # built in that dtype


def test_module_on_cpu_with_real_weights_is_filled(tmp_path):
    src, path = _packed(tmp_path)
    model = _source(seed=1)
    assert not torch.equal(_outputs(model), _outputs(src))
    assert fill_module(model, path) is model
    assert torch.equal(_outputs(model), _outputs(src))
    assert model.head.weight is model.embed.weight


def test_converted_module_directory_holds_its_pack_under_module(tmp_path):
    src = _source()
    (tmp_path / "conv" / MODULE_DIR).mkdir(parents=True)
    pack_module(src, tmp_path / "conv" / MODULE_DIR / PACK_NAME)
    model = load_module(TinyNet, tmp_path / "conv")
    assert torch.equal(_outputs(model), _outputs(src))


def test_directory_without_a_pack_is_an_error_naming_the_pack_path(tmp_path):
    with pytest.raises(PipelineLoadError, match=f"{tmp_path / MODULE_DIR / PACK_NAME}"):
        load_module(TinyNet, tmp_path)


def test_reads_are_used_and_the_file_is_not_read_again(tmp_path):
    src = _source()
    conv = tmp_path / "conv"
    (conv / MODULE_DIR).mkdir(parents=True)
    path = conv / MODULE_DIR / PACK_NAME
    pack_module(src, path)
    reads = start_pack_reads([(MODULE_DIR, path, None)])
    assert reads.wait(timeout=60)
    path.rename(tmp_path / "moved.flashpack")
    model = load_module(TinyNet, conv, reads=reads)
    assert torch.equal(_outputs(model), _outputs(src))


def test_packing_a_module_on_the_meta_device_is_an_error(tmp_path):
    with pytest.raises(ConversionError, match="tensor 'embed.weight' is on the meta device"):
        pack_module(build_empty_module(TinyNet), tmp_path / "meta.flashpack")
    assert not (tmp_path / "meta.flashpack").exists()


class TwoNames(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Parameter(torch.ones(3))
        self.a = nn.Module()
        self.b = nn.Module()
        self.a.weight = shared
        self.b.weight = shared


def test_a_parameter_registered_under_two_names_is_one_meta_parameter():
    model = build_empty_module(TwoNames)
    assert model.a.weight.is_meta
    assert model.a.weight is model.b.weight


def test_finding_a_module_pack_does_not_import_torch(tmp_path):
    (tmp_path / MODULE_DIR).mkdir()
    (tmp_path / MODULE_DIR / PACK_NAME).write_bytes(b"")
    code = (
        "import sys\n"
        "from model_loader import MODULE_DIR\n"
        "from model_loader.module import module_pack_path\n"
        f"print(module_pack_path({str(tmp_path)!r}), MODULE_DIR, 'torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == [str(tmp_path / MODULE_DIR / PACK_NAME), "module", "False"]
