"""`minilm`: deep self-attention distillation (Wang, Wei, Dong, Bao, Yang & Zhou, 2020, "MiniLM: Deep
Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020,
arXiv:2002.10957), with MiniLM-v2's relation heads for unequal head counts (Wang et al., 2021, "MiniLMv2:
Multi-Head Self-Attention Relation Distillation", arXiv:2012.15828).

Student: the task's own student (`task.build_student()`, fresh init): arith-nli's narrower encoder (1 layer,
width 64, 2 heads against the teacher's 2 layers, width 128, 4 heads), glue's 6-of-12-layer BERT. Only the
LAST layer of each is matched (section 3.1: "we only transfer the self-attention knowledge of the last
Transformer layer", which leaves the student's depth free).

Self-attention distribution transfer (eq. 7), for one sequence x of |x| tokens, A_h heads, teacher layer L,
student layer M:

    A_{l,a} = softmax( Q_{l,a} K_{l,a}^T / sqrt(d_k) )                    [|x|, |x|], row t over the keys
    L_AT    = 1/(A_h |x|) sum_{a=1..A_h} sum_{t=1..|x|} KL( A^T_{L,a,t} || A^S_{M,a,t} )

Self-attention value-relation transfer (eqs. 8-9), the scaled dot-product of the values with themselves:

    VR_{l,a} = softmax( V_{l,a} V_{l,a}^T / sqrt(d_k) )
    L_VR     = 1/(A_h |x|) sum_{a=1..A_h} sum_{t=1..|x|} KL( VR^T_{L,a,t} || VR^S_{M,a,t} )

    L = L_AT + L_VR                                                         (eq. 10, `minilm_losses`)

Heads. Both relations are |x| x |x| per head, whatever the widths, but v1 needs the teacher's and student's
head counts equal ("the number of attention heads of the student is the same as its teacher", section 3.1):
arith-nli's pair is 4 against 2. We follow MiniLM-v2 (section 3.1 of arXiv:2012.15828): the concatenated
projections Q, K, V = [B, |x|, H d_head] of either model are split into the same number R of "relation heads"
(consecutive slices of width D/R, as BERT slices its heads) and A_h := R in the equations, with
d_k := D/R of that model. `relation_heads = 0` (the default) takes R = the student's head count: the
student's relations are then its real attention distributions and value relations, and for a teacher with
as many heads (glue: 12 and 12) the method is v1 exactly; arith-nli's teacher heads 2r and 2r+1 together form
its relation head r (the relation logits (s_2r + s_2r+1)/sqrt(2) of the two heads' scores s). Unlike v2 we keep
v1's two relations (Q-K and V-V; v2 uses Q-Q, K-K, V-V) and v1's last layer (v2 recommends an upper-middle
teacher layer for large teachers).

Padding. Softmaxes run over real keys only (padding keys get probability 0, as BERT's own mask gives), the
sum over t over real query tokens only, and |x| is each sequence's real length: `relation_kl` is the per-
sequence L of the equations, averaged over the batch. transformers returns the attention probabilities but
neither the values nor their relation, so Q, K and V are recorded by hooks on the projections
(`baselines.distillation._encoder.Recorder`) and the relations recomputed from them.

Training. MiniLM distils task-agnostically on a pre-training corpus and then fine-tunes the student on the
task; here there is no pre-training corpus, so the distillation runs on the task's training inputs (labels
unused) for the first `distil_share` of the task's student-recipe epochs, and the student is then fine-tuned
on the labels with cross-entropy for the rest (`tasks._kit.classification.fit`, Adam, warm-up and cosine
restarted per stage, as the paper's two separate runs; smoke: 1 epoch each). Left out: the pre-training
corpus and the paper's teacher assistant (a mid-sized student distilled first, for very small students).
Control: the same student from a fresh init on the labels alone for the recipe's full epochs, so both see the
same number of steps (arith-nli: 2,500 + 2,500 against 5,000); the control is the one `tinybert` shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.api import EncoderData, Student, TrainingSplit
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class MiniLMConfig:
    relation_heads: int = 0  # R, the heads both models' Q/K/V are split into; 0: the student's head count
    distil_share: float = 0.5  # share of the recipe's epochs spent distilling; the rest fine-tunes on labels

    def validate(self) -> None:
        check_range("relation_heads", self.relation_heads, lo=0)
        check_range("distil_share", self.distil_share, lo=0, hi=1, lo_open=True, hi_open=True)


def resolve_relation_heads(setting: int, student_heads: int, width_t: int, width_s: int) -> int:
    """R: `setting`, or the student's head count for 0; it must divide both models' Q/K/V widths."""
    r = setting or student_heads
    if width_t % r or width_s % r:
        valid = [d for d in range(1, min(width_t, width_s) + 1) if width_t % d == 0 and width_s % d == 0]
        raise ValueError(f"relation_heads={r} must divide the teacher's Q/K/V width {width_t} and the student's "
                         f"{width_s}: one of {valid} (or 0 for the student's {student_heads} heads)")
    return r


def stage_epochs(epochs: int, share: float) -> tuple[int, int]:
    """(distillation, fine-tuning) epochs: `share` of `epochs`, each stage at least one."""
    e1 = min(max(1, round(share * epochs)), max(1, epochs - 1))
    return e1, max(1, epochs - e1)


def relation_kl(teacher, student, mask):
    """(1/(R |x|)) sum_a sum_t KL(softmax(teacher_{a,t}) || softmax(student_{a,t})) per sequence, averaged over
    the batch; teacher and student are relation logits [B, R, L, L], mask [B, L] the real tokens."""
    import torch
    import torch.nn.functional as F

    keys = mask[:, None, None, :]
    hidden = torch.tensor(float("-inf"), dtype=teacher.dtype, device=teacher.device)
    log_t = F.log_softmax(torch.where(keys, teacher, hidden), dim=-1)
    log_s = F.log_softmax(torch.where(keys, student, hidden), dim=-1)
    zero = torch.zeros((), dtype=teacher.dtype, device=teacher.device)
    # padding keys: p = 0 and both logs -inf; zeroing the logs keeps the 0 * (-inf + inf) of the KL out
    kl = (log_t.exp() * (torch.where(keys, log_t, zero) - torch.where(keys, log_s, zero))).sum(dim=-1)
    per_sequence = (kl * mask[:, None, :]).sum(dim=(1, 2)) / (teacher.shape[1] * mask.sum(dim=1))
    return per_sequence.mean()


def minilm_losses(teacher_qkv, student_qkv, mask, heads: int) -> dict:
    """{"at": L_AT, "vr": L_VR} of the module docstring from the (Q, K, V) [B, L, D] of the teacher's and the
    student's last layers (D may differ), split into `heads` relation heads."""
    from baselines.distillation._encoder import relation_scores

    (q_t, k_t, v_t), (q_s, k_s, v_s) = teacher_qkv, student_qkv
    return {"at": relation_kl(relation_scores(q_t, k_t, heads), relation_scores(q_s, k_s, heads), mask),
            "vr": relation_kl(relation_scores(v_t, v_t, heads), relation_scores(v_s, v_s, heads), mask)}


