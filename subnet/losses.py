"""Losses on logits for the submodel methods: cosub's co-training BCE, ST's KL, ST++'s direction-only KL-, and
GKT's group knowledge.

Every function computes in float32, or float64 when given float64: under AMP the logits arrive in fp16/bf16, where
softmax/KL lose precision and the 1e-7 eps of the standardisation is below fp16 resolution.
Teachers are always detached, so a distillation term only ever sends gradient into its student.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn



def _at_least_fp32(tensor: Tensor) -> Tensor:
    """Promote fp16/bf16 to float32 (differentiably) and leave float32/float64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class CosubTerms(NamedTuple):
    """cosub's four BCE terms, in DeiT's engine.py order, and their weighted total."""
    total: Tensor
    label_terms: tuple[Tensor, Tensor]  # BCE(z1, y), BCE(z2, y)
    peer_terms: tuple[Tensor, Tensor]  # BCE(z1, sg σ(z2)), BCE(z2, sg σ(z1))

    @property
    def label(self) -> Tensor:
        """Mean label BCE of the two submodels (what λ weights)."""
        return 0.5 * (self.label_terms[0] + self.label_terms[1])

    @property
    def peer(self) -> Tensor:
        """Mean peer BCE of the two submodels (what 1 − λ weights)."""
        return 0.5 * (self.peer_terms[0] + self.peer_terms[1])


def cosub_loss(
        logits_a: Tensor,
        logits_b: Tensor,
        target: Tensor,
        label_weight: float = 0.5,
        binarize_threshold: Optional[float] = None,
        label_smoothing: float = 0.0,
) -> CosubTerms:
    """Co-training loss of two submodels that saw the same images (Touvron et al., CVPR 2023; deit engine.py).

    total = λ·½[BCE(z1, y) + BCE(z2, y)] + (1 − λ)·½[BCE(z1, sg σ(z2)) + BCE(z2, sg σ(z1))]; λ = 0.5 is the official
    0.25 × 4. Plain mean-reduced BCE-with-logits over B·C everywhere. ``binarize_threshold`` is DeiT III's
    ``--bce-loss`` (``target.gt(t)``) and touches the label targets only: the peer targets stay soft probabilities
    (reusing timm's thresholded BCE would binarise them too).

    The targets may be mixup's soft single-label targets or multi-hot multi-label ones: every term is a per-label
    BCE, so the peer target of a label is the other submodel's sigmoid of that label. ``label_smoothing`` pulls the
    label targets towards 0.5 (timm's multi-label smoothing, ``y·(1 − s) + s/2``), for multi-hot targets that did
    not come through mixup (which smooths them itself).
    """
    if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
        raise ValueError(f'cosub needs two (B, C) logit tensors of one shape, got {tuple(logits_a.shape)} '
                         f'and {tuple(logits_b.shape)}')
    if target.shape != logits_a.shape:
        raise ValueError(f'cosub needs dense (batch, classes) targets {tuple(logits_a.shape)}, got shape '
                         f'{tuple(target.shape)}: enable mixup/cutmix or convert class indices to one-hot')
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f'cosub label weight must be in [0, 1], got {label_weight}')
    logits_a, logits_b = _at_least_fp32(logits_a), _at_least_fp32(logits_b)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f'cosub label smoothing must be in [0, 1), got {label_smoothing}')
    label_target = target.to(logits_a.dtype)
    if label_smoothing:
        label_target = label_target * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if binarize_threshold is not None:
        label_target = label_target.gt(binarize_threshold).to(logits_a.dtype)
    label_terms = (F.binary_cross_entropy_with_logits(logits_a, label_target),
                   F.binary_cross_entropy_with_logits(logits_b, label_target))
    peer_terms = (F.binary_cross_entropy_with_logits(logits_a, torch.sigmoid(logits_b.detach())),
                  F.binary_cross_entropy_with_logits(logits_b, torch.sigmoid(logits_a.detach())))
    total = (label_weight / 2 * (label_terms[0] + label_terms[1])
             + (1.0 - label_weight) / 2 * (peer_terms[0] + peer_terms[1]))
    return CosubTerms(total, label_terms, peer_terms)


