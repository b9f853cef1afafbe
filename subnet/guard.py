"""One guard for long runs: what stops a run cleanly, and what it saves before it stops.

``RunGuard`` holds the stop signals and the ranks' vote on them (``stopping.py``), the training set's unreadable
images (``unreadable.py``), the non-finite step count (``--skip-nonfinite``), the checks a checkpoint passes before
it is written (``before_save``), and the mid-epoch checkpoints that let ``--resume auto`` continue where a run
stopped (``resume.py``). train.py builds it once (``RunGuard.for_run``); the epoch loop calls it at named moments:

- ``batches``: the epoch's batches, from where a resumed epoch stopped;
- ``after_step``: a loader batch is done (was its loss finite and its update applied?);
- ``after_update``: an optimizer update is done: stop on what the ranks agreed on (a non-finite loss, too many
  unreadable images, a signal: after writing the position) or write a recovery checkpoint when one is due;
- ``end_of_epoch``: the epoch's last batch is done; ``after_checkpoint``: its checkpoint is written.

Every stop is a ``RunStopped`` (or, for a broken dataset, a ``UsageError``) with one line that says what to do.
"""
import signal
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from timm import utils

from .divergence import DivergenceLimit
from .errors import EXIT_NONFINITE, RunStopped, UsageError
from .finite import check_state_finite
from .resume import BatchCursor, EpochStart, PositionWriter, install_cursor, set_rng_state
from .stopping import Requests, SignalWatch, StopPolicy, Vote
from .unreadable import ImageFailures, over_limit

__all__ = ['RunGuard', 'EpochPosition']


@dataclass
class EpochPosition:
    """Where the epoch loop is, as the guard sees it."""
    epoch: int
    num_batches: int
    images: int  # the epoch's images (batches x batch size): what --bad-image-limit is a fraction of
    meters: Any  # the loop's EpochMeters: its ``counters`` and the ``state_dict`` a position checkpoint keeps
    updates: int = 0  # optimizer updates done in this epoch


