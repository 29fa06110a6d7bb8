from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baselines.distillation.kd import KDConfig, kd_loss
from bench.config import ConfigError, apply_overrides


def logits(seed):
    return torch.randn(8, 10, generator=torch.Generator().manual_seed(seed))


def test_alpha_zero_is_cross_entropy():
    s, t, y = logits(0), logits(1), torch.arange(8) % 10
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.0), F.cross_entropy(s, y))


def test_soft_term_is_t_squared_kl():
    s, t, y = logits(0), logits(1), torch.arange(8) % 10
    T = 3.0
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, y, T, 1.0), T * T * kl, atol=1e-6)


def test_soft_term_vanishes_when_student_equals_teacher():
    t, y = logits(1), torch.arange(8) % 10
    assert kd_loss(t, t, y, 4.0, 1.0).abs() < 1e-6


@pytest.mark.parametrize("bad", [{"temperature": "0"}, {"alpha": "1.2"}, {"alpha": "-0.1"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(KDConfig(), bad)
