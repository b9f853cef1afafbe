"""``--method cosub``: co-training of two stochastic-depth submodels (Touvron et al., CVPR 2023).

The official code is a flag of facebookresearch/deit (``engine.py``): after mixup the batch is concatenated with
itself, each copy runs through its own drop-path draw, and each submodel learns from the labels (weight λ) and from
the other's detached sigmoid (1 − λ), every term a mean BCE-with-logits. The duplication happens inside the step,
so ``--batch-size`` keeps meaning images per device, as in DeiT.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from ..depth import DepthEngine
from ..errors import UsageError
from ..losses import cosub_loss
from ..sampling import bernoulli_keep
from .base import SubnetTask

__all__ = ['CosubTask', 'cosub_options']

_logger = logging.getLogger('train')

IMPLEMENTATIONS = ('skip', 'mask', 'timm')


def cosub_options(parser) -> None:
    g = parser.add_argument_group('cosub: co-training of two stochastic-depth submodels (Touvron et al. 2023)')
    g.add_argument('--cosub-label-weight', type=float, default=0.5, metavar='LAMBDA',
                   help="weight of the label terms; the peer terms get 1 - LAMBDA (default: 0.5, DeiT's "
                        'engine.py: four terms of 0.25)')
    g.add_argument('--cosub-impl', default='skip', choices=IMPLEMENTATIONS,
                   help="'skip': dropped blocks are not computed for the rows that drop them (fast, default); "
                        "'mask': same masks, branches multiplied (full cost); 'timm': timm's own per-branch "
                        "DropPath, DeiT's implementation")


class CosubTask(SubnetTask):
    """cosub: the batch runs twice through independent stochastic-depth submodels (one per row).

    ``impl='skip'`` runs each block only on the rows that keep it (the paper's "efficient stochastic depth",
    at block granularity); 'mask' multiplies branches by the same per-row masks at full cost; 'timm' is
    timm's per-branch DropPath, DeiT's own implementation (masks from the global RNG, per branch).
    """

    options = (cosub_options,)
    drop_schedule = 'constant'  # DeiT III's models_v2.py: the same drop-path rate in every block

    def __init__(self, model, depth: DepthEngine, drop_rate: torch.Tensor, impl: str = 'skip',
                 label_weight: float = 0.5, target_threshold: Optional[float] = None, rank: int = 0, **kwargs):
        super().__init__(model, nn.Identity(), depth, **kwargs)
        self.drop_rate = drop_rate
        self.impl = impl
        self.label_weight = label_weight
        self.target_threshold = target_threshold
        self.rank = rank

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
            raise UsageError('cosub needs dense targets: turn on --mixup and/or --cutmix (as DeiT III does)')
        if args.drop_path is not None and args.drop_path <= 0:
            raise UsageError('cosub needs stochastic depth: set --drop-path > 0 (with 0 both submodels are '
                             'the same network)')
        if not 0 <= args.cosub_label_weight <= 1:
            raise UsageError(f'--cosub-label-weight must be in [0, 1], got {args.cosub_label_weight}')
        if args.bce_target_thresh is not None and args.smoothing > 0 and args.bce_target_thresh < args.smoothing:
            raise UsageError(f'--bce-target-thresh {args.bce_target_thresh} with --smoothing {args.smoothing} '
                             f'turns every smoothed target into 1 and erases the labels; use --smoothing 0 '
                             f'(DeiT III) or a higher threshold')

    @staticmethod
    def drop_rates_for(depth: DepthEngine) -> torch.Tensor:
        """Per-block drop-path rates: the model's own, as --drop-path and --drop-schedule built it."""
        rates = depth.model_drop_path_rates()
        if float(rates.max()) <= 0:
            raise UsageError(f'cosub needs stochastic depth but {depth.name} was built without it: '
                             f'set --drop-path > 0')
        return rates

    @classmethod
    def from_args(cls, args, model, criterion, *, device=None, dtype=None, input_size=None, verbose=True):
        depth = cls.depth_engine(model, input_size, verbose)
        impl = args.cosub_impl
        if impl == 'skip' and args.torchcompile:
            _logger.warning("--cosub-impl skip changes shapes every step, which torch.compile would recompile; "
                            "using --cosub-impl mask (same masks, static graph).")
            impl = 'mask'
        return cls(model, depth, cls.drop_rates_for(depth), impl=impl, label_weight=args.cosub_label_weight,
                   target_threshold=args.bce_target_thresh, rank=args.rank, seed=args.seed, device=device,
                   dtype=dtype, verbose=verbose)

    def submodels(self, rows: int):
        """Stochastic depth for ``rows`` rows, each row its own submodel."""
        if self.impl == 'timm':
            return self.depth.timm_drop_path(self.drop_rate)
        keep_mask = bernoulli_keep(rows, self.drop_rate, self.next_generator(self.rank))
        return self.depth.per_sample(keep_mask, 1.0 - self.drop_rate, mode=self.impl)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict:
        if target.ndim != 2:
            raise UsageError('cosub needs dense (mixup/cutmix) targets, got class indices')
        batch = input.shape[0]
        with self.submodels(2 * batch):
            logits = self.forward_pass(torch.cat([input, input]))
            terms = cosub_loss(logits[:batch], logits[batch:], target, self.label_weight, self.target_threshold)
            self.backward.final(terms.total)
        return {'loss': terms.total.detach(), 'output': logits[:batch].detach(),
                'cosub_label': terms.label.detach(), 'cosub_peer': terms.peer.detach()}
