"""ECDDP's loss: image-level (local + global crops), context-level and iBOT patch-level distillation.

Every term is the cross-entropy H(t, s) = -sum_k t_k log softmax(s / 0.1)_k between Sinkhorn-Knopp teacher
targets t (teacher temperature given by the caller: 0.04 -> 0.07 over 30 epochs in the paper) and student
logits s. Weights as in the public ``PretrainModel.forward_imp`` (model/pretrain_model.py), with
nG = 2 global and nL = 8 local crops and w = 1 / (2 nG + nL nG) = 1/20 (its "n_global_crops_loss_terms
+ n_local_crops_loss_terms"):

- img_local  = w * sum over (local crop l, global crop g) of mean_b H(t_g, s_l)        (16 pairs -> 16 w)
- img_global = w * sum over global pairs g != g' of mean_b H(t_g', s_g)                (= 2w * mean of the
  crop-swapped rows, as the public code writes it)
- context    = context_weight * nG * w * mean over (global crop, sample, context present in the crop) of
  H(t_context, s_context)
- patch      = patch_weight * (1 / (nG B)) * sum over global crops of the mean H over that crop's masked
  patches (unmasked crops count in the denominator; the public ``forward_masked``, scaled by 2 * 1/2 = 1)

The context term's weight is nG * w = 2w = 0.1: that *is* the paper's lambda1 = 0.1 (the image-global term has the
same 2w; the paper quotes the weights after normalising by the 20 loss terms). ``context_weight`` is an extra
factor on it for experiments, 1.0 (the public code) in every shipped config. (evforge used to multiply by a
further lambda1 = 0.1, which made the context term 10x weaker than the public code's.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sinkhorn import sinkhorn_knopp


def cross_entropy(t: torch.Tensor, s: torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """Row-wise H(t, s) = -sum t log softmax(s / student_temp): (..., K), (..., K) -> (...)."""
    return -(t * F.log_softmax(s.float() / student_temp, dim=-1)).sum(-1)


class ECDDPLoss(nn.Module):
    """Combine ECDDP's four terms; see the module doc for the exact weights.

    forward(...) -> (total, parts) with parts ``img_local``, ``img_global``, ``context``, ``patch`` (weighted,
    detached) so that ``total == sum(parts)``.
    """

    def __init__(
        self,
        n_global: int = 2,
        n_local: int = 8,
        student_temp: float = 0.1,
        context_weight: float = 1.0,
        patch_weight: float = 1.0,
        sinkhorn_iters: int = 3,
    ):
        super().__init__()
        self.n_global, self.n_local = n_global, n_local
        self.student_temp, self.context_weight = student_temp, context_weight
        self.patch_weight, self.sinkhorn_iters = patch_weight, sinkhorn_iters
        self.w = 1.0 / (2 * n_global + n_local * n_global)

    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Sinkhorn-Knopp teacher distributions (no gradient)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iters)

    def forward(
        self,
        *,
        student_global: torch.Tensor,
        teacher_global: torch.Tensor,
        student_local: torch.Tensor | None,
        student_context: torch.Tensor,
        teacher_context: torch.Tensor,
        context_index: torch.Tensor,
        student_patch: torch.Tensor,
        teacher_patch: torch.Tensor,
        patch_crop_index: torch.Tensor,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Shapes (P prototypes, crop-major rows ``c * B + b``):

        student_global, teacher_global: (nG*B, P) student logits of the masked global crops and teacher
        logits of the unmasked ones. student_local: (nL*B, P) or None.
        student_context: (M, P) student logits of the contexts present in the global crops; teacher_context:
        (B*K, P) teacher logits of all contexts of the 224 view (Sinkhorn runs over all of them, as public);
        context_index: (M,) the teacher_context row of each student row.
        student_patch, teacher_patch: (Mp, P) logits of the masked patches; patch_crop_index: (Mp,) their
        global-crop row.
        """
        ng, w = self.n_global, self.w
        nb = student_global.shape[0]
        b = nb // ng
        t_g = self.targets(teacher_global, teacher_temp).view(ng, b, -1)
        lsm_g = F.log_softmax(student_global.float() / self.student_temp, -1).view(ng, b, -1)
        t_sum = t_g.sum(0)  # sum_g sum_c <t_g, lsm_c> = <sum_g t_g, sum_c lsm_c>
        # sum over (student crop c, teacher crop g) of mean_b H, minus the same-crop pairs.
        all_pairs = -(t_sum * lsm_g.sum(0)).sum() / b
        same = -(t_g * lsm_g).sum() / b
        img_global = w * (all_pairs - same)

        if student_local is not None and student_local.numel():
            lsm_l = F.log_softmax(student_local.float() / self.student_temp, -1).view(-1, b, lsm_g.shape[-1])
            img_local = w * (-(t_sum * lsm_l.sum(0)).sum() / b)  # all (local, global) pairs
        else:
            img_local = student_global.sum() * 0.0

        if student_context.shape[0]:
            t_c = self.targets(teacher_context, teacher_temp)[context_index]
            ce = cross_entropy(t_c, student_context, self.student_temp)
            context = self.context_weight * ng * w * ce.mean()
        else:
            context = student_context.sum() * 0.0

        if student_patch.shape[0]:
            t_p = self.targets(teacher_patch, teacher_temp)
            ce = cross_entropy(t_p, student_patch, self.student_temp)
            per_crop = torch.bincount(patch_crop_index, minlength=nb).to(ce.dtype)
            # each masked patch weighs 1 / (masked patches of its crop); then mean over all nG*B crops
            patch = self.patch_weight * (ce / per_crop[patch_crop_index]).sum() / nb
        else:
            patch = student_patch.sum() * 0.0

        total = img_local + img_global + context + patch
        parts = {"img_local": img_local, "img_global": img_global, "context": context, "patch": patch}
        return total, {k: v.detach() for k, v in parts.items()}
