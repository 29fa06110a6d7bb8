"""The README's digits-gen figures: `python docs/digits_gen_grid.py <task> <out.png> [method ...]`.

Row 1 is the published reference (DDIM, 50 steps); each further row is one method applied to it with its
defaults, from the same initial noise and labels (digits 0-9, one per column), so a row that drifts from the
first is the method's loss of fidelity. With no methods: a 10 x 10 grid of the reference's samples.
A method may carry config overrides, as `bench run --set` takes them, after a colon and separated by colons:
`lcm:num_inference_steps=1` or `ddim:num_inference_steps=10` (a plain name keeps its defaults).
"""

from __future__ import annotations

import sys


def parse_method(item: str) -> tuple[str, dict[str, str]]:
    """`"name:k=v:k2=v2"` -> `("name", {"k": "v", "k2": "v2"})`; a plain `"name"` has no overrides."""
    from bench.config import parse_sets

    name, *sets = item.split(":")
    return name, parse_sets(sets)


def main(task_name: str, out: str, methods: list[str]) -> None:
    import torch

    from bench import registry
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks.base import RunContext
    from tasks._kit.diffusion import eval_inputs, sample, save_grid, to_uint8

    torch.set_num_threads(2)
    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=10, budget="full")
    task = registry.get_task_spec(task_name).cls()
    task.load(ctx)
    reference = task.subject_from_state(task.reference_weights(ctx).state, ctx)
    noise, labels = eval_inputs(10 if methods else 100, 0)
    rows = [to_uint8(sample(reference, noise, labels))]
    for item in methods:
        name, overrides = parse_method(item)
        applied = registry.create_method(name, overrides).apply(reference, task, ctx)
        rows.append(to_uint8(sample(applied.subject, noise, labels)))
    save_grid(torch.cat(rows), out, nrow=10)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
