"""Train the demo text-to-image model with planted memorization: the images it memorizes are known.

Data: scenes from memray.demo's deterministic generator. "normal" images are seen once per epoch,
"planted" images are duplicated (default 4, 16, 64, 256 copies, each with its own caption),
"held-out" images come from the same generator and are never trained on. Extra planted images can
be read from a folder (image files with same-stem .txt captions); they take the duplication
levels in turn.

The model is a small latent diffusion model in the Stable Diffusion layout (AutoencoderKL with
a factor-4 downsampling, CLIP text encoder with a word-level BPE tokenizer, UNet2DConditionModel,
DDIM scheduler), so memray loads it through the same path as a real SD checkpoint. The VAE is
trained first, then frozen; the text encoder and UNet train together on the DDPM epsilon objective
with 10% caption dropout, so the unconditional branch and classifier-free guidance exist.

Writes to --out: model/ (diffusers layout, safetensors), images/ (the demo set: PNGs and
manifest.jsonl with id, uri, caption, split, duplicates), train_index.jsonl (every trained image),
train_log.json (settings, losses, VAE reconstruction error, replication check, timings).

    nice -n 10 python jobs/train_demo_model.py --out memray/demo_assets
    python jobs/train_demo_model.py --smoke --out /tmp/demo-smoke      # about a minute on CPU
    python jobs/train_demo_model.py --check-only --out memray/demo_assets   # rerun the replication check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from memray.demo import CAPTION_WORDS, generated_scene, render_scene, scene_caption
from memray.models.tiny import build_tiny_clip_tokenizer, save_sd_pipeline, sd_schedule

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_LENGTH = 32  # tokens incl. start and end: the longest generated caption needs 24
DEMO_NORMAL = 12  # normal images copied into the demo set (all planted and held-out ones are)
SCHEDULE = sd_schedule()  # SD 1.x: scaled-linear betas, epsilon prediction


@dataclass
class Item:
    """One distinct image with its caption, split and number of copies in the training set."""

    id: str
    split: str  # planted, normal or heldout
    caption: str
    duplicates: int  # copies per epoch; 0 for held-out
    image: Image.Image


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; --smoke shrinks everything to a CI-sized run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="+", default=[4, 16, 64, 256], help="planted duplication levels")
    parser.add_argument("--planted-per-level", type=int, default=3)
    parser.add_argument("--normal", type=int, default=2000, help="normal training images, seen once per epoch")
    parser.add_argument("--heldout", type=int, default=12, help="held-out images written to the demo set")
    parser.add_argument("--extra-planted", help="folder of extra planted images with same-stem .txt captions")
    parser.add_argument("--epochs", type=int, default=70)
    parser.add_argument("--steps", type=int, help="UNet training steps (overrides --epochs)")
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--resolution", type=int, default=32, help="image side; latents are a quarter of it")
    parser.add_argument("--check-samples", type=int, default=4, help="samples per demo image in the replication check")
    parser.add_argument(
        "--init-from",
        help="fine-tune this demo checkpoint (its VAE stays frozen and untrained, its tokenizer is kept): "
        "a later checkpoint of the same model, e.g. with more images planted through --extra-planted",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration that runs in about a minute")
    parser.add_argument(
        "--check-only", action="store_true", help="rerun the replication check of the model in --out and update its log"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.smoke:
        args.planted_per_level, args.normal, args.heldout = 1, 48, 4
        args.steps, args.vae_steps, args.batch_size, args.check_samples = 40, 20, 16, 1
    return args


def build_dataset(args) -> list[Item]:
    """Planted, normal and held-out items, each a pure function of (seed, index)."""
    normal = [_generated(args, "normal", i, 1) for i in range(args.normal)]
    heldout = [_generated(args, "heldout", i, 0) for i in range(args.heldout)]
    # Planted captions must be unique in the training set, or the copies would teach a caption
    # that other images share; two-group scenes make collisions rare, and the rest are skipped.
    taken = {item.caption for item in normal}
    planted, index = [], 0
    for level in sorted(args.levels):
        while len([p for p in planted if p.duplicates == level]) < args.planted_per_level:
            scene = generated_scene(args.seed, "planted", index)
            if len(scene.groups) == 2 and scene_caption(scene) not in taken:
                taken.add(scene_caption(scene))
                planted.append(_generated(args, "planted", index, level))
            index += 1
    return planted + _extra_planted(args) + normal + heldout


def _generated(args, stream: str, index: int, duplicates: int) -> Item:
    scene = generated_scene(args.seed, stream, index)
    split = "heldout" if stream == "heldout" else stream
    name = f"planted-x{duplicates}-{index:04d}" if stream == "planted" else f"{stream}-{index:05d}"
    return Item(name, split, scene_caption(scene), duplicates, render_scene(scene, args.resolution))


def _extra_planted(args) -> list[Item]:
    if not args.extra_planted:
        return []
    files = sorted(p for p in Path(args.extra_planted).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    levels = sorted(args.levels)
    items = []
    for i, path in enumerate(files):
        caption = path.with_suffix(".txt").read_text().strip()
        image = _square(Image.open(path).convert("RGB"), args.resolution)
        items.append(Item(f"extra-{path.stem}", "planted", caption, levels[i % len(levels)], image))
    return items


def _square(image: Image.Image, size: int) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def training_order(trained: list[Item], seed: int, epoch: int) -> list[int]:
    """Indices into `trained` for one epoch: every item `duplicates` times, shuffled by (seed, epoch)."""
    expanded = torch.tensor([i for i, item in enumerate(trained) for _ in range(item.duplicates)])
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return expanded[torch.randperm(len(expanded), generator=generator)].tolist()


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images as a float tensor in [-1, 1], N x 3 x H x W."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def build_models(resolution: int, vocab_size: int, tokenizer):
    """A fresh VAE (factor 4, 4 latent channels), CLIP text encoder and cross-attention UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    return vae, text_encoder, unet


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


