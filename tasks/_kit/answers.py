"""Generated answers as an `Evaluation`'s outputs, and the fidelity that compares two sets of them: what every
generating task (arith, arith-dllm, gsm8k-dllm, digits-vlm, ...) records the same way.

Module scope is torch-free and numpy-free (tasks import it at module scope)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

    from tasks.base import Evaluation

PAD = -1  # fills a row after its answer's last token (no token id is negative)


def padded(rows: Sequence[Sequence[int]], width: int) -> "np.ndarray":
    """Answers' token ids as one int64 matrix, `width` columns, each row filled with `PAD` after its answer."""
    import numpy as np

    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for i, ids in enumerate(rows):
        if len(ids) > width:
            raise ValueError(f"answer {i} has {len(ids)} tokens, more than the {width} columns it is stored in")
        out[i, :len(ids)] = list(ids)
    return out


def identical_answer_tokens(reference: "Evaluation", method: "Evaluation") -> tuple[str, float]:
    """Fidelity: the share of examples whose answer tokens (padding included, so a longer or shorter answer
    differs) equal the reference's."""
    import numpy as np

    same = (np.asarray(reference.outputs) == np.asarray(method.outputs)).all(axis=1)
    return "identical_answer_tokens", float(same.mean())
