"""IP-Adapters (image prompts) at serving time: the configured ones built once from their store
entries, attached to the UNet for one request under the pipeline lock and detached after it.

**Built once.** An adapter's weights come from its store entry (a pack of the file's tensors,
``image_proj.*`` and ``ip_adapter.*``, read by the project's loader and checked by its checksums)
and its image encoder from another (a CLIPVisionModelWithProjection, loaded as any model is). In
setup diffusers' own ``UNet2DConditionModel._load_ip_adapter_weights`` turns the weights into its
IP-Adapter attention processors and image projection, exactly as ``pipe.load_ip_adapter`` would;
they are kept, and the UNet gets its own processors back. So each configured adapter costs its
processors' memory once, and a request without an image prompt runs the UNet untouched.

**One request.** :meth:`IPAdapters.applied` sets the adapter's processors, projection and scale on
the UNet and runs a view of the pipeline whose ``image_encoder`` (and, where the pipeline has none,
``feature_extractor``) are the adapter's; the UNet's own processors come back however the call
ends. Call it under the pipeline lock: the UNet is shared by every pipeline of the app.

torch and diffusers are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .images import Fetch, decode_image, read_url

if TYPE_CHECKING:
    from PIL.Image import Image

    from conversion.download.caller_url import FetchLimits

log = logging.getLogger(__name__)

# The two parts of an IP-Adapter file, as diffusers' load_ip_adapter splits a .safetensors file.
ADAPTER_PARTS = ("image_proj", "ip_adapter")


@dataclass(frozen=True)
class IPAdapter:
    """A configured IP-Adapter, built: its UNet attention processors and image projection, and
    its image encoder with the feature extractor that prepares the encoder's input."""

    path: str
    processors: dict[str, Any]
    projection: Any
    image_encoder: Any
    feature_extractor: Any


@dataclass(frozen=True)
class ImagePrompt:
    """A request's ``ip_adapter`` entry, read: the adapter, its image, its scale."""

    adapter: IPAdapter
    image: Image
    scale: float


