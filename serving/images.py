"""The input images of POST /image-to-image and /inpaint: read from a ``data:`` URI or fetched from
an ``https://`` URL, decoded within bounds, and refused with a short 422 naming the field.

fal's conventions (its fast-sdxl image-to-image and inpainting endpoints): ``image_url`` and
``mask_url`` are URLs, an https URL or a ``data:`` URI (what ``fal_client.encode_image`` makes), and
the mask is white where the image is repainted, black where it is kept (diffusers' convention too).

What an input must be, checked in this order (each failure is a fal ``FieldException``: a 422
``{"detail": [{"loc": ["body", "<field>"], "msg": "<field>: ...", "type": "..."}]}``):

- **readable**: a ``data:`` URI whose payload decodes (base64 or percent-encoded), or an https URL
  that answers 2xx within :data:`FETCH_TIMEOUT_S` per connect/read and ``[serving]
  image_fetch_timeout_s`` in all, with at most :data:`MAX_DOWNLOAD_BYTES` (fal's own limit for input
  images, ``fal.toolkit.image``). The fetch is fal's SSRF-safe client (``fal.toolkit.utils.ssrf``) in
  a child that is killed at the deadline or when the request is cancelled: https only, also after
  redirects, and never to a private, loopback or link-local address (refused before any
  connection). A ``data:`` URI is bounded by the request body limit.
- **an image**: PNG, JPEG, WebP, GIF or BMP, identified from its bytes (the declared media type is
  not trusted); anything else, or bytes that fail to decode, is refused. Of an animated image the
  first frame is used.
- **not too large**: at most ``[serving] max_pixels`` pixels, checked from the header *before* the
  pixels are decoded, so a decompression bomb costs nothing. PIL's own limit
  (``Image.MAX_IMAGE_PIXELS``, ~89 MP, an error at twice that) is left as it is, being
  process-global: a bomb it catches first gets the same 422.
- **of a mode we can read**: 8-bit images of any mode are converted to RGB (a mask to grayscale);
  transparency is flattened, onto white for an image, onto black (= keep) for a mask. 16-bit and
  float images (modes ``I``, ``I;16``, ``F``) are refused: there is no one right way to map them to
  8 bits. EXIF orientation is applied, as fal's ``read_image_from_url`` does.
- a mask must have the image's size (after orientation), else 422 naming ``mask_url``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fal.exceptions import FieldException
from fastapi import HTTPException

if TYPE_CHECKING:
    from PIL.Image import Image

    from conversion.download.caller_url import FetchLimits

# fal's limit for an input image it downloads (fal.toolkit.image.MAX_IMAGE_DOWNLOAD_SIZE: 50 MiB).
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
# Seconds for the connection and for each read of an https fetch.
FETCH_TIMEOUT_S = 10.0
# fal's limit for an https URL (fal.toolkit.types.MAX_HTTPS_URL_LENGTH).
MAX_URL_LENGTH = 2048
# The decoders an input may use (PIL's format names; JPEG's also opens MPO, many phones' JPEGs).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
FORMATS_TEXT = "PNG, JPEG, WebP, GIF or BMP"
# Modes refused: more than 8 bits per channel, or floats.
DEEP_MODES = ("I", "F")

# What reads the bytes of an https URL: (url, limits, cancelled) -> bytes; raises on failure.
Fetch = Callable[["str", "FetchLimits", Callable[[], bool]], bytes]


def url_problem(value: str, field: str) -> str | None:
    """Why ``value`` cannot be an image URL of a request (None when it can): the schema's check."""
    if value.startswith("data:"):
        return None
    if value.startswith("https://"):
        if len(value) > MAX_URL_LENGTH:
            return f"{field}: an https URL is at most {MAX_URL_LENGTH} characters"
        return None
    return f"{field} must be an https:// URL or a data: URI"


def fetch_limits(deadline_s: float) -> FetchLimits:
    """fal's size limit for an input image, :data:`FETCH_TIMEOUT_S` per read, ``deadline_s`` in all."""
    from conversion.download.caller_url import FetchLimits

    return FetchLimits(max_bytes=MAX_DOWNLOAD_BYTES, deadline_s=deadline_s, read_timeout_s=FETCH_TIMEOUT_S)


