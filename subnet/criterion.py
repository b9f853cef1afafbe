"""The label loss timm 1.0.31's train.py picks from its options (``--task``, ``--loss`` and the weight options):
plain training's loss, and the full net's label term of ST, ST++ and GKT (cosub's loss is its own,
``losses.CosubLoss``).

timm's ``create_classification_loss`` builds the loss and refuses the combinations it cannot run (a multi-label
loss on single-label targets, twoway/zlpr with mixup or smoothing, weights on a loss that takes none, ...);
``timm.loss.resolve_class_weights`` turns ``--loss-pos-weight`` / ``--loss-class-weight`` (a number, a list, a
file, or a method computed from ``--class-stats``) into weights. ``resolve_loss_args`` runs both at parse time,
so every such mistake is one line before anything is built; only the weights' count against the model's classes
waits for the model (``build_criterion``).
"""
import argparse
import os
from typing import Optional

import torch
import torch.nn as nn
from timm.loss import create_classification_loss, load_class_stats, resolve_class_weights

from .errors import InputError

__all__ = ['TASKS', 'is_multilabel', 'mixup_active', 'check_target_format', 'resolve_loss_args', 'loss_kwargs',
           'build_criterion']

TASKS = ('classification', 'multilabel')
# --smoothing when not given: timm's 0.1 for softmax classification; 0 for multi-label (timm 1.0.31's README, "What's
# New", September 2026: "Label smoothing moves each target towards 0.5 and defaults to 0 for multi-label")
DEFAULT_SMOOTHING = {'classification': 0.1, 'multilabel': 0.0}


def is_multilabel(args) -> bool:
    """``--task multilabel`` (a namespace without ``task``, as some tools build, is single-label)."""
    return getattr(args, 'task', 'classification') == 'multilabel'


def mixup_active(args) -> bool:
    """Mixup or CutMix is on: targets arrive dense (soft), as timm's train.py decides it."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def resolve_loss_args(args: argparse.Namespace) -> None:
    """Parse-time: the legacy flags mapped onto ``--loss`` (``--bce-loss`` → bce, ``--jsd-loss`` → jsd,
    ``--bce-pos-weight W`` → ``--loss-pos-weight 'W'``), ``--smoothing`` defaulted by task, and the loss built once
    on paper (without the model) so that a configuration timm refuses stops here. Raises InputError."""
    legacy = [name for name, flag in (('bce', args.bce_loss), ('jsd', args.jsd_loss)) if flag]
    if len(legacy) > 1:
        raise InputError('--bce-loss and --jsd-loss choose two losses: give one --loss')
    if legacy:
        if args.loss is not None and args.loss != legacy[0]:
            raise InputError(f'--{legacy[0]}-loss (the legacy spelling of --loss {legacy[0]}) conflicts with '
                             f'--loss {args.loss}')
        args.loss = legacy[0]
    if args.bce_pos_weight is not None:
        # an args.yaml written here holds both, equal: it replays
        if args.loss_pos_weight not in (None, str(args.bce_pos_weight)):
            raise InputError(f'--bce-pos-weight (the legacy spelling of --loss-pos-weight) conflicts with '
                             f'--loss-pos-weight {args.loss_pos_weight}')
        args.loss_pos_weight = str(args.bce_pos_weight)
    if args.smoothing is None:
        args.smoothing = DEFAULT_SMOOTHING[args.task]
    check_target_format(args)
    kwargs = loss_kwargs(args, num_classes=None)
    try:
        create_classification_loss(**kwargs)
    except ValueError as e:
        raise InputError(f'--loss {kwargs["loss_type"]}: {e}') from None


def check_target_format(args) -> None:
    """``--target-format multihot`` reads label vectors, which only a multi-label task has."""
    if args.target_format == 'multihot' and not is_multilabel(args):
        raise InputError('--target-format multihot reads multi-hot label vectors: it needs --task multilabel')


def _class_stats(args) -> Optional[tuple]:
    if not args.class_stats:
        return None
    try:
        return load_class_stats(args.class_stats)
    except OSError as e:
        raise InputError(f'--class-stats {args.class_stats}: {e.strerror}') from None
    except ValueError as e:  # not JSON, or without pos_counts / num_samples
        raise InputError(f'--class-stats {args.class_stats}: {e}') from None


def _weights(args, option: str, kind: str, stats):
    value = getattr(args, option.lstrip('-').replace('-', '_'))
    if value is None:
        return None
    if value.endswith(('.json', '.txt')) and not os.path.isfile(value):
        raise InputError(f'{option} {value}: no such file')
    try:
        return resolve_class_weights(value, kind, stats, power=args.loss_weight_power)
    except (ValueError, OSError) as e:
        raise InputError(f'{option} {value}: {e}') from None


def loss_kwargs(args, num_classes: Optional[int]) -> dict:
    """``create_classification_loss`` arguments from train.py's options; with ``num_classes``, weights given per
    class must have one entry per class (InputError otherwise)."""
    stats = _class_stats(args)
    loss = args.loss or ('bce' if is_multilabel(args) else 'ce')
    kwargs = dict(loss_type=loss, multi_label=is_multilabel(args), smoothing=args.smoothing,
                  soft_targets=mixup_active(args),
                  class_weight=_weights(args, '--loss-class-weight', 'class_weight', stats),
                  pos_weight=_weights(args, '--loss-pos-weight', 'pos_weight', stats))
    if loss == 'bce':  # timm's older train.py ignored these without --bce-loss, and recipes (DeiT III) set them so
        kwargs.update(bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum)
    if loss == 'poly':
        kwargs.update(poly_epsilon=args.poly_epsilon, poly_gamma=args.poly_gamma)
    if loss == 'jsd':
        kwargs['jsd_splits'] = args.aug_splits if args.aug_splits > 1 else 0
    if loss == 'db' and stats is not None:
        kwargs.update(class_counts=stats[0], num_samples=stats[1])
    if num_classes is not None:
        for option, key in (('--loss-class-weight', 'class_weight'), ('--loss-pos-weight', 'pos_weight')):
            weights = kwargs[key]
            if isinstance(weights, torch.Tensor) and weights.numel() != num_classes:
                raise InputError(f'{option} has {weights.numel()} entries but the model has {num_classes} classes')
        if stats is not None and len(stats[0]) != num_classes:
            raise InputError(f'--class-stats {args.class_stats} counts {len(stats[0])} classes but the model has '
                             f'{num_classes}')
    return kwargs


def build_criterion(args, num_classes: int) -> nn.Module:
    """timm 1.0.31's training loss for these options and this many classes."""
    return create_classification_loss(**loss_kwargs(args, num_classes))
