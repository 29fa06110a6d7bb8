"""`coco`: text-to-image generation on COCO validation captions with Stable Diffusion v1.5; FID against the
matching real images (torch-fidelity) and CLIP score (torchmetrics).

A *full* task: it runs for real where the machine can download the pipeline (use a GPU profile, e.g.
`bench run --method deepcache --task coco --profile a100-bf16`); its code is tested offline on fixture
captions and images in COCO's own layout with a tiny random Stable Diffusion pipeline built from configs
(tests/tasks/test_coco.py). The shared machinery (subject, evaluation loop, FID and its interval, fidelity,
workload) is `tasks._kit.latent_diffusion`.

Data: COCO captions (Chen et al., 2015, arXiv:1504.00325) in the layout cocodataset.org ships:
`<folder>/annotations/captions_<split>.json` (`images`: id, file_name; `annotations`: image_id, id, caption) and
`<folder>/<split>/<file_name>`. The folder is `$BENCH_COCO_DATA`, else `<BENCH_DATA or bench cache>/data/coco`;
the split `$BENCH_COCO_SPLIT`, `val2014` by default (40,504 images: the split of the FID-30k evaluations of
GLIDE, Imagen and Stable Diffusion) or `val2017` (5,000). The subset is fixed by `DATA_SEED`, not by the run's
seed: the images in one seeded permutation, the first n of them, and for each one of its ~5 captions chosen by
the same generator; so the 1k subset is inside the 5k one, which is inside the 30k one. n is the profile's
`[eval_size] coco` (1,000 on l4-fp16, 5,000 on a100-bf16, 30,000 on h100-bf16 / h200-bf16).

FID: the n generated images (one per selected caption, noise seeded per image by the run's seed) against the
same n real images, each resized (shorter side, bicubic, antialiased) and centre-cropped to the generated size
(512), features by torch-fidelity's `inception-v3-compat` (`tasks._kit.fid_stats`); the real statistics are cached.
CLIP score (Hessel et al., 2021, arXiv:2104.08718): torchmetrics' `CLIPScore`, the mean over the generated
images of 100 cos(E_image, E_caption), floored at 0, with `openai/clip-vit-large-patch14` (`$BENCH_COCO_CLIP`: a
local CLIP folder or a hub id, `@revision` to pin), handed to torchmetrics as a loaded (model, processor) pair
so that a local copy works. ViT-L/14 because it is torchmetrics' default and the model most text-to-image
papers report CLIP score with, so the numbers compare; note that it shares its text tower's architecture and
training with SD v1.5's own text encoder, which favours SD-like models. The CLIP score is recorded beside the FID
(the result's `quality.secondary`, reference and method); FID is the task's metric.

Reference: `stable-diffusion-v1-5/stable-diffusion-v1-5` (the maintained copy of runwayml's SD v1.5;
`$BENCH_COCO_REFERENCE`, a local diffusers folder or a hub id, `@revision` to pin), loaded as a
`StableDiffusionPipeline` without the safety checker (it would black out images and change FID). Sampler: DDIM,
50 steps, eta 0, built from the checkpoint's scheduler config; classifier-free guidance at 7.5 with the empty
prompt as the unconditional branch (the pipeline's defaults, and the usual setting of SD COCO evaluations);
prompts encoded by the pipeline's own `encode_prompt` (CLIP tokenizer, 77 tokens, truncated).

Estimated cost (not measured: no GPU or download here): SD v1.5 at 512x512 runs about 20 denoising steps per
second per image-pair batch on an A100 in half precision, so 5,000 images with 50 guided steps take roughly
2-3 hours per arm; the reference's evaluation is cached per profile and seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench.registry import register_task
from tasks.base import RunContext, Subject
from tasks._kit.latent_diffusion import LatentDiffusionTask, data_root

if TYPE_CHECKING:
    import torch

REFERENCE_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
REFERENCE_ENV, DATA_ENV, SPLIT_ENV, CLIP_ENV = "BENCH_COCO_REFERENCE", "BENCH_COCO_DATA", "BENCH_COCO_SPLIT", \
    "BENCH_COCO_CLIP"
CLIP_ID = "openai/clip-vit-large-patch14"
SPLITS = ("val2014", "val2017")
DATA_SEED = 0  # fixes the caption subset for every run, whatever the run's seed
STEPS = 50  # the reference sampler: DDIM, 50 steps, eta 0
GUIDANCE = 7.5  # classifier-free guidance scale (StableDiffusionPipeline's default)


class CocoDataNotFound(FileNotFoundError):
    """The COCO folder lacks the caption file or images."""


class CocoDataError(ValueError):
    """The caption file is not in COCO's format, or holds fewer images than asked."""


