"""Pick the faster of two equivalent implementations by timing real training steps (``--cosub-impl auto``).

Whether skipping the dropped rows beats computing every row and masking depends on the hardware, the model and the
drop rate (DINOv2 skips only above a drop rate of 0.1, where "the overhead is compensated" on its GPUs; DeiT III
trains ViT-S at 0.05), so it is measured, not assumed. The first steps of the run are the trial: each option runs
``warmup`` untimed steps (torch.compile compiles then), then ``trials`` timed steps, the options alternating so a
drifting machine load affects both alike. The steps train as usual: both options compute the same submodels from
the same masks. Rank 0 decides (the median step time of each option, the faster wins) and broadcasts its choice,
so every rank runs the same code; the choice and the trial's progress are part of the checkpoint, so a resumed run
continues the trial where it stopped or keeps the choice, and replays the same option at every step.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ['FastestChoice', 'default_clock']

_logger = logging.getLogger('train')

default_clock: Callable[[], float] = time.perf_counter  # what a FastestChoice built without a clock reads


class FastestChoice:
    """Which option each trial step runs, the step times, and the choice once the trial is over.

    ``clock``: seconds (``default_clock``, ``time.perf_counter``, unless given); ``what``: the log line's name.
    """

    def __init__(self, options: Sequence[str], *, warmup: int = 1, trials: int = 3,
                 clock: Optional[Callable[[], float]] = None, what: str = 'implementation',
                 verbose: bool = True):
        if len(options) < 2 or warmup < 0 or trials < 1:
            raise ValueError(f'FastestChoice needs two or more options, warmup >= 0 and trials >= 1; got '
                             f'{list(options)}, {warmup}, {trials}')
        self.options = tuple(options)
        self.warmup, self.trials = warmup, trials
        self.clock = clock if clock is not None else default_clock
        self.what = what
        self.verbose = verbose
        self.choice: Optional[str] = None
        self.steps = 0  # trial steps run so far
        self.times: Dict[str, List[float]] = {o: [] for o in self.options}

    @property
    def trial_steps(self) -> int:
        return (self.warmup + self.trials) * len(self.options)

    def current(self) -> str:
        """The option this step runs: the choice, or the trial's option for this step (alternating)."""
        return self.choice if self.choice is not None else self.options[self.steps % len(self.options)]

    @contextlib.contextmanager
    def timed(self, device: Optional[torch.device] = None) -> Iterator[str]:
        """Around one step: yields the option to run; during the trial, times it (waiting for the GPU) and
        decides after the last trial step."""
        option = self.current()
        if self.choice is not None:
            yield option
            return
        _synchronize(device)
        start = self.clock()
        yield option
        _synchronize(device)
        if self.steps >= self.warmup * len(self.options):
            self.times[option].append(self.clock() - start)
        self.steps += 1
        if self.steps >= self.trial_steps:
            self.decide()

    def decide(self) -> str:
        """Rank 0's faster option (median step time), the same on every rank; logged once."""
        medians = {o: statistics.median(t) for o, t in self.times.items() if t}
        choice = [min(medians, key=medians.get)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)
        self.choice = choice[0]
        if self.verbose:
            measured = ', '.join(f'{o} {medians[o] * 1000:.1f} ms' for o in self.options if o in medians)
            _logger.info(f'{self.what} auto: median step time after {self.warmup} warm-up step(s) each, over '
                         f'{self.trials} step(s) each: {measured}; using {self.choice}')
        return self.choice

    def state_dict(self) -> dict:
        return {'choice': self.choice, 'steps': self.steps, 'times': {o: list(t) for o, t in self.times.items()}}

    def load_state_dict(self, state: dict) -> None:
        choice = state.get('choice')
        if choice is not None and choice not in self.options:
            raise ValueError(f'{self.what}: the checkpoint chose {choice!r}, not one of {", ".join(self.options)}')
        self.choice = choice
        self.steps = int(state.get('steps', 0))
        self.times = {o: list(state.get('times', {}).get(o, [])) for o in self.options}
        if self.verbose and choice is not None:
            _logger.info(f'{self.what} auto: {choice}, as the checkpoint chose')


def _synchronize(device: Optional[torch.device]) -> None:
    if device is not None and device.type == 'cuda':
        torch.cuda.synchronize(device)
