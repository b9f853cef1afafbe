"""Find the residual blocks and stages of any timm model, with each block's residual branches and FLOPs.

timm gives every residual block one or more stochastic-depth slots (``drop_path``, ``drop_path1``..``3``; a
``DropPath``, an ``nn.Identity`` placeholder, or ``None`` in ResNet when the rate is 0). Those slots are how we
find blocks, without a per-family list of class names (a family with other slot names can be described with
``register_drop_path_slots``). One dry forward (eval mode, frozen parameters, batch 2) records, per block, the
forward order, the input/output shapes, the extra call arguments and the FLOPs; then each block runs again on its
recorded input with every branch zeroed, to check that it is a pure residual ``x + sum_i drop_path_i(f_i(x))``
(only such blocks can be skipped exactly), and once more to record the order of its children and slot calls,
i.e. its residual branches (see ``subnet.branches``).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.utils import unwrap_model
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .branches import Branch, check_branches, record_branches, restore_slots, swap_slots, unbatched_args
from .errors import ModelNotSupported, first_line

__all__ = ['Block', 'Stage', 'DropUnit', 'BlockMap', 'UNITS', 'find_blocks', 'drop_path_slots', 'slot_drop_rate',
           'register_drop_path_slots', 'swap_slots', 'restore_slots', 'model_name']

_logger = logging.getLogger(__name__)

# What a keep mask's columns are: whole blocks, or the residual branches of blocks whose branches run apart
UNITS = ('block', 'branch')

# Batch size of the discovery forward. An extra block argument whose first dimension equals it is taken to be
# per-row (gathered with the kept rows in per-sample mode); anything else (rope tables, relative position biases,
# H/W) is shared by all rows.
PROBE_BATCH = 2


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter has no formula for the fused CPU attention kernel, which would leave a ViT's q@k and attn@v out
_EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu'):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def model_name(model: nn.Module) -> str:
    """The timm architecture name, for one-line error messages."""
    model = unwrap_model(model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


# Slot names of families whose slots are not called drop_path*: block class (None: any module) -> names
_REGISTERED_SLOTS: Dict[Optional[type], Tuple[str, ...]] = {}


def register_drop_path_slots(*names: str, block: Optional[type] = None) -> None:
    """Describe a model family that discovery misses: its blocks' stochastic-depth slots are called ``names``.

    With ``block`` (an ``nn.Module`` subclass) the names count only on instances of that class, otherwise on any
    module. Each slot must hold what timm's hold: a module applied to one residual branch (``DropPath``,
    ``nn.Identity``) or ``None``. Registering the same names again is harmless.
    """
    if not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(f'register_drop_path_slots: slot names must be attribute names, got {names!r}')
    if block is not None and not (isinstance(block, type) and issubclass(block, nn.Module)):
        raise TypeError(f'register_drop_path_slots: block must be an nn.Module subclass, got {block!r}')
    _REGISTERED_SLOTS[block] = tuple(dict.fromkeys(_REGISTERED_SLOTS.get(block, ()) + names))


def drop_path_slots(module: nn.Module) -> Tuple[str, ...]:
    """Names of the stochastic-depth slots a module owns: submodules or plain ``None`` attributes."""
    names = list(module._modules) + [k for k, v in vars(module).items() if v is None]
    registered = {n for cls, slots in _REGISTERED_SLOTS.items()
                  if cls is None or isinstance(module, cls) for n in slots}
    return tuple(sorted({n for n in names if (n.startswith('drop_path') and not n.endswith('_rate'))
                         or n in registered}))


def slot_drop_rate(slot: Optional[nn.Module]) -> float:
    """The drop-path rate a slot holds as the model was built (0 for Identity / None)."""
    return float(getattr(slot, 'drop_prob', 0.0) or 0.0)


@dataclass(frozen=True, eq=False)
class Block:
    """One drop_path-bearing block of the model, in forward order."""
    index: int
    name: str                          # qualified module name, as in ``model.named_modules()``
    module: nn.Module = field(repr=False)
    stage: int                         # index into ``BlockMap.stages``
    slots: Tuple[str, ...]             # its drop_path attribute names
    skippable: bool                    # skipping it is exactly "zero all its residual branches"
    reason: str                        # why it is not skippable ('' when it is)
    flops: int                         # forward FLOPs per sample at the discovery input size
    # extra tensor arguments (position from 1, or keyword) without a batch dimension: rope tables, position biases
    shared_args: frozenset = field(default=frozenset(), repr=False)
    branches: Tuple[Branch, ...] = ()  # its residual branches, in call order (as many as slot calls)
    separable: bool = False            # each branch can run on its own rows (unit='branch' splits it)
    branch_reason: str = ''            # why not ('one branch', ...; '' when separable)


@dataclass(frozen=True)
class DropUnit:
    """One column of a keep mask: a whole block, or one residual branch of a block whose branches run apart."""
    index: int                         # the column
    block: int                         # index into ``BlockMap.blocks``
    branch: Optional[int]              # index into that block's ``branches``; None for the whole block
    flops: int


@dataclass(frozen=True)
class Stage:
    """A maximal run of consecutive blocks under the same parent container (ResNet ``layer2``, ViT ``blocks``)."""
    index: int
    name: str
    blocks: Tuple[int, ...]            # block indices, in forward order
    min_keep: int                      # a prefix shorter than this would drop a block that cannot be skipped


@dataclass(frozen=True)
class BlockMap:
    """The blocks and stages of a model with their FLOPs; masks over blocks index ``blocks``."""
    model_name: str
    input_size: Tuple[int, ...]
    blocks: Tuple[Block, ...]
    stages: Tuple[Stage, ...]
    total_flops: int                   # whole-model forward FLOPs per sample at ``input_size``

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def skippable(self) -> torch.Tensor:
        """Bool tensor (num_blocks,): which blocks can be skipped."""
        return torch.tensor([b.skippable for b in self.blocks], dtype=torch.bool)

    @property
    def depths(self) -> Tuple[int, ...]:
        return tuple(len(s.blocks) for s in self.stages)

    def units(self, unit: str = 'block') -> Tuple[DropUnit, ...]:
        """The columns of a keep mask at this granularity: one per block ('block'), or one per residual branch
        of the blocks whose branches run apart and one per other block ('branch')."""
        if unit not in UNITS:
            raise ValueError(f"{self.model_name}: drop unit must be one of {', '.join(UNITS)}, not {unit!r}")
        units = []
        for b in self.blocks:
            if unit == 'branch' and b.separable:
                units += [DropUnit(len(units) + j, b.index, j, branch.flops) for j, branch in enumerate(b.branches)]
            else:
                units.append(DropUnit(len(units), b.index, None, b.flops))
        return tuple(units)

    def per_unit(self, values: Union[torch.Tensor, Sequence[float]], unit: str = 'branch') -> torch.Tensor:
        """Per-block values (drop rates, ``skippable``) repeated for each column of ``unit``: the branches of a
        block share its value, as timm gives both slots of a block the same drop-path rate."""
        values = torch.as_tensor(values)
        if values.shape != (len(self.blocks),):
            raise ValueError(f'{self.model_name}: expected one value per block ({len(self.blocks)}), got shape '
                             f'{tuple(values.shape)}')
        return values[[u.block for u in self.units(unit)]]

    def flop_fraction(self, keep: Union[torch.Tensor, Sequence[float]], unit: str = 'block') -> float:
        """Fraction of the full model's FLOPs a subnet costs.

        ``keep`` is per column of ``unit`` (see ``units``): bools (a per-batch subnet), keep probabilities (the
        expected cost of per-sample masks), or a (batch, columns) mask whose row mean is used (the realised cost).
        """
        units = self.units(unit)
        keep = torch.as_tensor(keep, dtype=torch.float64)
        if keep.ndim == 2:
            keep = keep.mean(0)
        if keep.shape != (len(units),):
            raise ValueError(f'{self.model_name}: keep has shape {tuple(keep.shape)}, expected ({len(units)},)')
        flops = torch.tensor([u.flops for u in units], dtype=torch.float64)
        return float((self.total_flops - (flops * (1 - keep)).sum()) / self.total_flops)

    def stage_depths(self, keep: Union[torch.Tensor, Sequence[bool]]) -> Tuple[int, ...]:
        """Blocks kept per stage (ST logs a subnet as these depths, e.g. ResNet-50 (3, 3, 5, 3))."""
        keep = torch.as_tensor(keep, dtype=torch.bool)
        return tuple(int(keep[list(s.blocks)].sum()) for s in self.stages)

    def prefix_keep(self, kept_per_stage: Sequence[int]) -> torch.Tensor:
        """The (num_blocks,) bool mask keeping the first ``kept_per_stage[i]`` blocks of stage i (ST's shape)."""
        keep = torch.zeros(len(self.blocks), dtype=torch.bool)
        for stage, kept in zip(self.stages, kept_per_stage):
            keep[list(stage.blocks[:kept])] = True
        return keep

    def describe(self) -> str:
        """A table for logs: one line per block."""
        lines = [f'{self.model_name}: {int(self.skippable.sum())}/{len(self.blocks)} blocks skippable, '
                 f'stages {list(self.depths)}, {self.total_flops / 1e9:.3f} GFLOPs at {tuple(self.input_size)}']
        for b in self.blocks:
            share = 100 * b.flops / max(self.total_flops, 1)
            split = ' (branches: ' + ' | '.join(' '.join(branch.children) for branch in b.branches) + ')'
            lines.append(f'  {b.index:3d} stage {b.stage} {b.name:40s} {share:5.2f}%  '
                         + ('skippable' if b.skippable else f'kept: {b.reason}') + (split if b.separable else ''))
        return '\n'.join(lines)


class _ZeroBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.


def _is_pure_residual(module: nn.Module, slots: Sequence[str], args: tuple, kwargs: dict) -> bool:
    """Zeroing every branch must give back the input: otherwise something sits on the main path."""
    zero = _ZeroBranch()
    saved = swap_slots(module, slots, lambda slot, original: zero)
    try:
        out = module(*args, **kwargs)
    finally:
        restore_slots(module, saved)
    x = args[0]
    tol = 1e-6 * max(1.0, float(x.abs().max()))
    return torch.is_tensor(out) and out.shape == x.shape and bool(((out - x).abs() <= tol).all())


def _why_not_skippable(module: nn.Module, slots: Sequence[str], args: tuple, kwargs: dict, output) -> str:
    first = args[0] if args else None
    if not torch.is_tensor(first):
        return 'first input is not a positional tensor'
    if not torch.is_tensor(output) or output.shape != first.shape:
        return 'output shape differs from input'
    if getattr(module, 'has_skip', True) is False:
        return 'has_skip is False (no identity shortcut)'
    if not _is_pure_residual(module, slots, args, kwargs):
        return 'not a pure residual (something besides the branches is on the main path)'
    return ''


def _probe(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor, name: str):
    """One eval-mode forward: per module its first call (order, args, kwargs, output, FLOPs); and total FLOPs."""
    calls, flops_before = {}, {}
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)

    def pre_hook(module, args, kwargs):
        flops_before[module] = counter.get_total_flops()

    def post_hook(module, args, kwargs, output):
        if module not in calls:
            calls[module] = (len(calls), args, kwargs, output, counter.get_total_flops() - flops_before[module])

    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre_hook, with_kwargs=True),
                                           m.register_forward_hook(post_hook, with_kwargs=True))]
    try:
        with counter:
            model(x)
    except Exception as err:  # a wrong input size is the usual cause
        raise ModelNotSupported(f'{name}: dry forward at input size {tuple(x.shape[1:])} failed '
                                f'({first_line(err)}); pass the input size the model expects') from err
    finally:
        for h in handles:
            h.remove()
    return calls, counter.get_total_flops()


