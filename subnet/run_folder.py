"""The run folder: timm's layout (``output/train/<experiment>/``), written so that nothing is ever lost.

- The folder name follows timm (``--experiment`` or ``<date>-<model>-<img size>``); a fresh run into a folder
  that already holds a run stops instead of overwriting it (timm reuses the folder silently).
- Checkpoints go through timm's ``CheckpointSaver`` with every file written under a temporary name and
  renamed into place, so a process killed at any moment leaves no truncated file under a final name.
- ``summary.csv`` keeps timm's columns first; method and subnet columns are appended after ``lr``.
"""
import csv
import logging
import os
import shutil
from collections import OrderedDict
from datetime import datetime
from typing import Optional

from timm.models import safe_model_name
from timm.utils import CheckpointSaver

from .errors import UsageError

_logger = logging.getLogger('train')

# files whose presence means a folder holds a run
_RUN_FILES = ('args.yaml', 'summary.csv', 'last.pth.tar', 'log.txt')


def experiment_name(args, img_size: int) -> str:
    return args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(img_size)])


def holds_run(folder: str) -> bool:
    return os.path.isdir(folder) and (
        any(os.path.exists(os.path.join(folder, f)) for f in _RUN_FILES)
        or any(f.endswith('.pth.tar') for f in os.listdir(folder)))


def check_output_dir(folder: str) -> None:
    """Refuse to start a fresh run in a folder that holds a previous run."""
    if holds_run(folder):
        raise UsageError(
            f'output folder {folder} already holds a run; continue it with --resume auto '
            f'(with the same --experiment) or choose a new --experiment')


def claim_output_dir(folder: str, resuming_in_place: bool) -> str:
    """Create the run folder, refusing to write a fresh run over a previous one."""
    if not resuming_in_place:
        check_output_dir(folder)
    os.makedirs(folder, exist_ok=True)
    return folder


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, with copies and replacements that are atomic on POSIX file systems.

    timm unlinks the destination before renaming onto it, and falls back to a plain copy when hard links
    are not available: a kill in between leaves no ``last``/``model_best`` file, or a truncated one.
    timm has no public hook for this, so we override its two private file operations, ``_replace`` and
    ``_duplicate`` (and read its ``can_hardlink`` flag), here and nowhere else;
    ``tests/test_timm_private.py`` fails if timm renames them or stops routing its saves through them.
    """

    def _replace(self, src, dst):
        os.replace(src, dst)

    def _duplicate(self, src, dst):
        tmp = dst + '.tmp'
        if os.path.exists(tmp):
            os.unlink(tmp)
        if self.can_hardlink:
            try:
                os.link(src, tmp)
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        if not self.can_hardlink:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


# ------------------------------------------------------------------------------------------------ summary

def summary_row(epoch: int, train_metrics: dict, eval_metrics: Optional[dict], lr: float,
                extra: Optional[dict] = None) -> OrderedDict:
    """timm's row (epoch, train_*, eval_*, lr) followed by our extra columns."""
    row = OrderedDict(epoch=epoch)
    row.update((f'train_{k}', v) for k, v in train_metrics.items() if k == 'loss')
    row.update((f'eval_{k}', v) for k, v in (eval_metrics or {}).items())
    row['lr'] = lr
    row.update((f'train_{k}', v) for k, v in train_metrics.items() if k != 'loss')
    row.update(extra or {})
    return row


def append_summary(path: str, row: OrderedDict) -> None:
    """Append a row; the header is written for a new file, and rewritten if the columns changed."""
    rows = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            if list(reader.fieldnames or []) != list(row.keys()):
                rows = list(reader)
            else:
                rows = None
    if rows is None:  # same columns: plain append
        with open(path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=list(row.keys())).writerow(row)
        return
    fieldnames = list(row.keys())
    for old in rows:
        fieldnames += [k for k in old if k not in fieldnames]
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval='')
        writer.writeheader()
        writer.writerows(rows + [row])
    os.replace(tmp, path)
