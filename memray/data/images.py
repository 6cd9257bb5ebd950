"""Decode untrusted image bytes (scraped web images) into model-ready tensors.

Every way a file can be bad (empty, not an image, truncated, a decompression bomb, an exotic
pixel format) ends in an ImageDecodeError whose message says what is wrong, so an audit can
record why an image was skipped instead of crashing or, worse, measuring a half-grey image.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct

import numpy as np
import torch
from PIL import Image, ImageOps

from memray.data.uris import Location, UriError, locate, read_location

# PIL's default warning threshold (Image.MAX_IMAGE_PIXELS): about 0.25 GiB as 24-bit RGB.
DEFAULT_MAX_PIXELS = 89_478_485
# One image bigger than this is refused unread, whatever reads it: it is not a photo, and it
# could take the worker down.
MAX_IMAGE_BYTES = 256 * 1024 * 1024

# Formats seen in web scrapes. Restricting Image.open keeps exotic decoders away from untrusted
# bytes (EPS, for one, shells out to Ghostscript). MPO camera files open through "JPEG".
WEB_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO")

# What PIL raises on malformed input. MemoryError is left out on purpose: it means the worker is
# overloaded, not that the file is bad.
_CORRUPT_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    NotImplementedError,
    OverflowError,
)

# Greyscale modes deeper than 8 bits. PIL's own convert() clips them at 255 instead of scaling.
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be turned into a trustworthy RGB image."""


class _TruncationGuard(io.BytesIO):
    """In-memory file that refuses to read past its end once pixel decoding starts.

    With ImageFile.LOAD_TRUNCATED_IMAGES set (many training scripts set it process-wide) PIL
    pads a cut-off file with grey and reports success. Failing the read itself catches truncation
    whatever that global says, and without touching it.
    """

    decoding = False

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if self.decoding and not chunk and size is not None and size > 0:
            raise OSError("image data ends before all pixels were decoded")
        return chunk


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of the raw bytes, the identity of an image across renames and mirrors."""
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(image: Image.Image) -> str:
    """The image's 64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits: near-duplicates
    (resized, re-encoded, lightly edited copies) differ in a few bits."""
    import imagehash

    return str(imagehash.phash(image))


def read_bytes(
    uri: str | Location, *, max_bytes: int = MAX_IMAGE_BYTES, prefixes: tuple[Location, ...] | None = None
) -> bytes:
    """Read a local path or any fsspec URL into memory: at most `max_bytes`, from a regular file.

    Every way memray reads an image goes through here (or reads a shard member under the same
    cap), so one limit holds everywhere. The uri is normalised once (memray.data.uris) and exactly
    that location is read; a device or pipe (/dev/zero) is refused without waiting on it, and an
    HTTP(S) redirect is followed only within `prefixes` (None: the user named the uri, any hop).
    """
    try:
        location = uri if isinstance(uri, Location) else locate(uri)
        data = read_location(location, max_bytes=max_bytes, prefixes=prefixes)
    except UriError as error:
        raise ImageDecodeError(str(error)) from error
    except FileNotFoundError as error:
        raise ImageDecodeError(f"missing file: {location.uri}") from error
    except OSError as error:  # a directory, no permission, a storage error: this image's fault alone
        raise ImageDecodeError(f"unreadable file: {location.uri}: {error}") from error
    if len(data) > max_bytes:
        raise ImageDecodeError(f"file is over {max_bytes} bytes, not read: {location.uri}")
    return data


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode untrusted bytes into a fully loaded 8-bit RGB image, or raise ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        return _decode(data, max_pixels)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as error:
        raise ImageDecodeError("not an image: cannot identify format") from error
    # The warning arrives as an exception only where warnings are configured as errors.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"decompression bomb: {error}") from error
    except _CORRUPT_DATA_ERRORS as error:
        reason = str(error) or type(error).__name__
        raise ImageDecodeError(f"truncated or corrupt image: {reason}") from error


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    source = _TruncationGuard(data)
    with Image.open(source, formats=WEB_FORMATS) as image:
        # Image.open has parsed only the header here, so a bomb is stopped before any allocation.
        _check_pixel_count(image.size, max_pixels)
        source.decoding = True
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _to_8bit_grey(image)
    try:
        if _has_transparency(image):
            return _flatten_on_white(image)
        return image.convert("RGB")
    except ValueError as error:
        raise ImageDecodeError(f"unsupported colour mode {image.mode}: {error}") from error


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    samples = np.asarray(image, dtype=np.float32)
    # Floats are taken to span [0, 1]; integers to span 16 bits, so 65535 / 257 lands on 255.
    scaled = samples * 255.0 if image.mode == "F" else samples / 257.0
    return Image.fromarray(np.nan_to_num(scaled).clip(0, 255).round().astype(np.uint8))


def _has_transparency(image: Image.Image) -> bool:
    # Alpha can be a band (RGBA, LA, PA, premultiplied RGBa) or a tRNS colour key in info.
    return bool({"A", "a"} & set(image.getbands())) or "transparency" in image.info


def _flatten_on_white(image: Image.Image) -> Image.Image:
    # Web pages show transparent regions over white; dropping alpha would turn them black.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_model_tensor(image: Image.Image, resolution: int, *, allow_upscale: bool = False) -> torch.Tensor:
    """Resize the shorter side to `resolution`, centre-crop square, scale to [-1, 1] (3, H, W)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image from decode_image, got mode {image.mode}")
    width, height = image.size
    shorter = min(width, height)
    if shorter < resolution and not allow_upscale:
        raise ImageDecodeError(
            f"image is {width}x{height}, smaller than the model resolution {resolution} (set allow_upscale to upsample)"
        )
    # Truncating the longer side matches torchvision's Resize(int), as in Stable Diffusion training.
    new_size = (resolution * width // shorter, resolution * height // shorter)
    # reducing_gap box-reduces by an integer factor first: much faster on big downscales, and at
    # a gap of 3 Pillow documents the result as indistinguishable from a full bicubic pass.
    resized = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(cropped, dtype=np.float32))
    return pixels.permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


# -- encoding: tensors back to PNG (the catalog's replicas_png, figures) --


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def strip_height(height: int, *, low: int = 64, high: int = 128) -> int:
    """A tile height in [low, high]: small tiles grow by a whole factor (crisp pixels), large ones shrink."""
    if height > high:
        return high
    return height * math.ceil(low / height)


def _tile(pixels: torch.Tensor, height: int | None) -> Image.Image:
    tile = Image.fromarray(to_uint8(pixels))
    if height is None or height == tile.height:
        return tile
    width = max(1, round(tile.width * height / tile.height))
    # NEAREST keeps a tiny model's pixels visible as blocks; LANCZOS shrinks without aliasing.
    return tile.resize((width, height), Image.NEAREST if height > tile.height else Image.LANCZOS)


def image_row_png(images: list[torch.Tensor], *, height: int | None = None) -> bytes:
    """PNG bytes of images (3, H, W) in [-1, 1] side by side, each resized to `height`, 2-pixel white gaps."""
    tiles = [np.asarray(_tile(img, height)) for img in images]
    h = max(t.shape[0] for t in tiles)
    gap = np.full((h, 2, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for t in tiles for part in (t, gap)][:-1], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, "PNG")
    return buffer.getvalue()
