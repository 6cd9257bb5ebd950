"""What an InvMM audit costs on this machine: UNet throughput, FLOP utilisation, images per hour, memory.

    python jobs/benchmark_throughput.py --arch demo                      # the shipped demo model (CPU: a minute)
    python jobs/benchmark_throughput.py --arch demo sd15 sd21 --precision bf16 --slots 8    # on a GPU

Architectures: `demo` (the trained demo model) and the real-size networks of
memray/models/architectures (`sd15`, `sd21`), built with random weights (an evaluation costs the
same whatever the weights). For each, at InvMM's step shape (slots x samples_per_step samples):
UNet sample-evaluations per second forward and forward+backward (the backward reaches the input,
as InvMM's does), FLOPs per sample-evaluation (torch.utils.flop_counter), achieved TFLOP/s and
model-FLOP utilisation against the device's peak, the time of one InvMM optimisation step and of
one failing success check (the real code, not the bare UNet), images per hour at the reference
protocol's budget and at memray's defaults (the early stop and the gate), and peak memory.

`--ratio`: memray's batched loop against a one-image-at-a-time loop written like the reference
(the same UNet evaluations: results do not depend on the batch), on `--ratio-images` images.
Slot occupancy under continuous batching is measured on real images: jobs/calibrate_early_stop.py confirm.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import time

import torch

from memray.config import PRECISIONS, AuditConfig
from memray.measures import rng
from memray.measures.invmm import invmm
from memray.measures.replication import failing_check_forwards, replication_check
from memray.measures.similarity import LatentL2Similarity, replication_targets
from memray.models import autocast_dtype, load_model
from memray.models.architectures import random_weight_adapter

# Dense peak TFLOP/s by device name fragment and precision (vendor datasheets; bf16 and fp16 alike).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}
NEVER = LatentL2Similarity(threshold=2.0)  # latent L2 similarity is at most 1: every check fails, as for most images


def build(arch: str, device: str, precision: str):
    """The adapter of `arch` on `device` (autocast where the precision asks)."""
    if arch == "demo":
        return load_model("demo", device=device, precision=precision).adapter
    return random_weight_adapter(arch, device=device, autocast_dtype=autocast_dtype(precision))


def sync(device: torch.device) -> None:
    """Wait for the device, so a timer sees finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Seconds per call of fn(), after one warm-up call."""
    fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - started) / repeats


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last reset: the GPU's allocator, else this process's resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: torch.device) -> None:
    """Start the GPU's peak-memory counter afresh (the CPU's resident peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def unet_inputs(model, n: int, generator: torch.Generator):
    """A batch of n noisy latents, timesteps, prompt conditionings and owners, as InvMM's step sends."""
    z = torch.randn((n, *model.latent_shape), generator=generator, device=generator.device).to(model.device)
    t = torch.randint(model.num_train_timesteps, (n,), generator=generator, device=generator.device).to(model.device)
    cond = model.empty_condition(n) if model.is_conditional else None
    return z, t, cond, torch.zeros(n, dtype=torch.long, device=model.device)


def flops_per_sample(model, n: int) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs per sample-evaluation, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    z, t, cond, owner = unet_inputs(model, n, torch.Generator(device=model.device).manual_seed(0))
    with model.counter.scope(1), FlopCounterMode(display=False) as forward, torch.no_grad():
        model.predict(z, t, cond, owner)
    z.requires_grad_()
    with model.counter.scope(1), FlopCounterMode(display=False) as both:
        model.predict(z, t, cond, owner).z0.sum().backward()
    return forward.get_total_flops() / n, both.get_total_flops() / n


def unet_throughput(model, n: int, repeats: int) -> tuple[float, float]:
    """Sample-evaluations per second, (forward, forward+backward), at batch n."""
    z, t, cond, owner = unet_inputs(model, n, torch.Generator(device=model.device).manual_seed(1))

    def forward():
        with torch.no_grad():
            model.predict(z, t, cond, owner)

    def forward_backward():
        model.predict(z.detach().requires_grad_(), t, cond, owner).z0.sum().backward()

    with model.counter.scope(1):
        return n / timed(forward, model.device, repeats), n / timed(forward_backward, model.device, repeats)