@contextlib.contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode with frozen parameters, restoring every module's own flags afterwards.

    Frozen parameters rather than no_grad: under no_grad CaiT's expanded cls token requires grad without a
    grad_fn, which FlopCounterMode's module tracker rejects.
    """
    training = [(m, m.training) for m in model.modules()]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in requires_grad:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag


def _branches(module: nn.Module, slots: Sequence[str], args: tuple, kwargs: dict, skippable: bool,
              verdicts: dict) -> dict:
    """The block's residual branches, and whether each can run on its own rows (checked once per block class,
    branch layout and input shape: ``verdicts`` remembers the answers)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    branches, reason = record_branches(module, slots, args, kwargs, PROBE_BATCH, counter)
    if not reason and not skippable:
        reason = 'not skippable'
    if not reason:
        key = (type(module), tuple((b.slot, b.children) for b in branches),
               tuple(tuple(a.shape) for a in args if torch.is_tensor(a)))
        if key not in verdicts:
            verdicts[key] = check_branches(module, slots, branches, args, kwargs, PROBE_BATCH)
        reason = verdicts[key]
    return dict(branches=branches, separable=not reason, branch_reason=reason)


def _log_unseparated(name: str, blocks: Sequence[Block]) -> None:
    """One line per reason naming the multi-branch blocks that branch-level masks will drop as a whole."""
    by_reason: Dict[str, List[str]] = {}
    for b in blocks:
        if b.skippable and len(b.branches) > 1 and not b.separable:
            by_reason.setdefault(b.branch_reason, []).append(b.name)
    for reason, names in by_reason.items():
        _logger.warning(f'{name}: the residual branches of {", ".join(names)} cannot run on their own rows, so '
                        f'branch-level masks drop these blocks as a whole: {reason}')


