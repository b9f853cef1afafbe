"""Stopping a run cleanly: signals, and every rank agreeing on the update after which to stop or save.

Clusters preempt with SIGTERM (SLURM, Kubernetes), or warn ahead with a chosen signal (SLURM's ``--signal``, often
SIGUSR1); a user presses Ctrl-C (SIGINT). The handler only records the request: the loop finishes the optimizer
step in progress, writes a checkpoint holding its position in the epoch, and exits with 128 + the signal's number.
A second Ctrl-C exits at once. The same signal delivered twice is not a second request: a terminal sends Ctrl-C to
torchrun and its workers alike, and torchrun forwards what it gets to the workers, so a worker sees SIGINT twice
within milliseconds (a second SIGINT within a second of the first is ignored); a repeated SIGTERM or SIGUSR1 is
always ignored (a scheduler follows its signal with SIGKILL when its grace period ends anyway).

Under DDP the ranks must stop (or save) after the same update. Each rank's requests are a few integers, reduced
(max) across ranks on a CPU (gloo) group asynchronously: sent after update k, read after update k+1, so no step
waits on the network for them and the GPU is never synchronised for them.
"""
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ['STOP_SIGNALS', 'SignalWatch', 'Vote', 'Requests', 'StopPolicy']

_logger = logging.getLogger('train')

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class SignalWatch:
    """Records the first stop signal while training (a context manager; previous handlers come back on exit)."""

    REPEAT_WINDOW = 1.0  # seconds: a second SIGINT sooner than this is the first one, forwarded

    def __init__(self):
        self.received = 0  # the signal's number, 0 while none came
        self._previous = {}
        self._pid = os.getpid()
        self._first_at = 0.

    def __enter__(self) -> 'SignalWatch':
        if threading.current_thread() is threading.main_thread():  # Python sets handlers only there
            self._pid = os.getpid()
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked with this handler: the main process will stop it
        name = signal.Signals(signum).name
        if not self.received:
            self.received, self._first_at = signum, time.monotonic()
            _logger.warning(f'{name} received: finishing the current step, then saving and stopping '
                            f'(Ctrl-C again to exit at once).')
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > self.REPEAT_WINDOW:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class Vote:
    """The ranks' requests reduced (max) over a CPU process group: one update late and non-blocking, or now."""

    def __init__(self, distributed: bool):
        self.group = dist.new_group(backend='gloo') if distributed else None
        self._work, self._sent = None, None

    def exchange(self, values: List[int]) -> List[int]:
        """Send this update's values; return what every rank sent last time (single process: ``values``)."""
        if self.group is None:
            return list(values)
        agreed = self._collect() or [0] * len(values)
        self._sent = torch.tensor(values, dtype=torch.int64)
        self._work = dist.all_reduce(self._sent, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def now(self, values: List[int]) -> List[int]:
        """A blocking reduction of ``values`` (once per epoch)."""
        pending = self._collect()
        if self.group is not None:
            sent = torch.tensor(values, dtype=torch.int64)
            dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=self.group)
            values = sent.tolist()
        return [max(a, b) for a, b in zip(values, pending)] if pending else list(values)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable, CPU tensors), in rank order."""
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def max_now(self, value: int) -> int:
        """A blocking max of one value over the ranks (it also waits for every rank), leaving a pending exchange as
        it is."""
        if self.group is None:
            return value
        sent = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=self.group)
        return int(sent.item())

    def _collect(self) -> Optional[List[int]]:
        if self._work is None:
            return None
        self._work.wait()
        self._work = None
        return self._sent.tolist()


@dataclass
class Requests:
    """What one rank asks for after an update; reduced with max over ranks, so 0 means "no"."""
    signal: int = 0  # the stop signal's number
    nonfinite: int = 0  # 1 + the batch whose loss or gradients were not finite (a stop)
    bad_images: int = 0  # unreadable images of this epoch, once past the limit (a stop)
    save: int = 0  # a timed recovery checkpoint is due (rank 0's clock)

    def values(self) -> List[int]:
        return [self.signal, self.nonfinite, self.bad_images, self.save]

    @classmethod
    def of(cls, values: List[int]) -> 'Requests':
        return cls(*values)


class StopPolicy:
    """This rank's requests after each update (signals, non-finite steps, unreadable images, the recovery clock),
    agreed with the other ranks through a ``Vote``."""

    def __init__(self, signals: SignalWatch, vote: Vote, skip_nonfinite: int = 0, recovery_minutes: float = 0.,
                 primary: bool = True):
        self.signals, self.vote = signals, vote
        self.skip_nonfinite = skip_nonfinite
        self.recovery_seconds = recovery_minutes * 60
        self.primary = primary
        self.local = Requests()
        self._next_save = time.monotonic() + self.recovery_seconds

    def nonfinite_step(self, batch_idx: int, skipped_so_far: int) -> None:
        """A step whose loss or gradients were not finite; past ``skip_nonfinite`` such steps it is a stop."""
        if skipped_so_far > self.skip_nonfinite and not self.local.nonfinite:
            self.local.nonfinite = batch_idx + 1

    def too_many_bad_images(self, count: int) -> None:
        self.local.bad_images = max(self.local.bad_images, count)

    def _refresh(self) -> None:
        self.local.signal = self.signals.received
        if self.primary and self.recovery_seconds and time.monotonic() >= self._next_save:
            self.local.save = 1
            self._next_save = time.monotonic() + self.recovery_seconds

    def after_update(self) -> Requests:
        """What all ranks asked for (one update late under DDP, at once in a single process)."""
        self._refresh()
        agreed = Requests.of(self.vote.exchange(self.local.values()))
        self.local.save = 0  # sent once
        return agreed

    def agree_now(self) -> Requests:
        """A blocking vote (twice per epoch: after its last batch, after its checkpoint) on what is pending and on
        a signal that came since; the recovery clock waits for the next update."""
        self.local.signal = self.signals.received
        self.local.save = 0
        return Requests.of(self.vote.now(self.local.values()))
