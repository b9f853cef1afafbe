"""Per-sample state carried across training steps: which dataset samples a batch holds, and a memory of logits
indexed by them (GKT's knowledge across steps, ``--gkt-knowledge sample``).

The loader's images and labels say nothing of which samples they are, and timm's collate functions (the
prefetcher's, mixup's) take (image, int label) pairs only. So the indices are read where the loader draws them:
``SampleIndexTap`` wraps the index sampler under the loader's batch sampler and queues every index it hands out. The
loader delivers batches in the order it draws them (also with workers and timm's read-ahead prefetcher), so the
step that gets a batch of B images takes the queue's first B indices. The tap sits above the resume cursor
(``subnet/resume.py``), so the batches a resumed epoch skips never enter the queue.
"""
from collections import deque
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.utils.data

from .sample_seeds import SampleKey

__all__ = ['SampleIndexTap', 'install_index_tap', 'LogitMemory']


class SampleIndexTap(torch.utils.data.Sampler):
    """An index sampler that remembers what it handed out, until a training step takes it (``take``)."""

    def __init__(self, sampler, num_samples: int):
        self.sampler = sampler
        self.num_samples = num_samples  # the dataset's size (a distributed sampler draws a share of it)
        self.queue = deque()

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        self.queue.clear()  # a new pass over the data (an epoch, or a BN-recalibration read): nothing is pending
        for index in self.sampler:
            # the seeded training sampler (sample_seeds.py) hands out keys that carry the dataset index
            self.queue.append(index.index if isinstance(index, SampleKey) else int(index))
            yield index

    def take(self, count: int) -> torch.Tensor:
        """The dataset indices of the next batch of ``count`` samples."""
        if count > len(self.queue):
            raise RuntimeError(f'a batch of {count} samples, but the loader drew only {len(self.queue)} indices')
        return torch.tensor([self.queue.popleft() for _ in range(count)], dtype=torch.long)


def install_index_tap(loader) -> SampleIndexTap:
    """Put a ``SampleIndexTap`` under the training loader's batch sampler (above the resume cursor: install it after
    the run guard). Only torch's plain ``BatchSampler`` over a map-style dataset has indices to read."""
    data_loader = loader
    while not isinstance(data_loader, torch.utils.data.DataLoader) and hasattr(data_loader, 'loader'):
        data_loader = data_loader.loader  # timm's PrefetchLoader
    batch_sampler = getattr(data_loader, 'batch_sampler', None)
    if type(batch_sampler) is not torch.utils.data.BatchSampler:
        raise ValueError('needs a map-style training set read through torch\'s plain batch sampler (not '
                         '--train-img-sizes, --use-multi-epochs-loader, NaFlex or streamed datasets)')
    if not isinstance(batch_sampler.sampler, SampleIndexTap):
        batch_sampler.sampler = SampleIndexTap(batch_sampler.sampler, len(data_loader.dataset))
    return batch_sampler.sampler


class LogitMemory:
    """``slots`` fp32 logit vectors per dataset sample, and whether the sample has been seen, on the CPU.

    Replicated, not sharded, under DDP: every rank gathers the batch of every rank at each ``store``, so all ranks
    hold the same memory, the checkpoint (written by rank 0) holds all of it, and a run resumed on another number
    of ranks reads it as it is. Its size is samples × slots × classes × 4 bytes (CIFAR-10 with 3 groups: 6 MB;
    ImageNet-1k: 15 GB, per rank).
    """

    def __init__(self, num_samples: int, slots: int):
        self.num_samples, self.slots = num_samples, slots
        self.values: Optional[torch.Tensor] = None  # (samples, slots, classes), allocated at the first store
        self.seen = torch.zeros(num_samples, dtype=torch.bool)

    def recall(self, indices: torch.Tensor, device) -> tuple:
        """(values (B, slots, classes), seen (B,)) for these samples on ``device``; values None before any store."""
        if self.values is None:
            return None, None
        return self.values[indices].to(device), self.seen[indices].to(device)

    def store(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Write (B, slots, classes) values for these samples (every rank's batch, under DDP); rows that are not
        finite are left out."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            indices, values = _gathered(indices.to(values.device)), _gathered(values.contiguous())
        values, indices = values.detach().float().cpu(), indices.cpu()
        finite = values.flatten(1).isfinite().all(dim=1)  # a step that went non-finite leaves its samples as they were
        values, indices = values[finite], indices[finite]
        if self.values is None:
            self.values = torch.zeros(self.num_samples, self.slots, values.shape[-1])
        self.values[indices] = values
        self.seen[indices] = True

    def state_dict(self) -> dict:
        return {'values': self.values, 'seen': self.seen}

    def load_state_dict(self, state: dict) -> None:
        seen = state['seen']
        if seen.shape != (self.num_samples,):
            raise ValueError(f'the checkpoint remembers {seen.shape[0]} training samples, this training set has '
                             f'{self.num_samples}')
        values = state['values']
        if values is not None and values.shape[1] != self.slots:
            raise ValueError(f'the checkpoint remembers {values.shape[1]} knowledge groups, this run has {self.slots}')
        self.seen = seen.clone()
        self.values = None if values is None else values.clone()  # the checkpoint may be memory-mapped


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on each: the training loader drops the last incomplete batch), stacked
    in rank order along the first dimension."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)
