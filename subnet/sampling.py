"""Keep masks for the depth engine, drawn from a ``torch.Generator`` so runs are reproducible.

Masks index ``BlockMap.blocks`` (one column per drop_path-bearing block, True = the block runs):

* ``bernoulli_keep``: stochastic depth, one Bernoulli(1 - rate) per row and block (timm / DeiT III / cosub).
* ``stage_prefix_keep``: ST / ST++ "ordered residual sampling", the first k_i blocks of each stage.
* ``nested_keep``: GKT subnet-in-subnet, a child inherits its parent's drops and drops each survivor with prob q.
* ``step_generator`` / ``broadcast_from_rank0``: the same mask on every DDP rank when a method needs it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from .blocks import BlockMap
from .errors import UsageError

__all__ = ['drop_rates', 'bernoulli_keep', 'stage_prefix_keep', 'nested_keep', 'step_generator',
           'broadcast_from_rank0']

SCHEDULES = ('linear', 'constant')


def drop_rates(num_blocks: int, rate: float, schedule: str = 'linear') -> torch.Tensor:
    """Per-block drop rates: 'linear' is timm's ``calculate_drop_path_rates`` (0 at the first block, ``rate`` at the
    last); 'constant' is DeiT III's (``rate`` everywhere)."""
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f'drop rate {rate} must lie in [0, 1]')
    if schedule == 'linear':
        return torch.linspace(0.0, rate, num_blocks, dtype=torch.float64)
    if schedule == 'constant':
        return torch.full((num_blocks,), float(rate), dtype=torch.float64)
    raise UsageError(f'unknown drop-rate schedule {schedule!r} (expected one of {", ".join(SCHEDULES)})')


def bernoulli_keep(batch: int, rates: Union[torch.Tensor, Sequence[float]],
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A (batch, num_blocks) bool mask: row b keeps block i with probability 1 - rates[i], all independent."""
    rates = torch.as_tensor(rates, dtype=torch.float64)
    uniforms = torch.rand((batch, rates.numel()), generator=generator, dtype=torch.float64)
    return uniforms < (1.0 - rates)


def stage_prefix_keep(block_map: BlockMap, min_keep: Union[int, Sequence[int]] = 1,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A (num_blocks,) bool mask that keeps the first k_i blocks of stage i, k_i uniform in [m_i, d_i].

    m_i = min(d_i, min_keep_i), as ST's sample spaces do (ST++ 'space3' on ResNet-50 is min_keep=3), raised to the
    stage's own minimum so that blocks that cannot be skipped (a ResNet stage's first block) are always kept.
    """
    stages = block_map.stages
    if isinstance(min_keep, int):
        min_keep = [min_keep] * len(stages)
    if len(min_keep) != len(stages):
        raise UsageError(f'{block_map.model_name}: min_keep has {len(min_keep)} entries but the model has '
                         f'{len(stages)} stages')
    kept = []
    for stage, wanted in zip(stages, min_keep):
        depth = len(stage.blocks)
        low = max(min(depth, int(wanted)), stage.min_keep)
        kept.append(int(torch.randint(low, depth + 1, (1,), generator=generator)))
    return block_map.prefix_keep(kept)


def nested_keep(parent: torch.Tensor, q: float, generator: Optional[torch.Generator] = None,
                droppable: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A child of ``parent`` (same shape, bool): every block the parent dropped stays dropped, and each block the
    parent kept is dropped with probability ``q`` (only where ``droppable``, e.g. ``block_map.skippable``)."""
    if not 0.0 <= q <= 1.0:
        raise UsageError(f'nested drop probability {q} must lie in [0, 1]')
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


def broadcast_from_rank0(mask: torch.Tensor) -> torch.Tensor:
    """Rank 0's mask on every rank (a no-op without torch.distributed); NCCL gets a CUDA copy."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mask
    on_cuda = dist.get_backend() == 'nccl'
    buffer = mask.to(torch.uint8)
    buffer = buffer.cuda() if on_cuda else buffer.clone()
    dist.broadcast(buffer, src=0)
    return buffer.to(mask.device).to(mask.dtype)
