"""The run folder: timm's layout (``output/train/<experiment>/``), written so that nothing is ever lost.

- The folder name follows timm (``--experiment`` or ``<date>-<model>-<img size>``); a fresh run into a folder
  that already holds a run (a checkpoint or a summary row) stops instead of overwriting it (timm reuses the
  folder silently). A start that failed before its first checkpoint leaves nothing that blocks a retry.
- One run per folder: a run holds an exclusive ``flock`` on ``<folder>/.lock`` (with its pid and host in it) for
  its lifetime; a second run stops with one line naming the first. The kernel releases the lock when the
  process dies, even by ``kill -9``; the next run then removes the temporary files the dead one left. A
  restarted attempt of the same torchrun job waits for the lock instead (``elastic.job_identity``): the previous
  attempt's processes may still be exiting.
- Checkpoints go through timm's ``CheckpointSaver`` with every file written under a temporary name and
  renamed into place, so a process killed at any moment leaves no truncated file under a final name; a
  checkpoint with a non-finite weight is never written (``AtomicCheckpointSaver.before_save``).
- A write that fails (disk full, permissions, a read-only file system) stops the run with one line saying what
  happened and which checkpoints are intact, after removing its partial temporary file (``stop_on_failed_write``).
- ``summary.csv`` keeps timm's columns first; method and subnet columns are appended after ``lr``.
"""
import contextlib
import csv
import fcntl
import glob
import logging
import os
import shutil
import socket
import time
from collections import OrderedDict
from datetime import datetime
from typing import Callable, Optional

import torch
from timm.models import safe_model_name
from timm.utils import CheckpointSaver, load_checkpoint_metadata

from . import elastic
from .errors import EXIT_WRITE_FAILED, UsageError, WriteFailed
from .finite import check_state_finite
from .intact import CHECKSUM_KEY, checksums
from .resume import POSITION_KEY

_logger = logging.getLogger('train')

LOCK_FILE = '.lock'
_JOB = ', torchrun job {}'  # how the lock file names the torchrun job that holds it
# what a process killed while saving leaves behind (timm's temporary names, and ours: <final name>.tmp)
_TEMPORARY = ('tmp.pth.tar', 'recovery_tmp.pth.tar', '*.tmp')


def experiment_name(args, img_size: int) -> str:
    return args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(img_size)])


def _checkpoints(folder: str) -> list:
    return [f for f in os.listdir(folder) if f.endswith('.pth.tar') and f not in _TEMPORARY]


def holds_run(folder: str) -> bool:
    """A checkpoint or a summary row: something a fresh run would overwrite (args.yaml and log.txt of a start that
    failed before its first checkpoint are not)."""
    summary = os.path.join(folder, 'summary.csv')
    return os.path.isdir(folder) and (bool(_checkpoints(folder)) or (
        os.path.isfile(summary) and os.path.getsize(summary) > 0))


def describe_run(folder: str) -> str:
    """What the folder's run has done, from ``last.pth.tar`` (or the newest recovery file): for messages."""
    last = os.path.join(folder, 'last.pth.tar')
    try:
        checkpoint = load_checkpoint_metadata(last)
    except Exception:
        return 'no completed epoch yet'
    epochs = getattr(checkpoint.get('args'), 'epochs', None)
    done = checkpoint.get('epoch', -1) + 1
    return f'{done} of {epochs} epochs done' if epochs else f'{done} epochs done'


def check_output_dir(folder: str) -> None:
    """Refuse to start a fresh run in a folder that holds a previous run."""
    if holds_run(folder):
        raise UsageError(
            f'output folder {folder} already holds a run ({describe_run(folder)}; results in summary.csv); '
            f'continue it with --resume auto (with the same --experiment) or choose a new --experiment')


_HELD_LOCKS = set()  # the lock files this process holds open


