"""`imagenet-fid`: class-conditional ImageNet generation with DiT-XL/2 at 256x256 through diffusers; FID against
ImageNet reference statistics via torch-fidelity.

A *full* task: it runs for real where the machine can download DiT-XL/2 (use a GPU profile, e.g.
`bench run --method taylorseer --task imagenet-fid --profile h100-bf16`); its code is tested offline with a tiny
random DiT pipeline built from configs and fixture statistics and images (tests/tasks/test_imagenet_fid.py).
The shared machinery (subject, evaluation loop, FID and its interval, fidelity, workload) is
`tasks._kit.latent_diffusion`.

Reference: `facebook/DiT-XL-2-256` (Peebles & Xie, 2023, arXiv:2212.09748; `$BENCH_IMAGENET_FID_REFERENCE`, a
local diffusers folder or a hub id, `@revision` to pin), loaded as a `DiTPipeline`: the DiT (28 blocks, patch 2
on 32x32x4 latents, learned sigma) and the sd-vae-ft-ema VAE. Sampler: DDIM, 50 steps, eta 0, built from the
checkpoint's scheduler config, with classifier-free guidance at scale 1.5 (the scale of DiT's FID-optimal
results, and what the FORA, ToCa and TaylorSeer papers use on DiT-XL/2 with 50 DDIM steps), the null class
(id 1000) as the unconditional branch, applied as `DiTPipeline` does (on the noise channels of one batched
call of [conditional; unconditional] rows, the learned-sigma channels dropped).

Evaluation: n images, image i of class i mod 1000 (50 per class at FID-50k), its noise seeded per image by the
run's seed; n is the profile's `[eval_size] imagenet-fid` (1,000 on l4-fp16, 10,000 on a100-bf16, 50,000 on
h100-bf16 / h200-bf16). FID (`tasks._kit.fid_stats`, torch-fidelity's `inception-v3-compat`, 2048 features) against
ImageNet reference statistics, from the first of:
1. `$BENCH_IMAGENET_FID_STATS`: an .npz with `mu` and `sigma` (computed with the same features);
2. `$BENCH_IMAGENET_VAL`: a folder of ImageNet images (the ILSVRC2012 validation set, any layout), each resized
   (shorter side, bicubic, antialiased) and centre-cropped to 256; their statistics are computed and cached;
3. by default, ADM's ImageNet 256x256 reference batch (Dhariwal & Nichol, 2021; `VIRTUAL_imagenet256_labeled.npz`,
   whose `mu`/`sigma` are the TF-Inception pool-3 statistics of ImageNet training images that DiT's FID-50k is
   measured against), downloaded once into `<BENCH_DATA or bench cache>/data/imagenet-fid/` (about 1.6 GB; only
   `mu` and `sigma` are read). torch-fidelity's `inception-v3-compat` reproduces that TF Inception's features,
   so the numbers compare with the papers'.

Estimated cost (not measured: no GPU or download here): DiT-XL/2 is about 119 GFLOPs per forward pass at 256, so
50,000 images with 50 guided steps are about 6e17 FLOPs per arm, roughly an hour on one H100 in bf16; the
reference's evaluation is cached per profile and seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench.registry import register_task
from tasks.base import RunContext, Subject
from tasks._kit.latent_diffusion import LatentDiffusionTask, data_root

if TYPE_CHECKING:
    import torch

REFERENCE_ID = "facebook/DiT-XL-2-256"
REFERENCE_ENV, STATS_ENV, VAL_ENV = "BENCH_IMAGENET_FID_REFERENCE", "BENCH_IMAGENET_FID_STATS", "BENCH_IMAGENET_VAL"
ADM_REFERENCE = {  # ADM's (guided-diffusion) reference batches, by resolution
    256: "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
         "VIRTUAL_imagenet256_labeled.npz",
    512: "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/"
         "VIRTUAL_imagenet512.npz",
}
STEPS = 50  # the reference sampler: DDIM, 50 steps, eta 0
GUIDANCE = 1.5  # classifier-free guidance scale (DiT's FID setting)


class ImagenetStatsNotFound(FileNotFoundError):
    """The configured statistics file or image folder does not exist or holds nothing usable."""


def make_denoise(guidance: float, null_class: int, channels: int) -> Callable:
    """eps with classifier-free guidance, as DiTPipeline computes it: one call on [conditional; unconditional]
    rows, guidance on the first `channels` outputs (the noise), the learned-sigma outputs dropped."""
    import torch

    def denoise(model, x, t, labels, step_index):
        if guidance <= 1:
            return model(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample[:, :channels]
        both = torch.cat([labels, torch.full_like(labels, null_class)])
        out = model(torch.cat([x, x]), timestep=t.expand(2 * x.shape[0]), class_labels=both).sample
        eps_c, eps_u = out[:, :channels].chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    return denoise


@register_task("imagenet-fid", modality="image-generation", tier="full", metric="fid", higher_is_better=False,
               quality_budget="2%",  # FID within +-2% of the reference (MLPerf-style tolerance)
               version="1", summary="class-conditional ImageNet 256x256, DiT-XL/2 via diffusers, DDIM-50, guidance "
                                    "1.5; FID (torch-fidelity) against ImageNet reference statistics")
class ImagenetFid(LatentDiffusionTask):
    reference_env, reference_id = REFERENCE_ENV, REFERENCE_ID
    pipeline_class, backbone_attr = "DiTPipeline", "transformer"
    num_inference_steps, guidance_scale = STEPS, GUIDANCE

    # ---- what the task needs -----------------------------------------------------------------------------
    def preflight(self, ctx: RunContext, uses: frozenset[type] = frozenset()) -> list[str]:
        """Besides the pipeline and the FID weights: the reference statistics (`BENCH_IMAGENET_FID_STATS`,
        `BENCH_IMAGENET_VAL`, else ADM's reference batch: downloaded already, or downloadable)."""
        from bench import preflight

        problems = super().preflight(ctx, uses)
        stats_file, folder = os.environ.get(STATS_ENV, "").strip(), os.environ.get(VAL_ENV, "").strip()
        if stats_file:
            if not Path(stats_file).expanduser().is_file():
                problems.append(f"{STATS_ENV}={stats_file}: no such file (an .npz with `mu` and `sigma`, e.g. ADM's "
                                f"{ADM_REFERENCE[256].rsplit('/', 1)[1]})")
        elif folder:
            if not Path(folder).expanduser().is_dir():
                problems.append(f"{VAL_ENV}={folder}: no such folder (ImageNet validation images, .JPEG / .jpg / "
                                f".png, any depth)")
        else:
            url = ADM_REFERENCE[256]  # DiT-XL-2-256's; another resolution is known only once the configs are read
            path = data_root() / "imagenet-fid" / url.rsplit("/", 1)[1]
            net = preflight.url_reachable(url) if not path.is_file() else None
            if net is not None and not net.ok:
                problems.append(
                    f"the FID reference statistics are ADM's reference batch, downloaded on first use from {url}, "
                    f"which this machine cannot reach ({net.why}), and there is no copy at {path}. Set {STATS_ENV} to "
                    f"an .npz with mu and sigma, or {VAL_ENV} to a folder of ImageNet validation images, or put the "
                    f"file at {path}")
        return problems

    # ---- data ---------------------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        self.load_common(ctx)
        self.reference_stats, where = self.statistics(ctx)
        self.data_digest = {"statistics": where, "labels": "image i: class i mod num_classes"}
        self._loaded = True

    def statistics(self, ctx: RunContext) -> tuple[dict, str]:
        """(mu, sigma) of the ImageNet reference and where they came from (see the module docstring)."""
        from tasks._kit import fid_stats

        stats_file = os.environ.get(STATS_ENV, "").strip()
        if stats_file:
            path = Path(stats_file).expanduser().resolve()
            if not path.is_file():
                raise ImagenetStatsNotFound(f"{STATS_ENV}={stats_file}: no such file (an .npz with `mu` and `sigma`, "
                                            f"e.g. ADM's {ADM_REFERENCE[256].rsplit('/', 1)[1]})")
            return fid_stats.load_statistics(path, STATS_ENV), f"statistics file {path.name}"
        folder = os.environ.get(VAL_ENV, "").strip()
        if folder:
            root = Path(folder).expanduser().resolve()
            paths = fid_stats.find_images(root) if root.is_dir() else []
            if not paths:
                raise ImagenetStatsNotFound(f"{VAL_ENV}={folder}: {'no images in' if root.is_dir() else 'no folder'} "
                                            f"{root} (ImageNet validation images, .JPEG / .jpg / .png, any depth)")
            listing = fid_stats.listing_digest(root, paths)
            stats = fid_stats.image_statistics(
                paths, self.resolution, self.fid, ctx.device, ctx.eval_batch_size,
                self.stats_cache(listing, self.resolution, self.fid.identity()), ctx.progress,
                f"Features of {len(paths)} ImageNet images (cached afterwards)")
            return stats, f"image folder: {len(paths)} images, listing sha256 {listing}"
        return fid_stats.load_statistics(self.download_reference_batch(ctx), "ADM reference batch"), \
            f"ADM reference batch {ADM_REFERENCE.get(self.resolution)}"

    def download_reference_batch(self, ctx: RunContext) -> Path:
        url = ADM_REFERENCE.get(self.resolution)
        if url is None:
            raise ImagenetStatsNotFound(
                f"no default ImageNet reference statistics at {self.resolution}x{self.resolution} (ADM publishes "
                f"{', '.join(map(str, ADM_REFERENCE))}): set {STATS_ENV} to an .npz with mu and sigma, or "
                f"{VAL_ENV} to a folder of ImageNet validation images")
        path = data_root() / "imagenet-fid" / url.rsplit("/", 1)[1]
        if not path.is_file():
            from torch.hub import download_url_to_file

            path.parent.mkdir(parents=True, exist_ok=True)
            with ctx.progress.step(f"Downloading ADM's ImageNet reference batch to {path}"):
                try:
                    download_url_to_file(url, str(path), progress=False)
                except OSError as e:
                    raise ImagenetStatsNotFound(
                        f"could not download ADM's reference statistics from {url}: {e}. Download the file into "
                        f"{path.parent}, or set {STATS_ENV} (an .npz with mu and sigma) or {VAL_ENV} (a folder of "
                        f"ImageNet validation images)") from e
        return path

    # ---- sampling -----------------------------------------------------------------------------------------
    def sampling_extra(self, pipe, model, ctx: RunContext, guidance_scale: float | None = None) -> dict:
        cfg, w = model.config, self.guidance_scale if guidance_scale is None else guidance_scale
        return {"denoise": make_denoise(w, int(cfg.num_embeds_ada_norm), int(cfg.in_channels))}

    def conditioning(self, subject: Subject, indices: list[int], ctx: RunContext) -> Callable[[], "torch.Tensor"]:
        import torch

        classes = int(subject.model.config.num_embeds_ada_norm)
        labels = torch.tensor([i % classes for i in indices], dtype=torch.long, device=ctx.device)
        return lambda: labels
