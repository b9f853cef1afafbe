"""Unreadable images: skipped, named once, counted; a run stops only when so many fail that the dataset is broken.

A long run must not die on one corrupt JPEG, nor quietly train on a dataset half of which cannot be read. timm's
``ImageDataset`` skips an unreadable sample (it moves on to the next index, with a warning naming only the index)
and gives up after a few in a row, process-wide settings decide both. ``ReadableImages`` reads the sample itself
through the dataset's public parts (its reader, image mode, transforms), so:

- training: an unreadable image is replaced by the next readable one (index + 1, + 2, ...: deterministic, and the
  batch stays full); evaluation: the replacement is marked ``NOT_COUNTED`` and ``drop_not_counted`` leaves it out
  of the metrics, so no image is counted twice;
- each failure reaches the main process (directly, or from a loader worker through a queue) as (path, reason):
  ``ImageFailures.drain`` names each path once in the log and returns the new failures for counting.
"""
import logging
import multiprocessing
import queue
from typing import List, Optional, Tuple

import torch
import torch.utils.data
from PIL import Image
from timm.data.dataset import ImageDataset

from .errors import InputError, first_line

__all__ = ['ImageFailures', 'ReadableImages', 'NOT_COUNTED', 'readable', 'over_limit', 'drop_not_counted',
           'failures_of']

_logger = logging.getLogger('train')

NOT_COUNTED = -2  # the target of an evaluation sample that stands in for an unreadable image
MAX_IN_A_ROW = 100  # this many unreadable images in a row means the folder, not a file, is broken
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises for a bad file


class ImageFailures:
    """Unreadable images met by a dataset, in the main process or in loader workers (a queue the workers inherit)."""

    def __init__(self):
        self._queue = multiprocessing.get_context().Queue()
        self._here: List[Tuple[str, str, bool]] = []
        self.named = set()
        self.last = ''

    def report(self, path: str, reason: str, requested: bool) -> None:
        """``requested``: the sample asked for (counted); else a neighbour met while looking for a replacement
        (named, not counted: it is counted when it is asked for itself)."""
        if torch.utils.data.get_worker_info() is None:
            self._here.append((path, reason, requested))
        else:
            self._queue.put((path, reason, requested))

    def drain(self) -> int:
        """Log the paths not named yet; return how many requested samples were unreadable since the last call."""
        new, self._here = self._here, []
        while True:
            try:
                new.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for path, reason, requested in new:
            if requested:
                self.last = path
            if path not in self.named:
                self.named.add(path)
                _logger.warning(f'Unreadable image skipped: {path} ({reason})')
        return sum(requested for _, _, requested in new)


def _reason(error: Exception) -> str:
    return f'{type(error).__name__}: {first_line(error)[:120]}' if str(error).strip() else type(error).__name__


class ReadableImages(torch.utils.data.Dataset):
    """A timm ``ImageDataset`` whose unreadable images are replaced by the next readable one and reported.

    ``count_replacements``: True for training (the replacement is a sample like any other); False for evaluation
    (its target becomes ``NOT_COUNTED``). ``transform`` is this wrapper's (timm's ``create_loader`` sets it on the
    dataset it is given); other attributes (``filename``, ``reader``, ...) are the dataset's.
    """

    def __init__(self, dataset, failures: ImageFailures, count_replacements: bool = True):
        self.dataset, self.failures, self.count_replacements = dataset, failures, count_replacements
        self.transform = dataset.transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _read(self, index: int):
        """(image, target, *features) of one file, fully decoded, so a broken file fails here and not in a transform."""
        image, target, *features = self.dataset.reader[index]
        try:
            if self.dataset.load_bytes:
                return (image.read(), target, *features)
            decoded = Image.open(image)
            decoded = decoded.convert(self.dataset.input_img_mode) if self.dataset.input_img_mode else decoded
            decoded.load()
            return (decoded, target, *features)
        finally:
            if hasattr(image, 'close'):
                image.close()

    def __getitem__(self, index: int):
        size = len(self.dataset)
        for attempt in range(min(size, MAX_IN_A_ROW)):
            try:
                image, target, *features = self._read((index + attempt) % size)
                break
            except UNREADABLE as e:
                self.failures.report(self.dataset.filename((index + attempt) % size, absolute=True), _reason(e),
                                     requested=attempt == 0)
        else:
            raise InputError(f'{min(size, MAX_IN_A_ROW)} unreadable images in a row from '
                             f'{self.dataset.filename(index, absolute=True)}: the dataset looks broken')
        if self.transform is not None:
            image = self.transform(image)
        if target is None:
            target = -1
        elif self.dataset.target_transform is not None:
            target = self.dataset.target_transform(target)
        if attempt and not self.count_replacements:  # a multi-label row is marked in every column
            target = torch.full_like(target, NOT_COUNTED) if isinstance(target, torch.Tensor) else NOT_COUNTED
        return (image, target) if self.dataset.additional_features is None else (image, target, *features)


def readable(dataset, training: bool):
    """``dataset`` wrapped in ``ReadableImages`` if it is a timm ``ImageDataset`` (other datasets as they are)."""
    if isinstance(dataset, ImageDataset):
        return ReadableImages(dataset, ImageFailures(), count_replacements=training)
    return dataset


def failures_of(loader) -> Optional[ImageFailures]:
    """The ``ImageFailures`` of a loader's dataset, if it is a ``ReadableImages``."""
    return getattr(getattr(loader, 'dataset', None), 'failures', None)


def over_limit(count: int, limit: float, images: int) -> bool:
    """``--bad-image-limit``: a count (>= 1), a fraction of the epoch's images (< 1), or 0 (none allowed)."""
    return count > (limit if limit >= 1 or limit == 0 else limit * images)


def drop_not_counted(evaluator, output: torch.Tensor, target: torch.Tensor):
    """(output, target, dropped): the rows standing in for unreadable images removed before ``evaluator.update``.

    The evaluator's own trim of a distributed sampler's padding (``max_samples``) is applied first, and the dropped
    rows still count as seen, so the padding keeps falling off where it would have.
    """
    if evaluator.max_samples is not None:
        room = max(0, evaluator.max_samples - evaluator.num_samples)
        output, target = output[:room], target[:room]
    if target.ndim not in (1, 2):
        return output, target, 0
    keep = target != NOT_COUNTED if target.ndim == 1 else (target != NOT_COUNTED).any(dim=1)
    if bool(keep.all()):
        return output, target, 0
    dropped = int((~keep).sum())
    evaluator.num_samples += dropped
    return output[keep], target[keep], dropped