def adapter_state_dict(tensors: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """An IP-Adapter file's tensors split as diffusers' ``load_ip_adapter`` splits them:
    ``{"image_proj": {...}, "ip_adapter": {...}}``. ValueError naming the first tensor of neither part."""
    parts: dict[str, dict[str, Any]] = {part: {} for part in ADAPTER_PARTS}
    for name, tensor in tensors.items():
        part, _, key = name.partition(".")
        if part not in parts or not key:
            raise ValueError(f"{where}: {name!r} is not an IP-Adapter tensor (expected image_proj.* and ip_adapter.*)")
        parts[part][key] = tensor
    missing = [part for part in ADAPTER_PARTS if not parts[part]]
    if missing:
        raise ValueError(f"{where}: not an IP-Adapter: it has no {' or '.join(missing)}.* tensors")
    return parts


class IPAdapters:
    """The configured IP-Adapters of one pipeline, built, by path."""

    def __init__(self, unet: Any, adapters: list[IPAdapter]) -> None:
        self.unet = unet
        self.adapters = {adapter.path: adapter for adapter in adapters}
        self._own = (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)

    @classmethod
    def build(cls, pipe: Any, loaded: list[tuple[str, dict[str, Any], Any]]) -> IPAdapters:
        """Each ``(path, tensors, image_encoder)`` built into its processors with diffusers' own
        conversion; the UNet keeps its own processors."""
        unet = getattr(pipe, "unet", None)
        if unet is None or not hasattr(pipe, "image_encoder") or not hasattr(unet, "_load_ip_adapter_weights"):
            raise RuntimeError(f"[[model.ip_adapters]]: {type(pipe).__name__} takes no IP-Adapter here (SD 1.x/2.x and "
                               "SDXL pipelines do); remove the ip_adapters or serve another model")
        built = cls(unet, [])
        for path, tensors, encoder in loaded:
            try:
                state_dict = adapter_state_dict(tensors, f"[[model.ip_adapters]] {path}")
            except ValueError as exc:
                raise RuntimeError(str(exc)) from None
            problem = _encoder_problem(state_dict, encoder)
            if problem:
                raise RuntimeError(f"[[model.ip_adapters]] {path}: {problem}; configure the image encoder it was trained with")
            try:
                unet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=True)
            except (KeyError, RuntimeError, ValueError) as exc:
                built._restore()
                raise RuntimeError(f"[[model.ip_adapters]] {path}: cannot be used with this model's UNet "
                                   f"({type(exc).__name__}: {exc}); is it an IP-Adapter for this model family?") from exc
            adapter = IPAdapter(path, dict(unet.attn_processors), unet.encoder_hid_proj, encoder,
                                _feature_extractor(pipe, encoder))
            built._restore()
            built.adapters[path] = adapter
            log.info("ip_adapters: %s built (%s image encoder)", path, type(encoder).__name__)
        return built

    def read(self, entries: list[Any], fetch: Fetch, limits: FetchLimits, max_pixels: int,
             cancelled: Callable[[], bool]) -> list[ImagePrompt]:
        """A request's ``ip_adapter`` read: each image fetched, decoded and checked (422 naming
        ``ip_adapter[i].ip_adapter_image_url``)."""
        prompts = []
        for i, entry in enumerate(entries):
            field = f"ip_adapter[{i}].ip_adapter_image_url"
            image = decode_image(read_url(entry.ip_adapter_image_url, field, fetch, limits, cancelled), field,
                                 max_pixels)
            prompts.append(ImagePrompt(self.adapters[entry.path], image, entry.scale))
        return prompts

    @contextlib.contextmanager
    def applied(self, pipe: Any, prompt: ImagePrompt) -> Iterator[tuple[Any, dict[str, Any]]]:
        """For one call, under the pipeline lock: a view of ``pipe`` with ``prompt``'s adapter
        attached to the shared UNet, and the call's arguments (its image). Detached on exit."""
        adapter = prompt.adapter
        self.unet.set_attn_processor(dict(adapter.processors))
        self.unet.encoder_hid_proj = adapter.projection
        self.unet.config.encoder_hid_dim_type = "ip_image_proj"
        try:
            view = copy.copy(pipe)  # diffusers' setter updates the view's config only
            view.image_encoder = adapter.image_encoder
            view.feature_extractor = adapter.feature_extractor
            view.set_ip_adapter_scale(prompt.scale)
            yield view, {"ip_adapter_image": prompt.image}
        finally:
            self._restore()

    def _restore(self) -> None:
        processors, projection, hid_type = self._own
        self.unet.set_attn_processor(dict(processors))
        self.unet.encoder_hid_proj = projection
        self.unet.config.encoder_hid_dim_type = hid_type


def _encoder_problem(state_dict: dict[str, dict[str, Any]], encoder: Any) -> str | None:
    """Why ``encoder``'s image embeddings cannot feed the adapter's image projection (None when they
    can, or when the projection is not the plain one, whose input is the embedding)."""
    proj = state_dict["image_proj"].get("proj.weight")
    width = getattr(encoder.config, "projection_dim", None)
    if proj is None or width is None or proj.shape[-1] == width:
        return None
    return f"its image projection takes {proj.shape[-1]}-wide image embeddings, its image encoder gives {width}"


def _feature_extractor(pipe: Any, encoder: Any) -> Any:
    """What prepares the encoder's input, as diffusers' load_ip_adapter picks it: the pipeline's
    own feature extractor when it has one, else a CLIP image processor at the encoder's size."""
    own = getattr(pipe, "feature_extractor", None)
    if own is not None:
        return own
    from transformers import CLIPImageProcessor

    size = encoder.config.image_size
    return CLIPImageProcessor(size=size, crop_size=size)
