"""Measured inference speed: images per second of several models, timed in turns so they share the conditions.

FLOPs say what a subnet should cost; the clock says what it costs (a dropped block also saves its memory
traffic, a kept one may not use the cores as well as the FLOPs suggest). ``validate.py --export`` times each
exported model against the full net with this. On a shared machine the load changes while one model is timed,
so the models take turns: every round times each of them once, and a model's speed is the median over rounds.
All run in this process, with the same thread count, in eval mode under ``torch.inference_mode``; warm-up
passes (which allocate, pick kernels and fill caches) are not timed.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, ContextManager, Dict, Sequence

import torch
from torch import nn

__all__ = ['images_per_second', 'speed_fields', 'SPEED_FIELDS']

# what validate.py --export adds to each row: img/s at --speed-batch and at batch 1, and the ratios to the full net
SPEED_FIELDS = ('img_per_s', 'speedup', 'img_per_s_batch1', 'speedup_batch1')

WARMUP_PASSES = 3
ROUNDS = 7
ROUND_SECONDS = 0.2  # each model runs about this long per round (whole passes, at least one)


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(model: nn.Module, images: torch.Tensor, passes: int, autocast: Callable[[], ContextManager]) -> float:
    _synchronize(images.device)
    start = time.perf_counter()
    with autocast():
        for _ in range(passes):
            model(images)
    _synchronize(images.device)
    return time.perf_counter() - start


@torch.inference_mode()
def images_per_second(models: Dict[str, nn.Module], input_size: Sequence[int], batch_sizes: Sequence[int], *,
                      device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                      rounds: int = ROUNDS, round_seconds: float = ROUND_SECONDS) -> Dict[str, Dict[int, float]]:
    """``{name: {batch size: images per second}}`` for models already on ``device`` (set to eval mode here)."""
    for model in models.values():
        model.eval()
    speeds: Dict[str, Dict[int, float]] = {name: {} for name in models}
    generator = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        images = torch.randn((batch,) + tuple(input_size), generator=generator).to(device=device, dtype=dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        passes = {}
        for name, model in models.items():
            warmup = _timed(model, images, WARMUP_PASSES, autocast) / WARMUP_PASSES
            passes[name] = max(1, math.ceil(round_seconds / max(warmup, 1e-6)))
        times: Dict[str, list] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(_timed(model, images, passes[name], autocast) / passes[name])
        for name in models:
            speeds[name][batch] = batch / statistics.median(times[name])
    return speeds


def speed_fields(speeds: Dict[str, Dict[int, float]], name: str, full: str, batch: int) -> dict:
    """A row's SPEED_FIELDS: img/s at ``batch`` and at 1, and the ratios to the ``full`` model's."""
    mine, reference = speeds[name], speeds[full]
    return dict(img_per_s=round(mine[batch], 2), speedup=round(mine[batch] / reference[batch], 3),
                img_per_s_batch1=round(mine[1], 2), speedup_batch1=round(mine[1] / reference[1], 3))
