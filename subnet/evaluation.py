"""Evaluate a model's subnets: a SPEC (``subnet/spec.py``) names fixed keep masks, each measured with the depth engine.

The papers' claim is about subnets (plain training leaves them weak, ST / GKT / cosub make them strong), so
``validate.py --subnets SPEC`` and ``train.py --subnet-eval SPEC`` measure them. Masks are per batch: a subnet is
one fixed block subset, installed with ``DepthEngine.subnet`` while it is measured.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from .batchnorm import batchnorm_layers, recalibrated
from .blocks import BlockMap, unwrap_model
from .depth import DepthEngine
from .errors import UsageError
from .sampling import bernoulli_keep, step_generator
from .spec import Recipe, parse_spec

__all__ = ['SUBNET_FIELDS', 'Subnet', 'build_subnets', 'SubnetEvaluation', 'subnet_fields', 'SubnetMonitor']

_logger = logging.getLogger('train')

# what validate.py adds to timm's result fields, in this order
SUBNET_FIELDS = ('subnet', 'depths', 'blocks', 'kept_fraction', 'flop_fraction', 'bn_recal')

T = TypeVar('T')


@dataclass(frozen=True, eq=False)
class Subnet:
    """A named per-batch subnet of a model: one bool per entry of ``BlockMap.blocks`` and what it costs."""
    name: str
    kind: str                      # 'full', 'prefix', 'random' or 'first'
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


# ------------------------------------------------------------------------------------------------ the masks

def _draw_generator(seed: int, rate: float, draw: int) -> torch.Generator:
    # step_generator mixes three integers; here they are (seed, draw, rate in parts per million)
    return step_generator(seed, draw, rank=round(rate * 1_000_000))


def _keep_mask(recipe: Recipe, block_map: BlockMap, seed: int) -> torch.Tensor:
    fixed = ~block_map.skippable
    if recipe.kind == 'prefix':
        # the epsilon keeps 0.5 * 4 at 2 where floating point would make it 2.0000000001
        keep = block_map.prefix_keep([max(math.ceil(recipe.value * len(stage.blocks) - 1e-9), stage.min_keep)
                                      for stage in block_map.stages])
    elif recipe.kind == 'first':
        count = int(recipe.value)
        if count > len(block_map.blocks):
            raise UsageError(f'subnet first{count}: {block_map.model_name} has only {len(block_map.blocks)} blocks')
        keep = torch.arange(len(block_map.blocks)) < count
    else:
        rates = torch.full((len(block_map.blocks),), recipe.value, dtype=torch.float64).masked_fill(fixed, 0.0)
        keep = bernoulli_keep(1, rates, _draw_generator(seed, recipe.value, recipe.draw))[0]
    return keep | fixed


def _subnet(name: str, kind: str, keep: torch.Tensor, block_map: BlockMap) -> Subnet:
    return Subnet(name, kind, keep, block_map.stage_depths(keep), float(keep.float().mean()),
                  block_map.flop_fraction(keep))


def build_subnets(spec: str, block_map: BlockMap, seed: int = 42, include_full: bool = True) -> List[Subnet]:
    """The subnets of ``spec`` for a model (the full net first when ``include_full``)."""
    subnets = [_subnet('full', 'full', torch.ones(len(block_map.blocks), dtype=torch.bool), block_map)] \
        if include_full else []
    for recipe in parse_spec(spec):
        subnets.append(_subnet(recipe.name, recipe.kind, _keep_mask(recipe, block_map, seed), block_map))
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
            raise UsageError('subnets cannot be installed in a TorchScript model: drop --torchscript')
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

    def __init__(self, task, spec: str, seed: int, input_size: Optional[Sequence[int]] = None):
        engine = task.depth  # the method's engine; --method none has none, build one once
        if engine is None:
            engine = DepthEngine(unwrap_model(task.get_eval_model()), input_size=input_size)
        self.evaluation = SubnetEvaluation(engine.model, spec, seed=seed, engine=engine, include_full=False)
        _logger.info('Subnets evaluated at every eval (--subnet-eval): '
                     + '; '.join(s.describe() for s in self.evaluation.subnets))

    @classmethod
    def from_args(cls, args, task, input_size=None) -> Optional['SubnetMonitor']:
        return cls(task, args.subnet_eval, args.seed, input_size) if args.subnet_eval else None

    def columns(self, evaluate: Callable[[Subnet], dict]) -> dict:
        """``{'subnet_<name>_top1': top-1}`` from ``evaluate(subnet)`` run with each subnet installed."""
        return {f'subnet_{subnet.name}_top1': metrics['top1']
                for subnet, metrics, _ in self.evaluation.run(evaluate)}
