"""Resuming in the middle of an epoch, exactly where an interrupted run stopped.

A checkpoint written mid-epoch (a stop signal, ``--recovery-interval``, ``--recovery-minutes``) is a timm recovery
file whose ``epoch_position`` entry holds, per rank: the batches and updates done in the epoch, the loss meters,
and the RNG states (torch, CUDA, numpy, random). timm's train.py reads such a file as any recovery file (it goes on
at the next epoch); ours continues at the next batch:

- the epoch starts as always (every RNG re-seeded from (seed, epoch), so the sampler draws the same order), then
  the batches already done are skipped *at the sampler* (``BatchCursor``): their images are never read;
- the RNG states are put back at the moment the interrupted run had them. timm's prefetcher draws its random erasing
  for a batch when the loader hands that batch over, one batch ahead of the step, so the interrupted run had already
  drawn the next batch's erasing before its last step. The cursor records the RNG state whenever a batch is handed
  over (``DeliveredBatches``) and the checkpoint keeps the one of that read-ahead batch: on resume it is put back when
  that batch is handed over, and the state after the last step when the batch after it is. Without the prefetcher the
  cursor does this when the sampler starts a batch (nothing is read ahead then). The samples' own augmentation does
  not draw from these RNGs: it comes from streams seeded per sample (``sample_seeds.py``), in the loader's workers
  or in this process alike, so the result is bitwise the uninterrupted run with any ``--workers``.
"""
import logging
import random
import time
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import numpy as np
import torch
import torch.utils.data
from timm.data.loader import PrefetchLoader

from .errors import RunStopped

__all__ = ['rng_state', 'set_rng_state', 'BatchCursor', 'DeliveredBatches', 'install_cursor', 'EpochStart',
           'POSITION_KEY', 'epoch_start_from', 'resume_order', 'PositionWriter']

_logger = logging.getLogger('train')

POSITION_KEY = 'epoch_position'