class CosubLoss(nn.Module):
    """``cosub_loss`` with its settings, as a task's criterion (``CosubTask.criterion``)."""

    def __init__(self, label_weight: float = 0.5, binarize_threshold: Optional[float] = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_weight <= 1.0:
            raise ValueError(f'cosub label weight must be in [0, 1], got {label_weight}')
        self.label_weight, self.binarize_threshold = label_weight, binarize_threshold
        self.label_smoothing = label_smoothing

    def forward(self, logits_a: Tensor, logits_b: Tensor, target: Tensor) -> CosubTerms:
        return cosub_loss(logits_a, logits_b, target, self.label_weight, self.binarize_threshold,
                          self.label_smoothing)


def kl_distill(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes and averaged over the batch.

    This is the ST code's ``KLDivLoss(reduction='batchmean')·T²``; T² keeps the gradient scale independent of T
    (Hinton et al. 2015). Log-space targets avoid 0·log 0 when the teacher's softmax underflows.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f'student and teacher logits differ in shape: {tuple(student_logits.shape)} vs '
                         f'{tuple(teacher_logits.shape)}')
    if temperature <= 0:
        raise ValueError(f'distillation temperature must be > 0, got {temperature}')
    student_log_probs = F.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(_at_least_fp32(teacher_logits.detach()) / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs.to(student_log_probs.dtype),
                  reduction='batchmean', log_target=True)
    return kl * temperature ** 2


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-sample zero mean, unit (biased) variance over the class dim, no affine: ST++'s ``F.layer_norm`` on logits.

    The official code hard-codes 1000 classes in the normalised shape; we use the logits' own C.
    """
    logits = _at_least_fp32(logits)
    return F.layer_norm(logits, (logits.shape[-1],), None, None, eps)


def direction_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                 amplitude: float = 1.0) -> Tensor:
    """ST++'s "KL-": ``kl_distill`` on amplitude·standardised logits, so only the logits' direction is matched.

    It is invariant to scaling and shifting either side, unlike plain KL.
    """
    return kl_distill(amplitude * standardize_logits(student_logits),
                      amplitude * standardize_logits(teacher_logits), temperature)


class GroupKnowledge:
    """GKT group knowledge (our reconstruction): one detached fp32 EMA of subnet logits per group of the nested chain.

    Group 0 is the main net; the subnets of group g learn from ``teacher(g - 1)``. The first ``update`` of a group
    initialises its buffer, later ones do K ← (1 − β)·K + β·z (the paper's "EMA of subnet logits", β from ST's
    ``--direct_KD_ema``). Call ``reset`` every step: the buffers hold logits of one batch. ``remember`` hands a group
    the knowledge earlier steps kept for the same samples: its first update then folds into that instead.
    """

    def __init__(self, num_groups: int, ema_weight: float = 0.5) -> None:
        if num_groups < 1:
            raise ValueError(f'GKT needs at least one subnet group, got {num_groups}')
        if not 0.0 < ema_weight <= 1.0:
            raise ValueError(f'GKT EMA weight must be in (0, 1], got {ema_weight}')
        self.num_groups = num_groups
        self.ema_weight = ema_weight
        self._knowledge: dict[int, Tensor] = {}
        self._earlier: dict[int, tuple] = {}  # group -> (knowledge of earlier steps, rows that have it)

    def update(self, group: int, logits: Tensor) -> None:
        """Fold a group's new (detached) logits into its knowledge."""
        if not 0 <= group <= self.num_groups:
            raise ValueError(f'group {group} outside 0..{self.num_groups}')
        new_logits = logits.detach().to(torch.promote_types(logits.dtype, torch.float32), copy=True)
        previous = self._knowledge.get(group)
        if previous is None and group in self._earlier:
            earlier, seen = self._earlier.pop(group)
            blended = (1.0 - self.ema_weight) * earlier + self.ema_weight * new_logits
            self._knowledge[group] = torch.where(seen.view(-1, *([1] * (new_logits.ndim - 1))), blended, new_logits)
        elif previous is None:
            self._knowledge[group] = new_logits
        elif previous.shape != new_logits.shape:
            raise ValueError(f'group {group} holds logits of shape {tuple(previous.shape)}, got '
                             f'{tuple(new_logits.shape)}: call reset() between batches')
        else:
            self._knowledge[group] = (1.0 - self.ema_weight) * previous + self.ema_weight * new_logits

    def teacher(self, group: int) -> Tensor:
        """The current knowledge of ``group`` (the teacher of group + 1)."""
        if group not in self._knowledge:
            raise LookupError(f'group {group} has no knowledge yet: update it before teaching group {group + 1}')
        return self._knowledge[group]

    def remember(self, group: int, knowledge: Tensor, seen: Tensor) -> None:
        """Knowledge of ``group`` kept from earlier steps for this batch's samples (rows where ``seen`` is true)."""
        if group in self._knowledge:
            raise ValueError(f'group {group} already has knowledge this step: remember earlier steps before updating')
        self._earlier[group] = (knowledge.float(), seen)

    def reset(self) -> None:
        """Forget all groups (start of a new batch)."""
        self._knowledge.clear()
        self._earlier.clear()
