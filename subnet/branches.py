"""What sits inside a residual block: its drop_path slots, its residual branches, and running each branch on its
own rows.

A timm block with several residual branches computes them one after the other, each closed by a drop_path slot:
``x = x + drop_path1(f1(x)); x = x + drop_path2(f2(x))`` (ViT: attention then MLP; XCiT has three; CaiT calls one
slot for both). On the discovery probe we record the order in which the block calls its direct children and its
slots; a branch is the children called since the previous slot call. To run branch j only on the rows R_j that keep
it, each of its children gathers R_j from every argument that still has the full batch (the block's residual
stream), and its slot scatters the branch's result, times its scale, into zeros of the full batch, which the block
adds to its residual as it always does. Whether that is the same computation as masking each branch is checked on
the probe (``check_branches``), not assumed.
"""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import first_line

__all__ = ['Branch', 'BranchRows', 'SlotModule', 'InstanceForward', 'swap_slots', 'restore_slots',
           'record_branches', 'check_branches', 'install_branch_rows', 'unbatched_args']


@dataclass(frozen=True)
class Branch:
    """One residual branch of a block: the block's children it calls, in order, and the slot that closes it."""
    slot: str                          # drop_path slot name (CaiT's blocks close both branches with one slot)
    children: Tuple[str, ...]          # direct children of the block, in call order
    shared_args: Tuple[frozenset, ...]  # per child call: tensor arguments without a batch dimension (never gathered)
    flops: int                         # forward FLOPs per sample at the probe's input size


# ---- drop_path slots -----------------------------------------------------------------------------------------------
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


class SlotModule(nn.Module):
    """Base of the modules put into drop_path slots: a deepcopy taken inside a context gets the original slot back."""

    def __init__(self):
        super().__init__()
        self.inner = None  # the model's own slot content when it should still act (DropPath), else None

    def set_original(self, original: Optional[nn.Module]) -> None:
        object.__setattr__(self, '_original', original)  # not a submodule: invisible to state_dict / named_modules

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.__dict__.get('_original'), memo)


class InstanceForward:
    """Instance-level replacement of ``module.forward``; a deepcopy of the module gets its class forward back.

    The engine keeps one per module and role and only updates its fields, because torch.compile drops its cached
    graphs when the object it guarded on is freed.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.previous = None  # an instance-level forward someone installed before us, if any

    def run(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def install(self, undo: List) -> None:
        """Become ``module.forward`` until ``undo`` runs."""
        module = self.module
        had = 'forward' in module.__dict__
        self.previous = module.__dict__.get('forward')
        module.__dict__['forward'] = self
        previous = self.previous

        def restore():
            if had:
                module.__dict__['forward'] = previous
            else:
                module.__dict__.pop('forward', None)
        undo.append(restore)

    def __deepcopy__(self, memo):
        copied = memo.get(id(self.module))
        return types.MethodType(type(self.module).forward, copied) if copied is not None else self


def unbatched_args(args: Sequence, kwargs: dict, batch: int, first: int = 0) -> frozenset:
    """Keys (positions from ``first``, or keywords) of the tensor arguments whose first dimension is not ``batch``:
    rope tables, relative position biases, Swin's windows. Those are shared by all rows and never gathered."""
    extra = list(enumerate(args))[first:] + list(kwargs.items())
    return frozenset(key for key, value in extra
                     if torch.is_tensor(value) and not (value.ndim > 0 and value.shape[0] == batch))


# ---- recording the branches on the probe ---------------------------------------------------------------------------
class _SlotRecorder(nn.Module):
    def __init__(self, name: str, record: Callable[[str, bool, tuple, dict], None]):
        super().__init__()
        self.name = name
        object.__setattr__(self, 'record', record)

    def forward(self, x):
        self.record(self.name, True, (), {})
        return x


