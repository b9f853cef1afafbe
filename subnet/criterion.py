"""The label loss timm's train.py picks from its options: plain training's loss, and the full net's label term of
ST, ST++ and GKT (cosub's loss is its own, ``losses.CosubLoss``)."""
import torch.nn as nn
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

__all__ = ['build_criterion']


def build_criterion(args, num_aug_splits: int, mixup_active: bool) -> nn.Module:
    """timm's choice: JSD → BCE/soft-target CE under mixup → BCE/label-smoothing CE → CE."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:
        if num_aug_splits <= 1:
            raise ValueError('--jsd-loss needs --aug-splits 2 or more')
        return JsdCrossEntropy(num_splits=num_aug_splits, smoothing=args.smoothing)
    if mixup_active:
        # mixup already smooths its dense targets
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        if args.bce_loss:
            return BinaryCrossEntropy(smoothing=args.smoothing, **bce)
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()
