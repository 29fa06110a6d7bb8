"""`ei-bert`: EI-BERT's compression pipeline (Wang, Chu, Xie, Zang, Zhao, Zhong & Zhao, KDD 2025, "Put Teacher
in Student's Shoes: Cross-Distillation for Ultra-compact Model Compression Framework", arXiv:2507.04636):
hard token pruning, cross-distillation, then int8 quantization, into the task's (narrow) student.

What could be read of the paper here: its abstract and summaries (1.91 MB for a BERT model, 99.5% smaller than
BERT-base; "the teacher model [understands] the student model's perspective ... through parameter integration
and the mutual interplay between models"). Its method section could not be read through the search tool, so the
equations below are this module's reading of the pipeline the issue describes, not the paper's own; the loss
weights, the teacher's learning rate and the vocabulary budget are our defaults, not the paper's values.

Stage 1, hard token (vocabulary) pruning (`_ei_bert.token_importance`, `kept_tokens`, `remap_table`). The
fine-tuned teacher reads `importance_rows` training rows; the importance of token t is the attention it receives,
aggregated over layers l, heads h, sentences s and (real) query positions i:

    I(t) = sum_s sum_l sum_h sum_i sum_{j : x_sj = t} A^{l,h}_s[i, j]

The kept vocabulary is the tokenizer's special tokens plus the tokens the whole training split uses, ranked by
I(t) (then by count), up to `max_vocab`; a token the training data never uses is dropped. The student's
word-embedding matrix keeps the rows of the kept tokens (the student is built at the task's vocabulary and cut
before training), and the tokenizer mapping is rebuilt as a table old id -> new id (`VocabPruned.remap`, a
persistent int16 buffer: it is serialized with the model) in which every dropped id, like every id the
tokenizer already mapped to unknown, maps to the unknown token. With the defaults no token of the data is
dropped where the budget allows (a test checks that the test split gains no unknown tokens on arith-nli).

Stage 2, cross-distillation (`cross_losses`). The teacher's fine-tuned task layer (pooler W_p, b_p and
classifier W_c, b_c) is copied into the student, behind a learned map W (d_S -> d_T) from the student's width:

    z_S = W_c tanh(W_p (W h_S[CLS]) + b_p) + b_c

and the teacher is fine-tuned alongside the student, at `teacher_lr_ratio` times the student's learning rate,
on its own labels and on the student's predictions (the teacher "in the student's shoes"):

    L_S = CE(z_S, y) + a_mse [ MSE(H_S W, H_T) + MSE(z_S, z_T) ] + a_kl t^2 KL(softmax(z_T/t) || softmax(z_S/t))
    L_T = CE(z_T, y) + a_kl t^2 KL(softmax(z_S/t) || softmax(z_T/t))

with H the last layer's hidden states at real tokens, and the other model's side detached in each loss (each
loss trains its own model only). Both run in one Adam with two parameter groups (`_ei_bert.train_pair`), each
group clipped on its own.

Stage 3, modular int8 quantization with learned step sizes (LSQ, Esser et al., ICLR 2020). Every Linear and
Embedding module of the student becomes an LSQ module with its own step s (initialised 2 mean|w| / sqrt(Q_P)):

    w_hat = round(clamp(w / s, -Q_N, Q_P)) * s        Q_N = 128, Q_P = 127
    d w_hat / d w = 1 inside the range (straight-through estimator), d w_hat / d s scaled by g = 1 / sqrt(N Q_P)

Linear inputs are fake-quantized as the runtime kernel quantizes them (per batch, uint8 with the batch's
min/max range, 7 bits on the x86/fbgemm engine). The student is fine-tuned `qat_epochs` with its stage-2 loss
from the now frozen teacher, then converted (`_ei_bert.to_int8`): each Linear to `Int8Linear`, which calls
torch.ao's int8 kernel `quantized::linear_dynamic` on the prepacked int8 codes round(clamp(w / s)) with scale s
(int8 x uint8 products accumulated in int32); each Embedding to `Int8Embedding`, int8 rows scaled on lookup
(a gather: no matrix product to run in int8). LayerNorms, biases and steps stay float32. The state dict
holds the int8 codes (not the engine's packed form, rebuilt on first use), so the serialized student is about
one byte a weight. The int8 model's outputs equal its fake-quantized float twin's up to float rounding of the
rescaling (tests check it); `method_stats` say how many Linear calls the int8 kernel ran during the evaluation
(`int8_kernel_calls`, `runtime_int8` = 1 when every Linear is an int8 module and the kernel ran) and the
largest logit difference from the float twin on training rows. LSQ's learned activation steps are replaced by
the kernel's per-batch activation range: torch.ao's CPU kernel that takes a fixed activation scale (static
quantization) also requantizes its output to int8 at a scale of its own, an extra rounding the paper's
modules do not have.

Left out: the paper's multi-task distillation and its deployment runtime (on-device inference engines);
general (pre-training) distillation: the student starts from a fresh init, as the task's other students do.
The runner's MACs count what torch's flop counter sees: the int8 kernels are not counted.

Control: the same tiny student (the task's own, with its own head, the same pruned vocabulary) distilled
without cross-distillation: plain KD, CE(z_S, y) + a_kl t^2 KL(p_T || p_S) from the frozen teacher, for the same
steps, then the same LSQ stage and int8 conversion; evaluated by the task like the method.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, ControlResult, Cost, Method
from bench.api import EncoderData, Student, Tokenizer, TrainingSplit, require
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class EIBertConfig:
    max_vocab: int = 8192  # tokens kept by stage 1, special tokens included (ours; more than the data uses here)
    importance_rows: int = 8192  # training rows the teacher's attention scores the tokens on
    distill_epochs: float = 1.0  # stage 2 length, in passes over the training split (at the student recipe's batch)
    qat_epochs: float = 0.25  # stage 3 (LSQ) length, in passes over the training split
    teacher_lr_ratio: float = 0.1  # the teacher's learning rate / the student's (a small rate, as the issue says)
    temperature: float = 1.0  # t of the KL terms
    alpha_mse: float = 1.0  # a_mse: weight of the hidden-state and logit MSE
    alpha_kl: float = 1.0  # a_kl: weight of the KL terms

    def validate(self) -> None:
        check_range("max_vocab", self.max_vocab, lo=8)
        check_range("importance_rows", self.importance_rows, lo=1)
        check_range("distill_epochs", self.distill_epochs, lo=0, lo_open=True)
        check_range("qat_epochs", self.qat_epochs, lo=0, lo_open=True)
        check_range("teacher_lr_ratio", self.teacher_lr_ratio, lo=0)
        check_range("temperature", self.temperature, lo=0, lo_open=True)
        check_range("alpha_mse", self.alpha_mse, lo=0)
        check_range("alpha_kl", self.alpha_kl, lo=0)


def kl(z_from, z_to, t: float):
    """t^2 KL(softmax(z_from / t) || softmax(z_to / t)), batch mean: z_from is the target distribution."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(z_to / t, dim=-1), F.log_softmax(z_from / t, dim=-1), reduction="batchmean",
                    log_target=True) * t * t


