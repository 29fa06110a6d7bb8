"""Expected wall time of the full tasks' evaluations on one GPU of each profile: ESTIMATES, derived from the
workload sizes, until a record on that GPU replaces them. `python docs/gpu_estimates.py` prints the README's table.

What is derived and what is assumed:
- MACs per denoiser call are counted by torch's flop counter on the real architectures built on the meta device
  (no weights, no compute): DiT-XL/2 at 256 px, SD-1.5's UNet at 512 px, and each one's VAE decoder.
- Images per evaluation and steps come from the profiles (`[eval_size]`) and the tasks (50 DDIM steps, classifier-
  free guidance as two denoiser calls per step).
- Assumed: a model-FLOPs utilisation of MFU = 35% of the GPU's dense bf16/fp16 peak for batched diffusion (an
  assumption, stated; measured figures replace it), and for batch-1 greedy decoding of Qwen2.5-1.5B in eager
  PyTorch a per-token time of max(weights / memory bandwidth, 20 ms of per-token launch and Python overhead)
  with 5-shot prompts and ~150 generated tokens per answer until the stop string (lm-eval's `Question:`).
- Peak figures are the vendors' datasheet numbers (dense, no sparsity): A100 312 TFLOP/s and 1.56 TB/s (40 GB),
  H100 SXM 989 and 3.35, H200 989 and 4.8, L4 121 (fp16) and 0.3.
"""

from __future__ import annotations

GPUS = {  # profile: (dense bf16/fp16 TFLOP/s, memory bandwidth TB/s)
    "a100-bf16": (312.0, 1.56),
    "h100-bf16": (989.0, 3.35),
    "h200-bf16": (989.0, 4.8),
    "l4-fp16": (121.0, 0.3),
}
MFU = 0.35  # assumed share of the dense peak a batched denoiser reaches
STEPS, CFG = 50, 2  # the full diffusion tasks' reference sampler: DDIM-50, guidance as two calls per step
GSM8K_PROBLEMS, GSM8K_TOKENS, DECODE_OVERHEAD_S = 1319, 150, 0.020
QWEN_1_5B_BYTES = 1.54e9 * 2  # Qwen2.5-1.5B-Instruct in bf16


def diffusion_macs() -> dict[str, float]:
    """MACs per generated image: 50 steps x 2 guidance calls x the denoiser, plus one VAE decode."""
    import torch
    from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    def macs(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 2

    with torch.device("meta"):
        dit = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                    num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD-1.x's configuration
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        t = torch.tensor([500])
        dit_call = macs(lambda: dit(torch.randn(1, 4, 32, 32), timestep=t, class_labels=torch.tensor([1])))
        unet_call = macs(lambda: unet(torch.randn(1, 4, 64, 64), t, encoder_hidden_states=torch.randn(1, 77, 768)))
        decode_256 = macs(lambda: vae.decode(torch.randn(1, 4, 32, 32)))
        decode_512 = macs(lambda: vae.decode(torch.randn(1, 4, 64, 64)))
    return {"imagenet-fid": STEPS * CFG * dit_call + decode_256, "coco": STEPS * CFG * unet_call + decode_512,
            "dit_call": dit_call, "unet_call": unet_call}


def hours(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def table() -> str:
    from bench.profiles import load_profile

    per_image = diffusion_macs()
    rows = ["| profile | imagenet-fid (DiT-XL/2, FID-N) | coco (SD-1.5, FID-N + CLIP) | gsm8k (Qwen2.5-1.5B, "
            "1,319 problems) |", "| --- | --- | --- | --- |"]
    for name, (tflops, tbs) in GPUS.items():
        p = load_profile(name)
        rate = tflops * 1e12 * MFU / 2  # MACs per second
        cells = []
        for task in ("imagenet-fid", "coco"):
            n = p.eval_size[task]
            cells.append(f"{n:,} images: {hours(n * per_image[task] / rate)}")
        per_token = max(QWEN_1_5B_BYTES / (tbs * 1e12), DECODE_OVERHEAD_S)
        cells.append(hours(GSM8K_PROBLEMS * GSM8K_TOKENS * per_token))
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    note = (f"Per evaluation of one arm (the reference's is cached after the first run, so a method's run costs "
            f"about one more). MACs per image: DiT-XL/2 {per_image['dit_call'] / 1e9:.1f} G per call, "
            f"SD-1.5 UNet {per_image['unet_call'] / 1e9:.0f} G per call, x {STEPS} steps x {CFG} (guidance), plus "
            f"the VAE decode; at {MFU:.0%} of the dense peak (assumed).")
    return "\n".join(rows) + "\n\n" + note


if __name__ == "__main__":
    print(table())
