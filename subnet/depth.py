"""Run a timm model as a subnet: per-batch block subsets, per-sample keep masks (skip or mask mode), timm drop-path.

Every mode is a context manager that installs its pieces on entry and restores the model exactly on exit (also
on an exception), so outside a context the model is the plain timm model: module names, state_dict keys,
``deepcopy`` (EMA), DDP and torch.compile see nothing of the engine.

* ``subnet(keep)``: dropped blocks get an instance-level ``forward`` that returns its input, so they cost nothing.
  ``nn.Sequential``, loops and timm's ``checkpoint_seq`` all call ``block.forward``, so no family needs special care.
* ``per_sample(keep_mask, keep_prob, mode='skip')``: a block runs only on the rows that keep it (gather, the block's
  own forward, scatter back); the other rows pass through untouched. The branch scaling (1/keep_prob, timm's
  ``scale_by_keep``) is a module put into the block's drop_path slots, so blocks with an activation after the
  residual sum (ResNet) are handled by their own forward.
* ``per_sample(..., unit='branch')``: a mask column per residual branch (ViT: attention and MLP drop apart, as
  timm's DropPath does): each branch runs only on the rows that keep it (``subnet.branches``). Blocks with one
  branch, or whose branches cannot run apart, keep one column.
* ``per_sample(..., mode='mask')``: every block runs on every row and its branches are multiplied by the per-row
  mask / keep_prob; same result, full cost, but a graph whose structure does not depend on the mask.
* ``timm_drop_path(rates)``: timm's per-branch stochastic depth (``timm.layers.drop_path``) at the given per-block
  rates, in place of the model's slots (DeiT / ``--cosub-impl timm``).

With grad checkpointing the blocks run again during backward, so call ``backward()`` inside the context.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from timm.layers import drop_path
from timm.utils import unwrap_model

from .blocks import Block, BlockMap, DropUnit, find_blocks, slot_drop_rate
from .branches import (
    BranchRows, InstanceForward, SlotModule, install_branch_rows, restore_slots, same_format, swap_slots)

__all__ = ['DepthEngine']

KeepSpec = Union[torch.Tensor, Sequence[bool], Iterable[int]]


class _BranchScale(SlotModule):
    """Multiplies a residual branch by a constant: 1/keep_prob for the rows that keep the block."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            x = self.inner(x)
        return x if self.factor == 1.0 else x * self.factor


