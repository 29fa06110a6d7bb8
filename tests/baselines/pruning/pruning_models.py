"""Tiny models, calibration data and stand-in tasks for the pruning tests (imported by conftest and the tests)."""

from __future__ import annotations

import functools

import torch


def correlated_inputs(n_in: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Calibration inputs X [tokens, n_in] with correlated features and a few large-norm (outlier) features,
    as in the activations of trained transformers: where |W| alone is a poor guide."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=gen) / n_in ** 0.5 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=gen) @ mix
    scale = torch.ones(n_in)
    scale[torch.randperm(n_in, generator=gen)[: max(1, n_in // 8)]] = 8.0
    return x * scale


def layer_error(w: torch.Tensor, w_pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W' X||_F for inputs X given as rows [tokens, in]."""
    return float(torch.linalg.norm(x @ w.T - x @ w_pruned.T))


def tiny_llama(tok, hidden: int = 32, layers: int = 3, heads: int = 2, seed: int = 0):
    from tasks._kit import lm

    return lm.build_lm(lm.LMArch(hidden=hidden, layers=layers, heads=heads, intermediate=2 * hidden), tok, seed=seed)


def tiny_bert_pair_classifier(task, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
    """arith-nli's PairClassifier around a tiny random BERT (trained weights are not needed)."""
    from tasks.arith_nli import EncoderArch, pair_classifier_class

    cfg = EncoderArch(hidden=hidden, layers=layers, heads=heads, intermediate=2 * hidden).config(
        len(task.tokenizer), task.tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = pair_classifier_class()(cfg)
        with torch.no_grad():  # larger than BERT's 0.02 init, so that heads and layers matter to the output
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.2)
    return model


@functools.cache
def small_arith_nli():
    """arith-nli with only its first 512 training pairs encoded (the whole split takes seconds to encode)."""
    from tasks.arith_nli import ArithNLI

    class SmallArithNLI(ArithNLI):
        @functools.cached_property
        def train(self):
            return self.encode(self.train_pairs[:512])

    task = SmallArithNLI()
    task.load()
    return task


def vlm_context():
    """The cpu profile's vision-language context at smoke budget (digits-vlm's tests and the methods applied)."""
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks.base import RunContext

    return RunContext.for_profile(load_profile("cpu"), "vision-language", 0, Reporter(), "smoke")