def record_branches(module: nn.Module, slots: Sequence[str], args: tuple, kwargs: dict, batch: int,
                    counter) -> Tuple[Tuple[Branch, ...], str]:
    """The block's branches in call order, from one call on its probe input (``counter``: a FlopCounterMode), and
    '' or why they cannot run on their own rows."""
    names = {child: name for name, child in module.named_children() if name not in slots}
    events = []  # (name, is_slot, shared args, FLOPs so far)

    def record(name, is_slot, call_args, call_kwargs):
        events.append((name, is_slot, unbatched_args(call_args, call_kwargs, batch), counter.get_total_flops()))

    handles = [child.register_forward_pre_hook(
        lambda child, a, kw: record(names[child], False, a, kw), with_kwargs=True) for child in names]
    saved = swap_slots(module, slots, lambda slot, original: _SlotRecorder(slot, record))
    try:
        with counter:
            start = counter.get_total_flops()
            module(*args, **kwargs)
    finally:
        restore_slots(module, saved)
        for handle in handles:
            handle.remove()
    branches, children, shared, flops_before = [], [], [], start
    for name, is_slot, shared_args, flops in events:
        if not is_slot:
            children.append(name)
            shared.append(shared_args)
            continue
        branches.append(Branch(name, tuple(children), tuple(shared), (flops - flops_before) // batch))
        children, shared, flops_before = [], [], flops
    if len(branches) < 2:
        return tuple(branches), 'one branch' if branches else 'its slots are not called'
    empty = [i for i, b in enumerate(branches) if not b.children]
    if empty:
        return tuple(branches), f'branch {empty[0]} calls no child module (nowhere to gather its rows)'
    return tuple(branches), ''


# ---- running each branch on its own rows ----------------------------------------------------------------------------
Factor = Union[float, torch.Tensor]


def same_format(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``like``'s memory format when that is channels_last (a gathered or new tensor is contiguous)."""
    if like.ndim == 4 and like.is_contiguous(memory_format=torch.channels_last):
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


class BranchRows:
    """The per-step state of one block whose branches run on their own rows.

    For each branch: ``rows`` (a LongTensor of the kept rows, or None for every row) and ``factor`` (a float scale
    applied to the kept rows, or a per-row (batch,) tensor that multiplies the branch on every row: mask mode).
    ``position`` follows the block's calls in the order recorded on the probe, so that a child or a slot called in
    several branches (CaiT's one slot) knows which branch a call belongs to; the block's forward resets it
    (``StartCalls``), also when checkpointing recomputes a block and stops early.
    """

    def __init__(self, block_name: str, model_name: str, branches: Sequence[Branch]):
        self.block_name, self.model_name = block_name, model_name
        self.calls = [(child, j, shared) for j, b in enumerate(branches)
                      for child, shared in zip(b.children + (b.slot,), b.shared_args + (frozenset(),))]
        self.position = 0
        self.batch = 0
        self.rows: List[Optional[torch.Tensor]] = [None] * len(branches)
        self.factor: List[Factor] = [1.0] * len(branches)

    def set(self, batch: int, rows: Sequence[Optional[torch.Tensor]], factor: Sequence[Factor]) -> None:
        self.position, self.batch, self.rows, self.factor = 0, batch, list(rows), list(factor)

    def advance(self, name: str) -> Tuple[int, frozenset]:
        """The branch of this call (and the arguments it shares), checking that the block keeps its probe order."""
        expected = self.calls[self.position][0] if self.position < len(self.calls) else 'nothing more'
        if name != expected:
            raise ValueError(f'{self.model_name}: block {self.block_name} called {name} where the discovery probe '
                             f'saw {expected}, so its branches cannot run on their own rows (use unit="block")')
        _, branch, shared = self.calls[self.position]
        self.position += 1
        return branch, shared


class StartCalls(InstanceForward):
    """``forward`` of a block whose branches run on their own rows: its calls start again from the first."""

    def __init__(self, module: nn.Module, state: BranchRows):
        super().__init__(module)
        self.state = state

    def __call__(self, *args, **kwargs):
        self.state.position = 0
        return self.run(*args, **kwargs)


class GatherRows(InstanceForward):
    """``forward`` of a child of a branch: arguments that still have the full batch are cut to the branch's rows."""

    def __init__(self, module: nn.Module, name: str, state: BranchRows):
        super().__init__(module)
        self.name, self.state = name, state

    def __call__(self, *args, **kwargs):
        branch, shared = self.state.advance(self.name)
        rows = self.state.rows[branch]
        if rows is not None:
            args = [self._gather(pos, a, rows, shared) for pos, a in enumerate(args)]
            kwargs = {k: self._gather(k, v, rows, shared) for k, v in kwargs.items()}
        return self.run(*args, **kwargs)

    def _gather(self, key, value, rows, shared):
        if (torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == self.state.batch
                and key not in shared):
            return same_format(value.index_select(0, rows), value)
        return value


class ScatterRows(SlotModule):
    """The drop_path slot of a branch: scales its kept rows and puts them back into a full batch of zeros."""

    def __init__(self, name: str, state: BranchRows):
        super().__init__()
        self.name = name
        object.__setattr__(self, 'state', state)  # shared with the block's other slots and children, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        branch, _ = state.advance(self.name)
        if self.inner is not None:
            x = self.inner(x)
        rows, factor = state.rows[branch], state.factor[branch]
        if torch.is_tensor(factor):
            if x.shape[0] != factor.shape[0]:
                raise ValueError(f'{state.model_name}: keep mask has {factor.shape[0]} rows but the batch has '
                                 f'{x.shape[0]}')
            return x * factor.view((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)
        if rows is None:
            return x if factor == 1.0 else x * factor
        if x.shape[0] != rows.shape[0]:
            raise ValueError(f'{state.model_name}: keep mask has {state.batch} rows but block {state.block_name} '
                             f'got a batch of {x.shape[0]}')
        if factor != 1.0:
            x = x * factor
        full = same_format(x.new_zeros((state.batch,) + x.shape[1:]), x)
        return full.index_put_((rows,), x)


def install_branch_rows(module: nn.Module, state: BranchRows, branches: Sequence[Branch], undo: List,
                        installed: dict, keep_inner: bool = False) -> None:
    """Until ``undo`` runs: ``StartCalls`` as the block's forward, ``GatherRows`` forwards on the branches' children
    and ``ScatterRows`` in their slots, reusing the objects kept in ``installed`` (torch.compile guards on them);
    ``keep_inner``: the model's own slot content (its DropPath) still acts on the kept rows."""
    if 'start' not in installed:
        installed.update(start=StartCalls(module, state), gathers={}, scatters={})
    installed['start'].install(undo)
    gathers, scatters = installed['gathers'], installed['scatters']
    for name in dict.fromkeys(c for b in branches for c in b.children):
        if name not in gathers:
            gathers[name] = GatherRows(getattr(module, name), name, state)
        gathers[name].install(undo)

    def make(slot, original):
        if slot not in scatters:
            scatters[slot] = ScatterRows(slot, state)
        scatters[slot].set_original(original)
        scatters[slot].inner = original if keep_inner else None
        return scatters[slot]
    saved = swap_slots(module, tuple(dict.fromkeys(b.slot for b in branches)), make)
    undo.append(lambda: restore_slots(module, saved))


# ---- checking that the branches can run apart ---------------------------------------------------------------------
class _MaskByCall(nn.Module):
    """Reference slot: the i-th slot call of the block multiplies its branch by ``factors[i]`` (per row)."""

    def __init__(self, factors: List[torch.Tensor], calls: List[int]):
        super().__init__()
        self.factors, self.calls = factors, calls

    def forward(self, x):
        factor = self.factors[self.calls[0]]
        self.calls[0] += 1
        return x * factor.view((-1,) + (1,) * (x.ndim - 1))


CHECK_ROWS = 5  # rows of the separability check: each branch keeps a different 3 of them (never 1: no broadcasting)


def _check_inputs(args: tuple, kwargs: dict, batch: int, generator: torch.Generator) -> Tuple[list, dict]:
    """The probe call's arguments in float64 on the CPU, per-row ones widened to ``CHECK_ROWS`` rows (the first
    argument perturbed so that repeated rows differ)."""
    shared = unbatched_args(args, kwargs, batch, first=1)
    row_map = torch.arange(CHECK_ROWS) % batch

    def widen(key, value):
        if not torch.is_tensor(value):
            return value
        value = value.to('cpu', torch.float64) if value.is_floating_point() else value.cpu()
        if value.ndim > 0 and value.shape[0] == batch and key not in shared:
            value = value.index_select(0, row_map)
        return value
    x = widen(0, args[0])
    x = x + 0.1 * x.std() * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return [x] + [widen(pos, a) for pos, a in enumerate(args) if pos > 0], {k: widen(k, v) for k, v in kwargs.items()}


def check_branches(module: nn.Module, slots: Sequence[str], branches: Sequence[Branch], args: tuple,
                   kwargs: dict, batch: int) -> str:
    """'' if running each branch on its own rows computes what masking each branch computes, else why not.

    Checked on a float64 CPU copy of the block with perturbed weights (so that layer scales of 1e-6 or zero-init
    branches cannot hide a difference), on ``CHECK_ROWS`` rows made from the probe input, each branch keeping a
    different subset of 3. A block that mixes the rows of different branches (a norm shared by two branches), reads
    the batch size of its input inside a branch, or calls its children in another order fails here.
    """
    generator = torch.Generator().manual_seed(0)
    keeps = [(torch.arange(CHECK_ROWS) - j) % CHECK_ROWS < 3 for j in range(len(branches))]
    with torch.no_grad():
        try:
            block = copy.deepcopy(module).to('cpu', torch.float64)
            for param in block.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
            call_args, call_kwargs = _check_inputs(args, kwargs, batch, generator)
            calls = [0]
            saved = swap_slots(block, slots, lambda slot, original: _MaskByCall([k.double() for k in keeps], calls))
            try:
                reference = block(*call_args, **call_kwargs)
            finally:
                restore_slots(block, saved)
        except Exception as err:  # the check itself cannot run: do not split what we cannot check
            return f'cannot be checked on a float64 CPU copy ({first_line(err)})'
        state = BranchRows(type(module).__name__, 'branch check', branches)
        state.set(CHECK_ROWS, [k.nonzero().flatten() for k in keeps], [1.0] * len(branches))
        undo = []
        try:
            install_branch_rows(block, state, branches, undo, {})
            separate = block(*call_args, **call_kwargs)
        except Exception as err:  # any failure on a subset of rows means the branches do not run apart
            return f'fails on a subset of rows ({first_line(err)})'
        finally:
            for restore in reversed(undo):
                restore()
    if not torch.is_tensor(separate) or separate.shape != reference.shape:
        return 'gives an output of another shape on a subset of rows'
    error = float((separate - reference).abs().max())
    if error > 1e-9 * max(float(reference.abs().max()), 1e-30):
        return f'differs from masking each branch by {error:.2g} (the branches share or mix rows)'
    return ''