def _stages(blocks: List[dict]) -> List[Stage]:
    """Group consecutive blocks under the same parent container; record the shortest prefix that is allowed."""
    groups: List[Tuple[str, List[int]]] = []
    for b in blocks:
        parent = b['name'].rsplit('.', 1)[0] if '.' in b['name'] else ''
        if not groups or groups[-1][0] != parent:
            groups.append((parent, []))
        groups[-1][1].append(b['index'])
        b['stage'] = len(groups) - 1
    stages = []
    for index, (parent, members) in enumerate(groups):
        fixed = [pos for pos, b in enumerate(members) if not blocks[b]['skippable']]
        stages.append(Stage(index, parent, tuple(members), min_keep=fixed[-1] + 1 if fixed else 0))
    return stages


def find_blocks(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> BlockMap:
    """Discover the blocks of a timm model (unwrapping DDP / compile); nothing in the model is changed.

    ``input_size`` is (C, H, W) and defaults to ``model.pretrained_cfg['input_size']``; FLOPs are counted there.
    Blocks that the forward never runs are left out.
    """
    model = unwrap_model(model)
    name = model_name(model)
    if input_size is None:
        input_size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))
    input_size = tuple(int(s) for s in input_size)
    candidates = [(n, m) for n, m in model.named_modules() if drop_path_slots(m)]
    if not candidates:
        raise ModelNotSupported(f'{name}: no skippable residual block (no module has a drop_path slot)')

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    # a private generator: discovery must not move the training RNG
    x = torch.randn((PROBE_BATCH,) + input_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    with _frozen_eval(model):
        calls, total_flops = _probe(model, [m for _, m in candidates], x, name)
        ran = sorted((calls[m][0], n, m) for n, m in candidates if m in calls)
        blocks, verdicts = [], {}
        for index, (_, qual_name, module) in enumerate(ran):
            _, args, kwargs, output, flops = calls[module]
            slots = drop_path_slots(module)
            reason = _why_not_skippable(module, slots, args, kwargs, output)
            blocks.append(dict(index=index, name=qual_name, module=module, slots=slots, skippable=not reason,
                               reason=reason, flops=flops // PROBE_BATCH,
                               shared_args=unbatched_args(args, kwargs, PROBE_BATCH, first=1),
                               **_branches(module, slots, args, kwargs, not reason, verdicts)))
    stages = _stages(blocks)
    block_objs = tuple(Block(**b) for b in blocks)
    if not any(b.skippable for b in block_objs):
        raise ModelNotSupported(f'{name}: no skippable residual block ({len(block_objs)} drop_path blocks, none '
                                f'with an identity shortcut)')
    _log_unseparated(name, block_objs)
    return BlockMap(name, input_size, block_objs, tuple(stages), total_flops // PROBE_BATCH)