class _RowMask(SlotModule):
    """Multiplies a residual branch by a per-row factor (keep / keep_prob): a dropped row adds exactly zero."""

    def __init__(self, model_name: str):
        super().__init__()
        self.model_name = model_name
        self.factor = torch.ones(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.factor.shape[0]:
            raise ValueError(f'{self.model_name}: keep mask has {self.factor.shape[0]} rows but the batch has '
                             f'{x.shape[0]}')
        if self.inner is not None:
            x = self.inner(x)
        return x * self.factor.view((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)


class _BlockForward(InstanceForward):
    """Instance-level replacement of ``block.forward`` (one per block and kind, reused across steps)."""

    def __init__(self, block: Block, model_name: str):
        super().__init__(block.module)
        self.block = block
        self.model_name = model_name
        self.batch: Optional[int] = None
        self.touch = False

    def check_batch(self, x: torch.Tensor) -> None:
        if self.batch is not None and x.shape[0] != self.batch:
            raise ValueError(f'{self.model_name}: keep mask has {self.batch} rows but block {self.block.name} '
                             f'got a batch of {x.shape[0]}')

    def passthrough(self, x: torch.Tensor) -> torch.Tensor:
        if self.touch and torch.is_grad_enabled():
            # 0 * (sum of the block's parameters): every parameter stays in the autograd graph with a zero grad,
            # so DDP without find_unused_parameters does not wait for them; x + 0 is still exactly x
            params = [p for p in self.block.module.parameters() if p.requires_grad]
            if params:
                return x + 0. * sum(p.sum() for p in params)
        return x


class _SkipBlock(_BlockForward):
    """The block is not computed at all."""

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.check_batch(x)
        return self.passthrough(x)


class _RowSubsetBlock(_BlockForward):
    """The block runs only on the kept rows; the others pass through untouched."""

    def __init__(self, block: Block, model_name: str):
        super().__init__(block, model_name)
        self.rows = torch.zeros(0, dtype=torch.long)

    def gather(self, key, value):
        # an extra argument with a batch dimension (an attention mask) follows the rows; shared ones (rope tables,
        # relative position biases) do not
        if (torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == self.batch
                and key not in self.block.shared_args):
            return value.index_select(0, self.rows)
        return value

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.check_batch(x)
        kept = same_format(x.index_select(0, self.rows), x)
        args = [self.gather(pos, a) for pos, a in enumerate(args, start=1)]
        kwargs = {k: self.gather(k, v) for k, v in kwargs.items()}
        out = self.run(kept, *args, **kwargs)
        # into a copy of x that keeps its memory format; index_put_ saves only the rows for backward (index_copy
        # would also keep ``out`` alive, a second copy of the kept activations)
        return x.to(dtype=out.dtype, copy=True).index_put_((self.rows,), out)


class DepthEngine:
    """Depth masking for one timm model; build it before wrapping the model in DDP / torch.compile.

    ``touch_unused``: skipped blocks add ``0 * sum(params)`` so DDP sees every parameter used; None turns it on
    when torch.distributed is initialised with more than one rank.
    """

    def __init__(self, model: nn.Module, block_map: Optional[BlockMap] = None, *,
                 input_size: Optional[Sequence[int]] = None, touch_unused: Optional[bool] = None):
        self.model = unwrap_model(model)
        self.block_map = block_map if block_map is not None else find_blocks(self.model, input_size)
        self.touch_unused = touch_unused
        self._active = False
        # slot modules are reused across steps: torch.compile then sees the same objects each time
        self._scale_slots = {}
        self._mask_slots = {}
        self._drop_path_slots = {}
        self._forwards = {}
        # per block whose branches run apart: its step state and the objects installed for it, also reused
        self._branch_rows: Dict[int, BranchRows] = {}
        self._branch_objects: Dict[int, dict] = {}

    @property
    def name(self) -> str:
        return self.block_map.model_name

    @property
    def num_blocks(self) -> int:
        return len(self.block_map.blocks)

    # ---- validation -------------------------------------------------------------------------------------------
    def keep_vector(self, keep: KeepSpec) -> torch.Tensor:
        """A (num_blocks,) bool tensor from a bool mask or from the indices of the blocks to keep."""
        n = self.num_blocks
        keep = keep.detach().cpu() if torch.is_tensor(keep) else torch.as_tensor(list(keep))
        if keep.dtype == torch.bool:
            if keep.shape != (n,):
                raise ValueError(f'{self.name}: keep has shape {tuple(keep.shape)}, expected ({n},) (one per block)')
            return keep
        if keep.numel() and (keep.ndim != 1 or keep.is_floating_point()):
            raise ValueError(f'{self.name}: keep must be one bool per block or a list of block indices')
        mask = torch.zeros(n, dtype=torch.bool)
        for index in keep.long().tolist():
            if not 0 <= index < n:
                raise ValueError(f'{self.name}: block index {index} out of range ({n} blocks)')
            mask[index] = True
        return mask

    def _check_droppable(self, dropped: torch.Tensor) -> None:
        for index in dropped.nonzero().flatten().tolist():
            block = self.block_map.blocks[index]
            if not block.skippable:
                raise ValueError(f'{self.name}: block {index} ({block.name}) cannot be skipped: {block.reason}')

    def _rates(self, rates, what: str, columns: Optional[int] = None) -> torch.Tensor:
        columns = self.num_blocks if columns is None else columns
        rates = torch.as_tensor(rates, dtype=torch.float64).detach().cpu()
        if rates.ndim == 0:
            rates = rates.expand(columns)
        if rates.shape != (columns,):
            raise ValueError(f'{self.name}: {what} has shape {tuple(rates.shape)}, expected ({columns},)')
        if bool(((rates < 0) | (rates > 1)).any()):
            raise ValueError(f'{self.name}: {what} must lie in [0, 1]')
        return rates

    def _touch(self) -> bool:
        if self.touch_unused is not None:
            return self.touch_unused
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device('cpu')

    # ---- installing and restoring -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self) -> Iterator[List]:
        if self._active:
            raise RuntimeError(f'{self.name}: a depth context is already active on this model')
        self._active = True
        undo = []
        try:
            yield undo
        finally:
            for restore in reversed(undo):
                restore()
            self._active = False

    def _set_forward(self, undo: List, block: Block, kind, batch: Optional[int], **fields) -> None:
        key = (block.index, kind)
        if key not in self._forwards:
            self._forwards[key] = kind(block, self.name)
        forward = self._forwards[key]
        forward.batch = batch
        for name, value in fields.items():
            setattr(forward, name, value)
        forward.install(undo)

    @staticmethod
    def _set_slots(undo: List, block: Block, make_slot, keep_inner: bool) -> None:
        def make(slot, original):
            new = make_slot(slot)
            new.set_original(original)
            new.inner = original if keep_inner else None
            return new
        saved = swap_slots(block.module, block.slots, make)
        undo.append(lambda: restore_slots(block.module, saved))

    @staticmethod
    def _reused_slot(cache: dict, block: Block, new, **fields):
        """A ``make_slot`` for ``_set_slots``: one module per (block, slot), kept across steps and given ``fields``
        (torch.compile guards on these objects, so reusing them keeps its graphs)."""
        def make(slot):
            key = (block.index, slot)
            if key not in cache:
                cache[key] = new()
            for name, value in fields.items():
                setattr(cache[key], name, value)
            return cache[key]
        return make

    def _scale_slot(self, block: Block, factor: float):
        return self._reused_slot(self._scale_slots, block, _BranchScale, factor=factor)

    def _mask_slot(self, block: Block, factor: torch.Tensor):
        return self._reused_slot(self._mask_slots, block, lambda: _RowMask(self.name), factor=factor)

    # ---- the modes --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def subnet(self, keep: KeepSpec, *, model_drop_path: bool = False) -> Iterator[None]:
        """Run whole batches through the kept blocks only (a bool per block, or the kept block indices).

        The model's own DropPath slots are off in the kept blocks unless ``model_drop_path``.
        """
        keep = self.keep_vector(keep)
        self._check_droppable(~keep)
        touch = self._touch()
        with self._session() as undo:
            for block in self.block_map.blocks:
                if not keep[block.index]:
                    self._set_forward(undo, block, _SkipBlock, None, touch=touch)
                elif not model_drop_path:
                    self._set_slots(undo, block, self._scale_slot(block, 1.0), keep_inner=False)
            yield

    @contextlib.contextmanager
    def per_sample(self, keep_mask: torch.Tensor, keep_prob=None, *, mode: str = 'skip', unit: str = 'block',
                   model_drop_path: bool = False) -> Iterator[None]:
        """Run each block (or residual branch) only for the rows that keep it.

        ``keep_mask`` is (batch, columns) bool, one column per entry of ``block_map.units(unit)``: per block
        (``unit='block'``), or per residual branch of the blocks whose branches run apart and per other block
        (``unit='branch'``, DeiT's stochastic depth: attention and MLP drop independently).
        ``keep_prob`` (a float or one per column) divides the kept rows as timm's DropPath(scale_by_keep) does,
        so a Bernoulli(keep_prob) mask gives stochastic depth in expectation; None leaves them unscaled.
        ``mode='skip'`` saves the compute of dropped rows in skippable blocks (other blocks are mask-multiplied);
        ``mode='mask'`` multiplies every branch by its per-row factor (static graph, full cost).
        """
        if mode not in ('skip', 'mask'):
            raise ValueError(f"{self.name}: per-sample mode must be 'skip' or 'mask', not {mode!r}")
        units = self.block_map.units(unit)
        keep_mask = self._keep_mask(keep_mask, len(units), unit)
        factors = torch.ones(len(units), dtype=torch.float64)
        if keep_prob is not None:
            probs = self._rates(keep_prob, 'keep_prob', len(units))
            factors = torch.where(probs > 0, 1.0 / probs.clamp_min(1e-12), torch.ones_like(probs))
        # float64 whatever the model's dtype: cast to the branch's dtype where it is used
        row_factors = (keep_mask.to(torch.float64) * factors).t().contiguous().to(self._device())
        columns: Dict[int, List[DropUnit]] = {}
        for u in units:
            columns.setdefault(u.block, []).append(u)
        step = dict(keep_mask=keep_mask, factors=factors, row_factors=row_factors, mode=mode,
                    model_drop_path=model_drop_path, touch=self._touch())
        with self._session() as undo:
            for block in self.block_map.blocks:
                if columns[block.index][0].branch is None:
                    self._per_sample_block(undo, block, columns[block.index][0].index, **step)
                else:
                    self._per_sample_branches(undo, block, [u.index for u in columns[block.index]], **step)
            yield

    def _keep_mask(self, keep_mask, columns: int, unit: str) -> torch.Tensor:
        keep_mask = torch.as_tensor(keep_mask)
        if keep_mask.ndim != 2 or keep_mask.shape[1] != columns:
            per = 'block' if unit == 'block' else "drop unit of block_map.units('branch')"
            raise ValueError(f'{self.name}: keep mask has shape {tuple(keep_mask.shape)}, expected '
                             f'(batch, {columns}) (one column per {per})')
        keep_mask = keep_mask.detach().cpu()
        if keep_mask.dtype != torch.bool:
            if bool(((keep_mask != 0) & (keep_mask != 1)).any()):
                raise ValueError(f'{self.name}: keep mask must hold only 0/1 or booleans')
            keep_mask = keep_mask != 0
        return keep_mask

    def _per_sample_block(self, undo: List, block: Block, column: int, *, keep_mask, factors, row_factors, mode,
                          model_drop_path, touch) -> None:
        """The whole block keeps or drops each row (column ``column`` of the mask)."""
        batch, count, factor = keep_mask.shape[0], int(keep_mask[:, column].sum()), float(factors[column])
        if mode == 'mask' or (not block.skippable and count < batch):
            self._set_slots(undo, block, self._mask_slot(block, row_factors[column]), model_drop_path)
            return
        if count == 0:
            self._set_forward(undo, block, _SkipBlock, batch, touch=touch)
            return
        if count < batch:
            rows = keep_mask[:, column].nonzero().flatten().to(self._device())
            self._set_forward(undo, block, _RowSubsetBlock, batch, rows=rows)
        if factor != 1.0 or not model_drop_path:
            self._set_slots(undo, block, self._scale_slot(block, factor), model_drop_path)

    def _per_sample_branches(self, undo: List, block: Block, columns: List[int], *, keep_mask, factors,
                             row_factors, mode, model_drop_path, touch) -> None:
        """Each residual branch keeps or drops each row on its own (``columns``: one per branch)."""
        batch, counts = keep_mask.shape[0], keep_mask[:, columns].sum(0).tolist()
        if mode == 'skip' and not any(counts):
            self._set_forward(undo, block, _SkipBlock, batch, touch=touch)
            return
        rows, scale = [], []
        for column, count in zip(columns, counts):
            if mode == 'mask':
                rows.append(None)
                scale.append(row_factors[column])
            else:
                # every row: no gather; no row: multiplied by zero at full cost (rare), like the mask mode
                gather = 0 < count < batch
                rows.append(keep_mask[:, column].nonzero().flatten().to(self._device()) if gather else None)
                scale.append(float(factors[column]) if count else 0.0)
        if block.index not in self._branch_rows:
            self._branch_rows[block.index] = BranchRows(block.name, self.name, block.branches)
        state = self._branch_rows[block.index]
        state.set(batch, rows, scale)
        installed = self._branch_objects.setdefault(block.index, {})
        install_branch_rows(block.module, state, block.branches, undo, installed, keep_inner=model_drop_path)

    @contextlib.contextmanager
    def timm_drop_path(self, rates) -> Iterator[None]:
        """timm's own stochastic depth at these per-block rates (a float or one per block), in place of the model's.

        Each branch draws its own per-row mask from the global RNG inside forward (training mode only), exactly
        as a model built with those rates would; static graph, full cost.
        """
        rates = self._rates(rates, 'drop-path rates')
        with self._session() as undo:
            for block in self.block_map.blocks:
                # a slot module has no children: setting ``training`` is its ``train()``
                make = self._reused_slot(self._drop_path_slots, block, _DropPathSlot,
                                         drop_prob=float(rates[block.index]), training=block.module.training)
                self._set_slots(undo, block, make, keep_inner=False)
            yield

    def model_drop_path_rates(self) -> torch.Tensor:
        """The drop-path rate of each block as the model was built (0 for Identity / None slots)."""
        return torch.tensor([max((slot_drop_rate(getattr(block.module, s)) for s in block.slots), default=0.0)
                             for block in self.block_map.blocks], dtype=torch.float64)


class _DropPathSlot(SlotModule):
    """timm's per-branch stochastic depth (``timm.layers.drop_path``, scale_by_keep) at a rate we set."""

    def __init__(self):
        super().__init__()
        self.drop_prob = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, scale_by_keep=True)
