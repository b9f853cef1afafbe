"""One training epoch and one evaluation pass, run the way timm's train.py runs them, around any task.

The loop only knows ``task(input, target) -> {'loss', 'output', <parts>}``: methods are ``TrainingTask``
subclasses. A method that must back-propagate inside its forward (several passes per step, or a pass that
has to run its backward while its subnet is installed, as grad checkpointing recomputes blocks) binds the
loop's ``StepBackward`` (``task.bind_backward``) and calls ``early`` / ``final`` on it: the same AMP
scaling, accumulation division, clipping and optimizer step as the loop's own backward, so there is still
one optimizer step (and one gradient all-reduce) per step. Scalar tensors in the result other than
``loss``/``output`` are averaged over the epoch and reported (log line, ``summary.csv``).
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


class StepBackward:
    """Back-propagation exactly as the loop does it, for methods that back-propagate inside their forward.

    ``early(loss)``: a pass whose gradients are accumulated (DDP decides at *forward* time whether a pass
    all-reduces, so run such a pass, forward and backward, inside ``task.no_sync()``). ``final(loss)``: the
    last pass of the step, outside ``no_sync``; it also clips and steps the optimizer when the loop's
    accumulation window ends. Called outside the loop (tests), both just back-propagate.
    """

    def __init__(self, task=None, optimizer=None, args=None, loss_scaler=None, second_order: bool = False):
        self.task, self.optimizer, self.args = task, optimizer, args
        self.loss_scaler = loss_scaler
        self.second_order = second_order
        self.scale = 1.0  # 1 / accumulation steps, times the variable-batch loss scale
        self.need_update = False

    def early(self, loss: torch.Tensor) -> None:
        loss = loss * self.scale
        if self.loss_scaler is not None:
            loss = self.loss_scaler._scaler.scale(loss)
        loss.backward(create_graph=self.second_order)

    def final(self, loss: torch.Tensor) -> None:
        if self.optimizer is None:
            loss.backward()
            return
        _backward(loss * self.scale, self.task, self.optimizer, self.args, self.loss_scaler, self.need_update,
                  self.second_order)


def _loss_scale(mode: str, batch_size: int, reference: float) -> float:
    """timm's variable-batch loss scaling (NaFlex and scheduled-resolution loaders)."""
    if not mode or mode == 'none':
        return 1.0
    scale = batch_size / reference
    return scale ** 0.5 if mode == 'sqrt' else scale


def _scalar_parts(result: dict) -> dict:
    return {k: v.detach() for k, v in result.items()
            if k not in ('loss', 'loss_value', 'output') and torch.is_tensor(v) and v.ndim == 0}