def rng_state() -> dict:
    """Every RNG a training step or an augmentation draws from, as tensors and tuples (``weights_only`` loads it)."""
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    state = {'torch': torch.get_rng_state(), 'random': random.getstate(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                       'gauss': float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate(state['random'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class BatchCursor(torch.utils.data.Sampler):
    """The loader's index sampler seen through a cursor: it knows which batch the loader is on, skips the batches
    a resumed epoch has done (their indices are drawn, their images never read) and puts RNG states back when
    given batches start. A batch starts when the sampler starts it or, ``at_delivery``, when ``DeliveredBatches``
    hands it over (with workers the sampler runs batches ahead of that). ``records``: the RNG states at batch starts
    are kept (the last two), for a checkpoint taken while a batch is read ahead."""

    def __init__(self, sampler, batch_size: int, records: bool, at_delivery: bool = False):
        self.sampler, self.batch_size, self.records, self.at_delivery = sampler, batch_size, records, at_delivery
        self.started = 0  # batches of this epoch the loader has started reading
        self._at_start: Dict[int, dict] = {}  # batch -> RNG state when it started (the last two)
        self._skip, self._restores = 0, {}

    def __len__(self) -> int:
        return len(self.sampler)

    def resume_at(self, batches: int, restores: Dict[int, dict]) -> None:
        """Next epoch only: skip ``batches`` batches; put ``restores[b]`` back when batch b starts (the last one also
        when the epoch ends before it)."""
        self._skip, self._restores = batches, dict(restores)

    def state_at_start(self, batch: int) -> Optional[dict]:
        return self._at_start.get(batch)

    @property
    def pending_skip(self) -> int:
        """The batches the coming pass skips."""
        return self._skip

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        indices = iter(self.sampler)
        for _ in range(skip * self.batch_size):
            next(indices, None)
        position = skip * self.batch_size
        if not self.at_delivery:
            self.started = skip
        for index in indices:
            if position % self.batch_size == 0 and not self.at_delivery:
                self.batch_starts(position // self.batch_size)
            position += 1
            yield index
        if not self.at_delivery:
            self.pass_ends()

    def batch_starts(self, batch: int) -> None:
        self.started = batch + 1
        if batch in self._restores:
            set_rng_state(self._restores.pop(batch))
        if self.records:
            self._at_start = {b: s for b, s in self._at_start.items() if b == batch - 1}
            self._at_start[batch] = rng_state()

    def pass_ends(self) -> None:
        if self._restores:  # the epoch ended before the batch a state waited for
            set_rng_state(self._restores[max(self._restores)])
            self._restores = {}


class DeliveredBatches:
    """A DataLoader as timm's prefetcher reads it: each batch it hands over starts on the cursor (``at_delivery``)."""

    def __init__(self, loader: torch.utils.data.DataLoader, cursor: BatchCursor):
        self.loader, self.cursor = loader, cursor

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # the prefetcher reads the loader's sampler, dataset and collate_fn
        if name == 'loader':
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        batch = self.cursor.pending_skip
        self.cursor.started = batch
        for item in self.loader:
            self.cursor.batch_starts(batch)
            batch += 1
            yield item
        self.cursor.pass_ends()


def _data_loader(loader) -> tuple:
    """The torch DataLoader inside timm's wrappers (``PrefetchLoader.loader``), and the wrapper holding it."""
    holder = None
    while not isinstance(loader, torch.utils.data.DataLoader) and hasattr(loader, 'loader'):
        holder, loader = loader, loader.loader
    return (loader, holder) if isinstance(loader, torch.utils.data.DataLoader) else (None, None)


def install_cursor(loader) -> Optional[BatchCursor]:
    """Put a ``BatchCursor`` under the loader's batch sampler (and, behind timm's prefetcher, ``DeliveredBatches``
    over the DataLoader); None for loaders without torch's plain batch sampler (scheduled sizes, NaFlex, timm's
    multi-epochs loader) and for streaming datasets (their sampler draws no indices): those replay the done batches
    on resume."""
    data_loader, holder = _data_loader(loader)
    batch_sampler = getattr(data_loader, 'batch_sampler', None)
    if type(batch_sampler) is not torch.utils.data.BatchSampler or isinstance(data_loader.dataset,
                                                                              torch.utils.data.IterableDataset):
        return None
    if not isinstance(batch_sampler.sampler, BatchCursor):
        prefetcher = isinstance(holder, PrefetchLoader)
        cursor = BatchCursor(batch_sampler.sampler, batch_sampler.batch_size,
                             records=prefetcher or data_loader.num_workers == 0, at_delivery=prefetcher)
        batch_sampler.sampler = cursor
        if prefetcher:
            holder.loader = DeliveredBatches(data_loader, cursor)
    return batch_sampler.sampler


@dataclass
class EpochStart:
    """Where a resumed epoch continues, for this rank."""
    epoch: int
    batches: int  # loader batches done
    updates: int  # optimizer updates done
    rng: dict  # the RNG states after the last update
    rng_next_batch: Optional[dict]  # the RNG states when the read-ahead batch started (None: nothing read ahead)
    meters: dict

    def restores(self) -> Dict[int, dict]:
        if self.rng_next_batch is None:
            return {self.batches: self.rng}
        return {self.batches: self.rng_next_batch, self.batches + 1: self.rng}


def epoch_start_from(checkpoint: dict, rank: int, world_size: int) -> Optional[EpochStart]:
    """The position a mid-epoch checkpoint holds for this rank; None for an epoch-boundary checkpoint, or (with a
    warning) when the number of processes changed, as the ranks' shares of the epoch differ then."""
    position = checkpoint.get(POSITION_KEY)
    if not position:
        return None
    if position['world_size'] != world_size:
        _logger.warning(f"The checkpoint was written by {position['world_size']} processes, this run has {world_size}: "
                        f"epoch {position['epoch']} starts again from its first batch.")
        return None
    mine = position['ranks'][rank]
    return EpochStart(position['epoch'], position['batches'], position['updates'], mine['rng'],
                      mine.get('rng_next_batch'), mine['meters'])


def resume_order(checkpoint: dict) -> tuple:
    """(epoch, batches done in it) a checkpoint continues from: mid-epoch ones from their position, others (timm's
    ``version`` 2 checkpoints record the epoch they completed) from the next epoch's start."""
    position = checkpoint.get(POSITION_KEY)
    if position:
        return position['epoch'], position['batches']
    return checkpoint.get('epoch', -1) + 1, 0


class PositionWriter:
    """Mid-epoch checkpoints: every rank's position gathered, rank 0's saver (``run_folder.AtomicCheckpointSaver``)
    writes them into a timm recovery file. Called on every rank at the same update (a collective)."""

    def __init__(self, vote, saver=None, cursor: Optional[BatchCursor] = None):
        self.vote, self.saver, self.cursor = vote, saver, cursor

    def save(self, epoch: int, batches: int, updates: int, meters: dict) -> str:
        """Write the position after ``batches`` batches (``updates`` updates) of ``epoch``; rank 0 returns the file.
        A save rank 0 refuses (``RunStopped``: its checks before a save failed) stops every rank."""
        mine = {'rng': rng_state(), 'meters': meters}
        if self.cursor is not None and self.cursor.records and self.cursor.started > batches:
            mine['rng_next_batch'] = self.cursor.state_at_start(batches)
        ranks = self.vote.gather(mine)
        path, refused = '', None
        if self.saver is not None:
            started = time.perf_counter()
            position = {'epoch': epoch, 'batches': batches, 'updates': updates, 'world_size': len(ranks),
                        'ranks': ranks}
            try:
                path = self.saver.save_position(epoch, updates, position)
                _logger.info(f'Saved {path} (epoch {epoch} after {batches} batches) in '
                             f'{time.perf_counter() - started:.2f} s.')
            except RunStopped as e:
                refused = e
        # no rank goes on (or exits, making torchrun stop the others) before the file is written or refused
        exit_code = self.vote.max_now(refused.exit_code if refused is not None else 0)
        if refused is not None:
            raise refused
        if exit_code:
            raise RunStopped(f'error: rank 0 refused to write the checkpoint of epoch {epoch} after {batches} '
                             f'batches (its log says why): stopped', exit_code)
        return path