def images(model, n: int, seed: int = 0) -> torch.Tensor:
    """n latents to invert: random, since the cost of a never-replicating image does not depend on it."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    return torch.randn((n, *model.latent_shape), generator=generator, device=model.device)


def run_invmm(model, z0, config, slots, seed: int = 0) -> int:
    """InvMM on z0 against a bar no generation clears, every image charged to its own slot; the UNet
    sample-evaluations it took."""
    ids = [f"bench-{seed}-{i}" for i in range(len(z0))]
    targets = replication_targets(model, NEVER, z0, None, 0.9, None)
    gens = rng.image_generators(ids, seed, "invmm", model.device)
    owner = torch.arange(len(z0), device=model.device)
    with model.counter.scope(len(z0)) as tally:
        invmm(model, z0, gens, owner, config, NEVER, targets, slots=slots)
    return int(tally.forwards.sum() + tally.backwards.sum())


def step_and_check_seconds(model, config, slots: int, steps: int) -> tuple[float, float]:
    """Seconds of one InvMM optimisation step of `slots` images, and of one failing check of them."""
    z0 = images(model, slots)
    optimise = dataclasses.replace(config, steps=steps, check_every=steps + 1, check_at_start=False, early_stop=False)
    step = timed(lambda: run_invmm(model, z0, optimise, slots), model.device, 1) / steps
    targets = replication_targets(model, NEVER, z0, None, 0.9, None)
    noises = images(model, slots, seed=2).unsqueeze(1).expand(-1, config.check_noises, *model.latent_shape)
    cond = model.empty_condition(slots) if model.is_conditional else None
    owner = torch.arange(slots, device=model.device)

    def check():
        if config.gate_steps:
            replication_check(
                model,
                z0,
                noises[:, :1],
                cond,
                config.guidance_scales,
                NEVER,
                targets,
                owner,
                num_steps=config.gate_steps,
            )
        else:
            replication_check(
                model, z0, noises, cond, config.guidance_scales, NEVER, targets, owner, num_steps=config.sampling_steps
            )

    with model.counter.scope(slots):
        return step, timed(check, model.device, 1)


def checks_until(config, steps: int) -> int:
    """Success checks an image that never replicates meets in `steps` steps (and at the start)."""
    return steps // config.check_every + int(config.check_at_start)


def images_per_hour(config, step: float, check: float, slots: int, steps: int) -> float:
    """Images per hour of `slots` images that never replicate and stop after `steps` steps, from measured times."""
    return 3600 * slots / (steps * step + checks_until(config, steps) * check)


def unet_images_per_hour(config, conditional: bool, forward: float, both: float, steps: int) -> float:
    """The same from the UNet's sample-evaluation rates alone (forward, forward+backward per second)."""
    seconds = steps * config.samples_per_step / both
    forwards = failing_check_forwards(config.guidance_scales, config.gate_steps or config.sampling_steps, conditional)
    seconds += checks_until(config, steps) * forwards / forward
    return 3600 / seconds


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for the precision, where PEAK_TFLOPS knows the device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[precision] for key, p in PEAK_TFLOPS.items() if key in name), None)


