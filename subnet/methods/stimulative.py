"""``--method st`` and ``--method st++``: stimulative training (Ye et al., NeurIPS 2022; ST++, arXiv 2305.02507).

Per step: the full net's label loss, then K subnets, each keeping the first k_i blocks of every stage (k_i uniform
in [min(d_i, M), d_i], the official "ordered residual sampling"), each taught by the detached full-net logits with
T²·KL, summed over subnets. ST++ adds the direction-only "KL-" on standardised logits (with the full net's label
loss on standardised logits too, as the official code does), six subnets, M = 3 (the official ``space3`` on
ResNet-50) and smaller random inputs for the subnets. The defaults of both come from the official code
(Sunshine-Ye/NIPS22-ST: ``train.py`` defaults and the README's ST++ command), listed in ``DEFAULTS``.
"""
from __future__ import annotations

import argparse
import logging
from typing import List

import torch
import torch.nn.functional as F

from ..blocks import BlockMap
from ..depth import DepthEngine
from ..errors import InputError
from ..losses import direction_kl, kl_distill, standardize_logits
from ..results import cost_part, loss_part
from ..sampling import lowest_prefix_depths, stage_prefix_keep
from ..step import Step
from .base import DistillFromFullNet, distillation_options

_logger = logging.getLogger('train')

__all__ = ['StimulativeTask', 'StimulativePlusPlusTask', 'stimulative_options']


def stimulative_options(parser) -> None:
    g = parser.add_argument_group('st / st++: stimulative training (Ye et al. 2022, 2023); defaults per method')
    g.add_argument('--st-subnets', type=int, default=None, metavar='K',
                   help='subnets sampled per step, their KL terms summed (st: 1, st++: 6)')
    g.add_argument('--st-min-keep', type=int, default=None, metavar='M',
                   help='each stage keeps at least min(depth, M) blocks (st: 1, st++: 3, the official space3)')
    g.add_argument('--st-loss', default=None, choices=('kl', 'kl-'),
                   help="'kl' (ST) or the direction-only 'kl-' on standardised logits (ST++) (st: kl, st++: kl-)")
    g.add_argument('--st-norm-ce', default=None, action=argparse.BooleanOptionalAction,
                   help="full net's label loss on the standardised logits, as the official ST++ code does "
                        "(default: on with kl-)")
    g.add_argument('--st-min-size', type=float, default=None, metavar='FRACTION',
                   help='subnet inputs are resized to a random side in [FRACTION * crop, crop] (st: 1.0, st++: 0.43)')
    g.add_argument('--st-min-side', type=int, default=None, metavar='PIXELS',
                   help="floor on a subnet input's side, capped at the crop (default: twice the model's output "
                        'stride, 64 px on a ResNet, so its last stage keeps at least a 2x2 map; the official runs '
                        'never go below 86 px, so ImageNet crops are unchanged; 0: the ratio alone)')
    g.add_argument('--st-side-step', type=int, default=None, metavar='PIXELS',
                   help="snap each drawn side to the nearest multiple of PIXELS in its range, or to the range's ends: "
                        'a few sizes, so that --torchcompile compiles each once (default: the output stride, 32 px '
                        'on a ResNet, with --torchcompile; 1, every side of the official draw, without)')
    g.add_argument('--st-amplitude', type=float, default=1.0, metavar='A', help='scale of the standardised logits')


def output_stride(model) -> int:
    """How much the model shrinks its input by its last feature map (timm's ``feature_info`` reduction: 32 for a
    ResNet, the patch size for a ViT); 32 when the model does not say."""
    info = getattr(model, 'feature_info', None)
    if isinstance(info, (list, tuple)) and info and isinstance(info[-1], dict) and 'reduction' in info[-1]:
        return int(info[-1]['reduction'])
    return 32


