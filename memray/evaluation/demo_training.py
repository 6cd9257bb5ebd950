"""Train the demo text-to-image model with planted memorization: the images it memorizes are known.

The training set looks like a web scrape at small scale (docs/demo-model.md):
- normal images stream from memray.demo's generator, most seen once or a few times, under
  captions of mixed detail (full, partial, or a loose one many images share);
- planted images are duplicated (default 64, 256, 1024 and 4096 copies over the run, 7.7% of
  the samples together) in both of Webster et al.'s kinds: a unique caption (matching
  verbatim) or a loose caption shared with many normal images (template verbatim);
- one deliberately extreme image is trained only without a caption (`--uncond-copies` times),
  so the unconditional model replicates it and nothing else: it exercises the premise check;
- never-trained images complete the demo set: held-out scenes from the same generator and hard
  negatives (near-uniform, dark, plain and noise images, and scenes whose captions share words
  with planted ones).
Extra planted images come from a folder (image files with same-stem .txt captions, in any words:
the tokenizer is built from the captions); they take the duplication levels in turn.

The model is a small latent diffusion model in the Stable Diffusion layout (AutoencoderKL with a
factor-4 downsampling, CLIP text encoder with a word-level BPE tokenizer, UNet2DConditionModel,
DDIM scheduler), so memray loads it through the same path as a real SD checkpoint. The VAE is
trained first, then frozen; the text encoder and UNet train together on the epsilon objective
with caption dropout, so the unconditional branch and classifier-free guidance exist.

The graded ground truth of every demo image is measured on the trained model: its replication
rate from `--truth-noises` noises under its own caption (the best guidance scale) and among
`--uncond-samples` samples from the empty prompt (memray's tiled L2 against the image's VAE
reconstruction, with its content null: memray.measures.similarity).

Writes to --out: model/ (diffusers layout, safetensors), images/ (the demo set: PNGs and
manifest.jsonl with id, uri, caption, split, duplicates, caption_kind, truth_caption_rate,
truth_uncond_rate), train_index.jsonl.gz (every trained image), train_log.json (settings,
losses, VAE reconstruction error, ground truth, timings, hardware).

    nice -n 10 python jobs/train_demo_model.py --out memray/demo_assets
    python jobs/train_demo_model.py --smoke --out /tmp/demo-smoke          # about a minute on CPU
    python jobs/train_demo_model.py --check-only --out memray/demo_assets  # measure the ground truth again
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from memray.data.images import decode_image, to_model_tensor
from memray.demo import (
    CAPTION_DETAILS,
    CAPTION_WORDS,
    HARD_NEGATIVES,
    Scene,
    generated_scene,
    hard_negative,
    render_scene,
    scene_caption,
    scene_variant,
)
from memray.models.tiny import SDSizes, build_tiny_clip_tokenizer, save_sd_pipeline, sd_components, sd_schedule

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_LENGTH = 32  # tokens incl. start and end: the longest generated caption needs 24
DEMO_SIZES = SDSizes(
    text_width=64,
    vae_channels=(32, 64, 64),
    vae_groups=16,
    unet_channels=(64, 128),
    unet_down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    unet_groups=16,
)
SCHEDULE = sd_schedule()  # SD 1.x: scaled-linear betas, epsilon prediction
TRUTH_SCALES = (1.0, 3.0, 5.0, 7.0)  # guidance scales of the caption replication rate
TRUTH_STEPS = 50  # DDIM steps of every ground-truth sample (--truth-steps)


@dataclass
class Item:
    """One distinct image: what it is, its caption, and how often the training run sees it."""

    id: str
    split: str  # planted, normal, heldout or hard
    caption: str
    caption_kind: str  # planted: unique, template or none; otherwise the caption detail or the hard-negative kind
    copies: int  # samples of it over the whole run; 0 = never trained
    scene: Scene | None = None
    picture: Image.Image | None = None  # for images that are not generated scenes

    def image(self, size: int) -> Image.Image:
        """The item's pixels at size x size."""
        return self.picture if self.picture is not None else render_scene(self.scene, size)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; --smoke shrinks everything to a CI-sized run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--levels", type=int, nargs="+", default=[64, 256, 1024, 4096], help="copies of a planted image over the run"
    )
    parser.add_argument("--planted-per-level", type=int, default=3, help="alternately unique and template captions")
    parser.add_argument(
        "--uncond-copies", type=int, default=6144, help="copies of the one image trained without a caption (0: none)"
    )
    parser.add_argument(
        "--normal-repeats",
        type=float,
        nargs="+",
        default=[0.55, 0.25, 0.12, 0.08],
        help="share of normal images seen 1, 2, 3, ... times",
    )
    parser.add_argument(
        "--caption-detail", type=float, nargs=3, default=[0.4, 0.3, 0.3], help="share of full, partial, loose captions"
    )
    parser.add_argument("--heldout", type=int, default=10, help="never-trained generated scenes in the demo set")
    parser.add_argument("--hard-per-kind", type=int, default=2, help="hard negatives of each kind in the demo set")
    parser.add_argument("--demo-normal", type=int, default=12, help="normal training images in the demo set")
    parser.add_argument("--extra-planted", help="folder of extra planted images with same-stem .txt captions")
    parser.add_argument("--steps", type=int, default=3300, help="UNet + text encoder training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument("--vae-images", type=int, default=20000, help="distinct normal images the VAE trains on")
    parser.add_argument("--resolution", type=int, default=32, help="image side; latents are a quarter of it")
    parser.add_argument("--truth-noises", type=int, default=16, help="noises per demo image under its caption")
    parser.add_argument("--truth-steps", type=int, default=TRUTH_STEPS, help="DDIM steps of every ground-truth sample")
    parser.add_argument(
        "--uncond-samples", type=int, default=256, help="empty-prompt samples for the unconditional rate"
    )
    parser.add_argument(
        "--init-from",
        help="fine-tune this demo checkpoint (its VAE stays frozen and untrained, its tokenizer is kept): "
        "a later checkpoint of the same model, e.g. with more images planted through --extra-planted",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration that runs in about a minute")
    parser.add_argument(
        "--check-only", action="store_true", help="measure the ground truth of the model in --out again"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.smoke:
        args.levels, args.planted_per_level, args.uncond_copies = [4, 16], 2, 16
        args.steps, args.batch_size, args.vae_steps, args.vae_images = 40, 16, 20, 64
        args.heldout, args.hard_per_kind, args.demo_normal = 2, 1, 4
        args.truth_noises, args.uncond_samples, args.truth_steps = 2, 8, 10
    return args


# -- the plan: which images, how often, under which caption ------------------------------------


def build_plan(args) -> tuple[list[Item], list[Item]]:
    """(trained items, never-trained demo items), each a pure function of the arguments."""
    extra = _extra_planted(args)
    total = args.steps * args.batch_size
    planted_samples = args.planted_per_level * sum(args.levels) + args.uncond_copies + sum(e.copies for e in extra)
    if planted_samples > total // 2:
        raise SystemExit(f"{planted_samples} planted samples do not fit in {total} training samples; lower --levels")
    normal = _normal_stream(args, total - planted_samples)
    planted = _planted(args, Counter(item.caption for item in normal)) + extra
    heldout = [_generated(args, "heldout", i, detail=_detail(args, "heldout", i)) for i in range(args.heldout)]
    return planted + normal, heldout + _hard_negatives(args, planted)


def _planted(args, shared: Counter) -> list[Item]:
    """Planted scenes of two groups, alternately under a unique caption (no normal image has it) and a
    template caption (a loose one that normal images share, and no other planted image), then the
    image trained without a caption."""
    items, used, index = [], set(), 0
    for level in sorted(args.levels):
        for _ in range(args.planted_per_level):
            kind = "unique" if len(items) % 2 == 0 else "template"
            while True:
                scene = generated_scene(args.seed, "planted", index)
                caption = scene_caption(scene, "full" if kind == "unique" else "loose")
                fits = bool(shared[caption]) == (kind == "template") and caption not in used
                if len(scene.groups) == 2 and fits:
                    break
                index += 1
            used.add(caption)
            items.append(Item(f"planted-x{level}-{index:04d}", "planted", caption, kind, level, scene))
            index += 1
    if args.uncond_copies:
        scene = generated_scene(args.seed, "planted", index)
        items.append(
            Item(f"planted-x{args.uncond_copies}-{index:04d}", "planted", "", "none", args.uncond_copies, scene)
        )
    return items


def _normal_stream(args, samples: int) -> list[Item]:
    """Distinct normal images, each seen a few times (--normal-repeats), until `samples` are filled."""
    items, filled, index = [], 0, 0
    repeats = range(1, len(args.normal_repeats) + 1)
    while filled < samples:
        rng = random.Random(f"memray-demo/{args.seed}/normal-plan/{index}")
        copies = min(rng.choices(repeats, weights=args.normal_repeats)[0], samples - filled)
        items.append(_generated(args, "normal", index, copies=copies, detail=_detail(args, "normal", index)))
        filled += copies
        index += 1
    return items


def _detail(args, stream: str, index: int) -> str:
    return random.Random(f"memray-demo/{args.seed}/{stream}-detail/{index}").choices(
        CAPTION_DETAILS, weights=args.caption_detail
    )[0]


def _generated(args, stream: str, index: int, *, copies: int = 0, detail: str = "full") -> Item:
    scene = generated_scene(args.seed, stream, index)
    return Item(f"{stream}-{index:06d}", stream, scene_caption(scene, detail), detail, copies, scene)


def _hard_negatives(args, planted: list[Item]) -> list[Item]:
    """Never-trained images that fool a naive similarity, and scenes that share a planted caption's words."""
    items = []
    for kind in HARD_NEGATIVES:
        for i in range(args.hard_per_kind):
            picture, caption = hard_negative(args.seed, kind, i, args.resolution)
            items.append(Item(f"hard-{kind}-{i:02d}", "hard", caption, kind, 0, picture=picture))
    for kind, keep in (("unique", "objects"), ("template", "background")):
        sources = [item for item in planted if item.caption_kind == kind and item.scene is not None]
        for i, source in enumerate(sources[-args.hard_per_kind :]):  # the most copied: the strongest lure
            scene = scene_variant(source.scene, random.Random(f"memray-demo/{args.seed}/variant/{source.id}"), keep)
            # template: the planted image's own caption; unique: the variant's, sharing its object words
            caption = source.caption if kind == "template" else scene_caption(scene)
            items.append(Item(f"hard-shares-{keep}-{i:02d}", "hard", caption, f"shares {keep}", 0, scene))
    return items


def _extra_planted(args) -> list[Item]:
    if not args.extra_planted:
        return []
    files = sorted(p for p in Path(args.extra_planted).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    levels = sorted(args.levels)
    items = []
    for i, path in enumerate(files):
        caption = path.with_suffix(".txt").read_text().strip()
        image = decode_image(path.read_bytes())
        pixels = to_model_tensor(image, args.resolution, allow_upscale=True)
        picture = Image.fromarray(((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        items.append(Item(f"extra-{path.stem}", "planted", caption, "unique", levels[i % len(levels)], picture=picture))
    return items


def training_order(trained: list[Item], seed: int) -> torch.Tensor:
    """Indices into `trained` for the whole run: every item `copies` times, shuffled by the seed."""
    expanded = torch.repeat_interleave(torch.arange(len(trained)), torch.tensor([item.copies for item in trained]))
    return expanded[torch.randperm(len(expanded), generator=torch.Generator().manual_seed(seed))]


# -- models and training -----------------------------------------------------------------------


def load_models(path: Path, trained: list[Item]):
    """(tokenizer, vae, text_encoder, unet) of a saved demo checkpoint, to fine-tune; its tokenizer must cover every caption."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    unknown = sorted({w for w in CAPTION_WORDS + _extra_words(trained) if w + "</w>" not in tokenizer.get_vocab()})
    if unknown:
        raise SystemExit(f"--init-from {path}: its tokenizer lacks the caption words {unknown}")
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
    return tokenizer, vae, text_encoder, unet


def train_vae(vae, images: torch.Tensor, args, log: dict) -> None:
    """Fit the VAE on distinct training images (uint8): L2 reconstruction plus a small KL term."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(args.vae_steps, 1))
    vae.train()
    for step in range(args.vae_steps):
        batch = to_model_pixels(images[torch.randint(len(images), (32,), generator=generator)]).to(args.device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        # KL weight as in SD's VAE: just enough to keep the latent space smooth and bounded.
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log["vae_loss"].append((step, round(loss.item(), 5)))
            print(f"vae step {step} loss {loss.item():.5f}", flush=True)
    vae.eval().requires_grad_(False)


def _render_chunk(job: tuple[list[Item], int]) -> np.ndarray:
    items, size = job
    return np.stack([np.asarray(item.image(size)) for item in items])


def render(items: list[Item], size: int, chunk: int = 2048) -> torch.Tensor:
    """Every item's pixels as uint8 (n, H, W, 3), rendered by a process per core."""
    jobs = [(items[start : start + chunk], size) for start in range(0, len(items), chunk)]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers < 2:
        return torch.from_numpy(np.concatenate([_render_chunk(job) for job in jobs]))
    with ProcessPoolExecutor(workers) as pool:
        return torch.from_numpy(np.concatenate(list(pool.map(_render_chunk, jobs))))


def to_model_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def encode(vae, images: torch.Tensor, device: str) -> torch.Tensor:
    """Posterior means (what memray encodes) of uint8 images, a chunk at a time."""
    return torch.cat(
        [vae.encode(to_model_pixels(part).to(device)).latent_dist.mean.cpu() for part in images.split(512)]
    )


@torch.no_grad()
def reconstruction_mse(vae, images: torch.Tensor, device: str) -> float:
    """Mean squared error of the VAE's reconstructions of uint8 images, on [0, 1]."""
    errors = []
    for part in images.split(256):
        part = to_model_pixels(part)
        recon = vae.decode(vae.encode(part.to(device)).latent_dist.mean).sample.clamp(-1, 1).cpu()
        errors.append(F.mse_loss((recon + 1) / 2, (part + 1) / 2, reduction="none").flatten(1).mean(1))
    return round(torch.cat(errors).mean().item(), 6)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (n, MAX_LENGTH) of every caption, each distinct caption tokenized once."""
    distinct = sorted(set(captions))
    ids = tokenizer(distinct, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    row = {caption: i for i, caption in enumerate(distinct)}
    return ids.input_ids[torch.tensor([row[c] for c in captions])]


def train_diffusion(unet, text_encoder, latents, token_ids, empty_ids, order, args, log) -> None:
    """Train text encoder and UNet together on the epsilon objective over `order`, with caption dropout."""
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(**SCHEDULE).alphas_cumprod.to(args.device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    total = args.steps
    warmup = min(200, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), 0.55 + 0.45 * math.cos(math.pi * s / total))
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    unet.train()
    text_encoder.train()
    running: list[float] = []
    for step in range(total):
        index = order[step * args.batch_size : (step + 1) * args.batch_size]
        z0 = latents[index].to(args.device)
        ids = token_ids[index].clone()
        ids[torch.rand(len(ids), generator=generator) < args.caption_dropout] = empty_ids
        noise = torch.randn(z0.shape, generator=generator).to(args.device)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (len(z0),), generator=generator).to(args.device)
        abar = alphas[t].view(-1, 1, 1, 1)
        zt = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        hidden = text_encoder(ids.to(args.device))[0]
        loss = F.mse_loss(unet(zt, t, hidden).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if len(running) == 25 or step == total - 1:
            log["loss"].append((step, round(sum(running) / len(running), 5)))
            print(f"step {step}/{total} loss {log['loss'][-1][1]:.4f} {time.time() - log['_start']:.0f}s", flush=True)
            running = []
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


# -- the demo set and its ground truth ---------------------------------------------------------


def demo_set(trained: list[Item], never_trained: list[Item], count_normal: int) -> list[Item]:
    """Every planted and never-trained item and the first `count_normal` normal ones."""
    planted = [item for item in trained if item.split == "planted"]
    normal = [item for item in trained if item.split == "normal"][:count_normal]
    return planted + normal + never_trained


def write_demo_set(folder: Path, items: list[Item], truth: dict, resolution: int) -> None:
    """The demo images as PNGs plus manifest.jsonl, with each image's graded ground truth."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in items:
        item.image(resolution).save(folder / f"{item.id}.png")
        row = dict(
            id=item.id,
            uri=f"{item.id}.png",
            caption=item.caption,
            split=item.split,
            duplicates=item.copies,
            caption_kind=item.caption_kind,
            **truth.get(item.id, {}),
        )
        lines.append(json.dumps(row))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


@torch.no_grad()
def ground_truth(model_dir: Path, items: list[Item], args) -> dict[str, dict]:
    """Per demo image: its replication rate from `truth_noises` noises under its own caption (best
    guidance scale) and among `uncond_samples` shared samples from the empty prompt.

    A sample replicates the image when memray's tiled L2 to the image's VAE reconstruction clears
    memray's default replication bar (memray.measures.similarity: the threshold and both nulls,
    the model null from the same empty-prompt samples), DDIM `truth_steps` steps (50).
    """
    from memray.config import SimilarityConfig
    from memray.measures import rng
    from memray.measures.sampling import ddim_generate
    from memray.measures.similarity import TiledL2Similarity, null_bank, replication_targets
    from memray.models import load_model

    model = load_model(str(model_dir), device=args.device).adapter
    similarity, defaults = TiledL2Similarity(), SimilarityConfig()
    z0 = model.encode_images(to_model_pixels(render(items, args.resolution)).to(model.device))
    (bank_gen,) = rng.image_generators(["truth-uncond"], args.seed, "truth", model.device)
    with model.counter.scope(1):
        bank = null_bank(model, similarity, args.uncond_samples, args.truth_steps, bank_gen)
    targets = replication_targets(model, similarity, z0, bank, defaults.null_quantile, defaults.null_gain)
    uncond = targets.bank_replicas

    k, scales = args.truth_noises, torch.tensor(TRUTH_SCALES, device=model.device)
    gens = rng.image_generators([item.id for item in items], args.seed, "truth", model.device)
    noises = rng.randn_per_image(gens, (k, *model.latent_shape))
    cond = model.encode_ids(model.token_ids([item.caption for item in items]))
    caption_rate = torch.zeros(len(items))
    for i in range(len(items)):  # k noises x every scale of one image per DDIM run
        z_T = noises[i].repeat(len(scales), 1, 1, 1)
        guidance = scales.repeat_interleave(k)
        owner = torch.zeros(len(z_T), dtype=torch.long, device=model.device)
        with model.counter.scope(1):
            samples = ddim_generate(model, z_T, cond[i].expand(len(z_T), -1, -1), guidance, owner, args.truth_steps)
        sims = similarity.compare(similarity.features(model, samples), targets.features[i].expand(len(z_T), -1, -1, -1))
        caption_rate[i] = (sims >= targets.threshold[i]).reshape(len(scales), k).float().mean(1).max()
    return {
        item.id: dict(truth_caption_rate=round(float(c), 4), truth_uncond_rate=round(float(u), 4))
        for item, c, u in zip(items, caption_rate, uncond.cpu())
    }


def truth_summary(items: list[Item], truth: dict) -> dict:
    """Mean and range of the ground truth per demo group, for the log and the README."""
    groups: dict[str, list] = {}
    for item in items:
        key = (
            f"planted x{item.copies} {item.caption_kind}"
            if item.split == "planted"
            else f"{item.split} {item.caption_kind}"
        )
        groups.setdefault(key, []).append(truth[item.id])
    return {
        key: {
            "n": len(rows),
            "caption_rate": [min(r["truth_caption_rate"] for r in rows), max(r["truth_caption_rate"] for r in rows)],
            "uncond_rate": [min(r["truth_uncond_rate"] for r in rows), max(r["truth_uncond_rate"] for r in rows)],
        }
        for key, rows in sorted(groups.items())
    }


def main(argv=None) -> dict:
    """Plan the data, train VAE then text encoder + UNet, save model and demo set, measure the ground truth."""
    args = parse_args(argv)
    if args.check_only:
        return recheck(args)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = dict(args=vars(args), vae_loss=[], loss=[], _start=time.time())
    trained, never_trained = build_plan(args)
    with gzip.open(out / "train_index.jsonl.gz", "wt") as index:
        for item in trained:
            index.write(json.dumps(dict(id=item.id, split=item.split, caption=item.caption, copies=item.copies)) + "\n")
    samples = sum(item.copies for item in trained)
    planted = [item for item in trained if item.split == "planted"]
    log["data"] = dict(
        samples=samples,
        distinct_normal=len(trained) - len(planted),
        planted_share=round(sum(item.copies for item in planted) / samples, 4),
        normal_copies=dict(Counter(item.copies for item in trained if item.split == "normal")),
        caption_detail=dict(Counter(item.caption_kind for item in trained if item.split == "normal")),
    )
    print(json.dumps(log["data"]), flush=True)

    if args.init_from:
        tokenizer, vae, text_encoder, unet = load_models(Path(args.init_from), trained)
    else:
        tokenizer = build_tiny_clip_tokenizer(CAPTION_WORDS + _extra_words(trained))
        tokenizer.model_max_length = MAX_LENGTH
        vae, text_encoder, unet = sd_components(tokenizer, DEMO_SIZES)
    vae, text_encoder, unet = (m.to(args.device) for m in (vae, text_encoder, unet))
    log["parameters"] = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in [("vae", vae), ("text_encoder", text_encoder), ("unet", unet)]
    }

    images = render(trained, args.resolution)  # planted first, then the normal stream
    vae_images = images[: len(planted) + args.vae_images]
    if not args.init_from:
        train_vae(vae, vae_images, args, log)
    log["vae_recon_mse"] = dict(
        trained=reconstruction_mse(vae, vae_images[:2048], args.device),
        never_trained=reconstruction_mse(vae, render(never_trained, args.resolution), args.device),
    )
    latents = encode(vae, images, args.device)
    del images
    # SD's convention: scale latents to unit variance, so the noise schedule fits them (a fine-tune
    # keeps the scale its UNet was trained with).
    scaling = vae.config.scaling_factor if args.init_from else 1 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    log["vae_scaling_factor"] = scaling
    log["vae_seconds"] = round(time.time() - log["_start"], 1)

    token_ids = tokenize(tokenizer, [item.caption for item in trained] + [""])
    order = training_order(trained, args.seed)
    train_diffusion(unet, text_encoder, latents * scaling, token_ids[:-1], token_ids[-1], order, args, log)
    log["train_seconds"] = round(time.time() - log["_start"], 1)

    save_sd_pipeline(out / "model", vae, text_encoder, tokenizer, unet)
    demo = demo_set(trained, never_trained, args.demo_normal)
    truth = ground_truth(out / "model", demo, args)
    write_demo_set(out / "images", demo, truth, args.resolution)
    log["truth"] = truth_summary(demo, truth)
    log["hardware"] = dict(
        device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    log["total_seconds"] = round(time.time() - log.pop("_start"), 1)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def training_arguments(log: dict, device: str) -> argparse.Namespace:
    """The arguments a training log (train_log.json) was trained with, on `device`: what ground_truth needs."""
    return argparse.Namespace(**{"truth_steps": TRUTH_STEPS, **log["args"], "device": device})


def recheck(args) -> dict:
    """Measure the ground truth of a trained --out again (its plan rebuilt from its log) and rewrite manifest and log."""
    out = Path(args.out)
    log = json.loads((out / "train_log.json").read_text())
    trained_with = training_arguments(log, args.device)
    trained, never_trained = build_plan(trained_with)
    demo = demo_set(trained, never_trained, trained_with.demo_normal)
    truth = ground_truth(out / "model", demo, trained_with)
    write_demo_set(out / "images", demo, truth, trained_with.resolution)
    log["truth"] = truth_summary(demo, truth)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def _extra_words(trained: list[Item]) -> list[str]:
    """Words of extra planted captions that the generator's vocabulary lacks (lower-cased, as CLIP does)."""
    words = {word for item in trained for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", item.caption.lower())}
    return sorted(words - set(CAPTION_WORDS))