def train_vae(vae, pixels: torch.Tensor, args, log: dict) -> None:
    """Fit the VAE on the distinct training images: L2 reconstruction plus a small KL term."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(args.vae_steps, 1))
    vae.train()
    for step in range(args.vae_steps):
        batch = pixels[torch.randint(len(pixels), (32,), generator=generator)].to(args.device)
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


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means (what memray encodes) and reconstructions, in batches."""
    means, recons = [], []
    for chunk in pixels.split(256):
        mean = vae.encode(chunk.to(device)).latent_dist.mean
        means.append(mean.cpu())
        recons.append(vae.decode(mean).sample.clamp(-1, 1).cpu())
    return torch.cat(means), torch.cat(recons)


def train_diffusion(unet, text_encoder, latents, token_ids, trained, args, log) -> None:
    """Train text encoder and UNet together on the epsilon objective, with 10% caption dropout."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**SCHEDULE)
    alphas = noise_scheduler.alphas_cumprod.to(args.device)
    empty_ids = token_ids[-1]  # the last row is the empty caption
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = max(len(training_order(trained, args.seed, 0)) // args.batch_size, 1)
    total = args.steps or args.epochs * steps_per_epoch
    warmup = min(200, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), 0.55 + 0.45 * math.cos(math.pi * s / total))
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    unet.train()
    text_encoder.train()
    running: list[float] = []
    order: list[int] = []
    for step in range(total):
        if len(order) < args.batch_size:
            order += training_order(trained, args.seed, step // steps_per_epoch + 1)
        index, order = torch.tensor(order[: args.batch_size]), order[args.batch_size :]
        z0 = latents[index].to(args.device)
        ids = token_ids[index].clone()
        ids[torch.rand(len(ids), generator=generator) < 0.1] = empty_ids
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


def write_demo_set(folder: Path, items: list[Item]) -> None:
    """The demo images as PNGs plus manifest.jsonl (id, uri, caption, split, duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in items:
        item.image.save(folder / f"{item.id}.png")
        row = dict(id=item.id, uri=f"{item.id}.png", caption=item.caption, split=item.split, duplicates=item.duplicates)
        lines.append(json.dumps(row))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def demo_subset(items: list[Item]) -> list[Item]:
    """Every planted and held-out item and the first DEMO_NORMAL normal ones."""
    normal = [item for item in items if item.split == "normal"][:DEMO_NORMAL]
    return [item for item in items if item.split != "normal"] + normal


@torch.no_grad()
def replication_check(model_dir: Path, items: list[Item], args) -> dict:
    """Generate from each demo caption with diffusers (DDIM 50 steps, guidance 5) and compare with the image.

    The similarity is memray's tiled L2 against the VAE's reconstruction of the image (what memray
    compares with, so the VAE's own error does not count). Per split / duplication level: the mean
    of each image's best and worst sample, and the fraction of images whose worst sample reaches
    memray's default threshold (0.9), i.e. replicated from the caption by every sample.
    """
    from diffusers import StableDiffusionPipeline

    from memray.measures.similarity import TiledL2Similarity, tiled_l2_similarity

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    _, recons = encode(pipe.vae, to_tensor([item.image for item in items]), args.device)
    rows = {}
    for item, recon in zip(items, recons):
        generator = torch.Generator().manual_seed(args.seed)
        samples = pipe(
            [item.caption] * args.check_samples,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=50,
            guidance_scale=5.0,
            generator=generator,
            output_type="pt",
        ).images  # in [0, 1]
        similarity = tiled_l2_similarity(samples * 2 - 1, recon.expand_as(samples).to(samples))
        rows[item.id] = dict(group=_group(item), best=similarity.max().item(), worst=similarity.min().item())
    threshold = TiledL2Similarity().threshold
    summary = {}
    for group in sorted({row["group"] for row in rows.values()}):
        members = [row for row in rows.values() if row["group"] == group]
        summary[group] = dict(
            n=len(members),
            mean_best=round(float(np.mean([row["best"] for row in members])), 3),
            mean_worst=round(float(np.mean([row["worst"] for row in members])), 3),
            replicated=sum(row["worst"] >= threshold for row in members) / len(members),
        )
    return dict(similarity="tiled_l2 vs VAE reconstruction", per_image=rows, summary=summary)


def _group(item: Item) -> str:
    return f"planted-x{item.duplicates:03d}" if item.split == "planted" else item.split


def main(argv=None) -> dict:
    """Build the data, train VAE then text encoder + UNet, save model, demo set and logs; return the log."""
    args = parse_args(argv)
    if args.check_only:
        return recheck(args)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = dict(args=vars(args), vae_loss=[], loss=[], _start=time.time())
    items = build_dataset(args)
    trained = [item for item in items if item.duplicates > 0]
    (out / "train_index.jsonl").write_text(
        "".join(
            json.dumps(dict(id=i.id, split=i.split, caption=i.caption, duplicates=i.duplicates)) + "\n" for i in trained
        )
    )
    if args.init_from:
        tokenizer, vae, text_encoder, unet = load_models(Path(args.init_from), trained)
    else:
        tokenizer = build_tiny_clip_tokenizer(CAPTION_WORDS + _extra_words(trained))
        tokenizer.model_max_length = MAX_LENGTH
        vae, text_encoder, unet = build_models(args.resolution, len(tokenizer), tokenizer)
    vae, text_encoder, unet = (m.to(args.device) for m in (vae, text_encoder, unet))
    log["parameters"] = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in [("vae", vae), ("text_encoder", text_encoder), ("unet", unet)]
    }

    pixels = to_tensor([item.image for item in trained])
    if not args.init_from:
        train_vae(vae, pixels, args, log)
    heldout = [item for item in items if item.split == "heldout"]
    log["vae_recon_mse"] = {}
    for name, group in (("trained", pixels), ("heldout", to_tensor([i.image for i in heldout]))):
        recon = encode(vae, group, args.device)[1]
        log["vae_recon_mse"][name] = round(F.mse_loss((recon + 1) / 2, (group + 1) / 2).item(), 6)  # on [0, 1]
    latents = encode(vae, pixels, args.device)[0]
    # SD's convention: scale latents to unit variance, so the noise schedule fits them (a fine-tune
    # keeps the scale its UNet was trained with).
    scaling = vae.config.scaling_factor if args.init_from else 1 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    log["vae_scaling_factor"] = scaling
    log["vae_seconds"] = round(time.time() - log["_start"], 1)

    token_ids = tokenizer(
        [i.caption for i in trained] + [""],
        padding="max_length",
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    train_diffusion(unet, text_encoder, latents * scaling, token_ids, trained, args, log)
    log["train_seconds"] = round(time.time() - log["_start"], 1)

    save_sd_pipeline(out / "model", vae, text_encoder, tokenizer, unet)
    demo = demo_subset(items)
    write_demo_set(out / "images", demo)
    if args.check_samples:
        log["replication"] = replication_check(out / "model", demo, args)
    log["hardware"] = dict(
        device=args.device,
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    log["total_seconds"] = round(time.time() - log.pop("_start"), 1)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def recheck(args) -> dict:
    """Rerun the replication check of a trained --out on its demo set (rebuilt from its log) and update the log."""
    out = Path(args.out)
    log = json.loads((out / "train_log.json").read_text())
    trained_with = argparse.Namespace(**{**log["args"], "device": args.device, "check_samples": args.check_samples})
    log["replication"] = replication_check(out / "model", demo_subset(build_dataset(trained_with)), trained_with)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def _extra_words(trained: list[Item]) -> list[str]:
    """Words of extra planted captions that the generator's vocabulary lacks (lower-cased, as CLIP does)."""
    words = {word for item in trained for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", item.caption.lower())}
    return sorted(words - set(CAPTION_WORDS))


if __name__ == "__main__":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    summary = main().get("replication", {}).get("summary")
    print(json.dumps(summary, indent=1))
