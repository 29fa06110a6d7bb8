"""tasks._kit.answers: answers padded into one matrix, and fidelity that tells a longer answer from a shorter one."""

from __future__ import annotations

import numpy as np
import pytest

from tasks._kit import answers
from tasks.base import Evaluation


def test_answers_are_padded_after_their_last_token_and_too_long_ones_refused():
    out = answers.padded([[5, 6], [], [7, 8, 9]], 3)
    assert out.dtype == np.int64 and out.tolist() == [[5, 6, -1], [-1, -1, -1], [7, 8, 9]]
    with pytest.raises(ValueError, match="4 tokens, more than the 3 columns"):
        answers.padded([[1, 2, 3, 4]], 3)


def test_fidelity_counts_answers_equal_token_for_token_including_their_length():
    ref = Evaluation(1.0, np.ones(3), answers.padded([[5, 6], [7], [8, 9]], 3))
    met = Evaluation(1.0, np.ones(3), answers.padded([[5, 6], [7, 1], [8]], 3))
    assert answers.identical_answer_tokens(ref, met) == ("identical_answer_tokens", pytest.approx(1 / 3))