def train_one_epoch(epoch: int, task, loader, optimizer, args, setup: StepSetup, lr_scheduler=None,
                    saver=None, output_dir: Optional[str] = None) -> OrderedDict:
    """Train ``task`` for one epoch; returns timm's ``{'loss': ...}`` plus the method's averaged loss parts."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif setup.mixup_fn is not None:
            setup.mixup_fn.mixup_enabled = False

    second_order = getattr(optimizer, 'is_second_order', False)
    module = task.get_trainable_module()
    module.train()
    has_no_sync = args.distributed and hasattr(module, 'no_sync')
    step_backward = StepBackward(task, optimizer, args, setup.loss_scaler, second_order)
    owns_backward = hasattr(task, 'bind_backward')
    if owns_backward:
        task.bind_backward(step_backward)

    num_batches = len(loader)
    accum_steps = args.grad_accum_steps
    last_accum_steps = num_batches % accum_steps
    last_window_start = num_batches - last_accum_steps
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    update_time_m, data_time_m, losses_m = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    part_sums, part_count = {}, 0
    progress = EpochProgress(f'Train {epoch}', updates_per_epoch, enabled=utils.is_primary(args))

    data_start = update_start = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_window_start:
            accum_steps = last_accum_steps

        if not args.prefetcher:
            input, target = input.to(device=setup.device, dtype=setup.model_dtype), target.to(setup.device)
            if setup.mixup_fn is not None:
                input, target = setup.mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time_m.update(accum_steps * (time.time() - data_start))

        batch_size = input['patches'].shape[0] if setup.naflex else input.shape[0]
        loss_scale, dist_scale = 1.0, None
        global_batch_size = batch_size * (args.world_size if args.distributed else 1)
        if setup.naflex or setup.scheduled_batches:
            mode = args.naflex_loss_scale if setup.naflex else args.variable_batch_loss_scale
            loss_scale = _loss_scale(mode, batch_size, setup.batch_size_reference)
            if setup.naflex and args.distributed:
                # ranks see different batch sizes: weight each rank's gradient by its share of the global batch
                global_batch_size = utils.reduce_tensor(
                    torch.tensor(batch_size, device=setup.device, dtype=torch.float32), 1).item()
                dist_scale = args.world_size * batch_size / global_batch_size
        step_backward.scale = loss_scale * (dist_scale or 1.0) / accum_steps
        step_backward.need_update = need_update

        with task.no_sync() if has_no_sync and not need_update else nullcontext():
            with setup.amp_autocast():
                result = task(input, target)
            if not owns_backward:
                step_backward.final(result['loss'])

        step_loss = result.get('loss_value', result['loss']).detach()
        losses_m.update(step_loss.item(), batch_size)
        for name, value in _scalar_parts(result).items():
            part_sums[name] = part_sums.get(name, 0.) + value.float() * batch_size
        part_count += batch_size
        update_sample_count += global_batch_size

        if not need_update:
            data_start = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if args.synchronize_step and setup.device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.time()
        update_time_m.update(now - update_start)
        update_start = now
        progress.show(update_idx + 1, f'loss {losses_m.avg:#.3g}')

        if update_idx % args.log_interval == 0 or last_batch:
            lrs = [group['lr'] for group in optimizer.param_groups]
            loss_now, loss_avg = losses_m.val, losses_m.avg
            if args.distributed:
                loss_now = utils.reduce_tensor(step_loss.new_tensor([loss_now]), args.world_size).item()
                loss_avg = utils.reduce_tensor(step_loss.new_tensor([loss_avg]), args.world_size).item()
            parts = ''.join(f'  {k}: {(v / part_count).item():#.3g}' for k, v in part_sums.items())
            if utils.is_primary(args):
                _logger.info(
                    f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                    f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                    f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
                    f'Time: {update_time_m.val:.3f}s, {update_sample_count / update_time_m.val:>7.2f}/s  '
                    f'({update_time_m.avg:.3f}s, {update_sample_count / update_time_m.avg:>7.2f}/s)  '
                    f'LR: {sum(lrs) / len(lrs):.3e}  '
                    f'Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})'
                    f'{parts}  ETA: {format_duration(progress.eta(update_idx + 1))}')
                if args.save_images and output_dir and not setup.naflex:
                    torchvision.utils.save_image(
                        input, os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'), padding=0, normalize=True)

        if saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
            saver.save_recovery(epoch, batch_idx=update_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
        update_sample_count = 0
        data_start = time.time()

    progress.close()
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()

    metrics = OrderedDict(loss=losses_m.avg)
    for name, total in part_sums.items():
        metrics[name] = (total / max(part_count, 1)).item()
    if args.distributed:
        values = torch.tensor(list(metrics.values()), device=setup.device, dtype=torch.float32)
        values = utils.reduce_tensor(values, args.world_size)
        metrics = OrderedDict(zip(metrics.keys(), values.tolist()))
    return metrics


def _backward(loss, task, optimizer, args, loss_scaler, need_update: bool, second_order: bool) -> None:
    """timm's backward + (clipped) optimizer step, through the AMP scaler when there is one."""
    clip_parameters = None
    if args.clip_grad is not None:
        clip_parameters = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=clip_parameters, create_graph=second_order, need_update=need_update)
        return
    loss.backward(create_graph=second_order)
    if need_update:
        if args.clip_grad is not None:
            utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
        optimizer.step()


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
