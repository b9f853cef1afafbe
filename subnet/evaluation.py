"""Evaluation, for train.py and validate.py alike: the loader, the pass, its metrics, and a model's subnets.

Entry points:

- ``eval_loader``: timm's evaluation loader (standard or NaFlex) for a dataset;
- ``evaluate``: one pass of a model over a loader; the task's metrics (timm's evaluators: loss, top-1, top-5, or
  for ``--task multilabel`` loss, mAP and micro/macro/sample F1 over the whole set; padding trimmed) and
  ``unreadable_images``. ``TrainReport`` / ``ValidateReport`` say how the pass reports itself (timm's
  train.py and validate.py log lines); ``Labels`` holds validate.py's label options;
- ``build_subnets`` / ``SubnetEvaluation``: the fixed subnets a SPEC (``subnet/spec.py``) names, each measured with
  its blocks installed by the depth engine (``validate.py --subnets``); ``SubnetMonitor`` does the same at every
  evaluation of a training run (``train.py --subnet-eval``).

The papers' claim is about subnets (plain training leaves them weak, ST / GKT / cosub make them strong), so both
scripts can measure them. Masks are per batch: a subnet is one fixed block subset, installed with
``DepthEngine.subnet`` while it is measured.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import torch
from timm import utils
from timm.data import create_loader
from timm.task.evaluator import ClassificationEvaluator, MultiLabelClassificationEvaluator, evaluation_sample_limit
from timm.utils import unwrap_model
from torch import nn

from .batchnorm import batchnorm_layers, recalibrated
from .blocks import BlockMap
from .criterion import is_multilabel
from .depth import DepthEngine
from .progress import EpochProgress
from .spec import parse_spec, spec_kind
from .unreadable import NOT_COUNTED, drop_not_counted, failures_of

__all__ = ['NaFlexEval', 'eval_loader', 'evaluator_class', 'create_evaluator', 'task_metric', 'predict_batches',
           'update_evaluator', 'Labels', 'TrainReport',
           'ValidateReport', 'evaluate', 'SUBNET_FIELDS', 'Subnet', 'build_subnets', 'SubnetEvaluation',
           'subnet_fields', 'SubnetMonitor']

_logger = logging.getLogger('train')

# what validate.py adds to timm's result fields, in this order
SUBNET_FIELDS = ('subnet', 'depths', 'blocks', 'kept_fraction', 'flop_fraction', 'bn_recal')

T = TypeVar('T')


# ------------------------------------------------------------------------------------------------ the loader

class NaFlexEval(NamedTuple):
    """What a NaFlex evaluation loader needs besides the dataset (``--naflex-loader``)."""
    patch_size: Optional[Tuple[int, int]]  # the model's; (16, 16) when it has none
    max_seq_len: int
    patchify_channels_last: bool = True


def eval_loader(dataset, data_config: dict, *, batch_size: int, device: torch.device, model_dtype, num_workers: int,
                use_prefetcher: bool, pin_memory: bool, distributed: bool = False, crop_pct: Optional[float] = None,
                naflex: Optional[NaFlexEval] = None, tf_preprocessing: bool = False, **transform_options):
    """timm's evaluation loader of ``dataset`` with the model's data config (``crop_pct`` overrides the config's;
    ``transform_options``: more of ``create_loader``'s eval-transform arguments, e.g. crop_mode)."""
    common = dict(batch_size=batch_size, is_training=False, interpolation=data_config['interpolation'],
                  mean=data_config['mean'], std=data_config['std'], num_workers=num_workers,
                  crop_pct=data_config['crop_pct'] if crop_pct is None else crop_pct, pin_memory=pin_memory,
                  img_dtype=model_dtype or torch.float32, device=device, distributed=distributed,
                  use_prefetcher=use_prefetcher, **transform_options)
    if naflex is not None:
        from timm.data import create_naflex_loader
        return create_naflex_loader(dataset, patch_size=naflex.patch_size or (16, 16), max_seq_len=naflex.max_seq_len,
                                    patchify_channels_last=naflex.patchify_channels_last, **common)
    return create_loader(dataset, input_size=data_config['input_size'], tf_preprocessing=tf_preprocessing, **common)


# ------------------------------------------------------------------------------------------------ the pass

@torch.inference_mode()
def predict_batches(model, loader, args, device: torch.device, amp_autocast: Callable = suppress,
                    model_dtype: Optional[torch.dtype] = None):
    """Yield ``(logits, target)`` per batch in eval mode, with timm's input handling and TTA reduction."""
    model.eval()
    for input, target in loader:
        if not args.prefetcher:
            input, target = input.to(device=device, dtype=model_dtype), target.to(device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
        if getattr(args, 'tta', 0) > 1:
            output = output.unfold(0, args.tta, args.tta).mean(dim=2)
            target = target[0:target.size(0):args.tta]
        yield output, target


def evaluator_class(args) -> type:
    """timm's dataset-level evaluator of the task (``--task``): top-1/top-5, or mAP and F1 for multi-label."""
    return MultiLabelClassificationEvaluator if is_multilabel(args) else ClassificationEvaluator


def create_evaluator(args, device, max_samples: Optional[int] = None) -> ClassificationEvaluator:
    """A fresh evaluator of the task; ``max_samples`` trims a distributed sampler's padding."""
    if is_multilabel(args):
        return MultiLabelClassificationEvaluator(device, max_samples=max_samples, threshold=args.multilabel_threshold)
    return ClassificationEvaluator(device, max_samples=max_samples)


def task_metric(args) -> str:
    """The metric the task is judged by (timm's evaluator default: top1, or map for multi-label)."""
    return evaluator_class(args).default_metric


class BatchFigures(NamedTuple):
    """One batch's own figures, for log lines; ``dropped``: rows standing in for unreadable images. top-1 and
    top-5 are None for multi-label evaluation, whose metrics exist only over the whole set."""
    loss: float
    top1: Optional[float]
    top5: Optional[float]
    count: int
    dropped: int


def update_evaluator(evaluator: ClassificationEvaluator, output, target) -> BatchFigures:
    """Add a batch to ``evaluator``, without the rows standing in for unreadable images."""
    output, target, dropped = drop_not_counted(evaluator, output, target)
    counts, loss_sum = evaluator.counts.clone(), evaluator.loss_sum.clone()
    evaluator.update(output, target)
    seen, top1, top5 = (evaluator.counts - counts).tolist()
    n = max(seen, 1)
    if isinstance(evaluator, MultiLabelClassificationEvaluator):
        return BatchFigures((evaluator.loss_sum - loss_sum).item() / n, None, None, seen, dropped)
    return BatchFigures((evaluator.loss_sum - loss_sum).item() / n, 100 * top1 / n, 100 * top5 / n, seen, dropped)


def _accuracy_text(batch: BatchFigures, running: dict) -> str:
    """The ``Acc@1 / Acc@5`` part of a ``Test:`` line; empty for multi-label evaluation."""
    if batch.top1 is None:
        return ''
    return (f'  Acc@1: {batch.top1:>7.3f} ({running["top1"]:>7.3f})  '
            f'Acc@5: {batch.top5:>7.3f} ({running["top5"]:>7.3f})')


@dataclass
class Labels:
    """validate.py's label options: a class subset (``--valid-labels``), ImageNet-ReaL labels (``--real-labels``,
    which then give top-1/top-5) and the predictions --metrics-avg scores (``keep_predictions``)."""
    subset: Optional[List[int]] = None
    real: Optional[object] = None  # timm's RealLabelsImagenet
    keep_predictions: bool = False
    predicted: List[torch.Tensor] = field(default_factory=list)
    true: List[torch.Tensor] = field(default_factory=list)

    def view(self, output: torch.Tensor) -> torch.Tensor:
        if self.subset is not None:
            output = output[:, self.subset]
        if self.real is not None:
            self.real.add_result(output)
        return output

    def keep(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if self.keep_predictions:
            counted = target != NOT_COUNTED
            self.predicted.append(output[counted].argmax(dim=1).cpu())
            self.true.append(target[counted].cpu())

    def finish(self, metrics: dict) -> None:
        if self.real is not None:
            metrics['top1'], metrics['top5'] = self.real.get_accuracy(k=1), self.real.get_accuracy(k=5)


class TrainReport:
    """How train.py's evaluation reports itself: timm train.py's ``Test:`` lines on rank 0 (every
    --log-interval batches and the last), and the progress line."""

    def __init__(self, args, suffix: str = ''):
        self.suffix, self.every, self.primary = suffix, args.log_interval, utils.is_primary(args)
        self.progress = None

    def start(self, num_batches: int) -> None:
        self.progress = EpochProgress('Test' + self.suffix, num_batches, enabled=self.primary)

    def batch(self, batch_idx: int, num_batches: int, batch: BatchFigures, evaluator, batch_time) -> None:
        self.progress.show(batch_idx + 1)
        last_idx = num_batches - 1
        if self.primary and (batch_idx == last_idx or batch_idx % self.every == 0):
            running = evaluator.summary()
            _logger.info(
                f'Test{self.suffix}: [{batch_idx:>4d}/{last_idx}]  '
                f'Time: {batch_time.val:.3f} ({batch_time.avg:.3f})  '
                f'Loss: {batch.loss:>7.3f} ({running["loss"]:>6.3f})' + _accuracy_text(batch, running))

    def close(self) -> None:
        self.progress.close()


class ValidateReport:
    """How validate.py's evaluation reports itself: timm validate.py's ``Test:`` lines every --log-freq batches."""

    def __init__(self, every: int, logger: logging.Logger):
        self.every, self.logger = every, logger

    def start(self, num_batches: int) -> None:
        pass

    def batch(self, batch_idx: int, num_batches: int, batch: BatchFigures, evaluator, batch_time) -> None:
        if batch_idx % self.every == 0:
            running = evaluator.summary()
            self.logger.info(
                f'Test: [{batch_idx:>4d}/{num_batches}]  '
                f'Time: {batch_time.val:.3f}s ({batch_time.avg:.3f}s, {batch.count / batch_time.avg:>7.2f}/s)  '
                f'Loss: {batch.loss:>7.4f} ({running["loss"]:>6.4f})' + _accuracy_text(batch, running))

    def close(self) -> None:
        pass


def evaluate(model, loader, args, device: torch.device, amp_autocast: Callable = suppress,
             model_dtype: Optional[torch.dtype] = None, log_suffix: str = '', *, report=None,
             labels: Optional[Labels] = None) -> OrderedDict:
    """The task's metrics of ``model`` on ``loader`` (timm's evaluators: loss, top-1 and top-5, or for
    ``--task multilabel`` loss, mAP and micro/macro/sample F1 over the whole set; padding trimmed, gathered over
    ranks when ``args.distributed``), and ``unreadable_images`` when some images could not be read (they are left
    out of the figures). ``report`` defaults to ``TrainReport(args, log_suffix)``."""
    report = report if report is not None else TrainReport(args, log_suffix)
    distributed = getattr(args, 'distributed', False)  # validate.py runs on one process
    evaluator = create_evaluator(args, device, max_samples=evaluation_sample_limit(loader))
    batch_time = utils.AverageMeter()
    failures, unreadable = failures_of(loader), 0
    report.start(len(loader))
    end = time.time()
    for batch_idx, (output, target) in enumerate(
            predict_batches(model, loader, args, device, amp_autocast, model_dtype)):
        if labels is not None:
            output = labels.view(output)
        batch = update_evaluator(evaluator, output, target)
        unreadable += batch.dropped
        if failures is not None:
            failures.drain()
        if labels is not None:
            labels.keep(output, target)
        batch_time.update(time.time() - end)
        end = time.time()
        report.batch(batch_idx, len(loader), batch, evaluator, batch_time)
    report.close()
    metrics = evaluator.compute(distributed=distributed)
    if distributed:
        total = torch.tensor([unreadable], device=device, dtype=torch.int64)
        torch.distributed.all_reduce(total)
        unreadable = int(total.item())
    if unreadable:
        metrics['unreadable_images'] = unreadable
    if labels is not None:
        labels.finish(metrics)
    return metrics


# ------------------------------------------------------------------------------------------------ subnets

@dataclass(frozen=True, eq=False)
class Subnet:
    """A named per-batch subnet of a model: one bool per entry of ``BlockMap.blocks`` and what it costs."""
    name: str
    kind: str                      # a SPEC kind's name (subnet/spec.py), or 'full'
    keep: torch.Tensor
    depths: Tuple[int, ...]        # blocks kept per stage (ST writes subnets so)
    kept_fraction: float           # kept blocks / blocks
    flop_fraction: float           # FLOPs / the full net's FLOPs, at the block map's input size

    @property
    def is_full(self) -> bool:
        return bool(self.keep.all())

    def blocks_text(self, block_map: BlockMap) -> str:
        """The mask, one character per block ('#' kept, '.' dropped), stages separated by '|'."""
        return '|'.join(''.join('#' if self.keep[b] else '.' for b in stage.blocks) for stage in block_map.stages)

    def describe(self) -> str:
        return (f'{self.name}: depths {"-".join(map(str, self.depths))}, {int(self.keep.sum())}/{len(self.keep)} '
                f'blocks, {100 * self.flop_fraction:.1f}% of the FLOPs')


def _subnet(name: str, kind: str, keep: torch.Tensor, block_map: BlockMap) -> Subnet:
    return Subnet(name, kind, keep, block_map.stage_depths(keep), float(keep.float().mean()),
                  block_map.flop_fraction(keep))


def build_subnets(spec: str, block_map: BlockMap, seed: int = 42, include_full: bool = True) -> List[Subnet]:
    """The subnets of ``spec`` for a model (the full net first when ``include_full``); each term's kind
    (``subnet/spec.py``) draws its keep mask."""
    subnets = [_subnet('full', 'full', torch.ones(len(block_map.blocks), dtype=torch.bool), block_map)] \
        if include_full else []
    for recipe in parse_spec(spec):
        keep = spec_kind(recipe.kind).keep_mask(recipe, block_map, seed)
        subnets.append(_subnet(recipe.name, recipe.kind, keep | ~block_map.skippable, block_map))
    return subnets


# ------------------------------------------------------------------------------------------------ evaluating

class SubnetEvaluation:
    """A model's full net and the subnets of a SPEC; ``run`` measures each one with its blocks installed.

    The full net is measured without any engine piece installed, so without BN recalibration its numbers are a
    plain evaluation's.
    """

    def __init__(self, model: nn.Module, spec: str, *, seed: int = 42, input_size: Optional[Sequence[int]] = None,
                 engine: Optional[DepthEngine] = None, include_full: bool = True):
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError('subnets cannot be installed in a TorchScript model')
        self.engine = engine if engine is not None else DepthEngine(model, input_size=input_size)
        self.block_map = self.engine.block_map
        self.subnets = build_subnets(spec, self.block_map, seed, include_full)

    @property
    def has_batchnorm(self) -> bool:
        """Whether re-estimating BN statistics can change anything (LayerNorm models: ViT, ConvNeXt)."""
        return bool(batchnorm_layers(self.engine.model))

    def run(self, measure: Callable[[Subnet], T], recal_batches: Optional[Callable[[], Iterable]] = None,
            recal_images: int = 0) -> List[Tuple[Subnet, T, int]]:
        """``(subnet, measure(subnet), BN recalibration images)`` per subnet, in SPEC order.

        With ``recal_images`` > 0 every net, the full one included, first re-estimates the BN statistics on
        ``recal_batches()`` (a fresh iterator of image batches each time); the model's own come back after it.
        All nets are treated alike so that their accuracies compare: ST's official code re-estimates the full
        net's statistics before every validation as well, and a subnet with re-estimated statistics set against
        a full net without them would look better than the full net for that reason alone.
        """
        results = []
        for subnet in self.subnets:
            installed = contextlib.nullcontext() if subnet.is_full else self.engine.subnet(subnet.keep)
            with installed:
                self.engine.model.eval()  # recalibrate switches only the BN layers to training mode
                batches = recal_batches() if recal_images > 0 and recal_batches is not None else ()
                with recalibrated(self.engine.model, batches, recal_images) as seen:
                    results.append((subnet, measure(subnet), seen))
        return results


def subnet_fields(subnet: Subnet, block_map: BlockMap, recal_images: int = 0) -> dict:
    """The columns validate.py appends to timm's result row (SUBNET_FIELDS)."""
    return dict(subnet=subnet.name, depths='-'.join(map(str, subnet.depths)), blocks=subnet.blocks_text(block_map),
                kept_fraction=round(subnet.kept_fraction, 4), flop_fraction=round(subnet.flop_fraction, 4),
                bn_recal=recal_images)


class SubnetMonitor:
    """``train.py --subnet-eval SPEC``: the same fixed subnets measured at every evaluation, as summary columns.

    They are the live model's subnets, with the running BN statistics as trained (no recalibration: that is
    ``validate.py --bn-recal``), so a BatchNorm model's columns are a lower bound.
    """

    def __init__(self, task, spec: str, seed: int, input_size: Optional[Sequence[int]] = None,
                 metric: str = 'top1'):
        self.metric = metric
        engine = task.depth  # the method's engine; --method none has none, build one once
        if engine is None:
            engine = DepthEngine(unwrap_model(task.get_eval_model()), input_size=input_size)
        self.evaluation = SubnetEvaluation(engine.model, spec, seed=seed, engine=engine, include_full=False)
        _logger.info('Subnets evaluated at every eval (--subnet-eval): '
                     + '; '.join(s.describe() for s in self.evaluation.subnets))

    @classmethod
    def from_args(cls, args, task, input_size=None) -> Optional['SubnetMonitor']:
        return cls(task, args.subnet_eval, args.seed, input_size, task_metric(args)) if args.subnet_eval else None

    def columns(self, evaluate: Callable[[Subnet], dict]) -> dict:
        """``{'subnet_<name>_<metric>': value}`` (the task's metric: top1, or map for multi-label) from
        ``evaluate(subnet)`` run with each subnet installed."""
        return {f'subnet_{subnet.name}_{self.metric}': metrics[self.metric]
                for subnet, metrics, _ in self.evaluation.run(evaluate)}
