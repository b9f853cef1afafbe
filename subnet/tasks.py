"""The training task for a run: timm's own for ``--method none``, one ``TrainingTask`` subclass per method.

``train.py`` asks ``build_task`` for the task and never looks inside it; the loop calls
``task(input, target)``. The label loss is chosen exactly as timm's train.py chooses it
(``build_criterion``), and the methods reuse it for their label terms where the paper does.
"""
import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.task import (ClassificationTask, FeatureDistillationTask, LogitDistillationTask,
                       TokenDistillationTask, TrainingTask)

from .errors import UsageError


def build_criterion(args, num_aug_splits: int, mixup_active: bool) -> nn.Module:
    """timm's loss choice: JSD → BCE/soft-target CE under mixup → BCE/label-smoothing CE → CE."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:
        if num_aug_splits <= 1:
            raise UsageError('--jsd-loss needs --aug-splits 2 or more')
        return JsdCrossEntropy(num_splits=num_aug_splits, smoothing=args.smoothing)
    if mixup_active:
        # mixup already smooths its dense targets
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        if args.bce_loss:
            return BinaryCrossEntropy(smoothing=args.smoothing, **bce)
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def _distillation_task(args, model, criterion, device, dtype, verbose) -> TrainingTask:
    """timm's knowledge-distillation tasks (``--kd-model-name``), built as timm's train.py builds them."""
    common = dict(criterion=criterion, distill_loss_weight=args.distill_loss_weight,
                  task_loss_weight=args.task_loss_weight, device=device, dtype=dtype, verbose=verbose)
    if args.kd_distill_type == 'logit':
        return LogitDistillationTask(student_model=model, teacher_model=args.kd_model_name,
                                     loss_type=args.kd_loss_type, temperature=args.kd_temperature, **common)
    if args.kd_distill_type == 'feature':
        return FeatureDistillationTask(student_model=model, teacher_model=args.kd_model_name,
                                       student_feature_dim=args.kd_student_feature_dim,
                                       teacher_feature_dim=args.kd_teacher_feature_dim, **common)
    return TokenDistillationTask(student_model=model, teacher_model=args.kd_model_name,
                                 distill_type=args.kd_token_distill_type, temperature=args.kd_temperature,
                                 **common)


def build_task(args, model: nn.Module, criterion: nn.Module, device: torch.device, dtype=None,
               verbose: bool = True) -> TrainingTask:
    """The task ``--method`` asks for, wrapping ``model`` (already on its device)."""
    if args.method == 'none':
        if args.kd_model_name is not None:
            return _distillation_task(args, model, criterion, device, dtype, verbose)
        return ClassificationTask(model=model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
    raise UsageError(f"method '{args.method}' is not available yet")
