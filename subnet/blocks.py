"""Find the residual blocks and stages of any timm model, with each block's share of the FLOPs.

timm gives every residual block one or more stochastic-depth slots (``drop_path``, ``drop_path1``..``3``; a
``DropPath``, an ``nn.Identity`` placeholder, or ``None`` in ResNet when the rate is 0). Those slots are how we
find blocks, without a per-family list of class names. One dry forward (eval mode, frozen parameters, batch 2)
records, per block, the forward order, the input/output shapes, the extra call arguments and the FLOPs; then each
block runs again on its recorded input with every branch zeroed, to check that it is a pure residual
``x + sum_i drop_path_i(f_i(x))``. Only such blocks can be skipped exactly (see timm.md section 4).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .errors import UsageError

__all__ = ['Block', 'Stage', 'BlockMap', 'find_blocks', 'drop_path_slots', 'swap_slots', 'restore_slots',
           'unwrap_model', 'model_name']

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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def model_name(model: nn.Module) -> str:
    """The timm architecture name, for one-line error messages."""
    model = unwrap_model(model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def drop_path_slots(module: nn.Module) -> Tuple[str, ...]:
    """Names of the stochastic-depth slots a module owns: submodules or plain ``None`` attributes."""
    names = list(module._modules) + [k for k, v in vars(module).items() if v is None]
    return tuple(sorted({n for n in names if n.startswith('drop_path') and not n.endswith('_rate')}))


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

    def flop_fraction(self, keep: Union[torch.Tensor, Sequence[float]]) -> float:
        """Fraction of the full model's FLOPs a subnet costs.

        ``keep`` is per block: bools (a per-batch subnet), keep probabilities (the expected cost of per-sample
        masks), or a (batch, num_blocks) mask whose row mean is used (the realised cost).
        """
        keep = torch.as_tensor(keep, dtype=torch.float64)
        if keep.ndim == 2:
            keep = keep.mean(0)
        if keep.shape != (len(self.blocks),):
            raise UsageError(f'{self.model_name}: keep has shape {tuple(keep.shape)}, expected ({len(self.blocks)},)')
        flops = torch.tensor([b.flops for b in self.blocks], dtype=torch.float64)
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
            lines.append(f'  {b.index:3d} stage {b.stage} {b.name:40s} {share:5.2f}%  '
                         + ('skippable' if b.skippable else f'kept: {b.reason}'))
        return '\n'.join(lines)


class _ZeroBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.


def swap_slots(module: nn.Module, slots: Sequence[str],
               make: Callable[[str, Optional[nn.Module]], nn.Module]) -> dict:
    """Put ``make(slot, original)`` into each drop_path slot as a submodule (ResNet's ``None`` slots included);
    returns what ``restore_slots`` needs to put the originals back."""
    saved = {}
    for name in slots:
        original = getattr(module, name)
        saved[name] = (name in module._modules, original)
        module.__dict__.pop(name, None)
        module._modules[name] = make(name, original)
    return saved


def restore_slots(module: nn.Module, saved: dict) -> None:
    for name, (was_module, value) in saved.items():
        if was_module:
            module._modules[name] = value
        else:
            module._modules.pop(name, None)
            module.__dict__[name] = value


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


def _shared_args(args: tuple, kwargs: dict) -> frozenset:
    """Extra tensor arguments (positions from 1, or keywords) without a batch dimension."""
    extra = list(enumerate(args))[1:] + list(kwargs.items())
    return frozenset(key for key, value in extra
                     if torch.is_tensor(value) and not (value.ndim > 0 and value.shape[0] == PROBE_BATCH))


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
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise UsageError(f'{name}: dry forward at input size {tuple(x.shape[1:])} failed ({first_line}); '
                         f'pass the input size the model expects') from err
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
        raise UsageError(f'{name}: no skippable residual block (no module has a drop_path slot)')

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    # a private generator: discovery must not move the training RNG
    x = torch.randn((PROBE_BATCH,) + input_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    with _frozen_eval(model):
        calls, total_flops = _probe(model, [m for _, m in candidates], x, name)
        ran = sorted((calls[m][0], n, m) for n, m in candidates if m in calls)
        blocks = []
        for index, (_, qual_name, module) in enumerate(ran):
            _, args, kwargs, output, flops = calls[module]
            slots = drop_path_slots(module)
            reason = _why_not_skippable(module, slots, args, kwargs, output)
            blocks.append(dict(index=index, name=qual_name, module=module, slots=slots, skippable=not reason,
                               reason=reason, flops=flops // PROBE_BATCH, shared_args=_shared_args(args, kwargs)))
    stages = _stages(blocks)
    block_objs = tuple(Block(**b) for b in blocks)
    if not any(b.skippable for b in block_objs):
        raise UsageError(f'{name}: no skippable residual block ({len(block_objs)} drop_path blocks, none with an '
                         f'identity shortcut)')
    return BlockMap(name, input_size, block_objs, tuple(stages), total_flops // PROBE_BATCH)
