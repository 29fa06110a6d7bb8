"""Fixtures for the full latent-diffusion tasks (`coco`, `imagenet-fid`), written by the tests, never downloaded:
tiny random diffusers pipelines built from configs (a Stable Diffusion with a CLIP text encoder and a local
CLIP tokenizer; a DiT), a tiny CLIP model for CLIPScore, a tiny torch-fidelity feature extractor standing in
for Inception (whose weights are a download), and COCO-layout captions and images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

EXTRACTOR = "bench-test-tiny"  # registered with torch-fidelity by `register_extractor`
LAYER = "24"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-"
STEPS = 4  # the tests' reference DDIM steps (the tasks' 50, patched, keep tests fast)


def clip_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges): every lower-case caption tokenizes, nothing unknown."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>", *CHARS, *(c + "</w>" for c in CHARS)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def text_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**dict(vocab_size=len(CHARS) * 2 + 2, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                    bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16), **kw})


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # two blocks: 2x downsampling; scaling factor as SD's
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)


def scheduler():
    """Stable Diffusion's and DiT's scheduler configs look like this (scaled-linear / linear betas, 1000 steps)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False)


def save_tiny_sd(folder: Path) -> Path:
    """A StableDiffusionPipeline folder: 8x8x4 latents (16x16 images), a cross-attention UNet of two blocks (no
    middle block: fewer modules, a faster test)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    torch.manual_seed(1)
    text = CLIPTextModel(text_config())
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def save_tiny_dit(folder: Path) -> Path:
    """A DiTPipeline folder: 8x8x4 latents (16x16 images), 2 DiT blocks, learned sigma, 1000 classes + null."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    with torch.no_grad():  # adaLN-zero starts at zero: make the blocks do something
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=dit, vae=tiny_vae(), scheduler=sched).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path) -> Path:
    """A CLIPModel + CLIPProcessor folder (32x32 vision tower) for torchmetrics' CLIPScore."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(2)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=16)
    CLIPModel(CLIPConfig(text_config=text_config().to_dict(), vision_config=vision.to_dict(),
                         projection_dim=16)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tokenizer()).save_pretrained(folder)
    return folder


def register_extractor() -> None:
    """A 24-feature torch-fidelity extractor: per-channel means and standard deviations over a 2x2 grid of the
    image, fixed (no weights), so FID is computable offline and differs between different images."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    class Tiny(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return (LAYER,)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return LAYER

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            x = torch.nn.functional.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", align_corners=False)
            cells = x.unfold(2, 8, 8).unfold(3, 8, 8).reshape(x.shape[0], 3, 4, 64)
            return (torch.cat([cells.mean(-1), cells.std(-1)], dim=1).reshape(x.shape[0], 24),)

    if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR, Tiny)


CAPTIONS = [
    "a cat sitting on a red chair.", "two dogs running on the beach.", "a plate of food with broccoli.",
    "a man riding a bike down the street.", "an airplane flying over the city.", "a bowl of fruit on a table.",
    "a train at the station.", "a girl holding an umbrella in the rain.", "a clock tower at night.",
    "people skiing down a snowy hill.", "a bus parked by the road.", "a bird on a branch.",
]


def write_coco(folder: Path, split: str = "val2014", n_images: int = 10, size: tuple[int, int] = (24, 20)) -> Path:
    """COCO's layout: annotations/captions_<split>.json and <split>/<file_name> JPEGs (random, seeded), two or
    three captions per image, image and annotation ids not in order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / split).mkdir(exist_ok=True)
    images, annotations = [], []
    for k in range(n_images):
        image_id = 1000 + 37 * ((k * 7) % n_images)
        name = f"COCO_{split}_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(folder / split / name)
        images.append({"id": image_id, "file_name": name, "height": size[1], "width": size[0],
                       "coco_url": f"http://images.cocodataset.org/{split}/{name}"})
        for j in range(2 + k % 2):
            annotations.append({"image_id": image_id, "id": 90000 - 10 * k - j,
                                "caption": f"  {CAPTIONS[(k + j) % len(CAPTIONS)]}\n"})
    (folder / "annotations" / f"captions_{split}.json").write_text(json.dumps(
        {"info": {"description": "fixture"}, "images": images, "annotations": annotations, "licenses": []}))
    return folder