def cross_losses(z_s, z_t, y, h_s_proj, h_t, mask, cfg: EIBertConfig) -> dict:
    """{"student": L_S, "teacher": L_T} of the module docstring, each detached from the other model."""
    import torch.nn.functional as F

    from baselines.distillation._encoder import masked_mse

    zs_d, zt_d = z_s.detach(), z_t.detach()
    student = (F.cross_entropy(z_s, y)
               + cfg.alpha_mse * (masked_mse(h_s_proj, h_t.detach(), mask) + F.mse_loss(z_s, zt_d))
               + cfg.alpha_kl * kl(zt_d, z_s, cfg.temperature))
    teacher = F.cross_entropy(z_t, y) + cfg.alpha_kl * kl(zs_d, z_t, cfg.temperature)
    return {"student": student, "teacher": teacher}


def plain_kd_loss(z_s, z_t, y, cfg: EIBertConfig):
    """The control's loss: CE(z_S, y) + a_kl t^2 KL(p_T || p_S), the teacher frozen."""
    import torch.nn.functional as F

    return F.cross_entropy(z_s, y) + cfg.alpha_kl * kl(z_t.detach(), z_s, cfg.temperature)


def integrate_head(student_hf, teacher_hf):
    """Put the teacher's task layer (pooler dense + classifier, copied) on the student behind a fresh map
    W: d_S -> d_T; returns W (`pooler.dense[0]`)."""
    import copy

    from torch import nn

    s_base, t_base = student_hf.base_model, teacher_hf.base_model
    if getattr(s_base, "pooler", None) is None or getattr(t_base, "pooler", None) is None \
            or not hasattr(teacher_hf, "classifier"):
        raise ValueError("ei-bert integrates the teacher's pooler and classifier into the student: it supports "
                         "BERT sequence classifiers with a pooler (arith-nli, glue-sst2, glue-mnli)")
    d_s, d_t = student_hf.config.hidden_size, teacher_hf.config.hidden_size
    proj = nn.Linear(d_s, d_t)
    s_base.pooler.dense = nn.Sequential(proj, copy.deepcopy(t_base.pooler.dense))
    student_hf.classifier = copy.deepcopy(teacher_hf.classifier)
    return proj


