"""Decoding untrusted image bytes: every failure mode gets a clear ImageDecodeError."""

from __future__ import annotations

import io
import struct
import uuid
import zlib

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from memray.data.images import (
    ImageDecodeError,
    decode_image,
    read_bytes,
    sha256_hex,
    to_model_tensor,
)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _noise(width: int, height: int) -> Image.Image:
    # Noise does not compress, so cutting the file in half really cuts pixel data.
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header claims width x height 1-bit pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_sha256_hex():
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_hex(b"abc") == expected


def test_empty_bytes():
    with pytest.raises(ImageDecodeError, match="empty file \\(0 bytes\\)"):
        decode_image(b"")


def test_random_bytes():
    garbage = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="not an image: cannot identify format"):
        decode_image(garbage)


def test_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode_image(b"not an image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("load_truncated_global", [False, True])
def test_truncated_file(fmt, load_truncated_global, monkeypatch):
    # Many training scripts flip this global; truncation must be caught either way.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated_global)
    data = _encode(_noise(256, 256), fmt)
    assert decode_image(data).size == (256, 256)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_checksum():
    data = bytearray(_encode(_noise(64, 64), "PNG"))
    data[-20] ^= 0xFF  # inside the IDAT payload, so its CRC no longer matches
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image"):
        decode_image(bytes(data))


def test_formats_outside_the_web_allowlist_are_refused():
    # EPS would be rendered by Ghostscript: no untrusted bytes should ever reach it.
    eps = _encode(Image.new("RGB", (8, 8), "red"), "EPS")
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(eps)


def test_rgb_jpeg_round_trip():
    image = decode_image(_encode(Image.new("RGB", (40, 30), (10, 120, 240)), "JPEG", quality=95))
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.abs(_pixels(image) - [10, 120, 240]).max() <= 3


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (64, 16))
    colours = {
        (0, 255, 255, 0): (255, 0, 0),
        (255, 0, 255, 0): (0, 255, 0),
        (255, 255, 0, 0): (0, 0, 255),
        (0, 0, 0, 255): (0, 0, 0),
    }
    for i, ink in enumerate(colours):
        cmyk.paste(ink, (16 * i, 0, 16 * (i + 1), 16))
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data)
    assert image.mode == "RGB"
    for i, rgb in enumerate(colours.values()):
        centre = _pixels(image)[8, 16 * i + 8]
        assert np.abs(centre - rgb).max() <= 12, (rgb, centre)


def test_greyscale_l():
    image = decode_image(_encode(Image.new("L", (4, 4), 77), "PNG"))
    assert image.mode == "RGB"
    assert (_pixels(image) == 77).all()


def test_greyscale_with_alpha_goes_over_white():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 128))  # half-transparent black
    la.putpixel((1, 0), (50, 255))  # opaque
    image = decode_image(_encode(la, "PNG"))
    # 0 * 128/255 + 255 * (1 - 128/255) = 127
    assert np.abs(_pixels(image)[0, 0] - 127).max() <= 1
    assert (_pixels(image)[0, 1] == 50).all()


