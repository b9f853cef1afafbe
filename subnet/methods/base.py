"""What every method is, and what the methods that sample subnets share.

``Method`` is the project's side of a training task: its command line (an option group, configuration checks,
the ``create_model`` kwargs it needs, how it is built from parsed arguments) and what the epoch loop calls
(``train_step``, the step protocol of ``subnet/step.py``; ``before_eval``; the ``depth`` engine it owns). Every
task train.py builds is a ``Method``; the defaults are plain timm training's, so a method overrides only what it
changes.

``SubnetTask`` is the base of the methods that run subnets: the depth engine and a step counter that seeds each
step's masks (the same on every DDP rank; checkpointed as ``task_state``, so a resumed run replays them).
``DistillFromFullNet`` adds what ST and GKT share: the full net's label pass, subnet
passes that distil from teachers, and the BatchNorm handling they need.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.task import ClassificationTask

from ..batchnorm import frozen_running_stats, recalibrate
from ..criterion import is_multilabel
from ..depth import DepthEngine
from ..errors import InputError
from ..results import ResultPart
from ..sampling import step_generator
from ..step import Step

__all__ = ['Method', 'SubnetTask', 'DistillFromFullNet', 'distillation_options', 'check_distillation_args']

_logger = logging.getLogger('train')


class Method:
    """The command line and loop hooks of a task; mixed into a ``timm.task.TrainingTask`` subclass.

    Class-level (before any model exists): ``options`` (functions that add option groups to train.py's parser;
    a group shared by several methods is added once), ``result_parts`` (what the result's scalars are,
    ``subnet/results.py``), ``check_args`` (one ``InputError`` per configuration the method cannot run),
    ``model_kwargs`` (extra ``create_model`` kwargs) and ``from_args`` (the task itself).
    """

    method: str = ''  # the --method name, set by register_method
    options: Tuple[Callable[[argparse.ArgumentParser], None], ...] = ()
    drop_schedule: str = 'linear'  # the model's drop-path rates unless --drop-schedule says: timm's ramp
    depth: Optional[DepthEngine] = None  # the depth engine of a task that runs subnets
    # --torchcompile's default --compile-scope (subnet/compile.py): 'model' (timm's), or 'blocks' for a method
    # whose subnet changes every step, where compiling the whole model would compile every new subnet
    compile_scope: str = 'model'
    compile_ahead_pending: bool = False  # set by subnet.compile.compile_task; the loop runs compile_ahead once
    # True: every step runs the full net unchanged (a label pass) inside ``full_net()``; the block scope compiles
    # that pass as one graph of the whole model (subnet.compile.FullNetGraph, set by compile_task)
    runs_full_net: bool = False
    full_net_graph = None
    result_parts: Tuple[ResultPart, ...] = ()  # the scalars train_step returns besides loss, output

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Refuse configurations the method cannot run (one InputError each); may fill method defaults."""

    @classmethod
    def model_kwargs(cls, args: argparse.Namespace) -> dict:
        """Extra ``create_model`` keyword arguments the method needs (the user's ``--model-kwargs`` win)."""
        return {}

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module, criterion: nn.Module, *, device=None,
                  dtype=None, input_size: Optional[Sequence[int]] = None, verbose: bool = True):
        """The task for this run, wrapping ``model`` (on its device, not yet compiled or in DDP).

        ``criterion`` is timm's label loss for these options; ``input_size`` (C, H, W) is the training input.
        """
        raise NotImplementedError(f'{cls.__qualname__} does not say how it is built from arguments')

    # ---- what the loop calls
    def train_step(self, input, target, step: Step) -> dict:
        """One training step's passes (``subnet/step.py``): timm's task forward under ``step.autocast()``, its loss
        back-propagated through ``step.backward`` outside it. Returns ``{'loss', 'output', <parts>}``."""
        with step.autocast():
            result = self(input, target)
        step.backward(result['loss'])
        return result

    def compile_variants(self, input: torch.Tensor) -> Sequence[Tuple[Callable, torch.Tensor]]:
        """The passes, beyond the first step's own, in which later steps run the model: (a context-manager
        factory, its input) each. Under ``--compile-scope blocks`` one forward and backward of each runs before the
        first step (``subnet.compile.compile_ahead``), so that every region graph compiles then and none later."""
        return ()

    @staticmethod
    def logits(output) -> torch.Tensor:
        """The logits of a model's output: the first of a tuple (a model with a second head or an auxiliary
        output)."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def full_net(self):
        """A context for a pass of the full net, unchanged: one graph of the whole model under the block scope."""
        return self.full_net_graph.running() if self.full_net_graph is not None else contextlib.nullcontext()

    def attach_train_loader(self, loader) -> None:
        """Called once the training loader and the run guard exist, for a method that follows samples across
        steps (``gkt --gkt-knowledge sample``)."""

    def before_eval(self, batches: Iterable[torch.Tensor]) -> None:
        """Called before every evaluation with (lazily loaded) training image batches."""


class SubnetTask(Method, ClassificationTask):
    """A method that runs subnets: the depth engine and the step counter (checkpointed). Its ``train_step`` runs
    and back-propagates its passes; calling the task, ``task(input, target)``, runs that step with a bare ``Step``
    (every pass just back-propagated, no autocast), for use outside train.py's loop."""

    compile_scope = 'blocks'

    def __init__(self, model: nn.Module, criterion: nn.Module, depth: DepthEngine, seed: int = 42,
                 device=None, dtype=None, verbose: bool = True):
        super().__init__(model=model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
        self.depth = depth
        self.seed = seed
        self.step = 0

    @classmethod
    def check_args(cls, args) -> None:
        if args.kd_model_name is not None:
            raise InputError(f'--method {args.method} cannot be combined with --kd-model-name (timm distillation)')
        if args.naflex_loader:
            raise InputError(f'--method {args.method} does not support --naflex-loader (dict inputs)')
        if args.aug_splits or args.jsd_loss or args.split_bn:
            raise InputError(f'--method {args.method} does not support --aug-splits/--jsd-loss/--split-bn')

    @staticmethod
    def depth_engine(model: nn.Module, input_size, verbose: bool) -> DepthEngine:
        """The engine for ``model``, its block table logged once."""
        depth = DepthEngine(model, input_size=input_size)
        if verbose:
            _logger.info(depth.block_map.describe())
        return depth

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict:
        return self.train_step(input, target, Step())

    def train_step(self, input: torch.Tensor, target: torch.Tensor, step: Step) -> dict:
        raise NotImplementedError(f'{type(self).__qualname__} does not define its training step')

    def next_generator(self, rank: int = 0) -> torch.Generator:
        """A generator for this step's masks: rank 0's seed on every rank unless a method asks per rank."""
        self.step += 1
        return step_generator(self.seed, self.step, rank)

    def get_task_state(self, module=None, ema: bool = False) -> dict:
        return {} if ema else {'method': self.method, 'step': self.step}

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        if state and not ema:
            self.step = int(state.get('step', 0))

    def forward_pass(self, input: torch.Tensor) -> torch.Tensor:
        return self.logits(self.trainable_module(input))


# ---------------------------------------------------------------------------------------- distilling subnets

BN_MODES = ('freeze', 'recal')


def distillation_options(parser: argparse.ArgumentParser) -> None:
    """What every method that distils subnets from a teacher shares (st, st++, gkt)."""
    g = parser.add_argument_group('Subnet distillation (st, st++, gkt)')
    g.add_argument('--subnet-temperature', type=float, default=1.0,
                   metavar='T', help='distillation temperature; each KL term is multiplied by T^2 '
                                     "(default: 1, the ST code's --Temp)")
    g.add_argument('--subnet-kd-weight', type=float, default=1.0, metavar='W',
                   help="weight of each subnet's KL term; the terms are summed (default: 1, the ST code's "
                        '--kl_coef)')
    g.add_argument('--subnet-bn', default='freeze', choices=BN_MODES,
                   help="BatchNorm running statistics: 'freeze' them during subnet passes (default), or 'recal': "
                        're-estimate them with the full net before each evaluation (the official ST code)')
    g.add_argument('--subnet-bn-images', type=int, default=2048,
                   metavar='N', help='training images for --subnet-bn recal (default: 2048, the official ST code)')


def check_distillation_args(args) -> None:
    if args.subnet_temperature <= 0:
        raise InputError(f'--subnet-temperature must be > 0, got {args.subnet_temperature}')
    if args.subnet_bn_images < 1:
        raise InputError(f'--subnet-bn-images must be >= 1, got {args.subnet_bn_images}')


class DistillFromFullNet(SubnetTask):
    """Shared by ST and GKT: the full net's label pass first, then subnet passes that distil from teachers.

    Every pass is back-propagated right after its forward (peak memory of plain training); all but the step's
    last pass run under DDP ``no_sync``, so there is one gradient all-reduce per step.
    """

    options = (distillation_options,)
    runs_full_net = True

    def __init__(self, model, criterion, depth: DepthEngine, bn_mode: str = 'freeze', recal_images: int = 2048,
                 **kwargs):
        super().__init__(model, criterion, depth, **kwargs)
        self.bn_mode = bn_mode
        self.recal_images = recal_images

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if is_multilabel(args):
            raise InputError(f'--method {args.method} distils softmax distributions, which a multi-label head does '
                             f'not have: it cannot train --task multilabel (cosub can)')
        check_distillation_args(args)

    @staticmethod
    def distillation_kwargs(args) -> dict:
        """Constructor arguments from the shared distillation options."""
        return dict(bn_mode=args.subnet_bn, recal_images=args.subnet_bn_images)

    def label_pass(self, input: torch.Tensor, target: torch.Tensor, step: Step, normalize=None):
        """Full net on the batch: label loss back-propagated at once (its graph freed), logits returned."""
        with self.no_sync():
            with step.autocast(), self.full_net():
                logits = self.forward_pass(input)
                label_loss = self.criterion(logits if normalize is None else normalize(logits), target)
            step.backward(label_loss)
        return logits.detach(), label_loss.detach()

    @contextlib.contextmanager
    def subnet_pass(self, keep: torch.Tensor, last: bool):
        """A subnet installed (and BN running statistics frozen) for one pass; DDP syncs only the last one."""
        sync = contextlib.nullcontext() if last else self.no_sync()
        bn = frozen_running_stats(self.depth.model) if self.bn_mode == 'freeze' else contextlib.nullcontext()
        with sync, bn, self.depth.subnet(keep):
            yield

    def compile_variants(self, input: torch.Tensor) -> Sequence[Tuple[Callable, torch.Tensor]]:
        """A subnet pass that keeps every block: each block's graph with BN as subnet passes have it, which a
        block skipped by the first step's subnet would otherwise compile in a later step."""
        every_block = torch.ones(self.depth.num_blocks, dtype=torch.bool)
        return [(lambda: self.subnet_pass(every_block, last=False), input)]

    def before_eval(self, batches) -> None:
        """``--subnet-bn recal``: the official ST code re-estimates BN statistics with the full net first."""
        if self.bn_mode == 'recal':
            model = self.depth.model
            was_training = model.training
            model.eval()
            seen = recalibrate(model, batches, self.recal_images)
            model.train(was_training)
            _logger.info(f'Re-estimated BatchNorm statistics of the full net on {seen} training images.')
