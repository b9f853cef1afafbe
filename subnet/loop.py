"""One training epoch and one evaluation pass, run the way timm's train.py runs them, around any task.

The loop knows a task through ``task(input, target) -> {'loss', 'output', <parts>}`` and the hooks every task
has (``subnet/methods/base.py``): it hands the task its ``StepBackward`` (``bind_backward``) and back-propagates
the returned loss itself unless the task ``owns_backward`` (methods that run several passes per step). Scalar
tensors in the result other than ``loss``/``output`` are averaged over the epoch and reported (log line,
``summary.csv``).

After every optimizer update the loop asks its ``Safeguards`` what the ranks agreed on (``subnet/stopping.py``):
stop on a non-finite loss (nothing saved), on too many unreadable images, or on a signal (after writing a
mid-epoch checkpoint, ``subnet/resume.py``), or write a recovery checkpoint. A resumed epoch starts at the batch
its checkpoint recorded, with the meters and RNG states it had.
"""
import logging
import math
import os
import signal
import time
from collections import OrderedDict
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torchvision.utils
from timm import utils
from timm.task.evaluator import ClassificationEvaluator, evaluation_sample_limit

from .backward import StepBackward
from .errors import EXIT_NONFINITE, RunStopped, UsageError, WriteFailed
from .finite import stop_if_weights_nonfinite
from .progress import EpochProgress, format_duration
from .resume import BatchCursor, EpochStart, PositionWriter, set_rng_state
from .stopping import Requests, SignalWatch, StopPolicy, Vote
from .unreadable import ImageFailures, drop_not_counted, failures_of, over_limit

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
class Safeguards:
    """What keeps a long run alive, as the loop sees it (train.py builds it; a bare one only checks losses)."""
    policy: Optional[StopPolicy] = None  # signals, limits and the recovery clock, agreed across ranks
    positions: Optional[PositionWriter] = None  # writes mid-epoch checkpoints
    cursor: Optional[BatchCursor] = None  # the training loader's sampler cursor (skips done batches on resume)
    failures: Optional[ImageFailures] = None  # the training set's unreadable images
    bad_image_limit: float = 0.01  # --bad-image-limit
    start: Optional[EpochStart] = None  # where a resumed epoch continues


def _loss_scale(mode: str, batch_size: int, reference: float) -> float:
    """timm's variable-batch loss scaling (NaFlex and scheduled-resolution loaders)."""
    if not mode or mode == 'none':
        return 1.0
    scale = batch_size / reference
    return scale ** 0.5 if mode == 'sqrt' else scale


def _scalar_parts(result: dict) -> dict:
    return {k: v.detach() for k, v in result.items()
            if k not in ('loss', 'loss_value', 'output') and torch.is_tensor(v) and v.ndim == 0}


class EpochMeters:
    """The running figures of a training epoch: timm's loss/time/data meters, the method's loss parts, and the
    counts of what went wrong (steps with a non-finite loss, fp16 overflows the grad scaler skipped, unreadable
    images replaced). A mid-epoch checkpoint keeps them (``state_dict``), so a resumed epoch reports the same."""

    COUNTERS = ('unreadable_images', 'nonfinite_steps', 'overflow_steps')

    def __init__(self, epoch: int, updates_per_epoch: int, primary: bool):
        self.epoch, self.updates_per_epoch = epoch, updates_per_epoch
        self.update_time, self.data_time, self.losses = utils.AverageMeter(), utils.AverageMeter(), \
            utils.AverageMeter()
        self.part_sums, self.part_count = {}, 0
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.update_samples = 0
        self.progress = EpochProgress(f'Train {epoch}', updates_per_epoch, enabled=primary)

    def add_step(self, result: dict, batch_size: int, global_batch_size: int) -> bool:
        """Account for one loader batch; a non-finite loss is left out (and False returned)."""
        loss = result.get('loss_value', result['loss']).detach().item()  # the one host sync of a step
        self.update_samples += global_batch_size
        if not math.isfinite(loss):
            return False
        self.losses.update(loss, batch_size)
        for name, value in _scalar_parts(result).items():
            self.part_sums[name] = self.part_sums.get(name, 0.) + value.float() * batch_size
        self.part_count += batch_size
        return True

    def log_line(self, update_idx: int, lr: float, loss_now: float, loss_avg: float) -> str:
        """timm's ``Train:`` line (parsers rely on its prefix), then our loss parts and the ETA."""
        parts = ''.join(f'  {k}: {(v / self.part_count).item():#.3g}' for k, v in self.part_sums.items())
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
        metrics = OrderedDict(loss=self.losses.avg)
        for name, total in self.part_sums.items():
            metrics[name] = (total / max(self.part_count, 1)).item()
        return metrics

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


