"""Keep masks for the depth engine, drawn from a ``torch.Generator`` so runs are reproducible.

Masks index ``BlockMap.blocks`` (one column per drop_path-bearing block, True = the block runs), or for
per-sample masks ``BlockMap.units(unit)`` (``unit='branch'``: one column per residual branch where branches run apart):

* ``bernoulli_keep``: stochastic depth, one Bernoulli(1 - rate) per row and column (timm / DeiT III / cosub).
* ``fixed_count_keep``: exactly round((1 - rate) * batch) random rows per column (DINOv2's fixed-size subsets):
  the same shapes every step, so torch.compile keeps one graph.
* ``draw_keep``: either of the two with the keep probabilities that make its rescaling unbiased;
  ``unit_drop_rates``: per-column rates from a per-block schedule.
* ``stage_prefix_keep``: ST / ST++ "ordered residual sampling", the first k_i blocks of each stage.
* ``nested_keep``: GKT subnet-in-subnet, a child inherits its parent's drops and drops each survivor with prob q.
* ``step_generator``: the same mask on every DDP rank when a method needs it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .blocks import BlockMap

__all__ = ['drop_rates', 'unit_drop_rates', 'bernoulli_keep', 'fixed_count_keep', 'draw_keep', 'stage_prefix_keep',
           'lowest_prefix_depths', 'nested_keep', 'step_generator']

SCHEDULES = ('linear', 'constant')
ROW_SAMPLINGS = ('bernoulli', 'fixed')  # how per-sample masks pick the rows that keep a block or branch


def drop_rates(num_blocks: int, rate: float, schedule: str = 'linear') -> torch.Tensor:
    """Per-block drop rates: 'linear' is timm's ``calculate_drop_path_rates`` (0 at the first block, ``rate`` at the
    last); 'constant' is DeiT III's (``rate`` everywhere)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f'drop rate {rate} must lie in [0, 1]')
    if schedule == 'linear':
        return torch.linspace(0.0, rate, num_blocks, dtype=torch.float64)
    if schedule == 'constant':
        return torch.full((num_blocks,), float(rate), dtype=torch.float64)
    raise ValueError(f'unknown drop-rate schedule {schedule!r} (expected one of {", ".join(SCHEDULES)})')


def unit_drop_rates(block_map: BlockMap, rate: float, schedule: str = 'constant', unit: str = 'branch') -> torch.Tensor:
    """Drop rates for the columns of ``block_map.units(unit)``: the per-block schedule of ``drop_rates``, shared by
    the branches of a block (as timm gives both slots of a block one rate), and 0 where a block cannot be skipped.
    A constant rate on every branch is DeiT III's stochastic depth, the one cosub trains with."""
    return block_map.per_unit(drop_rates(len(block_map), rate, schedule) * block_map.skippable, unit)