def data_folder() -> tuple[Path, str]:
    """(folder, split) from the environment (see the module docstring)."""
    split = os.environ.get(SPLIT_ENV, "").strip() or SPLITS[0]
    if split not in SPLITS:
        raise CocoDataError(f"{SPLIT_ENV}={split}: valid splits are {', '.join(SPLITS)}")
    value = os.environ.get(DATA_ENV, "").strip()
    folder = Path(value).expanduser().resolve() if value else data_root() / "coco"
    ann = folder / "annotations" / f"captions_{split}.json"
    if not ann.is_file():
        year = split[-4:]
        where = f"{DATA_ENV}={value}" if value else f"the default, {DATA_ENV} unset"
        raise CocoDataNotFound(
            f"COCO captions not found: no {ann} ({where}). The folder must hold COCO's own layout: "
            f"annotations/captions_{split}.json and {split}/<file_name> images; get it with\n"
            f"  mkdir -p {folder} && cd {folder} && wget http://images.cocodataset.org/zips/{split}.zip "
            f"http://images.cocodataset.org/annotations/annotations_trainval{year}.zip && unzip -q {split}.zip && "
            f"unzip -q annotations_trainval{year}.zip\nand set {DATA_ENV}={folder} ({SPLIT_ENV} picks "
            f"{' or '.join(SPLITS)}).")
    return folder, split


def read_captions(folder: Path, split: str) -> list[tuple[int, str, list[str]]]:
    """(image id, file name, captions) of every captioned image, by image id; captions by annotation id, with
    their whitespace normalised."""
    path = folder / "annotations" / f"captions_{split}.json"
    try:
        data = json.loads(path.read_text())
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        caps: dict[int, list[tuple[int, str]]] = {}
        for a in data["annotations"]:
            caps.setdefault(int(a["image_id"]), []).append((int(a["id"]), " ".join(str(a["caption"]).split())))
    except (ValueError, KeyError, TypeError) as e:
        raise CocoDataError(f"{path} is not a COCO captions file (expected `images` with id and file_name, "
                            f"`annotations` with image_id, id and caption): {e!r}") from e
    missing = sorted(set(caps) - set(images))
    if missing:
        raise CocoDataError(f"{path}: captions refer to image ids not in `images`, e.g. {missing[:3]}")
    return [(i, images[i], [c for _, c in sorted(caps[i])]) for i in sorted(caps)]


def select(records: list[tuple[int, str, list[str]]], n: int) -> list[tuple[int, str, str]]:
    """The first n images of the fixed permutation, each with its fixed caption (nested across n)."""
    import numpy as np

    rng = np.random.default_rng(DATA_SEED)
    order = rng.permutation(len(records))
    picks = rng.integers(0, 2 ** 31, size=len(records))
    out = []
    for k in range(n):
        image_id, file_name, captions = records[order[k]]
        out.append((image_id, file_name, captions[int(picks[k]) % len(captions)]))
    return out


