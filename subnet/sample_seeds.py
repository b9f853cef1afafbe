"""Per-sample random streams: a training sample's augmentation is a function of (seed, epoch, rank, position).

timm's training transforms (crop, flip, RandAugment / AutoAugment / 3-Augment, colour jitter, random erasing on the
loader side) draw from the global RNGs of Python's ``random``, numpy and torch in whatever process reads the
sample: with loader workers, each worker's stream is seeded when the epoch's workers start, so what a sample gets
depends on the worker count and on where in the epoch the workers started (a resumed epoch starts them at the resume
batch). Here the loader's index sampler tags every index with a ``SampleKey`` (the epoch, the sample's position in
this rank's epoch order); the dataset seeds all three RNGs from the key before reading the sample, and the prefetcher's
collate mixup seeds them from its batch's first key. The same sample then gets the same augmentation with any
``--workers``, in a resumed epoch too, and (seed, epoch, position) replays it alone.

The key carries the position rather than the dataset index so that the copies of an image that timm's repeated
augmentation (``--aug-repeats``) puts in one epoch are augmented independently. In the main process (``--workers
0``) the global RNG states are put back after each draw: the model-side randomness (drop-path, subnets, mixup in the
loop, the prefetcher's random erasing) sees the same stream with any worker count.
"""
import hashlib
import random
import struct
from contextlib import contextmanager
from typing import Iterator, List, NamedTuple, Optional

import numpy as np
import torch
import torch.utils.data
from timm.data import FastCollateMixup

__all__ = ['SampleKey', 'KeyedSampler', 'SeededSamples', 'SeededCollateMixup', 'seeded_rngs', 'key_seed',
           'key_samples']

_COLLATE = 1  # the stream of a batch's collate, apart from its first sample's own


class SampleKey(NamedTuple):
    """What a seeded dataset receives instead of a bare index: the index, and where it is in the epoch."""
    index: int
    epoch: int
    position: int  # in this rank's order of the epoch, from 0


def key_seed(seed: int, rank: int, key: SampleKey, stream: int = 0) -> int:
    """A 64-bit seed from (seed, rank, epoch, position, stream): a hash, so near keys give unrelated streams."""
    packed = struct.pack('<5q', seed, rank, key.epoch, key.position, stream)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), 'little')


@contextmanager
def seeded_rngs(seed64: int, keep: Optional[bool] = None):
    """Seed Python's ``random``, numpy's global RNG and torch's CPU generator from ``seed64``; ``keep``: put their
    states back afterwards (default: in the main process only; a loader worker's global streams serve nothing else)."""
    if keep is None:
        keep = torch.utils.data.get_worker_info() is None
    if keep:
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed64)
    np.random.seed([seed64 & 0xffffffff, seed64 >> 32])
    torch.default_generator.manual_seed(seed64)
    try:
        yield
    finally:
        if keep:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


class KeyedSampler(torch.utils.data.Sampler):
    """An index sampler whose indices come out as ``SampleKey``s of the dataset's current epoch.

    The key travels with the index through the loader's index queue, so the epoch reaches workers that were started
    in an earlier epoch (persistent workers) as well as fresh ones."""

    def __init__(self, sampler, dataset: 'SeededSamples'):
        self.sampler, self.dataset = sampler, dataset

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.dataset.epoch
        for position, index in enumerate(self.sampler):
            yield SampleKey(index, epoch, position)


class SeededBatch(list):
    """The samples of one batch, with the key of its first sample (for ``SeededCollateMixup``)."""
    key: SampleKey


class SeededSamples(torch.utils.data.Dataset):
    """A training dataset read under ``seeded_rngs`` of each sample's key (``KeyedSampler``'s)."""

    def __init__(self, dataset, seed: int, rank: int):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.epoch = 0  # the epoch the loader's next pass belongs to (``set_epoch``, called in the main process)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        with seeded_rngs(key_seed(self.seed, self.rank, key)):
            return self.dataset[key.index]

    def __getitems__(self, keys: List[SampleKey]) -> SeededBatch:
        batch = SeededBatch(self[key] for key in keys)
        batch.key = keys[0]
        return batch

    @property
    def transform(self):  # timm's create_loader sets the training transform on the dataset it is given
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    def __getattr__(self, name):  # the wrapped dataset's other parts (its reader, unreadable-image counts)
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededCollateMixup(FastCollateMixup):
    """timm's collate mixup (the prefetcher's), drawing its lambdas from its batch's own stream."""

    def __init__(self, *args, seed: int, rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.rank = seed, rank

    def __call__(self, batch, _=None):
        with seeded_rngs(key_seed(self.seed, self.rank, batch.key, _COLLATE)):
            return super().__call__(batch, _)


def key_samples(loader) -> KeyedSampler:
    """Put a ``KeyedSampler`` under the batch sampler of a torch DataLoader built on a ``SeededSamples``."""
    batch_sampler = loader.batch_sampler
    if type(batch_sampler) is not torch.utils.data.BatchSampler:
        raise TypeError(f'per-sample seeding needs torch\'s BatchSampler, not {type(batch_sampler).__name__}')
    batch_sampler.sampler = KeyedSampler(batch_sampler.sampler, loader.dataset)
    return batch_sampler.sampler