class RunGuard:
    """Signals, the stop vote, unreadable images, non-finite steps and position checkpoints; a bare one (tests,
    benchmarks) only stops on a non-finite loss."""

    def __init__(self, policy: Optional[StopPolicy] = None, positions: Optional[PositionWriter] = None,
                 cursor: Optional[BatchCursor] = None, failures: Optional[ImageFailures] = None,
                 bad_image_limit: float = 0.01, start: Optional[EpochStart] = None, recovery_interval: int = 0):
        self.policy = policy or StopPolicy(SignalWatch(), Vote(distributed=False))
        self.positions, self.cursor, self.failures = positions, cursor, failures
        self.bad_image_limit, self.recovery_interval = bad_image_limit, recovery_interval
        self.start = start  # where a resumed run continues (the first epoch it trains only)
        self.limit: Optional[DivergenceLimit] = None  # the run's divergence bounds (train.py sets them)

    @classmethod
    def for_run(cls, args, train_loader, failures: Optional[ImageFailures], start: Optional[EpochStart],
                saver=None) -> 'RunGuard':
        """The guard of a train.py run; ``saver`` (rank 0's) writes the position checkpoints and asks
        ``before_save`` before every checkpoint it writes."""
        vote = Vote(args.distributed)
        policy = StopPolicy(SignalWatch(), vote, skip_nonfinite=args.skip_nonfinite,
                            recovery_minutes=args.recovery_minutes, primary=utils.is_primary(args))
        cursor = install_cursor(train_loader)
        guard = cls(policy, PositionWriter(vote, saver, cursor), cursor, failures, args.bad_image_limit, start,
                    args.recovery_interval)
        if saver is not None:
            saver.before_save = guard.before_save
        return guard

    def __enter__(self) -> 'RunGuard':
        """Stop signals are recorded while in this block (``stopping.SignalWatch``)."""
        self.policy.signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.policy.signals.__exit__(*exc)

    # ---- where an epoch starts
    def resume_point(self, epoch: int) -> Optional[EpochStart]:
        return self.start if self.start is not None and self.start.epoch == epoch else None

    def batches(self, loader, epoch: int) -> Iterator:
        """(batch index, batch) from the first batch, or from where a resumed epoch stopped."""
        start = self.resume_point(epoch)
        if start is None:
            yield from enumerate(loader)
        elif start.batches >= len(loader):  # stopped after its last step: no batch left
            set_rng_state(start.rng)
        elif self.cursor is not None:
            self.cursor.resume_at(start.batches, start.restores())
            yield from enumerate(loader, start=start.batches)
        else:  # a loader without torch's plain batch sampler: read the done batches again, and drop them
            for batch_idx, batch in enumerate(loader):
                if batch_idx == start.batches:
                    set_rng_state(start.rng)
                if batch_idx >= start.batches:
                    yield batch_idx, batch

    # ---- the moments the loop calls
    def after_step(self, position: EpochPosition, batch_idx: int, good: bool) -> None:
        """A loader batch is done; ``good``: its loss was finite and its update (if it ended one) applied."""
        if not good:
            counters = position.meters.counters
            counters['nonfinite_steps'] += 1
            self.policy.nonfinite_step(batch_idx, counters['nonfinite_steps'])

    def after_update(self, position: EpochPosition, batches_done: int) -> None:
        """An optimizer update is done (``position.updates`` counts it): act on what the ranks agreed on."""
        self._count_unreadable(position)
        due = bool(self.recovery_interval) and position.updates % self.recovery_interval == 0
        requests = self.policy.after_update()
        self._act(requests, position, batches_done, save=bool(requests.save) or due)

    def end_of_epoch(self, position: EpochPosition) -> None:
        """The epoch's last batch is done: a blocking vote on what is pending, nothing saved."""
        self._count_unreadable(position)
        self._act(self.policy.agree_now(), position, position.num_batches, save=False)

    def after_checkpoint(self, epoch: int, last_path: str, going_on: bool) -> None:
        """The epoch's checkpoint (``last_path``) is written: a signal that came during evaluation or saving stops
        the run now, if it would go on (``going_on``; every rank votes either way)."""
        signum = self.policy.agree_now().signal
        if signum and going_on:
            raise RunStopped(f'stopped by {signal.Signals(signum).name} after epoch {epoch}: {last_path} holds it; '
                             f'the same command with --resume auto continues from there', 128 + signum)

    def before_save(self, state: dict) -> None:
        """The checks every checkpoint passes before it is written (a ``RunStopped`` when one fails, and nothing
        is written): its weights, and its EMA weights, are finite and within the divergence bound."""
        check_state_finite(state)
        if self.limit is not None:
            self.limit.check_state(state)

    # ---- what the moments do
    def _count_unreadable(self, position: EpochPosition) -> None:
        if self.failures is None:
            return
        counters = position.meters.counters
        counters['unreadable_images'] += self.failures.drain()
        if over_limit(counters['unreadable_images'], self.bad_image_limit, position.images):
            self.policy.too_many_bad_images(counters['unreadable_images'])

    def _act(self, requests: Requests, position: EpochPosition, batches_done: int, save: bool) -> None:
        """Do what the ranks agreed on after ``batches_done`` batches: stop, save a position, or go on."""
        if requests.nonfinite:
            raise RunStopped(self._nonfinite_message(position, requests.nonfinite - 1), EXIT_NONFINITE)
        if requests.bad_images:
            raise UsageError(self._bad_images_message(position.epoch, requests.bad_images))
        path = ''
        if (save or requests.signal) and self.positions is not None:
            path = self.positions.save(position.epoch, batches_done, position.updates, position.meters.state_dict())
        if requests.signal:
            raise RunStopped(self._signal_message(requests.signal, position, batches_done, path),
                             128 + requests.signal)

    def _nonfinite_message(self, position: EpochPosition, batch_idx: int) -> str:
        where = f'epoch {position.epoch}, batch {batch_idx} of {position.num_batches}'
        skip = self.policy.skip_nonfinite
        what = (f'more than --skip-nonfinite {skip} steps had a non-finite loss or gradients (the last at {where})'
                if skip else f'the loss is not finite at {where}')
        return (f'error: {what}: stopped without saving, the run folder keeps its last good checkpoint; lower --lr, '
                f'add --clip-grad{"" if skip else ", or skip such steps with --skip-nonfinite N"}')

    def _bad_images_message(self, epoch: int, count: int) -> str:
        last = f'unreadable image file {self.failures.last}: ' if self.failures and self.failures.last else ''
        return (f'{last}{count} unreadable images in epoch {epoch}, more than --bad-image-limit '
                f'{self.bad_image_limit:g} allows: the dataset, not a file, looks broken (each is named in the log)')

    def _signal_message(self, signum: int, position: EpochPosition, batches_done: int, path: str) -> str:
        saved = f'saved {path}' if path else 'rank 0 saved its position' if self.positions is not None \
            else 'nothing saved'
        return (f'stopped by {signal.Signals(signum).name} in epoch {position.epoch} after {batches_done} of its '
                f'{position.num_batches} batches: {saved}; the same command with --resume auto continues from '
                f'there')
