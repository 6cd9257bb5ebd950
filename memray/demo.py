"""The embedded default until the trained demo model ships: a tiny model built in code, a few images.

The tiny model is randomly initialised, so its verdicts exercise the chain end to end but say
nothing about memorisation; the trained demo model with planted images replaces it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from memray.models.tiny import build_tiny_sd

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def demo_model_dir(path: str | Path) -> Path:
    """Build the tiny demo checkpoint at `path` unless it is there already."""
    path = Path(path)
    if not (path / "model_index.json").exists():
        build_tiny_sd(path)
    return path


def write_demo_images(folder: str | Path, count: int = 6) -> Path:
    """Write `count` demo images as PNG files with a JSONL manifest (id, uri, caption); return the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in demo_images(count):
        (folder / f"{item['image_id']}.png").write_bytes(item["data"])
        lines.append(json.dumps({"id": item["image_id"], "uri": f"{item['image_id']}.png", "caption": item["caption"]}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def shape_image(shape: str, colour: str, background: str, size: int = 64) -> bytes:
    """A PNG of one coloured shape on a plain background."""
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon(
            [(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=COLOURS[colour]
        )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def demo_images(count: int = 6) -> list[dict]:
    """`count` captioned shape images as ImageInput keyword dicts."""
    colours = list(COLOURS)
    items = []
    for i in range(count):
        shape, colour, background = SHAPES[i % 3], colours[i % 4], colours[(i + 1) % 4]
        caption = f"a {colour} {shape} on a {background} background"
        items.append(
            dict(
                image_id=f"demo-{i:02d}",
                data=shape_image(shape, colour, background),
                caption=caption,
                source="memray.demo",
            )
        )
    return items