def _to_device(input, target, args, setup: StepSetup):
    """What timm's prefetcher does when it is off: device, dtype, mixup; then the memory format."""
    if not args.prefetcher:
        input, target = input.to(device=setup.device, dtype=setup.model_dtype), target.to(setup.device)
        if setup.mixup_fn is not None:
            input, target = setup.mixup_fn(input, target)
    if args.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def _batch_scale(batch_size: int, args, setup: StepSetup):
    """(loss scale, global batch size): timm's variable-batch scaling for NaFlex / scheduled-size loaders."""
    global_batch_size = batch_size * (args.world_size if args.distributed else 1)
    if not (setup.naflex or setup.scheduled_batches):
        return 1.0, global_batch_size
    mode = args.naflex_loss_scale if setup.naflex else args.variable_batch_loss_scale
    scale = _loss_scale(mode, batch_size, setup.batch_size_reference)
    if setup.naflex and args.distributed:
        # ranks see different batch sizes: weight each rank's gradient by its share of the global batch
        global_batch_size = utils.reduce_tensor(
            torch.tensor(batch_size, device=setup.device, dtype=torch.float32), 1).item()
        scale *= args.world_size * batch_size / global_batch_size
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


def train_one_epoch(epoch: int, task, loader, optimizer, args, setup: StepSetup, lr_scheduler=None,
                    output_dir: Optional[str] = None, guards: Optional[Safeguards] = None) -> OrderedDict:
    """Train ``task`` for one epoch; returns timm's ``{'loss': ...}`` plus the method's averaged loss parts and the
    counts of what went wrong (only those that are not zero)."""
    return _TrainingEpoch(epoch, task, loader, optimizer, args, setup, lr_scheduler, output_dir,
                          guards or Safeguards()).run()