def _close_in_child() -> None:
    """A forked child (a loader worker) drops its copy of the lock files: flock lasts while any copy is open, so a
    worker outliving a killed run would otherwise keep the folder locked. Closing a copy leaves the lock held."""
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` for this process's lifetime (``release`` ends it earlier).

    flock belongs to the open file: the kernel drops it when the process ends however it ends, so a lock left by
    a killed run never blocks the next one. On NFS, Linux maps it onto the server's byte-range locks. A restarted
    attempt of the torchrun job that holds the lock waits up to ``same_job_wait`` seconds for it.
    """

    def __init__(self, folder: str, same_job_wait: float = 120.):
        os.makedirs(folder, exist_ok=True)
        self.folder, job = folder, elastic.job_identity()
        self._fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._take(job, same_job_wait)
        if holder is not None:
            os.close(self._fd)
            raise UsageError(f'output folder {folder} is in use by a running run ({holder}); wait for it to end, '
                             f'stop it, or choose another --experiment')
        _HELD_LOCKS.add(self._fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f'pid {os.getpid()} on {socket.gethostname()}, started '
                            f'{time.strftime("%Y-%m-%d %H:%M:%S")}{_JOB.format(job) if job else ""}\n'.encode(), 0)

    def _take(self, job: Optional[str], same_job_wait: float) -> Optional[str]:
        """Take the lock; None when taken, else what the holder wrote. Waits while the holder is ``job``."""
        deadline, said = time.monotonic() + same_job_wait, False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except OSError:
                holder = os.pread(self._fd, 512, 0).decode(errors='replace').strip() or 'another process'
            if not job or not holder.endswith(_JOB.format(job)) or time.monotonic() > deadline:
                return holder
            if not said:
                _logger.info(f'Waiting for the previous attempt of this torchrun job to release {self.folder}.')
                said = True
            time.sleep(0.5)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self._fd)
            os.close(self._fd)
            self._fd = None


def remove_temporary_files(folder: str) -> None:
    """Remove what a process killed while saving left (call it while holding the folder's lock)."""
    left = sorted({p for pattern in _TEMPORARY for p in glob.glob(os.path.join(folder, pattern))})
    for path in left:
        os.unlink(path)
    if left:
        _logger.info(f'Removed temporary files of an interrupted process: {", ".join(map(os.path.basename, left))}')


def remove_recovery_files(folder: str) -> None:
    """Recovery files are superseded by a newer ``last.pth.tar``: they must not outlive it."""
    for path in glob.glob(os.path.join(folder, 'recovery-*.pth.tar')):
        os.unlink(path)


def claim_output_dir(folder: str, resuming_in_place: bool, lock: Optional[RunLock] = None) -> RunLock:
    """Lock the run folder (or keep ``lock``, taken earlier), refuse to write a fresh run over a previous one, and
    remove the temporary files of a process that was killed in it."""
    lock = lock or RunLock(folder)
    if not resuming_in_place:
        check_output_dir(folder)
    remove_temporary_files(folder)
    return lock


# torch.save reports a failed write as a RuntimeError of its zip writer, without the errno
_TORCH_WRITE_ERRORS = ('inline_container', 'PytorchStreamWriter', 'file write failed', 'cannot be opened')
# a folder with less free space than this after a failed write is taken to be full
_FULL_BELOW = 64 * 2 ** 20


def write_problem(error: Exception, folder: str) -> Optional[str]:
    """What made a write into ``folder`` fail ('no space left on device', ...); None for errors that are not a
    failed write (bugs keep their traceback). Call it before the partial file is removed: that frees the space."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno).lower()
    if not (isinstance(error, RuntimeError) and any(m in str(error) for m in _TORCH_WRITE_ERRORS)):
        return None
    stats = os.statvfs(folder)
    if stats.f_flag & os.ST_RDONLY:
        return 'read-only file system'
    if not os.access(folder, os.W_OK):
        return 'permission denied'
    if stats.f_bavail * stats.f_frsize < _FULL_BELOW:
        return 'no space left on device'
    return f'the write failed ({str(error).strip().splitlines()[0][:160]})'


def intact_files(folder: str) -> str:
    """The checkpoints ``folder`` holds, for a message after a failed write."""
    names = sorted(_checkpoints(folder)) if os.path.isdir(folder) else []
    if not names:
        return 'no checkpoint was written before'
    last = f' (last.pth.tar: {describe_run(folder)})' if 'last.pth.tar' in names else ''
    return f'intact: {", ".join(names)}{last}'


@contextlib.contextmanager
def stop_on_failed_write(folder: str, what: str):
    """Turn a failed write of ``what`` into ``folder`` into one line (``WriteFailed``, exit 4) after removing the
    partial temporary file; every checkpoint is written under a temporary name, so the others are intact."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        problem = write_problem(error, folder)
        if problem is None:
            raise
        remove_temporary_files(folder)
        raise WriteFailed(f'error: cannot write {what} in {folder}: {problem}; the partial file is removed, '
                          f'{intact_files(folder)}; make room (or fix the folder) and run the same command with '
                          f'--resume auto', EXIT_WRITE_FAILED) from None


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, with copies and replacements that are atomic on POSIX file systems, every file written
    by one function (``write``) after the checks of ``before_save`` and with its checksums (``subnet.intact``),
    mid-epoch position checkpoints, and a failed write turned into one line (``stop_on_failed_write``).

    timm unlinks the destination before renaming onto it, and falls back to a plain copy when hard links
    are not available: a kill in between leaves no ``last``/``model_best`` file, or a truncated one.
    timm has no public hook for this, so we override its three private file operations, ``_replace``,
    ``_duplicate`` and ``_save`` (and read its ``can_hardlink`` flag), here and nowhere else;
    ``tests/test_timm_private.py`` fails if timm renames them or stops routing its saves through them.
    ``before_save(state)`` raises to refuse a checkpoint (train.py's is ``RunGuard.before_save``; the default
    refuses a non-finite weight).
    """

    def __init__(self, *args, before_save: Callable[[dict], None] = check_state_finite, **kwargs):
        super().__init__(*args, **kwargs)
        self.before_save = before_save

    def checkpoint_state(self, epoch: int, metric: Optional[float] = None) -> dict:
        """What timm's saver writes: epoch, arch, args, optimizer, AMP scaler, the task's state (weights, EMA,
        task_state), metric, and the saver's own history (``state_dict``)."""
        arch = self.args.model if self.args is not None else type(self.model).__name__.lower()
        state = {'epoch': epoch, 'arch': arch, 'optimizer': self.optimizer.state_dict(), 'version': 2}
        if self.args is not None:
            state['args'] = self.args
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
        state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        return state

    def write(self, path: str, epoch: int, metric: Optional[float] = None, position: Optional[dict] = None) -> None:
        """Write one checkpoint file (every save goes through here): its state, with ``position`` for a checkpoint
        written mid-epoch (``resume.POSITION_KEY``), once ``before_save`` accepts it."""
        state = self.checkpoint_state(epoch, metric)
        if position is not None:
            state[POSITION_KEY] = position
        self.before_save(state)
        state[CHECKSUM_KEY] = checksums(state)
        torch.save(state, path)

    def _save(self, save_path, epoch, metric=None):
        self.write(save_path, epoch, metric)

    def save_checkpoint(self, epoch, metric=None):
        with stop_on_failed_write(self.checkpoint_dir, f'the checkpoint of epoch {epoch}'):
            return super().save_checkpoint(epoch, metric)

    def save_milestone(self, completed_epochs):
        with stop_on_failed_write(self.checkpoint_dir, f'the milestone checkpoint of epoch {completed_epochs}'):
            return super().save_milestone(completed_epochs)

    def save_position(self, epoch: int, updates: int, position: dict) -> str:
        """A recovery file under timm's name (``recovery-<epoch>-<update index>.pth.tar``) holding ``position``;
        as timm's ``save_recovery``, the file before the previous one is removed. Returns its path."""
        with stop_on_failed_write(self.recovery_dir, f'a recovery checkpoint of epoch {epoch}'):
            return self._write_position(epoch, updates, position)

    def _write_position(self, epoch: int, updates: int, position: dict) -> str:
        tmp = os.path.join(self.recovery_dir, f'{self.recovery_prefix}_tmp{self.extension}')
        path = os.path.join(self.recovery_dir, f'{self.recovery_prefix}-{epoch}-{updates - 1}{self.extension}')
        self.write(tmp, epoch, position=position)
        os.replace(tmp, path)
        if self.prev_recovery_file != path and os.path.exists(self.prev_recovery_file):
            os.remove(self.prev_recovery_file)
        self.prev_recovery_file, self.curr_recovery_file = self.curr_recovery_file, path
        return path

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
