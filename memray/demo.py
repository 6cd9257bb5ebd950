"""The demo data: a deterministic generator of captioned scenes, and the embedded demo model and images.

Scenes are coloured shapes (sizes, counts, positions, stripes) on plain, striped or checkered
backgrounds, each fully determined by (seed, index). jobs/train_demo_model.py trains the shipped
demo model on them, with a few planted images duplicated many times, so which images are
memorized is known.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from memray.models.loading import DEMO_MODEL
from memray.models.tiny import build_tiny_sd

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring")
SIZES = {"small": (0.10, 0.15), "large": (0.20, 0.28)}  # radius as a fraction of the image side
COUNTS = ("one", "two", "three")
PATTERNS = ("plain", "striped", "checkered")
# A single object is placed in a named region (centre x, y as fractions); groups go anywhere.
REGIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "middle": (0.5, 0.5)}
SUPERSAMPLE = 4  # draw at 4x and downsample, so small shapes get smooth edges
DEMO_ASSETS = Path(__file__).parent / "demo_assets"

# How much a caption says. Real training sets mix captions that pin an image down with loose
# ones that many images share, so a caption alone rarely identifies a training image.
CAPTION_DETAILS = ("full", "partial", "loose")

# Every word a caption can use, for the demo model's word-level tokenizer.
CAPTION_WORDS = sorted(
    {"a", "an", "and", "on", "the", "at", "in", "background", "shapes"}
    | set(COLOURS)
    | set(SHAPES)
    | {shape + "s" for shape in SHAPES}
    | set(SIZES)
    | set(COUNTS)
    | set(PATTERNS)
    | set(REGIONS)
)


@dataclass(frozen=True)
class Group:
    """`count` identical objects: a shape of one size, colour and fill pattern."""

    count: int
    shape: str
    size: str
    colour: str
    stripe: str | None  # second colour of a striped fill, None for a plain fill


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image and caption it."""

    background: str
    pattern: str
    background2: str | None
    groups: tuple[Group, ...]
    region: str | None
    placement_seed: int


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene: 1-2 groups of 1-3 objects on a plain, striped or checkered background."""
    colours = list(COLOURS)
    background = rng.choice(colours)
    pattern = rng.choice(("plain", "plain", "striped", "checkered"))
    background2 = rng.choice([c for c in colours if c != background]) if pattern != "plain" else None
    groups: list[Group] = []
    for _ in range(rng.choice((1, 1, 2))):
        # A second group differs in colour from the first, so the caption never names one group twice.
        colour = rng.choice([c for c in colours if c not in (background, background2, *(g.colour for g in groups))])
        stripe = rng.choice([c for c in colours if c != colour]) if rng.random() < 0.3 else None
        groups.append(Group(rng.choice((1, 1, 2, 3)), rng.choice(SHAPES), rng.choice(list(SIZES)), colour, stripe))
    single = len(groups) == 1 and groups[0].count == 1
    region = rng.choice(list(REGIONS)) if single else None
    return Scene(background, pattern, background2, tuple(groups), region, rng.getrandbits(32))


def scene_caption(scene: Scene, detail: str = "full") -> str:
    """Describe the scene in words from CAPTION_WORDS: everything ("full"), the objects without
    colours, sizes or position ("partial"), or only the background ("loose")."""
    if detail == "loose":
        return f"shapes on {_background_words(scene)}"
    parts = []
    for group in scene.groups:
        count = "a" if group.count == 1 else COUNTS[group.count - 1]
        noun = group.shape + ("s" if group.count > 1 else "")
        if detail == "partial":
            parts.append(f"{count} {noun}")
            continue
        fill = f"{group.colour} and {group.stripe} striped" if group.stripe else group.colour
        parts.append(f"{count} {group.size} {fill} {noun}")
    text = " and ".join(parts)
    if scene.region and detail == "full":
        text += f" at the {scene.region}"
    return f"{text} on {_background_words(scene)}"


def _background_words(scene: Scene) -> str:
    if scene.pattern == "plain":
        return f"{_article(scene.background)} {scene.background} background"
    return f"{_article(scene.background)} {scene.background} and {scene.background2} {scene.pattern} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render_scene(scene: Scene, size: int = 32) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` pixels."""
    side = size * SUPERSAMPLE
    image = _texture(side, scene.background, scene.background2, scene.pattern)
    rng = random.Random(scene.placement_seed)
    placed: list[tuple[float, float, float]] = []
    for group in scene.groups:
        for _ in range(group.count):
            radius = rng.uniform(*SIZES[group.size]) * side
            x, y = _place(rng, radius, side, scene.region, placed)
            placed.append((x, y, radius))
            mask = Image.new("L", (side, side), 0)
            _draw_shape(ImageDraw.Draw(mask), group.shape, x, y, radius)
            fill = _texture(side, group.colour, group.stripe, "striped" if group.stripe else "plain", diagonal=True)
            image.paste(fill, (0, 0), mask)
    return image.resize((size, size), Image.Resampling.BOX)


