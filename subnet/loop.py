"""One training epoch, run the way timm's train.py runs it, around any task (evaluation: ``subnet/evaluation.py``).

The loop hands every loader batch to ``task.train_step`` with a ``Step`` (``subnet/step.py``: autocast for the
forward passes, the loss scale, whether the batch ends an update, how passes are back-propagated); when the task
returns, it applies the update (clipping and the optimizer step, outside autocast) and reads the result: the loss
and, as scalar tensors, the parts the method declares (``Method.result_parts``, ``subnet/results.py``): losses and
costs averaged over the epoch, counters summed, reported in the log line and ``summary.csv``.

What keeps a long run alive is one ``RunGuard`` (``subnet/guard.py``), called after each step, after each update
and at the end of the epoch; a resumed epoch starts at the batch its checkpoint recorded, with the meters it had.
"""
import logging
import math
import os
import time
from collections import OrderedDict
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torchvision.utils
from timm import utils

from .compile import compile_ahead
from .guard import EpochPosition, RunGuard
from .progress import EpochProgress, format_duration
from .results import COUNTER, LOOP_COUNTERS, ResultPart
from .step import Step, Update

_logger = logging.getLogger('train')


@dataclass
class StepSetup:
    """What every step needs besides the batch: device, precision, and the loaders' mixup/batching mode."""
    device: torch.device
    amp_autocast: Callable = suppress
    loss_scaler: Optional[Any] = None
    model_dtype: Optional[torch.dtype] = None
    mixup_fn: Optional[Callable] = None
    naflex: bool = False
    scheduled_batches: bool = False
    batch_size_reference: float = 1.


@dataclass
class LoopOptions:
    """The command-line options the training epoch follows (timm's names; ``from_args`` reads them)."""
    batch_size: int = 1  # --batch-size: per process (the base of --bad-image-limit)
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    skip_nonfinite: int = 0  # --skip-nonfinite: steps with non-finite gradients dropped before a stop
    batch_loss_scale: str = ''  # --naflex-loss-scale / --variable-batch-loss-scale: the loaders' mode
    prefetcher: bool = False  # timm's prefetcher already put the batch on the device (and mixed it)
    channels_last: bool = False
    mixup_off_epoch: int = 0
    distributed: bool = False
    world_size: int = 1
    primary: bool = True  # rank 0: logs and progress
    log_interval: int = 50
    synchronize_step: bool = False
    save_images: bool = False
    output_dir: Optional[str] = None  # where --save-images writes

    @classmethod
    def from_args(cls, args, naflex: bool = False, output_dir: Optional[str] = None) -> 'LoopOptions':
        return cls(batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad,
                   clip_mode=args.clip_mode, skip_nonfinite=args.skip_nonfinite,
                   batch_loss_scale=args.naflex_loss_scale if naflex else args.variable_batch_loss_scale,
                   prefetcher=args.prefetcher, channels_last=args.channels_last, mixup_off_epoch=args.mixup_off_epoch,
                   distributed=args.distributed, world_size=args.world_size, primary=utils.is_primary(args),
                   log_interval=args.log_interval, synchronize_step=args.synchronize_step,
                   save_images=args.save_images, output_dir=output_dir)


def _loss_scale(mode: str, batch_size: int, reference: float) -> float:
    """timm's variable-batch loss scaling (NaFlex and scheduled-resolution loaders)."""
    if not mode or mode == 'none':
        return 1.0
    scale = batch_size / reference
    return scale ** 0.5 if mode == 'sqrt' else scale


def _scalar_parts(result: dict) -> dict:
    return {k: v.detach() for k, v in result.items()
            if k not in ('loss', 'loss_value', 'output') and torch.is_tensor(v) and v.ndim == 0}


def _undeclared(name: str) -> ValueError:
    return ValueError(f"the step's result holds a scalar {name!r} that the method does not declare: add it to "
                      f'Method.result_parts (loss_part, cost_part or counter from subnet/results.py)')


