"""How alike a generated sample is to the target (SSCD, tiled L2, latent L2), and how alike it
must be before it counts as a replica of *this* image.

Every kind maps a pair to a similarity where 1 means identical and larger means more alike, in
three steps: `view` (what it looks at: decoded pixels, or the latents), `embed` (the features
it compares: the pixels themselves, SSCD descriptors) and `compare`.

An absolute threshold alone confuses "like this image" with "like anything plain": a dark or
near-uniform target is close in tiled L2 to any dark or uniform generation. So each target gets
two nulls, similarities that no copy of it is needed to reach (docs/science.md, "replication"):
- content null: the target against itself with its detail removed (each tile replaced by its
  mean colour, then encoded and decoded like every generation, so the decoder's own texture is
  in both). A generation with the right colours in the right places and nothing else reaches
  it; for a near-uniform target it is about 1, so such a target can never replicate.
- model null: a high quantile of the target against the model's own samples from the empty
  prompt and N(0, I) noise that are not copies of it, generations that have nothing to do with
  it (SSCD's score normalisation against a background set, with the model's output as the
  background). The share of those samples that are copies is the unconditional replication rate.
A replica must also be much closer to the target than its nulls are: it must remove at least a
share `null_gain` of the distance (1 - similarity) that each null leaves,
    replicated  <=>  similarity >= max(threshold, 1 - (1 - null_gain) * (1 - null)) for both nulls.
The relative form needs no per-kind margin and tightens where a null is already close: a target
whose detail-free version reaches 0.98 needs a 0.99 replica.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=2)
def _load_torchscript(path: str) -> torch.jit.ScriptModule:
    """Load a TorchScript network once per process (audits build a similarity per batch)."""
    return torch.jit.load(path, map_location="cpu").eval()


class _Similarity:
    """Shared by the kinds: features of latents, and the plain pairwise similarity."""

    tiles: int = 4
    in_pixels: bool = True  # views decoded pixels (else the latents themselves)

    def features(self, model, z0: torch.Tensor) -> torch.Tensor:
        """The features `compare` takes, for a batch of latents z0."""
        return self.embed(self.view(model, z0))

    def content_features(self, model, z0: torch.Tensor) -> torch.Tensor:
        """Features of each target with its detail removed: the tile means of its view, and for pixel
        views encoded and decoded again, as every generation is."""
        flat = detail_free(self.view(model, z0), self.tiles)
        return self.features(model, model.encode_images(flat)) if self.in_pixels else self.embed(flat)

    def __call__(self, model, generated_z0: torch.Tensor, target_z0: torch.Tensor) -> torch.Tensor:
        return self.compare(self.features(model, generated_z0), self.features(model, target_z0))


@dataclass
class SSCDSimilarity(_Similarity):
    """Cosine similarity of SSCD copy-detection descriptors (a TorchScript file the user provides)."""

    path: str
    threshold: float = 0.5
    kind: str = "sscd"

    def __post_init__(self):
        self.network = _load_torchscript(self.path)

    def view(self, model, z0):
        return model.decode_latents(z0)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> L2-normalised SSCD descriptors at 320x320 with ImageNet statistics."""
        self.network.to(pixels.device)
        x = F.interpolate((pixels + 1) / 2, size=(320, 320), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        with torch.no_grad():
            return F.normalize(self.network((x - mean) / std).float(), dim=-1)

    def compare(self, generated, target):
        return (generated * target).sum(-1)


@dataclass
class TiledL2Similarity(_Similarity):
    """1 - the largest per-tile RMS pixel difference (pixels in [0, 1]), Carlini et al.'s tiled L2."""

    tiles: int = 4
    threshold: float = 0.9
    kind: str = "tiled_l2"

    def view(self, model, z0):
        return model.decode_latents(z0)

    def embed(self, pixels):
        return pixels

    def compare(self, generated, target):
        return tiled_l2_similarity(generated, target, self.tiles)


def tiled_l2_similarity(generated: torch.Tensor, target: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """1 - the largest per-tile RMS difference of two image batches in [-1, 1] (N, C, H, W), on a [0, 1] scale."""
    diff = (generated - target) / 2
    n, c, h, w = diff.shape
    th, tw = h // tiles, w // tiles
    parts = diff[:, :, : th * tiles, : tw * tiles].reshape(n, c, tiles, th, tiles, tw)
    rms = parts.square().mean(dim=(1, 3, 5)).sqrt()
    return 1 - rms.flatten(1).amax(1)


@dataclass
class LatentL2Similarity(_Similarity):
    """1 - ||z_gen - z0|| / ||z0||: the z0 error in the model's own space, no decoding needed."""

    threshold: float = 0.5
    kind: str = "latent_l2"
    in_pixels: bool = False

    def view(self, model, z0):
        return z0

    def embed(self, latents):
        return latents

    def compare(self, generated, target):
        return 1 - (generated - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)


def detail_free(images: torch.Tensor, tiles: int) -> torch.Tensor:
    """Each of tiles x tiles cells replaced by its mean (N, C, H, W): the image with its detail removed."""
    n, c, h, w = images.shape
    th, tw = h // tiles, w // tiles
    cells = images[:, :, : th * tiles, : tw * tiles].reshape(n, c, tiles, th, tiles, tw).mean(dim=(3, 5))
    out = images.clone()
    out[:, :, : th * tiles, : tw * tiles] = cells.repeat_interleave(th, 2).repeat_interleave(tw, 3)
    return out


def build_similarity(kind: str, *, threshold: float | None = None, sscd_path: str | None = None):
    """The similarity the configuration names; its default threshold unless one is given."""
    if kind == "sscd":
        if not sscd_path:
            raise ValueError("similarity 'sscd' needs the path of an SSCD TorchScript file (sscd_path)")
        similarity = SSCDSimilarity(sscd_path)
    elif kind == "tiled_l2":
        similarity = TiledL2Similarity()
    elif kind == "latent_l2":
        similarity = LatentL2Similarity()
    else:
        raise ValueError(f"unknown similarity {kind!r}; expected sscd, tiled_l2 or latent_l2")
    if threshold is not None:
        similarity.threshold = threshold
    return similarity


@dataclass
class Targets:
    """What a replication check compares against, per image: features and the bar to clear."""

    features: torch.Tensor  # (B, ...) the similarity's features of each target
    content_null: torch.Tensor  # (B,)
    model_null: torch.Tensor  # (B,) nan without a null bank, or where every bank sample is a replica
    threshold: torch.Tensor  # (B,) the bar: max(threshold, each null's share) (module docstring)
    bank_replicas: torch.Tensor  # (B,) share of the bank's samples that replicate the target (nan without one)

    def __getitem__(self, rows) -> Targets:
        return Targets(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def null_level(self) -> torch.Tensor:
        """The higher of each image's nulls (content, model) on the CPU, 0 where neither was measured."""
        nulls = torch.stack([self.content_null, self.model_null]).cpu().nan_to_num(nan=-torch.inf).amax(0)
        return torch.where(nulls.isinf(), torch.zeros_like(nulls), nulls)

    def progress(self, similarity: torch.Tensor) -> torch.Tensor:
        """progress_to_bar of each image's similarity (B,), on the CPU."""
        return progress_to_bar(similarity.cpu(), self.null_level(), self.threshold.cpu())


def progress_to_bar(similarity, null, bar):
    """(similarity - null) / (bar - null): the share of the way from an unrelated generation (its null
    level) to a replica (its bar), so that one scale reads the same for every kind of similarity."""
    return (similarity - null) / (bar - null)


@torch.no_grad()
def null_bank(model, similarity, count: int, num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """Features of `count` samples from the empty prompt and N(0, I) noise (DDIM, eta 0): the model null.

    Generated once per model and configuration; `generator` fixes the noises, so every image of
    an audit is held to the same bank whatever batch or actor it runs in. A sample that is not
    finite would silently lift every image's bar, so it is an error.
    """
    from memray.measures.sampling import ddim_generate

    noise = torch.randn((count, *model.latent_shape), generator=generator, device=generator.device)
    noise = noise.to(model.device)
    cond = model.empty_condition(count) if model.is_conditional else None
    guidance = torch.ones(count, device=model.device)
    owner = torch.zeros(count, dtype=torch.long, device=model.device)
    features = []
    for part in range(0, count, model.max_batch):
        rows = slice(part, part + model.max_batch)
        c = None if cond is None else cond[rows]
        z0 = ddim_generate(model, noise[rows], c, guidance[rows], owner[rows], num_steps)
        features.append(similarity.features(model, z0))
    bank = torch.cat(features)
    bad = int((~bank.flatten(1).isfinite().all(1)).sum())
    if bad:
        raise ValueError(f"{bad} of the model's {count} empty-prompt samples are not finite: no model null")
    return bank


def null_bar(similarity, null: torch.Tensor, gain: float | None) -> torch.Tensor:
    """The similarity a replica needs: max(threshold, 1 - (1 - gain) * (1 - null)).

    A nan null (none measured), or gain None (the reference's absolute threshold alone), sets no
    bar beyond the threshold.
    """
    if gain is None:
        return torch.full_like(null, float(similarity.threshold))
    bar = 1 - (1 - gain) * (1 - torch.nan_to_num(null, nan=-torch.inf))
    return bar.clamp_min(similarity.threshold)


@torch.no_grad()
def replication_targets(
    model, similarity, z0: torch.Tensor, bank: torch.Tensor | None, quantile: float, gain: float | None
) -> Targets:
    """Features, nulls and bar of B targets; `bank` from null_bank (None: content null only).

    The model null is the `quantile` of the target's similarity to the bank samples that do not
    replicate it (clear the threshold and the content null's bar): a copy has everything to do
    with the target, so a model that copies an image often does not lift that image's own bar.
    The share of copies is the image's unconditional replication rate. The nulls are measured
    whatever `gain`; with gain None they set no bar (null_bar).
    """
    features = similarity.features(model, z0)
    content = similarity.compare(similarity.content_features(model, z0), features)
    content_bar = null_bar(similarity, content, gain)
    nan = torch.full_like(content, torch.nan)
    model_null, replicas = nan, nan
    if bank is not None and len(bank):
        sims = torch.stack([similarity.compare(bank, f.expand_as(bank)) for f in features])  # (B, M)
        copies = sims >= content_bar.unsqueeze(1)
        replicas = copies.float().mean(1)
        model_null = torch.where(copies, torch.nan, sims).nanquantile(quantile, dim=1)
    threshold = torch.maximum(content_bar, null_bar(similarity, model_null, gain))
    return Targets(features, content, model_null, threshold, replicas)