def _texture(side: int, colour: str, colour2: str | None, pattern: str, diagonal: bool = False) -> Image.Image:
    image = Image.new("RGB", (side, side), COLOURS[colour])
    if pattern == "plain":
        return image
    draw = ImageDraw.Draw(image)
    period = side // 8  # 4-pixel stripes at 32x32: coarse enough for a factor-4 VAE to keep
    for i in range(-side, 2 * side, period):
        if pattern == "striped" and diagonal:
            draw.polygon(
                [(i, 0), (i + period // 2, 0), (i + period // 2 - side, side), (i - side, side)], COLOURS[colour2]
            )
        elif pattern == "striped":
            draw.rectangle((0, i, side, i + period // 2 - 1), COLOURS[colour2])
        else:
            for j in range(0, side, period):
                if (i // period + j // period) % 2:
                    draw.rectangle((i, j, i + period - 1, j + period - 1), COLOURS[colour2])
    return image


def _place(rng: random.Random, radius: float, side: int, region: str | None, placed) -> tuple[float, float]:
    if region:
        cx, cy = REGIONS[region]
        # Wide enough that the caption leaves the position open: a model that only learned the
        # caption cannot place the object where a memorized copy has it.
        jitter = 0.10 * side
        return cx * side + rng.uniform(-jitter, jitter), cy * side + rng.uniform(-jitter, jitter)
    # Rejection sampling keeps objects of a group apart so the count stays visible; give up after 30 tries.
    for _ in range(30):
        x, y = rng.uniform(radius, side - radius), rng.uniform(radius, side - radius)
        if all((x - px) ** 2 + (y - py) ** 2 > (0.9 * (radius + pr)) ** 2 for px, py, pr in placed):
            break
    return x, y


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        draw.ellipse((x - r / 2, y - r / 2, x + r / 2, y + r / 2), fill=0)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((x - s, y - s, x + s, y + s), fill=255)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=255)
    else:
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=255)


def generated_scene(seed: int, stream: str, index: int) -> Scene:
    """The scene at `index` of the named stream ("normal", "heldout", "planted") for `seed`."""
    return random_scene(random.Random(f"memray-demo/{seed}/{stream}/{index}"))


def scene_variant(scene: Scene, rng: random.Random, keep: str) -> Scene:
    """A new scene that shares the words of one part of `scene`'s caption: its objects ("objects":
    a new background and placement) or its background ("background": new objects and placement)."""
    other = random_scene(rng)
    if keep == "objects":
        taken = {g.colour for g in scene.groups}
        background = rng.choice([c for c in COLOURS if c not in taken and c != scene.background])
        second = rng.choice([c for c in COLOURS if c not in taken | {background}]) if scene.pattern != "plain" else None
        return Scene(background, scene.pattern, second, scene.groups, scene.region, other.placement_seed)
    if keep == "background":
        clash = {scene.background, scene.background2}
        groups = tuple(g for g in other.groups if g.colour not in clash) or (
            Group(1, "circle", "large", next(c for c in COLOURS if c not in clash), None),
        )
        single = len(groups) == 1 and groups[0].count == 1
        region = other.region or ("middle" if single else None)
        return Scene(
            scene.background, scene.pattern, scene.background2, groups, region if single else None, other.placement_seed
        )
    raise ValueError(f"keep must be 'objects' or 'background', got {keep!r}")


# Never-trained images that fool a naive similarity: a near-uniform image, a dark one (a night
# sky), a plain two-tone one, and noise. Each comes with the caption a scraper might attach.
HARD_NEGATIVES = ("uniform", "dark", "plain", "noise")


def hard_negative(seed: int, kind: str, index: int, size: int = 32) -> tuple[Image.Image, str]:
    """The `index`-th never-trained hard negative of a kind, and its caption; deterministic per (seed, kind, index)."""
    rng = random.Random(f"memray-demo/{seed}/hard-{kind}/{index}")
    noise = np.random.default_rng(rng.getrandbits(32))
    colours = list(COLOURS)
    y = np.linspace(0, 1, size)[:, None, None]
    if kind == "uniform":
        colour = rng.choice(colours)
        tint = np.array(COLOURS[colour], dtype=np.float32) + 12 * (y - 0.5) + noise.normal(0, 2, (size, size, 3))
        caption = f"{_article(colour)} {colour} background"
    elif kind == "dark":
        tint = noise.normal(12, 2, (size, size, 3))
        for _ in range(rng.randint(3, 7)):  # a few small dim stars
            r, c, v = rng.randrange(size), rng.randrange(size), rng.uniform(90, 200)
            tint[max(r - 1, 0) : r + 1, max(c - 1, 0) : c + 1] = v
        caption = "small white circles on a black background"
    elif kind == "plain":
        top, bottom = rng.sample(colours, 2)
        tint = (1 - y) * np.array(COLOURS[top], dtype=np.float32) + y * np.array(COLOURS[bottom], dtype=np.float32)
        tint = tint + noise.normal(0, 2, (size, size, 3))
        caption = f"{_article(top)} {top} and {bottom} background"
    elif kind == "noise":
        tint = noise.uniform(0, 255, (size, size, 3))
        caption = scene_caption(random_scene(rng), "loose")
    else:
        raise ValueError(f"unknown hard negative {kind!r}; expected one of {HARD_NEGATIVES}")
    pixels = np.broadcast_to(tint, (size, size, 3)).clip(0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels), caption


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def trained_demo_model() -> Path:
    """The shipped demo model with planted memorization (diffusers layout): `--model demo`."""
    return DEMO_MODEL


def trained_demo_manifest() -> Path:
    """The shipped demo image set's manifest.jsonl (id, uri, caption, split, duplicates)."""
    return DEMO_ASSETS / "images" / "manifest.jsonl"


def demo_audit_config() -> Path:
    """The audit configuration `memray demo` runs the shipped model with (a TOML file)."""
    return DEMO_ASSETS / "audit.toml"


def read_demo_manifest(manifest: str | Path) -> list[dict]:
    """The records (id, uri, caption, split, duplicates) of a demo set manifest, in file order."""
    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(
            f"no demo set at {manifest}: train the demo model first "
            "(python jobs/train_demo_model.py --out memray/demo_assets)"
        )
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def demo_group(record: dict) -> str:
    """What the training did with a demo image: "planted x1024", "normal", "held-out" or "hard negative"."""
    if record["split"] == "planted":
        return f"planted x{record['duplicates']}"
    return {"heldout": "held-out", "hard": "hard negative"}.get(record["split"], record["split"])


def demo_truth(record: dict) -> str:
    """The ground truth of a demo image in a few words: its group, caption kind and graded replication rates."""
    rates = ""
    if "truth_caption_rate" in record:
        rates = f"; caption {record['truth_caption_rate']:.0%}, empty {record['truth_uncond_rate']:.0%}"
    return f"{demo_group(record)} ({record.get('caption_kind', '?')}){rates}"


def write_demo_sample(folder: str | Path, per_group: int | None) -> tuple[Path, dict[str, str]]:
    """Copy the first `per_group` images of every demo group (all if None) to `folder` with a manifest.

    Returns the manifest and each copied image's ground truth (demo_truth), to print next to verdicts.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = trained_demo_manifest()
    taken: dict[str, int] = {}
    lines, truth = [], {}
    for record in read_demo_manifest(source):
        group = demo_group(record)
        taken[group] = taken.get(group, 0) + 1
        if per_group is not None and taken[group] > per_group:
            continue
        (folder / record["uri"]).write_bytes((source.parent / record["uri"]).read_bytes())
        lines.append(json.dumps({"id": record["id"], "uri": record["uri"], "caption": record["caption"] or None}))
        truth[record["id"]] = demo_truth(record)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, truth


def demo_model_dir(path: str | Path) -> Path:
    """Build the tiny random-weight checkpoint at `path` unless it is there (a fast fixture, not the demo model)."""
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


def demo_images(count: int = 6) -> list[dict]:
    """`count` captioned held-out scenes (seed 0) as ImageInput keyword dicts."""
    items = []
    for i in range(count):
        scene = generated_scene(0, "heldout", i)
        items.append(
            dict(
                image_id=f"demo-{i:02d}",
                data=png_bytes(render_scene(scene, 64)),
                caption=scene_caption(scene),
                source="memray.demo",
            )
        )
    return items