class EpochMeters:
    """The running figures of a training epoch: timm's loss/time/data meters, the method's declared result parts
    (``parts``: losses and costs averaged over the samples, counters summed), and the counts of what went wrong
    (steps with a non-finite loss, fp16 overflows the grad scaler skipped, unreadable images replaced). A mid-epoch
    checkpoint keeps them (``state_dict``), so a resumed epoch reports the same."""

    COUNTERS = tuple(part.name for part in LOOP_COUNTERS)

    def __init__(self, epoch: int, updates_per_epoch: int, primary: bool, parts: Iterable[ResultPart] = ()):
        self.epoch, self.updates_per_epoch = epoch, updates_per_epoch
        self.update_time, self.data_time, self.losses = utils.AverageMeter(), utils.AverageMeter(), \
            utils.AverageMeter()
        self.parts = {part.name: part for part in parts}
        self.part_sums, self.part_count = {}, 0
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.update_samples = 0
        self.last_scale = None  # the fp16 grad scaler's scale after the last update
        self.progress = EpochProgress(f'Train {epoch}', updates_per_epoch, enabled=primary)

    def add_step(self, result: dict, batch_size: int, global_batch_size: int) -> bool:
        """Account for one loader batch; a non-finite loss is left out (and False returned)."""
        parts = _scalar_parts(result)
        for name in parts:
            if name not in self.parts:
                raise _undeclared(name)
        loss = result.get('loss_value', result['loss']).detach().item()  # the one host sync of a step
        self.update_samples += global_batch_size
        if not math.isfinite(loss):
            return False
        self.losses.update(loss, batch_size)
        for name, value in parts.items():
            if self._counts(name):
                self.part_sums[name] = self.part_sums.get(name, 0.) + value.double()
            else:
                self.part_sums[name] = self.part_sums.get(name, 0.) + value.float() * batch_size
        self.part_count += batch_size
        return True

    def _counts(self, name: str) -> bool:
        return self.parts[name].kind == COUNTER

    def log_line(self, update_idx: int, lr: float, loss_now: float, loss_avg: float) -> str:
        """timm's ``Train:`` line (parsers rely on its prefix), then the declared parts (counters as integers) and
        the ETA."""
        parts = ''.join(f'  {k}: {v:d}' if isinstance(v, int) else f'  {k}: {v:#.3g}'
                        for k, v in list(self.metrics().items())[1:])
        times, samples = self.update_time, self.update_samples
        return (f'Train: {self.epoch} [{update_idx:>4d}/{self.updates_per_epoch} '
                f'({100. * (update_idx + 1) / self.updates_per_epoch:>3.0f}%)]  '
                f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
                f'Time: {times.val:.3f}s, {samples / times.val:>7.2f}/s  '
                f'({times.avg:.3f}s, {samples / times.avg:>7.2f}/s)  '
                f'LR: {lr:.3e}  '
                f'Data: {self.data_time.val:.3f} ({self.data_time.avg:.3f})'
                f'{parts}  ETA: {format_duration(self.progress.eta(update_idx + 1))}')

    def metrics(self) -> OrderedDict:
        """The loss and the parts so far on this rank: averages, and counters' totals as integers."""
        metrics = OrderedDict(loss=self.losses.avg)
        for name, total in self.part_sums.items():
            metrics[name] = round(total.item()) if self._counts(name) else (total / max(self.part_count, 1)).item()
        return metrics

    def reduced(self, device: torch.device, world_size: int = 1) -> OrderedDict:
        """The epoch's averages (over ranks), the method's counters and the loop's non-zero counts (summed over
        ranks)."""
        metrics, counters = self.metrics(), self.counters
        if world_size > 1:
            summed = [k for k in metrics if k in self.parts and self._counts(k)]
            averaged = [k for k in metrics if k not in summed]
            values = torch.tensor([metrics[k] for k in averaged], device=device, dtype=torch.float32)
            metrics.update(zip(averaged, utils.reduce_tensor(values, world_size).tolist()))
            totals = torch.tensor([metrics[k] for k in summed] + list(counters.values()), device=device,
                                  dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            totals = [int(v) for v in totals.tolist()]
            metrics.update(zip(summed, totals[:len(summed)]))
            counters = dict(zip(counters.keys(), totals[len(summed):]))
        metrics.update((k, v) for k, v in counters.items() if v)
        return metrics

    def count_overflow(self, loss_scaler) -> None:
        """The fp16 grad scaler skips a step whose gradients overflowed, and lowers its scale: count those (the
        first call, at the epoch's start, reads the scale it starts from)."""
        scale = loss_scaler.state_dict().get('scale') if loss_scaler is not None else None
        if scale is not None and self.last_scale is not None and scale < self.last_scale:
            self.counters['overflow_steps'] += 1
        self.last_scale = scale

    def state_dict(self) -> dict:
        return {'loss': {k: getattr(self.losses, k) for k in ('val', 'avg', 'sum', 'count')},
                'parts': {k: v.cpu() for k, v in self.part_sums.items()}, 'part_count': self.part_count,
                'counters': dict(self.counters)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        for k, v in state['loss'].items():
            setattr(self.losses, k, v)
        self.part_sums = {k: v.to(device) for k, v in state['parts'].items()}
        self.part_count = state['part_count']
        self.counters.update(state['counters'])


def _mean_lr(optimizer) -> float:
    lrs = [group['lr'] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def _to_device(input, target, options: LoopOptions, setup: StepSetup):
    """What timm's prefetcher does when it is off: device, dtype, mixup; then the memory format."""
    if not options.prefetcher:
        input, target = input.to(device=setup.device, dtype=setup.model_dtype), target.to(setup.device)
        if setup.mixup_fn is not None:
            input, target = setup.mixup_fn(input, target)
    if options.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def _batch_scale(batch_size: int, options: LoopOptions, setup: StepSetup):
    """(loss scale, global batch size): timm's variable-batch scaling for NaFlex / scheduled-size loaders."""
    global_batch_size = batch_size * (options.world_size if options.distributed else 1)
    if not (setup.naflex or setup.scheduled_batches):
        return 1.0, global_batch_size
    scale = _loss_scale(options.batch_loss_scale, batch_size, setup.batch_size_reference)
    if setup.naflex and options.distributed:
        # ranks see different batch sizes: weight each rank's gradient by its share of the global batch
        global_batch_size = utils.reduce_tensor(
            torch.tensor(batch_size, device=setup.device, dtype=torch.float32), 1).item()
        scale *= options.world_size * batch_size / global_batch_size
    return scale, global_batch_size


def _turn_mixup_off(loader, setup: StepSetup) -> None:
    if getattr(loader, 'mixup_enabled', False):
        loader.mixup_enabled = False
    elif setup.mixup_fn is not None:
        setup.mixup_fn.mixup_enabled = False


class _Windows:
    """The epoch's gradient-accumulation windows: which batch ends an update, and how many batches its window has."""

    def __init__(self, num_batches: int, accum_steps: int):
        self.num_batches, self.accum_steps = num_batches, accum_steps
        self.last_window_start = num_batches - num_batches % accum_steps
        self.updates = (num_batches + accum_steps - 1) // accum_steps

    def ends_update(self, batch_idx: int) -> bool:
        return batch_idx == self.num_batches - 1 or (batch_idx + 1) % self.accum_steps == 0

    def size(self, batch_idx: int) -> int:
        return self.num_batches % self.accum_steps if batch_idx >= self.last_window_start else self.accum_steps


def train_one_epoch(epoch: int, task, loader, optimizer, options: LoopOptions, setup: StepSetup, lr_scheduler=None,
                    guard: Optional[RunGuard] = None) -> OrderedDict:
    """Train ``task`` for one epoch; returns timm's ``{'loss': ...}`` plus the method's declared parts and the
    counts of what went wrong (only those that are not zero)."""
    return _TrainingEpoch(epoch, task, loader, optimizer, options, setup, lr_scheduler, guard or RunGuard()).run()


class _TrainingEpoch:
    """One training epoch: timm's loop (``run``, ``_step``, ``_after_update``) and the guard's moments."""

    def __init__(self, epoch, task, loader, optimizer, options: LoopOptions, setup: StepSetup, lr_scheduler,
                 guard: RunGuard):
        self.epoch, self.task, self.loader, self.optimizer = epoch, task, loader, optimizer
        self.options, self.setup, self.lr_scheduler, self.guard = options, setup, lr_scheduler, guard
        self.windows = _Windows(len(loader), options.grad_accum_steps)
        parts = getattr(task, 'result_parts', ())  # a timm task that is not a Method returns none
        self.meters = EpochMeters(epoch, self.windows.updates, options.primary, parts)
        self.position = EpochPosition(epoch, self.windows.num_batches, self.windows.num_batches * options.batch_size,
                                      self.meters)
        self.update = Update(task, optimizer, setup.loss_scaler, options.clip_grad, options.clip_mode,
                             options.skip_nonfinite)
        self.data_start = self.update_start = None

    @property
    def num_updates(self) -> int:
        return self.epoch * self.windows.updates + self.position.updates

    def run(self) -> OrderedDict:
        self._begin()
        for batch_idx, (input, target) in self.guard.batches(self.loader, self.epoch):
            need_update = self.windows.ends_update(batch_idx)
            good = self._step(batch_idx, input, target, need_update)
            self.guard.after_step(self.position, batch_idx, good)
            if need_update:
                self._after_update(batch_idx, input)
                self.guard.after_update(self.position, batch_idx + 1)
            self.data_start = time.time()
        self.meters.progress.close()
        if hasattr(self.optimizer, 'sync_lookahead'):
            self.optimizer.sync_lookahead()
        self.guard.end_of_epoch(self.position)
        return self.meters.reduced(self.setup.device, self.options.world_size if self.options.distributed else 1)

    def _begin(self) -> None:
        if self.options.mixup_off_epoch and self.epoch >= self.options.mixup_off_epoch:
            _turn_mixup_off(self.loader, self.setup)
        self.task.get_trainable_module().train()
        start = self.guard.resume_point(self.epoch)
        if start is not None:
            self.meters.load_state_dict(start.meters, self.setup.device)
            self.meters.progress.done_before = self.position.updates = start.updates
        self.meters.count_overflow(self.setup.loss_scaler)
        self.data_start = self.update_start = time.time()
        self.optimizer.zero_grad()

    def _step(self, batch_idx: int, input, target, need_update: bool) -> bool:
        """One loader batch through the task, and the update when its window ends; False when its loss was not
        finite or its update was not applied."""
        options, setup, task, meters = self.options, self.setup, self.task, self.meters
        input, target = _to_device(input, target, options, setup)
        meters.data_time.update(self.windows.size(batch_idx) * (time.time() - self.data_start))
        batch_size = input['patches'].shape[0] if setup.naflex else input.shape[0]
        loss_scale, global_batch_size = _batch_scale(batch_size, options, setup)
        step = Step(setup.amp_autocast, loss_scale / self.windows.size(batch_idx), need_update, self.update)
        no_sync = options.distributed and hasattr(task.get_trainable_module(), 'no_sync') and not need_update
        if getattr(task, 'compile_ahead_pending', False):  # --torchcompile --compile-scope blocks
            task.compile_ahead_pending = False
            compile_ahead(task, input, step)
        with task.no_sync() if no_sync else nullcontext():
            result = task.train_step(input, target, step)
        applied = self.update.apply() if need_update else True
        return meters.add_step(result, batch_size, global_batch_size) and applied

    def _after_update(self, batch_idx: int, input) -> None:
        meters = self.meters
        update_idx = batch_idx // self.options.grad_accum_steps
        self.position.updates += 1
        self.optimizer.zero_grad()
        self.task.update_ema(step=self.num_updates)
        if self.options.synchronize_step and self.setup.device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.time()
        meters.update_time.update(now - self.update_start)
        self.update_start = now
        meters.progress.show(update_idx + 1, f'loss {meters.losses.avg:#.3g}')
        meters.count_overflow(self.setup.loss_scaler)
        if update_idx % self.options.log_interval == 0 or batch_idx == self.windows.num_batches - 1:
            self._log(update_idx, batch_idx, input)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step_update(num_updates=self.num_updates, metric=meters.losses.avg)
        meters.update_samples = 0

    def _log(self, update_idx: int, batch_idx: int, input) -> None:
        options, meters = self.options, self.meters
        loss_now, loss_avg = meters.losses.val, meters.losses.avg
        if options.distributed:
            loss_now, loss_avg = utils.reduce_tensor(
                torch.tensor([loss_now, loss_avg], device=self.setup.device), options.world_size).tolist()
        if options.primary:
            _logger.info(meters.log_line(update_idx, _mean_lr(self.optimizer), loss_now, loss_avg))
            if options.save_images and options.output_dir and not self.setup.naflex:
                torchvision.utils.save_image(
                    input, os.path.join(options.output_dir, f'train-batch-{batch_idx}.jpg'), padding=0, normalize=True)