def bernoulli_keep(batch: int, rates: Union[torch.Tensor, Sequence[float]],
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A (batch, columns) bool mask: row b keeps column i with probability 1 - rates[i], all independent (timm's
    DropPath distribution)."""
    rates = torch.as_tensor(rates, dtype=torch.float64)
    uniforms = torch.rand((batch, rates.numel()), generator=generator, dtype=torch.float64)
    return uniforms < (1.0 - rates)


def fixed_counts(batch: int, rates: Union[torch.Tensor, Sequence[float]]) -> torch.Tensor:
    """Rows each column keeps in ``fixed_count_keep``: (1 - rate) * batch rounded to the nearest integer, at least
    one unless the rate is 1. (DINOv2 truncates instead, ``int(b * (1 - ratio))``; rounding keeps the realised rate
    nearest the nominal one.)"""
    rates = torch.as_tensor(rates, dtype=torch.float64)
    if bool(((rates < 0) | (rates > 1)).any()):
        raise ValueError('drop rates must lie in [0, 1]')
    counts = torch.round((1.0 - rates) * batch).long()
    return torch.where(rates < 1, counts.clamp(1, batch), torch.zeros_like(counts))


def fixed_count_keep(batch: int, rates: Union[torch.Tensor, Sequence[float]],
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A (batch, columns) bool mask in which column i keeps exactly ``fixed_counts(batch, rates)[i]`` rows, a
    uniformly random subset drawn independently per column (DINOv2's ``drop_add_residual_stochastic_depth``).
    Scaled by batch / kept, a row's expected branch is the full branch, as with Bernoulli rows."""
    counts = fixed_counts(batch, rates)
    uniforms = torch.rand((batch, counts.numel()), generator=generator, dtype=torch.float64)
    ranks = uniforms.argsort(0).argsort(0)  # a random permutation of the rows, per column
    return ranks < counts


def draw_keep(batch: int, rates: Union[torch.Tensor, Sequence[float]], row_sampling: str = 'bernoulli',
              generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A keep mask drawn as ``row_sampling`` says ('bernoulli' or 'fixed'), and the per-column keep probabilities to
    pass to ``DepthEngine.per_sample``: 1 - rates for Bernoulli rows, kept / batch for fixed counts."""
    rates = torch.as_tensor(rates, dtype=torch.float64)
    if row_sampling == 'bernoulli':
        return bernoulli_keep(batch, rates, generator), 1.0 - rates
    if row_sampling == 'fixed':
        return fixed_count_keep(batch, rates, generator), fixed_counts(batch, rates).double() / batch
    raise ValueError(f'unknown row sampling {row_sampling!r} (expected one of {", ".join(ROW_SAMPLINGS)})')


def stage_prefix_keep(block_map: BlockMap, min_keep: Union[int, Sequence[int]] = 1,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A (num_blocks,) bool mask that keeps the first k_i blocks of stage i, k_i uniform in [m_i, d_i].

    m_i = min(d_i, min_keep_i), as ST's sample spaces do (ST++ 'space3' on ResNet-50 is min_keep=3), raised to the
    stage's own minimum so that blocks that cannot be skipped (a ResNet stage's first block) are always kept.
    """
    kept = [int(torch.randint(low, len(stage.blocks) + 1, (1,), generator=generator))
            for stage, low in zip(block_map.stages, lowest_prefix_depths(block_map, min_keep))]
    return block_map.prefix_keep(kept)


def lowest_prefix_depths(block_map: BlockMap, min_keep: Union[int, Sequence[int]] = 1) -> List[int]:
    """The fewest blocks ``stage_prefix_keep`` keeps in each stage: min(d_i, min_keep_i), and at least the stage's
    own minimum."""
    stages = block_map.stages
    if isinstance(min_keep, int):
        min_keep = [min_keep] * len(stages)
    if len(min_keep) != len(stages):
        raise ValueError(f'{block_map.model_name}: min_keep has {len(min_keep)} entries but the model has '
                         f'{len(stages)} stages')
    return [max(min(len(stage.blocks), int(wanted)), stage.min_keep) for stage, wanted in zip(stages, min_keep)]


def nested_keep(parent: torch.Tensor, q: float, generator: Optional[torch.Generator] = None,
                droppable: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A child of ``parent`` (same shape, bool): every block the parent dropped stays dropped, and each block the
    parent kept is dropped with probability ``q`` (only where ``droppable``, e.g. ``block_map.skippable``)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f'nested drop probability {q} must lie in [0, 1]')
    parent = torch.as_tensor(parent, dtype=torch.bool)
    survives = torch.rand(parent.shape, generator=generator, dtype=torch.float64) >= q
    if droppable is not None:
        survives |= ~torch.as_tensor(droppable, dtype=torch.bool)
    return parent & survives


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, step, rank) alone: pass the same rank on every process (the default)
    for masks identical on all DDP ranks without communication, or the real rank for per-rank masks."""
    mixed = _splitmix64(_splitmix64(_splitmix64(int(seed)) ^ int(step)) ^ int(rank))
    return torch.Generator().manual_seed(mixed & 0x7FFFFFFFFFFFFFFF)