@register_method("ei-bert", family="distillation", paper="Wang et al., Put Teacher in Student's Shoes: "
                 "Cross-Distillation for Ultra-compact Model Compression Framework (EI-BERT)", year=2025,
                 url="https://arxiv.org/abs/2507.04636", modalities=("text-classification",),
                 requires=(TrainingSplit, Student, EncoderData, Tokenizer),
                 summary="attention-ranked vocabulary pruning, cross-distillation (the teacher's task layer in "
                         "the student, the teacher co-trained), LSQ int8 on torch.ao's int8 kernels")
class EIBert(Method):
    Config = EIBertConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy
        import time

        import torch

        from baselines.distillation import _ei_bert as ei
        from baselines.distillation import _encoder as enc
        from bench.api import pick
        from bench.measure import serialized_bytes

        cfg = self.config
        if ctx.device != "cpu":
            raise ValueError(f"ei-bert's int8 runtime is torch.ao's quantized CPU kernels (quantized::linear_dynamic); "
                             f"run it under a CPU profile, not on {ctx.device!r}")
        tok = require(task, Tokenizer).tokenizer
        data, recipe = enc.training_data(task), enc.recipe_of(task)
        ids_row = require(task, EncoderData).model_keys().index("input_ids")
        teacher0 = enc.frozen(enc.packed(subject.model, task), ctx)
        vocab = teacher0.hf.get_input_embeddings().num_embeddings

        # ---- stage 1: importance, kept tokens, the rebuilt mapping
        t1 = time.perf_counter()
        with ctx.progress.step("EI-BERT stage 1: token importance from the teacher's attention"):
            rows = torch.tensor(pick(len(data.y), cfg.importance_rows, ctx.seed))
            importance = ei.token_importance(teacher0, data.x[rows].to(ctx.device), vocab)
        s1_seconds = time.perf_counter() - t1
        ids = data.x[:, ids_row]
        counts = torch.bincount(ids.flatten(), minlength=vocab)
        special = [i for i in tok.all_special_ids if i is not None and 0 <= i < vocab]
        kept = ei.kept_tokens(importance, counts, special, cfg.max_vocab)
        remap = ei.remap_table(kept, vocab, tok.unk_token_id)
        used = int((counts > 0).sum())
        to_unk = remap.long() == int(remap[tok.unk_token_id])
        dropped_used = int(((counts > 0) & to_unk).sum()) - int(counts[tok.unk_token_id] > 0)

        def pruned_student():
            built = require(task, Student).build_student()
            hf = getattr(built, "hf", built)
            ei.prune_embeddings(hf, kept)
            vp = ei.VocabPruned(hf, remap.clone(), built if hasattr(built, "inputs") else None).to(ctx.device)
            train_view = vp if vp.packed else enc.packed_class()(vp, task.model_keys())
            return vp, train_view

        steps2 = ctx.budget.steps(max(1, round(cfg.distill_epochs * -(-len(data.y) // recipe.batch_size))))
        steps3 = ctx.budget.steps(max(1, round(cfg.qat_epochs * -(-len(data.y) // recipe.batch_size))))
        reduce = ei.reduce_range()

        def quantize(vp, train_view, teacher, loss_of, seed: int, what: str):
            """Stage 3 for one arm: LSQ fine-tuning from the frozen teacher, the float twin kept, then int8."""
            for p in teacher.parameters():
                p.requires_grad_(False)
            n_q = ei.to_fake_quant(vp.hf, reduce)
            stats = ei.train_pair(train_view, None, data, recipe, ctx, steps3, seed, 0.0,
                                  lambda x, y: (loss_of(train_view(x), x, y), None),
                                  f"{what}: LSQ int8 fine-tuning of {n_q} Linear/Embedding modules")
            twin = copy.deepcopy(vp).eval()
            ei.to_int8(vp.hf)
            return stats, twin, n_q

        # ---- stage 2: cross-distillation
        torch.manual_seed(ctx.seed)
        vp, view = pruned_student()
        teacher = copy.deepcopy(teacher0)
        for p in teacher.parameters():
            p.requires_grad_(True)
        integrate_head(vp.hf, teacher.hf)  # W is `proj_now()`: the LSQ stage swaps the module
        vp.to(ctx.device)
        rec_s, rec_t = enc.Recorder(vp.hf), enc.Recorder(teacher.hf)
        last: dict[str, float] = {}

        def cross_step(x, y):
            z_s, z_t = view(x), teacher(x)
            parts = cross_losses(z_s, z_t, y, proj_now()(rec_s.hidden[-1]), rec_t.hidden[-1],
                                 enc.token_mask(view, x), cfg)
            last.update({f"final_{k}_loss": float(v.detach()) for k, v in parts.items()})
            return parts["student"], parts["teacher"]

        def proj_now():  # W, whichever module (float, LSQ) it is now
            return vp.hf.base_model.pooler.dense[0]

        s2 = ei.train_pair(view, teacher, data, recipe, ctx, steps2, ctx.seed, recipe.lr * cfg.teacher_lr_ratio,
                           cross_step, "EI-BERT stage 2: cross-distillation (student and teacher together)")

        def student_loss(z_s, x, y):
            with torch.no_grad():
                z_t = teacher(x)
            mask = enc.token_mask(view, x)
            return cross_losses(z_s, z_t, y, proj_now()(rec_s.hidden[-1]), rec_t.hidden[-1], mask, cfg)["student"]

        s3, twin, n_q = quantize(vp, view, teacher, student_loss, ctx.seed + 1, "EI-BERT stage 3")
        rec_s.remove()
        rec_t.remove()

        # ---- the control: the task's student, same vocabulary, plain KD from the frozen teacher, same stages 3
        torch.manual_seed(ctx.seed)
        c_vp, c_view = pruned_student()

        def kd_loss(z_s, x, y):
            with torch.no_grad():
                z_t = teacher0(x)
            return plain_kd_loss(z_s, z_t, y, cfg)

        c2 = ei.train_pair(c_view, None, data, recipe, ctx, steps2, ctx.seed, 0.0,
                           lambda x, y: (kd_loss(c_view(x), x, y), None),
                           "Control: the task's student, plain KD from the frozen teacher")
        c3, _, _ = quantize(c_vp, c_view, teacher0, kd_loss, ctx.seed + 1, "Control stage 3")
        c_eval = task.evaluate(task.prepare(c_vp, ctx), ctx)
        control = ControlResult(
            "plain_kd_same_student", "the task's student with its own head, the same pruned vocabulary, distilled "
            "by plain KD (CE + KL) from the frozen teacher for the same steps, then the same LSQ stage and int8 "
            "conversion", c_eval.value, c_eval.per_example, c2.seconds + c3.seconds)

        # the int8 model against its fake-quantized float twin, on training rows
        probe = data.x[rows[:256]].to(ctx.device)
        train_int8 = vp if vp.packed else enc.packed_class()(vp, task.model_keys())
        train_twin = twin if twin.packed else enc.packed_class()(twin, task.model_keys())
        with torch.inference_mode():
            z8, zf = train_int8(probe), train_twin(probe)
        gap = float((z8 - zf).abs().max())
        agree = float((z8.argmax(-1) == zf.argmax(-1)).double().mean())
        n_lin = sum(isinstance(m, ei.Int8Linear) for m in vp.modules())
        float_lin = sum(type(m) is torch.nn.Linear for m in vp.modules())
        student_bytes, teacher_bytes = serialized_bytes(vp), serialized_bytes(subject.model)
        calls0 = ei.int8_calls(vp)
        out = dict(last)
        out.update({"vocab_original": float(vocab), "vocab_kept": float(kept.numel()),
                    "vocab_used_by_training_data": float(used), "used_tokens_dropped": float(dropped_used),
                    "quantized_modules": float(n_q), "int8_linear_modules": float(n_lin),
                    "float_linear_modules": float(float_lin), "int8_vs_float_twin_max_logit_diff": gap,
                    "int8_vs_float_twin_label_agreement": agree,
                    "student_serialized_bytes": float(student_bytes),
                    "compression_vs_reference": 1 - student_bytes / teacher_bytes,
                    "teacher_lr": recipe.lr * cfg.teacher_lr_ratio})

        def stats() -> dict[str, float]:
            calls = ei.int8_calls(vp) - calls0  # Linear calls the int8 kernel ran since (the evaluation's)
            return {**out, "int8_kernel_calls": float(calls),
                    "runtime_int8": float(calls > 0 and n_lin > 0 and float_lin == 0)}

        cost = Cost(s1_seconds + s2.seconds + s3.seconds, s2.steps + s3.steps, s2.samples_seen + s3.samples_seen,
                    f"{s2.steps} Adam steps of cross-distillation (student at lr {recipe.lr:g}, the teacher co-trained "
                    f"at {recipe.lr * cfg.teacher_lr_ratio:g}), then {s3.steps} of LSQ int8 fine-tuning; vocabulary "
                    f"{vocab} -> {kept.numel()} tokens by the teacher's attention on {len(rows)} training rows "
                    f"({s1_seconds:.1f} s, included)")
        return Applied(task.prepare(vp, ctx), cost, [control], stats=stats)
