"""``--method cosub``: co-training of two stochastic-depth submodels (Touvron et al., CVPR 2023).

The official code is a flag of facebookresearch/deit (``engine.py``): after mixup the batch is concatenated with
itself, each copy runs through its own drop-path draw, and each submodel learns from the labels (weight λ) and from
the other's detached sigmoid (1 − λ), every term a mean BCE-with-logits. The duplication happens inside the step,
so ``--batch-size`` keeps meaning images per device, as in DeiT.

The submodels are DeiT's stochastic depth (``models_v2.py``): timm's ``DropPath`` on the attention and on the MLP
branch of every block, each dropping a row on its own, i.i.d. Bernoulli, at the same rate in every block. By
default we draw exactly those masks and run each branch only on the rows that keep it (the paper's "efficient
stochastic depth", which DeiT never released); the depth engine does the work.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from ..blocks import UNITS
from ..criterion import is_multilabel, mixup_active
from ..depth import DepthEngine
from ..errors import InputError
from ..fastest import FastestChoice
from ..losses import CosubLoss
from ..results import loss_part
from ..sampling import ROW_SAMPLINGS, draw_keep
from ..step import Step
from .base import SubnetTask

__all__ = ['CosubTask', 'cosub_options']

_logger = logging.getLogger('train')

IMPLEMENTATIONS = ('auto', 'skip', 'mask', 'timm')
MEASURED = ('skip', 'mask')  # what 'auto' chooses between: the same masks either way


def cosub_options(parser) -> None:
    g = parser.add_argument_group('cosub: co-training of two stochastic-depth submodels (Touvron et al. 2023)')
    g.add_argument('--cosub-label-weight', type=float, default=0.5, metavar='LAMBDA',
                   help="weight of the label terms; the peer terms get 1 - LAMBDA (default: 0.5, DeiT's "
                        'engine.py: four terms of 0.25)')
    g.add_argument('--cosub-impl', default='auto', choices=IMPLEMENTATIONS,
                   help="'skip': a dropped branch is not computed for the rows that drop it; 'mask': the same "
                        "masks multiplied in (full cost, a static graph); 'auto': time a few first steps of each "
                        'on this model and batch and keep the faster, logged and kept in the checkpoint '
                        "(default); 'timm': timm's own per-branch DropPath, DeiT's implementation (every branch "
                        'computed, then multiplied)')
    g.add_argument('--cosub-drop-unit', default='branch', choices=UNITS,
                   help="what drops: each residual 'branch' on its own (a ViT block's attention and MLP, as "
                        "DeiT's models_v2.py puts a DropPath on each; default), or a whole 'block'. Blocks with "
                        'one branch (ResNet, ConvNeXt) are the same either way')
    g.add_argument('--cosub-rows', default=None, choices=ROW_SAMPLINGS,
                   help="how the rows that keep a branch are drawn: 'bernoulli', each row on its own with "
                        "probability 1 - rate (timm's DropPath, as in DeiT; default), or 'fixed', exactly "
                        "round((1 - rate) x rows) random rows per branch (DINOv2's): shapes never change, so "
                        'torch.compile compiles the step once (default under --torchcompile)')


class CosubTask(SubnetTask):
    """cosub: the batch runs twice through independent stochastic-depth submodels (one per row).

    ``drop_rate``: one rate per block (the model's own, see ``drop_rates_for``), shared by the block's branches.
    ``impl='skip'`` runs each branch (``unit='branch'``) or block only on the rows that keep it; 'mask'
    multiplies by the same masks at full cost; 'auto' times the first steps of each and keeps the faster
    (``subnet.fastest``; ``impl_clock`` replaces its clock); 'timm' is timm's per-branch DropPath, DeiT's own
    implementation (masks from the global RNG, drawn inside the forward). ``row_sampling``: 'bernoulli' or 'fixed'
    (see ``draw_keep``).
    """

    options = (cosub_options,)
    result_parts = (loss_part('cosub_label', 'the two submodels\' label (BCE) loss'),
                    loss_part('cosub_peer', 'each submodel\'s BCE against the other\'s sigmoid'))
    compile_scope = 'model'  # one graph for every draw (fixed-count rows): faster than compiling each block
    drop_schedule = 'constant'  # DeiT III's models_v2.py: the same drop-path rate in every block

    def __init__(self, model, depth: DepthEngine, drop_rate: torch.Tensor, impl: str = 'skip', unit: str = 'branch',
                 row_sampling: str = 'bernoulli', label_weight: float = 0.5, target_threshold: Optional[float] = None,
                 label_smoothing: float = 0.0, rank: int = 0, impl_clock=None, **kwargs):
        super().__init__(model, CosubLoss(label_weight, target_threshold, label_smoothing), depth, **kwargs)
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"cosub implementation must be one of {', '.join(IMPLEMENTATIONS)}, not {impl!r}")
        if row_sampling not in ROW_SAMPLINGS:
            raise ValueError(f"cosub row sampling must be one of {', '.join(ROW_SAMPLINGS)}, not {row_sampling!r}")
        self.drop_rate = torch.as_tensor(drop_rate, dtype=torch.float64)
        self.unit_rates = depth.block_map.per_unit(self.drop_rate, unit)  # also checks the unit
        self.impl, self.unit, self.row_sampling = impl, unit, row_sampling
        self.rank = rank
        # 'auto': skip or mask, whichever runs this model's steps faster (measured on the first steps)
        self.impl_choice = FastestChoice(MEASURED, clock=impl_clock, what='--cosub-impl',
                                         verbose=kwargs.get('verbose', True)) if impl == 'auto' else None

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if not is_multilabel(args) and not mixup_active(args):
            raise InputError('cosub needs dense targets: turn on --mixup and/or --cutmix (as DeiT III does), or '
                             'train multi-hot targets (--task multilabel)')
        if getattr(args, 'loss', None) not in (None, 'bce') or any(
                getattr(args, option, None) is not None for option in ('loss_pos_weight', 'loss_class_weight')):
            raise InputError("cosub's loss is its own binary cross-entropy (labels and the peer's sigmoids): "
                             '--loss other than bce, --loss-pos-weight and --loss-class-weight do not apply')
        if args.drop_path is not None and args.drop_path <= 0:
            raise InputError('cosub needs stochastic depth: set --drop-path > 0 (with 0 both submodels are '
                             'the same network)')
        if not 0 <= args.cosub_label_weight <= 1:
            raise InputError(f'--cosub-label-weight must be in [0, 1], got {args.cosub_label_weight}')
        if args.bce_target_thresh is not None and args.smoothing > 0 and args.bce_target_thresh < args.smoothing:
            raise InputError(f'--bce-target-thresh {args.bce_target_thresh} with --smoothing {args.smoothing} '
                             f'turns every smoothed target into 1 and erases the labels; use --smoothing 0 '
                             f'(DeiT III) or a higher threshold')
        if args.cosub_impl == 'timm' and (args.cosub_drop_unit != 'branch' or args.cosub_rows == 'fixed'):
            raise InputError("--cosub-impl timm is timm's own DropPath: per branch, Bernoulli rows; "
                             '--cosub-drop-unit block and --cosub-rows fixed need --cosub-impl skip or mask')

    @staticmethod
    def drop_rates_for(depth: DepthEngine) -> torch.Tensor:
        """Per-block drop-path rates: the model's own, as --drop-path and --drop-schedule built it."""
        rates = depth.model_drop_path_rates()
        if float(rates.max()) <= 0:
            raise InputError(f'cosub needs stochastic depth but {depth.name} was built without it: '
                             f'set --drop-path > 0')
        return rates

    @staticmethod
    def row_sampling_for(args, verbose: bool = True) -> str:
        """``--cosub-rows``, or its default: Bernoulli, and a fixed count under --torchcompile with skip, whose
        per-step row counts would otherwise recompile the model every step."""
        if args.cosub_rows is not None:
            if args.cosub_rows == 'bernoulli' and args.torchcompile and args.cosub_impl in ('skip', 'auto') \
                    and verbose:
                _logger.warning('--cosub-rows bernoulli changes shapes every step: torch.compile recompiles until '
                                'its recompile limit, then runs that frame eagerly; --cosub-rows fixed compiles once')
            return args.cosub_rows
        if args.torchcompile and args.cosub_impl in ('skip', 'auto'):
            if verbose:
                _logger.info('cosub under --torchcompile: each branch keeps a fixed count of rows (--cosub-rows '
                             'fixed), so the shapes never change and the step compiles once.')
            return 'fixed'
        return 'bernoulli'

    @classmethod
    def from_args(cls, args, model, criterion, *, device=None, dtype=None, input_size=None, verbose=True):
        """cosub's criterion is its own (``CosubLoss``: BCE on two submodels' logits), not timm's ``criterion``."""
        depth = cls.depth_engine(model, input_size, verbose)
        return cls(model, depth, cls.drop_rates_for(depth), impl=args.cosub_impl, unit=args.cosub_drop_unit,
                   row_sampling=cls.row_sampling_for(args, verbose), label_weight=args.cosub_label_weight,
                   target_threshold=args.bce_target_thresh, label_smoothing=cls.label_smoothing_for(args),
                   rank=args.rank, seed=args.seed, device=device, dtype=dtype, verbose=verbose)

    @staticmethod
    def label_smoothing_for(args) -> float:
        """Smoothing cosub applies to multi-hot label targets itself: ``--smoothing`` for multi-label targets
        without mixup/cutmix, towards 0.5 as timm's multi-label losses do; mixup (and single-label targets, which
        always come through mixup here) have it applied already."""
        return args.smoothing if is_multilabel(args) and not mixup_active(args) else 0.0

    @contextlib.contextmanager
    def submodels(self, batch: int):
        """Stochastic depth for ``batch`` rows, each row its own submodel (masks differ per rank: other images);
        under ``impl='auto'`` the step inside is timed while the trial lasts."""
        if self.impl == 'timm':
            with self.depth.timm_drop_path(self.drop_rate):
                yield
            return
        keep_mask, keep_prob = draw_keep(batch, self.unit_rates, self.row_sampling, self.next_generator(self.rank))
        timed = self.impl_choice.timed(self.device) if self.impl_choice is not None \
            else contextlib.nullcontext(self.impl)
        with timed as impl, self.depth.per_sample(keep_mask, keep_prob, mode=impl, unit=self.unit):
            yield

    def get_task_state(self, module=None, ema: bool = False) -> dict:
        state = super().get_task_state(module, ema)
        if self.impl_choice is not None and not ema:
            state['cosub_impl'] = self.impl_choice.state_dict()
        return state

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        super().load_task_state(state, strict, module, ema)
        if state and not ema and self.impl_choice is not None and 'cosub_impl' in state:
            self.impl_choice.load_state_dict(state['cosub_impl'])

    def train_step(self, input: torch.Tensor, target: torch.Tensor, step: Step) -> dict:
        if target.ndim != 2:
            raise ValueError('cosub needs dense targets (mixup/cutmix, or multi-hot labels), got class indices')
        batch = input.shape[0]
        with self.submodels(2 * batch):
            with step.autocast():
                logits = self.forward_pass(torch.cat([input, input]))
                terms = self.criterion(logits[:batch], logits[batch:], target)
            step.backward(terms.total)
        return {'loss': terms.total.detach(), 'output': logits[:batch].detach(),
                'cosub_label': terms.label.detach(), 'cosub_peer': terms.peer.detach()}