class StimulativeTask(DistillFromFullNet):
    """ST: one subnet per step, any prefix depth per stage, plain KL to the full net of the same step.

    ST++'s smaller inputs are the original batch resized once per subnet to a random side in
    [max(⌊min_size·crop⌋, min(min_side, crop)), crop], not re-normalised. The floor ``min_side`` (ours; default
    twice the model's output stride) keeps small images from collapsing to 1x1 maps: the official ratio was tuned
    on ImageNet crops, where it never goes below 86 px (the official code resizes cumulatively, subnet k seeing
    r₁…r_k, and normalises again each time: an accident of overwriting its input tensor in the loop).
    ``side_step`` (ours, the default under ``--torchcompile``) snaps the drawn side to a few sizes: inductor
    compiles a graph per input side (README, Speed), 129 sides at 224 px, 5 once snapped to multiples of 32, with
    the same mean side.
    """

    result_parts = (loss_part('st_label', "the full net's label loss"),
                    loss_part('st_kl', "the subnets' distillation loss, summed"),
                    cost_part('st_subnet_flops', "the subnets' mean FLOPs, a fraction of the full net's"))

    options = (distillation_options, stimulative_options)
    # the official code's defaults (train.py: --multi_Snet 1, default sample space, no --norm_kd, no --Snet_Dtrans)
    DEFAULTS = dict(subnets=1, min_keep=1, loss='kl', norm_ce=False, min_size=1.0)

    @property
    def varies_input_size(self) -> bool:
        """ST++: each subnet sees the batch at another side (``subnet.compile`` warns when they are not snapped to
        a few: inductor compiles again for each)."""
        return self.min_size < 1.0

    @property
    def compile_dynamic(self):
        """``torch.compile``'s ``dynamic`` for the block scope: False (a static graph per side) when the sides are
        snapped to a few, else None (dynamo's automatic dynamic shapes)."""
        return False if self.varies_input_size and self.side_step > 1 else None

    def __init__(self, model, criterion, depth: DepthEngine, subnets: int = None, min_keep: int = None,
                 loss: str = None, norm_ce: bool = None, min_size: float = None, temperature: float = 1.0,
                 amplitude: float = 1.0, kl_weight: float = 1.0, min_side: int = None, side_step: int = 1,
                 **kwargs):
        super().__init__(model, criterion, depth, **kwargs)
        given = dict(subnets=subnets, min_keep=min_keep, loss=loss, norm_ce=norm_ce, min_size=min_size)
        settings = {k: self.DEFAULTS[k] if v is None else v for k, v in given.items()}
        self.subnets, self.min_keep, self.loss = settings['subnets'], settings['min_keep'], settings['loss']
        self.norm_ce, self.min_size = settings['norm_ce'], settings['min_size']
        self.temperature = temperature
        self.amplitude = amplitude
        self.kl_weight = kl_weight
        patch = getattr(getattr(depth.model, 'patch_embed', None), 'patch_size', None)
        self.size_multiple = int(patch[0] if isinstance(patch, (tuple, list)) else patch or 1)
        self.min_side = 2 * output_stride(depth.model) if min_side is None else min_side
        self.side_step = side_step

    # ---- command line
    @classmethod
    def fill_defaults(cls, args) -> None:
        """The method's published values for the ST options left unset (``--st-norm-ce``: on with KL-)."""
        for key, value in cls.DEFAULTS.items():
            if key != 'norm_ce' and getattr(args, f'st_{key}') is None:
                setattr(args, f'st_{key}', value)
        if args.st_norm_ce is None:
            args.st_norm_ce = args.st_loss == 'kl-'

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        cls.fill_defaults(args)
        if args.st_subnets < 1 or args.st_min_keep < 1:
            raise InputError('--st-subnets and --st-min-keep must be >= 1')
        if not 0 < args.st_min_size <= 1:
            raise InputError(f'--st-min-size must be in (0, 1], got {args.st_min_size}')
        if args.st_min_side is not None and args.st_min_side < 0:
            raise InputError(f'--st-min-side must be >= 0, got {args.st_min_side}')
        if args.st_side_step is not None and args.st_side_step < 1:
            raise InputError(f'--st-side-step must be >= 1, got {args.st_side_step}')

    @classmethod
    def model_kwargs(cls, args) -> dict:
        """ViT-like models must accept the subnets' smaller inputs (timm's ``dynamic_img_size``)."""
        cls.fill_defaults(args)
        return {'dynamic_img_size': True} if args.st_min_size < 1.0 else {}

    @staticmethod
    def check_sampling_space(block_map: BlockMap, min_keep: int, method: str) -> None:
        """One line when ``min_keep`` leaves every stage at its full depth: the method would train the full net
        alone (``--method st++`` keeps 3 blocks per stage, all of a ResNet-18's 2)."""
        lowest = lowest_prefix_depths(block_map, min_keep)
        if any(low < len(s.blocks) for low, s in zip(lowest, block_map.stages)):
            return
        names = ', '.join(s.name for s in block_map.stages)
        depths = ', '.join(str(len(s.blocks)) for s in block_map.stages)
        fits = max((len(s.blocks) - 1 for s in block_map.stages if s.min_keep < len(s.blocks)), default=0)
        remedy = (f'use --st-min-keep {fits}, the most that lets a stage be shortened' if fits else
                  "no stage ends in blocks that can be skipped, and ST's subnets drop the last blocks of a stage")
        raise InputError(f'--method {method} on {block_map.model_name} samples only the full net: --st-min-keep '
                         f'{min_keep} keeps every block of its stages ({names} hold {depths} blocks); {remedy}')

    @classmethod
    def from_args(cls, args, model, criterion, *, device=None, dtype=None, input_size=None, verbose=True):
        cls.fill_defaults(args)
        depth = cls.depth_engine(model, input_size, verbose)
        cls.check_sampling_space(depth.block_map, args.st_min_keep, cls.method)
        if args.st_side_step is None:
            args.st_side_step = output_stride(model) if getattr(args, 'torchcompile', None) else 1
        task = cls(model, criterion, depth, subnets=args.st_subnets,
                   min_keep=args.st_min_keep, loss=args.st_loss, norm_ce=args.st_norm_ce, min_size=args.st_min_size,
                   temperature=args.subnet_temperature, amplitude=args.st_amplitude, kl_weight=args.subnet_kd_weight,
                   min_side=args.st_min_side, side_step=args.st_side_step, seed=args.seed, device=device,
                   dtype=dtype, verbose=verbose, **cls.distillation_kwargs(args))
        if verbose and input_size is not None and task.varies_input_size:
            crop, sides = input_size[-1], task.sides(input_size[-1])
            how = (f'snapped to multiples of {task.side_step} px (--st-side-step)' if task.side_step > 1 else
                   'every side of the official draw (--st-side-step 1)')
            _logger.info(f'{cls.method} subnet inputs: {len(sides)} sides from {sides[0]} to {sides[-1]} px at the '
                         f'{crop}-px crop, {how}' if len(sides) > 1 else
                         f'{cls.method} subnet inputs: the full {crop}-px crop (--st-min-side {task.min_side} is not '
                         f'below it)')
        return task

    # ---- the step
    def standardized(self, logits: torch.Tensor) -> torch.Tensor:
        return self.amplitude * standardize_logits(logits)

    def distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.loss == 'kl-':
            return direction_kl(student, teacher, self.temperature, self.amplitude)
        return kl_distill(student, teacher, self.temperature)

    def side_range(self, crop: int) -> tuple:
        """The smallest and largest side a subnet input may have for a square ``crop``."""
        if self.min_size >= 1.0:
            return crop, crop
        return max(int(crop * self.min_size), min(self.min_side, crop)), crop

    def snapped_side(self, side: int, low: int, high: int) -> int:
        """``side`` snapped to the nearest multiple of ``side_step`` in [low, high] or to one of its ends, then
        rounded to the patch size of ViT-like models. A tie goes to the even multiple (Python's ``round``), so a
        uniform draw keeps its mean side (160 px at a 224-px crop, from 96, 128, 160, 192 and 224)."""
        if self.side_step > 1:
            grid = round(side / self.side_step) * self.side_step
            candidates = (grid, low, high) if low <= grid <= high else (low, high)
            side = min(candidates, key=lambda c: abs(c - side))
        return max(self.size_multiple, round(side / self.size_multiple) * self.size_multiple)

    def sides(self, crop: int) -> List[int]:
        """Every side a subnet input may have at a square ``crop``, in increasing order."""
        low, high = self.side_range(crop)
        return sorted({self.snapped_side(side, low, high) for side in range(low, high + 1)})

    def subnet_input(self, input: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch resized to a random side (``snapped_side``)."""
        low, high = self.side_range(input.shape[-1])
        if low >= high:
            return input
        return self.resized(input, self.snapped_side(int(torch.randint(low, high + 1, (1,), generator=generator)),
                                                     low, high))

    @staticmethod
    def resized(input: torch.Tensor, side: int) -> torch.Tensor:
        if side == input.shape[-1]:
            return input
        return F.interpolate(input, size=(side, side), mode='bilinear', align_corners=False)

    def compile_variants(self, input: torch.Tensor):
        """Every block's subnet-pass graph at each side a subnet input may have, when the sides are snapped to a
        few (``compile_dynamic`` False); at every side of the draw only the crop's (a graph per side: 129)."""
        (context, _), = super().compile_variants(input)
        sides = self.sides(input.shape[-1]) if self.compile_dynamic is False else [input.shape[-1]]
        return [(context, self.resized(input, side)) for side in sides]

    def train_step(self, input: torch.Tensor, target: torch.Tensor, step: Step) -> dict:
        generator = self.next_generator()
        teacher, label_loss = self.label_pass(input, target, step, self.standardized if self.norm_ce else None)
        kl_sum, flops = torch.zeros((), device=teacher.device), 0.0
        for k in range(self.subnets):
            keep = stage_prefix_keep(self.depth.block_map, self.min_keep, generator)
            with self.subnet_pass(keep, last=k == self.subnets - 1):
                with step.autocast():
                    kl = self.kl_weight * self.distill(self.forward_pass(self.subnet_input(input, generator)),
                                                       teacher)
                step.backward(kl)
            kl_sum += kl.detach()
            flops += self.depth.block_map.flop_fraction(keep) / self.subnets
        return {'loss': label_loss + kl_sum, 'output': teacher, 'st_label': label_loss, 'st_kl': kl_sum,
                'st_subnet_flops': torch.tensor(flops)}


class StimulativePlusPlusTask(StimulativeTask):
    """ST++: six subnets, each stage keeps at least min(d_i, 3) blocks, KL- on standardised logits with the label
    loss on them too, subnet inputs of a random side in [⌊0.43·crop⌋, crop].

    Values from the official ST++ ImageNet command (README: ``--multi_Snet 6 --sample_space space3 --norm_kd
    --Snet_Dtrans --Dtrans Dtrans7``; ``mini_size = 0.43`` in train.py).
    """

    DEFAULTS = dict(subnets=6, min_keep=3, loss='kl-', norm_ce=True, min_size=0.43)
