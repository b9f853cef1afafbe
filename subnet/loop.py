"""One training epoch and one evaluation pass, run the way timm's train.py runs them, around any task.

The loop knows a task through ``task(input, target) -> {'loss', 'output', <parts>}`` and the hooks every task
has (``subnet/methods/base.py``): it hands the task its ``StepBackward`` (``bind_backward``) and back-propagates
the returned loss itself unless the task ``owns_backward`` (methods that run several passes per step). Scalar
tensors in the result other than ``loss``/``output`` are averaged over the epoch and reported (log line,
``summary.csv``).
"""
import logging
import os
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
from .progress import EpochProgress, format_duration

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
    """The running figures of a training epoch: timm's loss/time/data meters and the method's loss parts."""

    def __init__(self, epoch: int, updates_per_epoch: int, primary: bool):
        self.epoch, self.updates_per_epoch = epoch, updates_per_epoch
        self.update_time, self.data_time, self.losses = utils.AverageMeter(), utils.AverageMeter(), \
            utils.AverageMeter()
        self.part_sums, self.part_count = {}, 0
        self.update_samples = 0
        self.progress = EpochProgress(f'Train {epoch}', updates_per_epoch, enabled=primary)

    def add_step(self, result: dict, batch_size: int, global_batch_size: int) -> torch.Tensor:
        """Account for one loader batch; returns its detached loss."""
        step_loss = result.get('loss_value', result['loss']).detach()
        self.losses.update(step_loss.item(), batch_size)
        for name, value in _scalar_parts(result).items():
            self.part_sums[name] = self.part_sums.get(name, 0.) + value.float() * batch_size
        self.part_count += batch_size
        self.update_samples += global_batch_size
        return step_loss

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


def train_one_epoch(epoch: int, task, loader, optimizer, args, setup: StepSetup, lr_scheduler=None,
                    saver=None, output_dir: Optional[str] = None) -> OrderedDict:
    """Train ``task`` for one epoch; returns timm's ``{'loss': ...}`` plus the method's averaged loss parts."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        _turn_mixup_off(loader, setup)
    module = task.get_trainable_module()
    module.train()
    has_no_sync = args.distributed and hasattr(module, 'no_sync')
    step_backward = StepBackward(task, optimizer, args, setup.loss_scaler,
                                 getattr(optimizer, 'is_second_order', False))
    task.bind_backward(step_backward)

    num_batches = len(loader)
    accum_steps = args.grad_accum_steps
    last_accum_steps = num_batches % accum_steps
    last_window_start = num_batches - last_accum_steps
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    meters = EpochMeters(epoch, updates_per_epoch, utils.is_primary(args))

    data_start = update_start = time.time()
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_window_start:
            accum_steps = last_accum_steps
        input, target = _to_device(input, target, args, setup)
        meters.data_time.update(accum_steps * (time.time() - data_start))

        batch_size = input['patches'].shape[0] if setup.naflex else input.shape[0]
        loss_scale, global_batch_size = _batch_scale(batch_size, args, setup)
        step_backward.scale = loss_scale / accum_steps
        step_backward.need_update = need_update
        with task.no_sync() if has_no_sync and not need_update else nullcontext():
            with setup.amp_autocast():
                result = task(input, target)
            if not task.owns_backward:
                step_backward.final(result['loss'])
        step_loss = meters.add_step(result, batch_size, global_batch_size)
        if not need_update:
            data_start = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if args.synchronize_step and setup.device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.time()
        meters.update_time.update(now - update_start)
        update_start = now
        meters.progress.show(update_idx + 1, f'loss {meters.losses.avg:#.3g}')
        if update_idx % args.log_interval == 0 or last_batch:
            loss_now, loss_avg = meters.losses.val, meters.losses.avg
            if args.distributed:
                loss_now = utils.reduce_tensor(step_loss.new_tensor([loss_now]), args.world_size).item()
                loss_avg = utils.reduce_tensor(step_loss.new_tensor([loss_avg]), args.world_size).item()
            if utils.is_primary(args):
                _logger.info(meters.log_line(update_idx, _mean_lr(optimizer), loss_now, loss_avg))
                if args.save_images and output_dir and not setup.naflex:
                    torchvision.utils.save_image(
                        input, os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'), padding=0, normalize=True)
        if saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
            saver.save_recovery(epoch, batch_idx=update_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=meters.losses.avg)
        meters.update_samples = 0
        data_start = time.time()

    meters.progress.close()
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    metrics = meters.metrics()
    if args.distributed:
        values = torch.tensor(list(metrics.values()), device=setup.device, dtype=torch.float32)
        values = utils.reduce_tensor(values, args.world_size)
        metrics = OrderedDict(zip(metrics.keys(), values.tolist()))
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
    """Add a batch to ``evaluator``; return the batch's own (loss, top1, top5, count) for log lines."""
    counts, loss_sum = evaluator.counts.clone(), evaluator.loss_sum.clone()
    evaluator.update(output, target)
    seen, top1, top5 = (evaluator.counts - counts).tolist()
    n = max(seen, 1)
    return (evaluator.loss_sum - loss_sum).item() / n, 100 * top1 / n, 100 * top5 / n, seen


def evaluate(model, loader, args, device: torch.device, amp_autocast: Callable = suppress,
             model_dtype: Optional[torch.dtype] = None, log_suffix: str = '') -> OrderedDict:
    """Loss, top-1 and top-5 of ``model`` on ``loader`` (timm's evaluator: exact counts, padding trimmed)."""
    evaluator = ClassificationEvaluator(device, max_samples=evaluation_sample_limit(loader))
    batch_time_m = utils.AverageMeter()
    last_idx = len(loader) - 1
    progress = EpochProgress('Test' + log_suffix, len(loader), enabled=utils.is_primary(args))
    end = time.time()
    for batch_idx, (output, target) in enumerate(
            predict_batches(model, loader, args, device, amp_autocast, model_dtype)):
        loss, top1, top5, _ = update_evaluator(evaluator, output, target)
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
    return evaluator.compute(distributed=args.distributed)