@register_method("minilm", family="distillation", paper="Wang et al., MiniLM: Deep Self-Attention Distillation "
                 "for Task-Agnostic Compression of Pre-Trained Transformers", year=2020,
                 url="https://arxiv.org/abs/2002.10957", modalities=("text-classification",),
                 requires=(TrainingSplit, Student, EncoderData),
                 summary="KL to the teacher's last-layer attention distributions and value relations (per "
                         "relation head), then fine-tuning on labels, into the task's student")
class MiniLM(Method):
    Config = MiniLMConfig

    def apply(self, subject, task, ctx) -> Applied:
        from dataclasses import replace

        import torch

        from baselines.distillation import _encoder as enc
        from tasks._kit.classification import fit

        cfg = self.config
        teacher, student, data, recipe = enc.teacher_and_student(subject, task, ctx)
        last_t, last_s = (enc.bert_parts(m)[1][-1].attention.self for m in (teacher, student))
        heads = resolve_relation_heads(cfg.relation_heads, last_s.num_attention_heads, last_t.all_head_size,
                                       last_s.all_head_size)
        n_t, n_s = len(enc.bert_parts(teacher)[1]), len(enc.bert_parts(student)[1])
        rec_s, rec_t = enc.Recorder(student), enc.Recorder(teacher)
        seen: list[dict] = []  # the first and the latest step's losses

        def distil(logits, x, y):
            with torch.no_grad():
                teacher(x)
            parts = minilm_losses(rec_t.projections(n_t), rec_s.projections(n_s), enc.token_mask(student, x), heads)
            now = {k: float(v.detach()) for k, v in parts.items()}
            seen[:] = [seen[0] if seen else now, now]
            return parts["at"] + parts["vr"]

        e1, e2 = stage_epochs(recipe.epochs, cfg.distil_share)
        s1 = fit(student, data, replace(recipe, epochs=e1), ctx, seed=ctx.seed, loss_fn=distil,
                 description=f"MiniLM: last-layer attention and value relations, {heads} relation heads")
        rec_s.remove()
        rec_t.remove()
        s2 = fit(student, data, replace(recipe, epochs=e2), ctx, seed=ctx.seed + 1,
                 description="MiniLM: fine-tuning the distilled student on the labels")
        control = enc.control(task, ctx, student, data, recipe, "the same student (the task's)")
        cost = Cost(s1.seconds + s2.seconds, s1.steps + s2.steps, s1.samples_seen + s2.samples_seen,
                    f"{s1.steps} Adam steps of last-layer self-attention distillation (teacher layer {n_t} -> "
                    f"student layer {n_s}, {heads} relation heads), with a teacher forward pass each, then "
                    f"{s2.steps} of fine-tuning on the labels")
        stats = {"relation_heads": float(heads), "teacher_heads": float(last_t.num_attention_heads),
                 "student_heads": float(last_s.num_attention_heads), "distil_steps": float(s1.steps),
                 "finetune_steps": float(s2.steps)}
        for when, parts in zip(("first", "final"), seen):
            stats.update({f"distil_{when}_{k}_loss": v for k, v in parts.items()})
        return Applied(task.prepare(enc.unpacked(student, task), ctx), cost, [control], stats=lambda: stats)