def test_rgba_goes_over_white_not_black():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (200, 0, 0, 128))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.putpixel((2, 0), (10, 20, 30, 255))
    image = decode_image(_encode(rgba, "PNG"))
    assert image.mode == "RGB"
    row = _pixels(image)[0]
    # 200 * 128/255 + 255 * 127/255 = 227.4 ; 0 * 128/255 + 255 * 127/255 = 127
    assert np.abs(row[0] - [227, 127, 127]).max() <= 1
    assert row[1].tolist() == [255, 255, 255]
    assert row[2].tolist() == [10, 20, 30]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    data = _encode(palette, fmt, transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    row = _pixels(decode_image(data))[0]
    assert row[0].tolist() == [255, 0, 0]
    assert row[1].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    ("mode", "fmt", "values", "expected"),
    [
        ("I;16", "PNG", [0, 257, 32768, 65535], [0, 1, 128, 255]),
        ("I;16B", "TIFF", [0, 257, 32768, 65535], [0, 1, 128, 255]),
        ("I", "TIFF", [-5, 32768, 65535, 70000], [0, 128, 255, 255]),
        ("F", "TIFF", [-1.0, 0.5, 1.0, 2.0], [0, 128, 255, 255]),
    ],
)
def test_high_bit_depth_greyscale_is_scaled_not_clipped(mode, fmt, values, expected):
    source = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        source.putpixel((x, 0), value)
    data = _encode(source, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    image = decode_image(data)
    assert image.mode == "RGB"
    row = _pixels(image)[0]
    assert (row == row[:, :1]).all()  # still grey
    assert np.abs(row[:, 0] - expected).max() <= 1, row[:, 0]


def test_decompression_bomb_caught_by_pil():
    # 900 Mpx is past PIL's hard limit, so Image.open itself raises.
    data = _png_claiming_size(30_000, 30_000)
    assert len(data) < 100
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_caught_by_default_limit():
    # 100 Mpx: PIL only warns, the default max_pixels refuses before decoding.
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(_png_claiming_size(10_000, 10_000))
    message = "decompression bomb: 10000x10000 = 100000000 pixels exceeds the limit of 89478485"
    assert str(caught.value) == message


def test_max_pixels_is_configurable():
    data = _encode(Image.new("RGB", (200, 100)), "PNG")
    assert decode_image(data).size == (200, 100)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, max_pixels=10_000)
    expected = "decompression bomb: 200x100 = 20000 pixels exceeds the limit of 10000"
    assert str(caught.value) == expected


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = decode_image(_encode(stored, "JPEG", quality=95, exif=exif))
    assert image.size == (32, 64)
    pixels = _pixels(image)
    assert np.abs(pixels[8, 16] - [255, 0, 0]).max() <= 8  # the left edge is now on top
    assert np.abs(pixels[56, 16] - [0, 0, 255]).max() <= 8


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 2
    assert _pixels(decode_image(buffer.getvalue()))[0, 0].tolist() == [255, 0, 0]


def test_to_model_tensor_shape_range_dtype():
    tensor = to_model_tensor(_noise(50, 40), 32)
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert tensor.is_contiguous()
    white = to_model_tensor(Image.new("RGB", (32, 32), "white"), 32)
    black = to_model_tensor(Image.new("RGB", (32, 32), "black"), 32)
    assert torch.equal(white, torch.ones(3, 32, 32))
    assert torch.equal(black, -torch.ones(3, 32, 32))


def _three_bands(size: tuple[int, int], horizontal: bool) -> Image.Image:
    image = Image.new("RGB", size)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    width, height = size
    step = (width if horizontal else height) // 3
    for i, colour in enumerate(colours):
        start, stop = i * step, (i + 1) * step
        image.paste(colour, (start, 0, stop, height) if horizontal else (0, start, width, stop))
    return image


@pytest.mark.parametrize("horizontal", [True, False])
def test_to_model_tensor_centre_crops(horizontal):
    # Red | green | blue thirds, shrunk by 2: only the green middle third survives the crop.
    size = (192, 64) if horizontal else (64, 192)
    tensor = to_model_tensor(_three_bands(size, horizontal), 32)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    # A few pixels at the band edges carry bicubic ringing from the neighbouring thirds.
    inner = tensor[:, :, 3:-3] if horizontal else tensor[:, 3:-3, :]
    assert torch.allclose(inner, green.expand_as(inner), atol=0.05)


def test_to_model_tensor_refuses_to_upscale_by_default():
    small = Image.new("RGB", (20, 30), (255, 0, 0))
    with pytest.raises(ImageDecodeError) as caught:
        to_model_tensor(small, 32)
    assert str(caught.value) == ("image is 20x30, smaller than the model resolution 32 (set allow_upscale to upsample)")
    tensor = to_model_tensor(small, 32, allow_upscale=True)
    assert tensor.shape == (3, 32, 32)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(tensor, red, atol=0.02)


def test_to_model_tensor_needs_rgb():
    with pytest.raises(ValueError, match="RGB"):
        to_model_tensor(Image.new("RGBA", (32, 32)), 32)


def test_read_bytes_local_file(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG payload")
    assert read_bytes(str(path)) == b"\x89PNG payload"


def test_read_bytes_fsspec_url():
    uri = f"memory://memray-tests/{uuid.uuid4().hex}.png"
    data = _encode(Image.new("RGB", (32, 32), "white"), "PNG")
    with fsspec.open(uri, "wb") as handle:
        handle.write(data)
    try:
        assert read_bytes(uri) == data
        assert decode_image(read_bytes(uri)).size == (32, 32)
    finally:
        fsspec.filesystem("memory").rm(uri)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_read_bytes_missing_file(where, tmp_path):
    if where == "local":
        uri = str(tmp_path / "absent.png")
    else:
        uri = f"memory://memray-tests/{uuid.uuid4().hex}.png"
    with pytest.raises(ImageDecodeError) as caught:
        read_bytes(uri)
    assert str(caught.value) == f"missing file: {uri}"