def fetch_https(url: str, limits: FetchLimits, cancelled: Callable[[], bool]) -> bytes:
    """The body of ``url`` through fal's SSRF-safe client in a killable child
    (``conversion.download.caller_url``): https only (redirects too), public addresses only, within
    ``limits``, stopped when ``cancelled()``; raises on any failure or non-2xx answer."""
    import tempfile

    from conversion.download.caller_url import fetch_to_file

    with tempfile.TemporaryDirectory(prefix="image-fetch-") as tmp:
        target = Path(tmp) / "body"
        fetch_to_file(url, target, limits, cancelled)
        return target.read_bytes()


def read_url(url: str, field: str, fetch: Fetch, limits: FetchLimits,
             cancelled: Callable[[], bool] = lambda: False) -> bytes:
    """The bytes ``url`` (a request's ``field``) stands for: a ``data:`` URI's payload, or an https
    URL's body fetched with ``fetch``. Raises a 422 ``FieldException`` naming ``field`` (a 507 when
    the local disk is full; FetchCancelled when the request was cancelled meanwhile)."""
    from conversion.errors import DiskFullError, FetchCancelled

    if url.startswith("data:"):
        return _data_uri_payload(url, field)
    try:
        return fetch(url, limits, cancelled)
    except FetchCancelled:
        raise
    except DiskFullError as exc:
        raise HTTPException(507, f"{field} could not be stored while it was fetched: {exc}") from None
    except Exception as exc:  # DNS, connect, TLS, timeout, deadline, HTTP status, size: all the caller's URL
        raise _refused(field, "image_unreachable", f"could not be fetched: {_reason(exc)}") from exc


def _data_uri_payload(url: str, field: str) -> bytes:
    from conversion.download.caller_url import data_uri_payload
    from conversion.errors import CallerUrlError

    try:
        return data_uri_payload(url)
    except CallerUrlError as exc:
        raise _refused(field, "image_data_uri", f"is {exc}") from None


def decode_image(data: bytes, field: str, max_pixels: int) -> Image:
    """``data`` as an RGB image (transparency flattened onto white, EXIF orientation applied)."""
    return _decode(data, field, max_pixels, mask=False)


def decode_mask(data: bytes, field: str, max_pixels: int) -> Image:
    """``data`` as a grayscale mask (white: repaint, black: keep; transparency counts as black)."""
    return _decode(data, field, max_pixels, mask=True)


def _decode(data: bytes, field: str, max_pixels: int, mask: bool) -> Image:
    from PIL import Image as PILImage
    from PIL import ImageOps, UnidentifiedImageError

    try:
        picture = PILImage.open(io.BytesIO(data), formats=FORMATS)
    except PILImage.DecompressionBombError as exc:
        raise _refused(field, "image_too_large", f"has too many pixels (more than {max_pixels})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise _refused(field, "image_format", f"is not an image in a supported format ({FORMATS_TEXT})") from exc
    with picture:
        width, height = picture.size
        if width * height > max_pixels:  # from the header: nothing is decoded yet
            raise _refused(field, "image_too_large",
                           f"is {width}x{height} ({width * height} pixels), more than the limit of {max_pixels}")
        if picture.mode.split(";")[0] in DEEP_MODES:
            raise _refused(field, "image_mode",
                           f"has mode {picture.mode} (16-bit or float): only 8-bit images are supported")
        try:
            picture.load()
            picture = ImageOps.exif_transpose(picture)
            # transparent pixels: over white for an image, over black (keep) for a mask
            return _flattened(picture, "L", (0, 0, 0)) if mask else _flattened(picture, "RGB", (255, 255, 255))
        except Exception as exc:  # truncated or corrupt pixel data: whatever the decoder raises
            raise _refused(field, "image_corrupt", f"could not be decoded ({_reason(exc)})") from exc


def _has_alpha(picture: Image) -> bool:
    return picture.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in picture.info


def _flattened(picture: Image, mode: str, background: tuple[int, int, int]) -> Image:
    """``picture`` in ``mode``, any transparency composited over ``background`` first."""
    from PIL import Image as PILImage

    if _has_alpha(picture):
        rgba = picture.convert("RGBA")
        return PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, (*background, 255)), rgba).convert(mode)
    return picture.convert(mode)


def check_same_size(image: Image, mask: Image, field: str) -> None:
    """422 naming ``field`` (the mask's) unless ``mask`` has ``image``'s size."""
    if mask.size != image.size:
        raise _refused(field, "mask_size",
                       f"is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: "
                       "they must be the same size")


def _refused(field: str, kind: str, what: str) -> FieldException:
    return FieldException(field=field, message=f"{field} {what}", type=kind)


def _reason(exc: BaseException) -> str:
    """A short reason for ``exc``: its type and its first 100 characters."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 100 else text[:100] + "..."