def report_architecture(arch: str, args) -> list[str]:
    """One block of the table for one architecture."""
    device = torch.device(args.device)
    reset_peak(device)
    started = time.perf_counter()
    model = build(arch, args.device, args.precision)
    built = time.perf_counter() - started
    default = AuditConfig().invmm
    reference = dataclasses.replace(default, early_stop=False, gate_steps=0)  # the reference protocol
    n = args.batch or args.slots * reference.samples_per_step
    forward_flops, both_flops = flops_per_sample(model, min(n, 2))
    forward, both = unet_throughput(model, n, args.repeats)
    achieved = both * both_flops / 1e12
    peak = args.peak_tflops or peak_tflops(device, args.precision)
    mfu = f"{achieved / peak:.1%}" if peak else "-"
    attention = (
        {type(p).__name__ for p in model.unet.attn_processors.values()}
        if hasattr(model.unet, "attn_processors")
        else set()
    )
    lines = [
        f"{arch}: UNet {sum(p.numel() for p in model.unet.parameters()) / 1e6:.0f}M parameters, latent {tuple(model.latent_shape)}, "
        f"attention {', '.join(sorted(attention)) or '-'}, built in {built:.0f} s",
        f"  UNet sample-evaluations/s at batch {n}: forward {forward:.1f}, forward+backward {both:.1f}",
        f"  GFLOP per sample-evaluation: forward {forward_flops / 1e9:.1f}, forward+backward {both_flops / 1e9:.1f}; "
        f"achieved {achieved:.2f} TFLOP/s in the InvMM step shape, model-FLOP utilisation {mfu}"
        + (f" of {peak:.0f} TFLOP/s" if peak else ""),
        f"  images/h from UNet time (an image that never replicates): reference protocol "
        f"{unet_images_per_hour(reference, model.is_conditional, forward, both, reference.steps):.3g}, "
        f"memray default {unet_images_per_hour(default, model.is_conditional, forward, both, default.stop_after):.3g} "
        f"(stopped at {default.stop_after} steps)",
        f"  peak memory after the UNet lines {peak_memory_gib(device):.1f} GiB",
    ]
    if not args.unet_only:
        step, check = step_and_check_seconds(model, reference, args.slots, args.steps)
        gated = step_and_check_seconds(model, default, args.slots, 1)[1] if default.gate_steps else check
        lines += [
            f"  InvMM loop: one step of {args.slots} images x {reference.samples_per_step} samples {step * 1e3:.0f} ms, "
            f"one failing check {check * 1e3:.0f} ms"
            + (f" ({gated * 1e3:.0f} ms gated)" if default.gate_steps else ""),
            f"  images/h measured on the loop: reference protocol {images_per_hour(reference, step, check, args.slots, reference.steps):.2f}, "
            f"memray default {images_per_hour(default, step, gated, args.slots, default.stop_after):.1f}",
            f"  peak memory after the InvMM loop {peak_memory_gib(device):.1f} GiB",
        ]
    if args.ratio and arch == args.ratio_arch:
        lines += batched_ratio(model, args)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return lines


def batched_ratio(model, args) -> list[str]:
    """memray's batched loop against one image at a time, the same UNet evaluations."""
    config = dataclasses.replace(AuditConfig().invmm, steps=args.steps, check_every=args.steps, early_stop=False)
    z0 = images(model, args.ratio_images)
    evaluations = []
    batched = timed(lambda: evaluations.append(run_invmm(model, z0, config, args.ratio_images)), model.device, 1)
    alone = timed(lambda: [run_invmm(model, z0[i : i + 1], config, 1, seed=0) for i in range(len(z0))], model.device, 1)
    return [
        f"  batched vs one image at a time ({args.ratio_images} images, {args.steps} steps and 2 checks each, "
        f"{evaluations[-1]} UNet evaluations either way): {batched:.1f} s vs {alone:.1f} s, {alone / batched:.2f}x"
    ]


def main(argv=None) -> int:
    """Print the device line, then one block per architecture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["demo"], help="demo, sd15, sd21")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="InvMM steps timed per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch", type=int, help="UNet batch for the throughput lines (default: slots x samples_per_step)"
    )
    parser.add_argument("--unet-only", action="store_true", help="only the UNet lines (real-size networks on a CPU)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, where PEAK_TFLOPS does not know it")
    parser.add_argument("--ratio", action="store_true", help="batched vs one image at a time")
    parser.add_argument("--ratio-arch", default="demo")
    parser.add_argument("--ratio-images", type=int, default=8)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(f"{name}, torch {torch.__version__}, {args.precision}, {args.slots} slots", flush=True)
    for arch in args.arch:
        print("\n".join(report_architecture(arch, args)), flush=True)
    return 0
