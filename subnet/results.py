"""What a training step's result holds besides ``loss`` and ``output``, declared once so every reader knows it.

A method lists its parts in ``Method.result_parts`` (``register_method`` registers them here); the loop declares
its own counters. The loop averages (or, for counters, sums) them over the epoch, prints them in the ``Train:``
line and writes them to ``summary.csv`` as ``train_<name>``; ``summary.png`` looks each column up here to know
what to draw (losses in the loss panel; costs and counters are not losses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional

__all__ = ['LOSS', 'COST', 'COUNTER', 'ResultPart', 'loss_part', 'cost_part', 'counter', 'LOOP_COUNTERS',
           'register_parts', 'result_part']

LOSS, COST, COUNTER = 'loss', 'cost', 'counter'


@dataclass(frozen=True)
class ResultPart:
    """One named scalar of a step's result: a loss part, a cost (e.g. the subnets' FLOP share) or a counter."""
    name: str
    kind: str
    about: str = ''

    def __post_init__(self):
        if self.kind not in (LOSS, COST, COUNTER):
            raise ValueError(f'result part {self.name!r}: kind must be {LOSS}, {COST} or {COUNTER}, got {self.kind!r}')

    @property
    def column(self) -> str:
        """Its summary.csv column."""
        return f'train_{self.name}'


def loss_part(name: str, about: str = '') -> ResultPart:
    return ResultPart(name, LOSS, about)


def cost_part(name: str, about: str = '') -> ResultPart:
    return ResultPart(name, COST, about)


def counter(name: str, about: str = '') -> ResultPart:
    return ResultPart(name, COUNTER, about)


# what the loop counts in every epoch (summed over ranks; a column only when not zero)
LOOP_COUNTERS = (counter('unreadable_images', 'images that could not be read and were replaced'),
                 counter('nonfinite_steps', 'steps with a non-finite loss or gradients, skipped'),
                 counter('overflow_steps', 'fp16 steps the grad scaler skipped on overflowing gradients'))

_PARTS: Dict[str, ResultPart] = {}


def register_parts(parts: Iterable[ResultPart]) -> None:
    """Declare ``parts``; a name declared again must mean the same."""
    for part in parts:
        known = _PARTS.setdefault(part.name, part)
        if known.kind != part.kind:
            raise ValueError(f'result part {part.name!r} is declared as a {known.kind} already, not a {part.kind}')


def result_part(column: str) -> Optional[ResultPart]:
    """The declared part behind a summary.csv column (``train_<name>``), or None."""
    return _PARTS.get(column[len('train_'):]) if column.startswith('train_') else None


register_parts(LOOP_COUNTERS)