class _TrainingEpoch:
    """The state of one training epoch; ``run`` is the loop."""

    def __init__(self, epoch, task, loader, optimizer, args, setup: StepSetup, lr_scheduler, output_dir,
                 guards: Safeguards):
        self.epoch, self.task, self.loader, self.optimizer, self.args = epoch, task, loader, optimizer, args
        self.setup, self.lr_scheduler, self.output_dir, self.guards = setup, lr_scheduler, output_dir, guards
        self.policy = guards.policy or StopPolicy(SignalWatch(), Vote(distributed=False))
        self.start = guards.start if guards.start is not None and guards.start.epoch == epoch else None
        self.windows = _Windows(len(loader), args.grad_accum_steps)
        self.meters = EpochMeters(epoch, self.windows.updates, utils.is_primary(args))
        self.num_updates = epoch * self.windows.updates
        self.step_backward = StepBackward(task, optimizer, args, setup.loss_scaler,
                                          getattr(optimizer, 'is_second_order', False))
        self.last_scale = self.data_start = self.update_start = None

    def run(self) -> OrderedDict:
        args, task = self.args, self.task
        if args.mixup_off_epoch and self.epoch >= args.mixup_off_epoch:
            _turn_mixup_off(self.loader, self.setup)
        task.get_trainable_module().train()
        task.bind_backward(self.step_backward)
        if self.start is not None:
            self.meters.load_state_dict(self.start.meters, self.setup.device)
            self.meters.progress.done_before = self.start.updates
            self.num_updates += self.start.updates
        if self.setup.loss_scaler is not None:
            self.last_scale = self.setup.loss_scaler.state_dict().get('scale')
        self.data_start = self.update_start = time.time()
        self.optimizer.zero_grad()
        for batch_idx, (input, target) in self._batches():
            if self._step(batch_idx, input, target):
                self._after_update(batch_idx, input)
        self.meters.progress.close()
        if hasattr(self.optimizer, 'sync_lookahead'):
            self.optimizer.sync_lookahead()
        self._count_unreadable()
        self._act(self.policy.agree_now(), self.windows.num_batches, save=False)
        return self._metrics()

    def _batches(self):
        """(batch index, batch) from the first batch, or from where a resumed epoch stopped."""
        start, cursor = self.start, self.guards.cursor
        if start is None:
            yield from enumerate(self.loader)
        elif start.batches >= self.windows.num_batches:  # stopped after its last step: no batch left
            set_rng_state(start.rng)
        elif cursor is not None:
            cursor.resume_at(start.batches, start.restores())
            yield from enumerate(self.loader, start=start.batches)
        else:  # a loader without torch's plain batch sampler: read the done batches again, and drop them
            for batch_idx, batch in enumerate(self.loader):
                if batch_idx == start.batches:
                    set_rng_state(start.rng)
                if batch_idx >= start.batches:
                    yield batch_idx, batch

    def _step(self, batch_idx: int, input, target) -> bool:
        """Forward and backward of one loader batch (and the optimizer step when its window ends)."""
        args, setup, task, meters, backward = self.args, self.setup, self.task, self.meters, self.step_backward
        need_update = self.windows.ends_update(batch_idx)
        accum_steps = self.windows.size(batch_idx)
        input, target = _to_device(input, target, args, setup)
        meters.data_time.update(accum_steps * (time.time() - self.data_start))
        batch_size = input['patches'].shape[0] if setup.naflex else input.shape[0]
        loss_scale, global_batch_size = _batch_scale(batch_size, args, setup)
        backward.scale, backward.need_update, backward.skipped = loss_scale / accum_steps, need_update, False
        no_sync = args.distributed and hasattr(task.get_trainable_module(), 'no_sync') and not need_update
        with task.no_sync() if no_sync else nullcontext():
            with setup.amp_autocast():
                result = task(input, target)
            if not task.owns_backward:
                backward.final(result['loss'])
        if not meters.add_step(result, batch_size, global_batch_size) or backward.skipped:
            meters.counters['nonfinite_steps'] += 1
            self.policy.nonfinite_step(batch_idx, meters.counters['nonfinite_steps'])
        if not need_update:
            self.data_start = time.time()
        return need_update

    def _after_update(self, batch_idx: int, input) -> None:
        args, meters = self.args, self.meters
        update_idx = batch_idx // args.grad_accum_steps
        self.num_updates += 1
        self.optimizer.zero_grad()
        self.task.update_ema(step=self.num_updates)
        if args.synchronize_step and self.setup.device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.time()
        meters.update_time.update(now - self.update_start)
        self.update_start = now
        meters.progress.show(update_idx + 1, f'loss {meters.losses.avg:#.3g}')
        self._count_overflow()
        self._count_unreadable()
        if update_idx % args.log_interval == 0 or batch_idx == self.windows.num_batches - 1:
            self._log(update_idx, batch_idx, input)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step_update(num_updates=self.num_updates, metric=meters.losses.avg)
        meters.update_samples = 0
        due = bool(args.recovery_interval) and (update_idx + 1) % args.recovery_interval == 0
        requests = self.policy.after_update()
        self._act(requests, batch_idx + 1, save=bool(requests.save) or due)
        self.data_start = time.time()

    def _log(self, update_idx: int, batch_idx: int, input) -> None:
        args, meters = self.args, self.meters
        loss_now, loss_avg = meters.losses.val, meters.losses.avg
        if args.distributed:
            loss_now, loss_avg = utils.reduce_tensor(
                torch.tensor([loss_now, loss_avg], device=self.setup.device), args.world_size).tolist()
        if utils.is_primary(args):
            _logger.info(meters.log_line(update_idx, _mean_lr(self.optimizer), loss_now, loss_avg))
            if args.save_images and self.output_dir and not self.setup.naflex:
                torchvision.utils.save_image(
                    input, os.path.join(self.output_dir, f'train-batch-{batch_idx}.jpg'), padding=0, normalize=True)

    def _count_overflow(self) -> None:
        """The fp16 grad scaler skips a step whose gradients overflowed, and lowers its scale: count those."""
        if self.setup.loss_scaler is None:
            return
        scale = self.setup.loss_scaler.state_dict().get('scale')  # read after the step's sync: no extra wait
        if scale is not None and self.last_scale is not None and scale < self.last_scale:
            self.meters.counters['overflow_steps'] += 1
        self.last_scale = scale

    def _count_unreadable(self) -> None:
        failures = self.guards.failures
        if failures is None:
            return
        self.meters.counters['unreadable_images'] += failures.drain()
        count = self.meters.counters['unreadable_images']
        if over_limit(count, self.guards.bad_image_limit, self.windows.num_batches * self.args.batch_size):
            self.policy.too_many_bad_images(count)

    def _act(self, requests: Requests, batches_done: int, save: bool) -> None:
        """Do what the ranks agreed on after ``batches_done`` batches: stop, save a position, or go on."""
        if requests.nonfinite:
            raise RunStopped(self._nonfinite_message(requests.nonfinite - 1), EXIT_NONFINITE)
        if requests.bad_images:
            raise UsageError(self._bad_images_message(requests.bad_images))
        try:
            path = self._save_position(batches_done) if save or requests.signal else ''
        except WriteFailed as failed:  # the signal's exit status still tells the scheduler what stopped the run
            if not requests.signal:
                raise
            raise WriteFailed(f'{failed} (stopped by {signal.Signals(requests.signal).name})',
                              128 + requests.signal) from None
        if requests.signal:
            raise RunStopped(self._signal_message(requests.signal, batches_done, path), 128 + requests.signal)

    def _save_position(self, batches_done: int) -> str:
        if self.guards.positions is None:
            return ''
        stop_if_weights_nonfinite(self.task.get_trainable_module(),
                                  f'in epoch {self.epoch} after {batches_done} batches')
        return self.guards.positions.save(self.epoch, batches_done, self.num_updates - self.epoch
                                          * self.windows.updates, self.meters.state_dict())

    def _nonfinite_message(self, batch_idx: int) -> str:
        where = f'epoch {self.epoch}, batch {batch_idx} of {self.windows.num_batches}'
        skip = self.policy.skip_nonfinite
        what = (f'more than --skip-nonfinite {skip} steps had a non-finite loss or gradients (the last at {where})'
                if skip else f'the loss is not finite at {where}')
        return (f'error: {what}: stopped without saving, the run folder keeps its last good checkpoint; lower --lr, '
                f'add --clip-grad{"" if skip else ", or skip such steps with --skip-nonfinite N"}')

    def _bad_images_message(self, count: int) -> str:
        failures, limit = self.guards.failures, self.guards.bad_image_limit
        last = f'unreadable image file {failures.last}: ' if failures is not None and failures.last else ''
        return (f'{last}{count} unreadable images in epoch {self.epoch}, more than --bad-image-limit {limit:g} '
                f'allows: the dataset, not a file, looks broken (each is named in the log)')

    def _signal_message(self, signum: int, batches_done: int, path: str) -> str:
        saved = (f'saved {path}' if path else 'rank 0 saved its position' if self.guards.positions is not None
                 else 'nothing saved')
        return (f'stopped by {signal.Signals(signum).name} in epoch {self.epoch} after {batches_done} of its '
                f'{self.windows.num_batches} batches: {saved}; the same command with --resume auto continues from '
                f'there')

    def _metrics(self) -> OrderedDict:
        """The epoch's averages (over ranks) and its non-zero counts (summed over ranks)."""
        metrics, counters = self.meters.metrics(), self.meters.counters
        if self.args.distributed:
            values = torch.tensor(list(metrics.values()), device=self.setup.device, dtype=torch.float32)
            metrics = OrderedDict(zip(metrics.keys(), utils.reduce_tensor(values, self.args.world_size).tolist()))
            totals = torch.tensor(list(counters.values()), device=self.setup.device, dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            counters = dict(zip(counters.keys(), (int(v) for v in totals.tolist())))
        metrics.update((k, v) for k, v in counters.items() if v)
        return metrics


@torch.inference_mode()
def predict_batches(model, loader, args, device: torch.device, amp_autocast: Callable = suppress,
                    model_dtype: Optional[torch.dtype] = None):
    """Yield ``(logits, target)`` per batch in eval mode, with timm's input handling and TTA reduction."""
    model.eval()
    for input, target in loader:
        if not args.prefetcher:
            input, target = input.to(device=device, dtype=model_dtype), target.to(device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
        if getattr(args, 'tta', 0) > 1:
            output = output.unfold(0, args.tta, args.tta).mean(dim=2)
            target = target[0:target.size(0):args.tta]
        yield output, target


def update_evaluator(evaluator: ClassificationEvaluator, output, target) -> tuple:
    """Add a batch to ``evaluator``, without the rows standing in for unreadable images; return the batch's own
    (loss, top1, top5, count) for log lines and how many rows were left out."""
    output, target, dropped = drop_not_counted(evaluator, output, target)
    counts, loss_sum = evaluator.counts.clone(), evaluator.loss_sum.clone()
    evaluator.update(output, target)
    seen, top1, top5 = (evaluator.counts - counts).tolist()
    n = max(seen, 1)
    return (evaluator.loss_sum - loss_sum).item() / n, 100 * top1 / n, 100 * top5 / n, seen, dropped


def evaluate(model, loader, args, device: torch.device, amp_autocast: Callable = suppress,
             model_dtype: Optional[torch.dtype] = None, log_suffix: str = '') -> OrderedDict:
    """Loss, top-1 and top-5 of ``model`` on ``loader`` (timm's evaluator: exact counts, padding trimmed), and
    ``unreadable_images`` when some images could not be read (they are left out of the figures)."""
    evaluator = ClassificationEvaluator(device, max_samples=evaluation_sample_limit(loader))
    batch_time_m = utils.AverageMeter()
    last_idx = len(loader) - 1
    progress = EpochProgress('Test' + log_suffix, len(loader), enabled=utils.is_primary(args))
    failures, unreadable = failures_of(loader), 0
    end = time.time()
    for batch_idx, (output, target) in enumerate(
            predict_batches(model, loader, args, device, amp_autocast, model_dtype)):
        loss, top1, top5, _, dropped = update_evaluator(evaluator, output, target)
        unreadable += dropped
        if failures is not None:
            failures.drain()
        batch_time_m.update(time.time() - end)
        end = time.time()
        progress.show(batch_idx + 1)
        if utils.is_primary(args) and (batch_idx == last_idx or batch_idx % args.log_interval == 0):
            running = evaluator.summary()
            _logger.info(
                f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  '
                f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
                f'Loss: {loss:>7.3f} ({running["loss"]:>6.3f})  '
                f'Acc@1: {top1:>7.3f} ({running["top1"]:>7.3f})  '
                f'Acc@5: {top5:>7.3f} ({running["top5"]:>7.3f})')
    progress.close()
    metrics = evaluator.compute(distributed=args.distributed)
    if args.distributed:
        total = torch.tensor([unreadable], device=device, dtype=torch.int64)
        torch.distributed.all_reduce(total)
        unreadable = int(total.item())
    if unreadable:
        metrics['unreadable_images'] = unreadable
    return metrics
