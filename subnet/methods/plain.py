"""``--method none``: timm's own training, with timm's knowledge distillation when ``--kd-model-name`` is given.

The tasks are timm's (``ClassificationTask`` and the three distillation tasks) with the loop's hooks mixed in at
their defaults (``Method``): nothing of the step changes.
"""
from timm.task import (ClassificationTask, FeatureDistillationTask, LogitDistillationTask,
                       MultiLabelClassificationTask, TokenDistillationTask)

from ..criterion import is_multilabel
from ..errors import InputError

from ..results import loss_part
from .base import Method

__all__ = ['PlainTask', 'PlainMultiLabelTask', 'LogitDistillation', 'FeatureDistillation', 'TokenDistillation']

# what timm's distillation tasks (--kd-model-name) return besides the loss
TIMM_PARTS = (loss_part('task_loss', 'the label loss'), loss_part('kd_loss', 'the distillation loss'),
              loss_part('distill_loss', "the distillation token's loss"))


class LogitDistillation(Method, LogitDistillationTask):
    """timm's logit distillation from a teacher (``--kd-distill-type logit``)."""

    result_parts = TIMM_PARTS


class FeatureDistillation(Method, FeatureDistillationTask):
    """timm's feature distillation from a teacher (``--kd-distill-type feature``)."""

    result_parts = TIMM_PARTS


class TokenDistillation(Method, TokenDistillationTask):
    """timm's token distillation from a teacher (``--kd-distill-type token``)."""

    result_parts = TIMM_PARTS


class PlainMultiLabelTask(Method, MultiLabelClassificationTask):
    """timm's multi-label task (``--task multilabel``): dense float targets, a sigmoid per class."""


class PlainTask(Method, ClassificationTask):
    """timm's classification task: one forward, the label loss, the loop's backward."""

    result_parts = TIMM_PARTS  # registered under 'none', whose --kd-model-name runs build the tasks above

    @classmethod
    def check_args(cls, args) -> None:
        if args.kd_model_name is not None and is_multilabel(args):
            raise InputError("--kd-model-name: timm's distillation tasks distil softmax distributions, which a "
                             'multi-label head does not have: drop it for --task multilabel')

    @classmethod
    def from_args(cls, args, model, criterion, *, device=None, dtype=None, input_size=None, verbose=True):
        if is_multilabel(args):
            return PlainMultiLabelTask(model=model, criterion=criterion, threshold=args.multilabel_threshold,
                                       device=device, dtype=dtype, verbose=verbose)
        if args.kd_model_name is None:
            return cls(model=model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
        # built as timm's train.py builds them
        common = dict(student_model=model, teacher_model=args.kd_model_name, criterion=criterion,
                      distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight,
                      device=device, dtype=dtype, verbose=verbose)
        if args.kd_distill_type == 'logit':
            return LogitDistillation(loss_type=args.kd_loss_type, temperature=args.kd_temperature, **common)
        if args.kd_distill_type == 'feature':
            return FeatureDistillation(student_feature_dim=args.kd_student_feature_dim,
                                       teacher_feature_dim=args.kd_teacher_feature_dim, **common)
        return TokenDistillation(distill_type=args.kd_token_distill_type, temperature=args.kd_temperature, **common)
