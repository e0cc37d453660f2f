"""serving.images alone: reading a request's image URLs (data: URIs, https through a stand-in fetch
or fal's SSRF-safe client refusing a local address) and decoding them within bounds; and
serving.img2img's output size. Nothing reaches the network."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fal.exceptions import FieldException
from PIL import Image as PILImage

from conversion.errors import CallerUrlError
from serving.images import (
    FETCH_TIMEOUT_S,
    MAX_DOWNLOAD_BYTES,
    check_same_size,
    decode_image,
    decode_mask,
    fetch_https,
    fetch_limits,
    read_url,
    url_problem,
)
from serving.img2img import output_size
from serving.settings import load_settings

MAX_PIXELS = 131072  # the demo's [serving] max_pixels
LIMITS = fetch_limits(30.0)


def encoded(picture: PILImage.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **save)
    return buffer.getvalue()


def refusal(call, *args) -> FieldException:
    with pytest.raises(FieldException) as raised:
        call(*args)
    return raised.value


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds (almost) no pixel data: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# URLs


def test_a_base64_data_uri_gives_its_bytes_whatever_media_type_it_declares():
    assert read_url("data:text/plain;base64,aGVsbG8=", "image_url", fetch_https, LIMITS) == b"hello"
    assert read_url("data:image/png;base64,aGVs\nbG8=", "image_url", fetch_https, LIMITS) == b"hello"  # whitespace skipped


def test_a_percent_encoded_data_uri_gives_its_bytes():
    assert read_url("data:,a%20b", "image_url", fetch_https, LIMITS) == b"a b"


@pytest.mark.parametrize(("url", "message"), [("data:image/png;base64,@@@@", "base64 data is invalid"),
                                              ("data:image/png;base64", "no comma")])
def test_a_malformed_data_uri_is_refused_naming_the_field(url, message):
    error = refusal(read_url, url, "mask_url", fetch_https, LIMITS)
    assert error.field == "mask_url" and message in error.message and error.message.startswith("mask_url ")


def test_an_https_url_is_read_with_the_fetch_given_the_read_timeout_the_deadline_and_fals_size_limit():
    asked = []
    data = read_url("https://images.example.com/a.png", "image_url",
                    lambda url, limits, cancelled: asked.append((url, limits)) or b"bytes", LIMITS)
    assert data == b"bytes" and asked == [("https://images.example.com/a.png", LIMITS)]
    assert (LIMITS.read_timeout_s, LIMITS.deadline_s, LIMITS.max_bytes) == (FETCH_TIMEOUT_S, 30.0, MAX_DOWNLOAD_BYTES)
    assert MAX_DOWNLOAD_BYTES == 50 * 1024 * 1024  # fal.toolkit.image's own limit


def test_a_failed_fetch_is_refused_naming_the_field_with_a_short_reason():
    def failing(url, limits, cancelled):
        raise OSError("connection refused " + "x" * 500)

    error = refusal(read_url, "https://images.example.com/a.png", "image_url", failing, LIMITS)
    assert (error.field, error.type, error.status_code) == ("image_url", "image_unreachable", 422)
    assert error.message.startswith("image_url could not be fetched: connection refused xxx")
    assert len(error.message) < 160


@pytest.mark.parametrize("url", ["https://localhost/a.png", "https://127.0.0.1:8443/a.png", "https://[::1]/a.png",
                                 "https://169.254.169.254/latest/meta-data"])
def test_local_and_private_addresses_are_refused_in_process_without_connecting(url):
    started = time.perf_counter()
    with pytest.raises(CallerUrlError, match="its host is a private, loopback or link-local address"):
        fetch_https(url, LIMITS, lambda: False)
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize(("url", "problem"), [
    ("https://a.example/x.png", None), ("data:image/png;base64,AAAA", None),
    ("http://a.example/x.png", "image_url must be an https:// URL or a data: URI"),
    ("file:///etc/passwd", "image_url must be an https:// URL or a data: URI"),
    ("HTTPS://a.example/x.png", "image_url must be an https:// URL or a data: URI"),
    ("https://a.example/" + "x" * 2100, "image_url: an https URL is at most 2048 characters"),
])
def test_the_schema_takes_https_urls_and_data_uris_only(url, problem):
    assert url_problem(url, "image_url") == problem


# --------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_each_supported_format_decodes_to_rgb_of_its_size(fmt):
    picture = decode_image(encoded(PILImage.new("RGB", (40, 24), (10, 200, 30)), fmt), "image_url", MAX_PIXELS)
    assert (picture.mode, picture.size) == ("RGB", (40, 24))


@pytest.mark.parametrize(("data", "kind"), [
    (b"definitely not an image", "image_format"),
    (b"", "image_format"),
    (encoded(PILImage.new("RGB", (8, 8)), "TIFF"), "image_format"),  # a real image, but not a format we decode
    (encoded(PILImage.new("RGB", (8, 8)), "ICO"), "image_format"),
    (encoded(PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:200],
     "image_corrupt"),
])
def test_bytes_that_are_not_a_supported_image_are_refused(data, kind):
    error = refusal(decode_image, data, "image_url", MAX_PIXELS)
    assert (error.field, error.type) == ("image_url", kind)


def test_too_many_pixels_are_refused_from_the_header_before_decoding():
    error = refusal(decode_image, png_header_only(1000, 1000), "image_url", MAX_PIXELS)  # no pixel data to decode
    assert error.type == "image_too_large"
    assert error.message == "image_url is 1000x1000 (1000000 pixels), more than the limit of 131072"


def test_a_decompression_bomb_header_is_refused_at_once():
    started = time.perf_counter()
    error = refusal(decode_image, png_header_only(100_000, 100_000), "image_url", MAX_PIXELS)
    assert error.type == "image_too_large" and "too many pixels" in error.message
    assert time.perf_counter() - started < 1


def test_the_pixel_limit_is_inclusive():
    assert decode_image(encoded(PILImage.new("RGB", (512, 256))), "image_url", MAX_PIXELS).size == (512, 256)
    assert refusal(decode_image, encoded(PILImage.new("RGB", (512, 264))), "image_url", MAX_PIXELS).type == \
        "image_too_large"


def test_a_16_bit_image_is_refused_naming_its_mode():
    data = encoded(PILImage.fromarray(np.full((16, 16), 40000, dtype=np.uint16)))  # a 16-bit grayscale PNG
    error = refusal(decode_image, data, "image_url", MAX_PIXELS)
    assert error.type == "image_mode"
    assert error.message == "image_url has mode I;16 (16-bit or float): only 8-bit images are supported"


def test_transparency_is_flattened_onto_white_for_an_image():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel, the rest fully transparent
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black: a mid gray on white
    picture = np.asarray(decode_image(encoded(PILImage.fromarray(rgba, "RGBA")), "image_url", MAX_PIXELS))
    assert tuple(picture[0, 0]) == (255, 0, 0) and tuple(picture[3, 3]) == (255, 255, 255)
    assert 120 <= picture[0, 1, 0] <= 135


def test_a_palette_image_with_a_transparent_color_is_flattened_too():
    palette = PILImage.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1  # index 1 (red) is transparent
    picture = np.asarray(decode_image(encoded(palette, "PNG", transparency=1), "image_url", MAX_PIXELS))
    assert tuple(picture[0, 0]) == (255, 255, 255)


def test_grayscale_and_cmyk_images_become_rgb():
    gray = decode_image(encoded(PILImage.new("L", (8, 8), 77)), "image_url", MAX_PIXELS)
    assert gray.mode == "RGB" and tuple(np.asarray(gray)[0, 0]) == (77, 77, 77)
    cmyk = decode_image(encoded(PILImage.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), "image_url", MAX_PIXELS)
    assert cmyk.mode == "RGB" and np.asarray(cmyk).min() > 240  # no ink: white


def test_exif_orientation_is_applied():
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    picture = decode_image(encoded(PILImage.new("RGB", (40, 24)), "JPEG", exif=exif), "image_url", MAX_PIXELS)
    assert picture.size == (24, 40)


def test_the_first_frame_of_an_animated_image_is_used():
    frames = [PILImage.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    picture = np.asarray(decode_image(buffer.getvalue(), "image_url", MAX_PIXELS))
    assert picture[0, 0, 0] > 200 and picture[0, 0, 2] < 50


def test_a_mask_becomes_grayscale_white_repaint_and_transparency_counts_as_keep():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # opaque white: repaint; the rest transparent: keep
    mask = decode_mask(encoded(PILImage.fromarray(rgba, "RGBA")), "mask_url", MAX_PIXELS)
    assert mask.mode == "L" and np.asarray(mask)[0, 0] == 255 and np.asarray(mask)[3, 3] == 0
    rgb = decode_mask(encoded(PILImage.new("RGB", (4, 4), (255, 255, 255))), "mask_url", MAX_PIXELS)
    assert rgb.mode == "L" and np.asarray(rgb).min() == 255


def test_a_mask_of_another_size_is_refused_naming_the_masks_field():
    error = refusal(check_same_size, PILImage.new("RGB", (64, 48)), PILImage.new("L", (48, 64)), "mask_url")
    assert (error.field, error.type) == ("mask_url", "mask_size")
    assert error.message == "mask_url is 48x64 but the image is 64x48: they must be the same size"
    check_same_size(PILImage.new("RGB", (64, 48)), PILImage.new("L", (64, 48)), "mask_url")


def test_the_decoded_bytes_are_never_part_of_a_message():
    data = b"not an image " + base64.b64encode(b"x" * 5000)
    assert len(refusal(decode_image, data, "image_url", MAX_PIXELS).message) < 120


# --------------------------------------------------------------------------------------------------
# The output size


DEMO = load_settings(Path(__file__).resolve().parents[1] / "fal.toml", profile="demo").serving


@pytest.mark.parametrize(("size", "expected"), [((64, 48), (64, 48)), ((61, 47), (56, 40)), ((512, 256), (512, 256)),
                                               ((39, 33), (32, 32))])
def test_without_image_size_the_output_is_the_inputs_size_rounded_down_to_multiples_of_8(size, expected):
    assert output_size(None, PILImage.new("RGB", size), DEMO) == expected


@pytest.mark.parametrize(("size", "problem"), [((31, 64), "width 24 is outside [32, 512]"),
                                               ((520, 200), "width 520 is outside [32, 512]")])
def test_an_input_outside_the_bounds_needs_an_image_size(size, problem):
    error = refusal(output_size, None, PILImage.new("RGB", size), DEMO)
    assert error.field == "image_url" and problem in error.message and error.message.endswith("give image_size to resize it")


def test_a_given_image_size_wins():
    assert output_size("square", PILImage.new("RGB", (80, 48)), DEMO) == (64, 64)