def encode_prompts(pipe, prompts: list[str], device: str) -> "torch.Tensor":
    """The text encoder's embeddings of `prompts` (B x 77 x D), by the pipeline's own `encode_prompt`."""
    import torch

    with torch.inference_mode():
        return pipe.encode_prompt(prompts, device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


def make_denoise(guidance: float, uncond: "torch.Tensor") -> Callable:
    """eps with classifier-free guidance, as StableDiffusionPipeline computes it: one UNet call on
    [unconditional; conditional] rows, eps = eps_u + w (eps_c - eps_u)."""
    import torch

    def denoise(model, x, t, text, step_index):
        if guidance <= 1:
            return model(x, t, encoder_hidden_states=text).sample
        both = torch.cat([uncond.expand(x.shape[0], -1, -1), text])
        eps_u, eps_c = model(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    return denoise


def features_as_tensors(clip):
    """`clip` with `get_image_features` / `get_text_features` returning the projected embeddings as tensors.

    transformers 5 returns a `BaseModelOutputWithPooling` (projection in `pooler_output`) where torchmetrics 1.9.0's
    CLIPScore expects the tensor and fails (`'BaseModelOutputWithPooling' object has no attribute 'norm'`,
    torchmetrics issue #3407, fixed after 1.9.0 by PR #3408); this adapter is all the fix does."""
    import torch

    class Adapter(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config

        def get_image_features(self, *args, **kwargs):
            return _tensor(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _tensor(self.model.get_text_features(*args, **kwargs))

    def _tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    return Adapter(clip)


@register_task("coco", modality="image-generation", tier="full", metric="fid", higher_is_better=False, version="1",
               quality_budget="2%",  # FID within +-2% of the reference (MLPerf-style tolerance)
               summary="text-to-image on a fixed subset of COCO val captions (size by profile); Stable Diffusion "
                       "v1.5, DDIM-50, guidance 7.5; FID (torch-fidelity) and CLIP score (torchmetrics)")
class Coco(LatentDiffusionTask):
    reference_env, reference_id = REFERENCE_ENV, REFERENCE_ID
    pipeline_class, backbone_attr = "StableDiffusionPipeline", "unet"
    num_inference_steps, guidance_scale = STEPS, GUIDANCE

    def __init__(self) -> None:
        super().__init__()
        self._clip = None
        self._scorer = None

    def pipeline_kwargs(self) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    # ---- what the task needs -----------------------------------------------------------------------------
    def preflight(self, ctx: RunContext, uses: frozenset[type] = frozenset()) -> list[str]:
        """Besides the pipeline and the FID weights: the COCO captions (`BENCH_COCO_DATA`, a local folder: there
        is no download) and the CLIP-score model (`BENCH_COCO_CLIP`)."""
        from tasks._kit import pretrained

        problems = super().preflight(ctx, uses)
        try:
            data_folder()
        except (CocoDataNotFound, CocoDataError) as e:
            problems.append(str(e))
        clip = pretrained.source_problem(CLIP_ENV, CLIP_ID, "CLIP-score model")
        return problems + ([clip] if clip else [])

    # ---- data ---------------------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        from tasks._kit import fid_stats

        self.load_common(ctx)
        folder, split = data_folder()
        records = read_captions(folder, split)
        if self.n > len(records):
            raise CocoDataError(f"the profile {ctx.profile.name!r} asks for {self.n} COCO images ([eval_size] coco), "
                                f"but {split} has {len(records)} captioned images: use val2014 ({SPLIT_ENV}) or a "
                                f"profile with a smaller size")
        self.items = select(records, self.n)
        paths = [folder / split / file_name for _, file_name, _ in self.items]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise CocoDataNotFound(f"{len(absent)} of the {self.n} selected COCO images are missing, e.g. "
                                   f"{absent[0]}: unzip {split}.zip into {folder}")
        h = hashlib.sha256(f"coco {split}, seed {DATA_SEED}\n".encode())
        for image_id, file_name, caption in self.items:
            h.update(json.dumps([image_id, file_name, caption]).encode() + b"\n")
        h.update(fid_stats.listing_digest(folder, paths).encode())
        self.clip_source = self._clip_source()
        self.data_digest = {"captions": h.hexdigest()}  # not the CLIP model: it scores only the logged CLIP score
        self.reference_stats = fid_stats.image_statistics(
            paths, self.resolution, self.fid, ctx.device, ctx.eval_batch_size,
            self.stats_cache(h.hexdigest(), self.resolution, self.fid.identity()), ctx.progress,
            f"Features of the {self.n} real COCO images (cached afterwards)")
        self._loaded = True

    @staticmethod
    def _clip_source():
        from tasks._kit import pretrained

        return pretrained.model_source(CLIP_ENV, CLIP_ID)

    # ---- sampling -----------------------------------------------------------------------------------------
    def sampling_extra(self, pipe, model, ctx: RunContext, guidance_scale: float | None = None) -> dict:
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        return {"denoise": make_denoise(w, encode_prompts(pipe, [""], ctx.device))}

    def conditioning(self, subject: Subject, indices: list[int], ctx: RunContext) -> Callable[[], "torch.Tensor"]:
        prompts, pipe = [self.items[i][2] for i in indices], self._pipe
        return lambda: encode_prompts(pipe, prompts, ctx.device)

    def training_conditions(self, subject: Subject, n: int, ctx: RunContext) -> "torch.Tensor":
        """Captions of images outside the evaluation subset, cycled (Pipeline): what a method that distils on
        the task's prompts trains on, never the evaluation's."""
        chosen = {image_id for image_id, _, _ in self.items}
        folder, split = data_folder()
        captions = [caps[0] for image_id, _, caps in read_captions(folder, split) if image_id not in chosen]
        if not captions:
            raise ValueError("coco has no captions outside the evaluation subset to train on")
        return encode_prompts(self.pipeline(ctx), [captions[i % len(captions)] for i in range(n)], ctx.device)

    # ---- CLIP score ---------------------------------------------------------------------------------------
    def begin_metrics(self, ctx: RunContext) -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            from tasks._kit import pretrained

            src = self.clip_source
            model = pretrained.load_model(CLIPModel, src, "CLIP-score model")
            try:
                processor = CLIPProcessor.from_pretrained(src.path, revision=src.revision)
            except (OSError, ValueError) as e:
                raise pretrained.PretrainedNotFound(f"could not load the CLIP processor from {src.describe()} "
                                                    f"({CLIP_ENV}): {e}\n{src.hint()}") from e
            self._clip = (features_as_tensors(model.float().eval()), processor)
        parts = self._clip
        self._scorer = CLIPScore(model_name_or_path=lambda: parts).to(ctx.device)

    def on_generated(self, images: "torch.Tensor", indices: list[int], ctx: RunContext) -> None:
        import torch

        with torch.inference_mode():
            self._scorer.update(images, [self.items[i][2] for i in indices])

    def end_metrics(self) -> dict[str, float]:
        return {"clip_score": float(self._scorer.compute())}
