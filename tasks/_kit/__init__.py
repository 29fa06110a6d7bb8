"""Shared task machinery, not tasks: training loops (`classification`, `lm`), diffusion sampling
(`diffusion`, `latent_diffusion`), FID (`fid`, `fid_stats`), public checkpoints (`pretrained`) and the
lm-eval bridge (`lm_harness`). Nothing here registers a task; task modules in `tasks/` and methods in
`baselines/` may import it (a method may not import a task module: tests/test_contract.py)."""
