#!/usr/bin/env python3
"""Train a timm image model, optionally with a submodel method: a drop-in replacement for timm's train.py.

Every timm option works as in timm (``-c hparams.yaml``, output folder, ``summary.csv``, checkpoints that
timm loads). Add ``--method cosub|st|st++|gkt`` for the methods; ``--method none`` is timm's own training.

    python train.py --data-dir data/fashion-mnist -c hparams/quickstart.yaml
    torchrun --nproc_per_node 8 train.py --data-dir /imagenet -c hparams/cosub_deit3_vit_base.yaml

The script reads top to bottom: parse → build (model, data, task, optimizer, run folder) → loop → report.
The epoch loop lives in ``subnet/engine.py``, the methods in ``subnet/tasks.py``.
"""
import argparse
import importlib
import json
import logging
import os
import sys
from contextlib import suppress
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm import utils
from timm.data import resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler, trim_summary

from subnet import output, plots
from subnet.data import (build_loaders, check_image_folders, loader_images, mixup_kwargs, seed_epoch,
                         set_loader_epoch)
from subnet.engine import StepSetup, evaluate, train_one_epoch
from subnet.evaluation import SubnetMonitor
from subnet.errors import UsageError
from subnet.models import check_state_dict_fits, load_checkpoint_file, load_initial_checkpoint, resolve_model_name
from subnet.options import parse_train_args
from subnet.tasks import build_criterion, build_task, check_method_args, method_model_kwargs

_logger = logging.getLogger('train')


def resolve_device(args) -> torch.device:
    """timm's ``init_distributed_device``, falling back to the CPU (with a warning) where timm asserts CUDA."""
    for module in args.device_modules or ():
        importlib.import_module(module)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        _logger.warning(f'--device {args.device} asked for but no CUDA GPU is present: training on the CPU.')
        args.device = 'cpu'
    device = utils.init_distributed_device(args)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.distributed:
        _logger.info(f'Training in distributed mode with multiple processes, 1 device per process. '
                     f'Process {args.rank}, total {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on 1 device ({args.device}).')
    return device


def preflight(args) -> None:
    """Every check that needs no model or data loading, so bad input stops before anything is built."""
    if args.stop_epoch is not None and not 0 < args.stop_epoch <= args.epochs:
        raise UsageError(f'--stop-epoch {args.stop_epoch} must be between 1 and --epochs ({args.epochs})')
    if args.resume == 'auto' and not args.experiment:
        raise UsageError('--resume auto needs --experiment NAME (the run folder to continue)')
    if args.model_dtype and args.model_dtype not in ('float32', 'float16', 'bfloat16'):
        raise UsageError(f'--model-dtype must be float32, float16 or bfloat16, got {args.model_dtype}')
    if args.amp and args.amp_dtype not in ('float16', 'bfloat16'):
        raise UsageError(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype}')
    if args.amp and args.model_dtype not in (None, 'float32'):
        raise UsageError('--amp needs a float32 model (drop --model-dtype)')
    if args.grad_accum_steps < 1:
        raise UsageError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    if args.aug_splits == 1:
        raise UsageError('--aug-splits 1 makes no sense: use 0 (off) or 2 or more')
    check_method_args(args)
    args.model = resolve_model_name(args.model)
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if not args.dataset:
        check_image_folders(args.data_dir, {'train': args.train_split, 'validation': args.val_split})
    if mixup_kwargs(args) is not None and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix need an even batch size, got --batch-size {args.batch_size}')
    if args.experiment and utils.is_primary(args):
        folder = os.path.join(args.output or './output/train', args.experiment)
        resuming_here = args.resume == 'auto' or (
            args.resume and os.path.realpath(os.path.dirname(args.resume)) == os.path.realpath(folder))
        if not resuming_here:
            output.check_output_dir(folder)
    if args.resume and args.resume != 'auto':
        load_checkpoint_file(args.resume, '--resume')
    if args.initial_checkpoint and not args.initial_checkpoint.endswith(('.safetensors', '.npz', '.npy')):
        load_checkpoint_file(args.initial_checkpoint, '--initial-checkpoint')


def build_model(args) -> nn.Module:
    """timm's ``create_model`` with train.py's arguments and checked initial weights."""
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    factory_kwargs = {}
    if args.pretrained_path:
        factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    create = partial(
        create_model,
        args.model,
        pretrained=args.pretrained,
        in_chans=in_chans,
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        scriptable=args.torchscript,
        **factory_kwargs,
    )
    method_kwargs = {k: v for k, v in method_model_kwargs(args).items() if k not in args.model_kwargs}
    try:
        model = create(**method_kwargs, **args.model_kwargs)
    except TypeError:  # a model without the option (e.g. dynamic_img_size on a CNN) does not need it
        model = create(**args.model_kwargs)
    if args.initial_checkpoint:
        load_initial_checkpoint(model, args.initial_checkpoint)
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if utils.is_primary(args):
        _logger.info(f'Model {args.model} created, param count:{sum(p.numel() for p in model.parameters())}')
    return model


def place_model(args, model: nn.Module, device: torch.device, model_dtype, num_aug_splits: int) -> nn.Module:
    """Split BN, device and dtype, channels_last, sync BN and TorchScript, in timm's order."""
    if args.split_bn:
        if not (num_aug_splits > 1 or args.resplit):
            raise UsageError('--split-bn needs --aug-splits 2 or more (or --resplit)')
        model = convert_splitbn_model(model, max(num_aug_splits, 2))
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''  # synchronized BN needs no end-of-epoch averaging
        model = convert_sync_batchnorm(model)
    if args.torchscript:
        model = torch.jit.script(model)
    return model


def mixed_precision(args, device: torch.device):
    """timm's AMP: autocast in the chosen dtype, a grad scaler only for CUDA float16."""
    if not args.amp:
        _logger.info(f'AMP not enabled. Training in {args.model_dtype or torch.float32}.')
        return suppress, None
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    scaler = NativeScaler(device=device.type) if device.type == 'cuda' and amp_dtype == torch.float16 else None
    _logger.info('Using native Torch AMP. Training in mixed precision.')
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype), scaler


def derive_lr(args, batch_size_reference: float) -> None:
    """timm's rule: ``lr = lr_base * global_batch / lr_base_size`` (square root for Ada*/LAMB optimizers)."""
    if args.lr:
        return
    global_batch_size = batch_size_reference * args.world_size * args.grad_accum_steps
    ratio = global_batch_size / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        ratio = ratio ** 0.5
    args.lr = args.lr_base * ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) and effective '
                     f'global batch size ({global_batch_size:g}) with {args.lr_base_scale} scaling.')


def resume_path(args, output_dir: str) -> str:
    """The checkpoint to continue from: ``--resume PATH``, or for ``auto`` the run folder's last.pth.tar."""
    if args.resume != 'auto':
        return args.resume
    last = os.path.join(output_dir, 'last.pth.tar')
    if os.path.exists(last):
        _logger.info(f'Resuming from {last} (--resume auto).')
        return last
    _logger.info(f'--resume auto: no checkpoint in {output_dir} yet, starting a fresh run there.')
    return ''


def restore(args, path: str, task, optimizer, loss_scaler) -> int:
    """Load model, task state, optimizer and scaler from a checkpoint; return the epoch to start from."""
    checkpoint = load_checkpoint_file(path, '--resume')
    check_state_dict_fits(task.get_eval_model(), checkpoint, path, '--resume')
    try:
        epoch = resume_task_checkpoint(task, path, optimizer=None if args.no_resume_opt else optimizer,
                                       loss_scaler=None if args.no_resume_opt else loss_scaler,
                                       log_info=utils.is_primary(args))
    except (ValueError, KeyError) as e:
        raise UsageError(f'--resume {path}: its optimizer state does not fit this run ({e}); '
                         f'add --no-resume-opt to start the optimizer afresh') from None
    return epoch or 0


@dataclass
class TrainRun:
    """What a finished run leaves behind, for scripts and tests that call ``run`` in-process."""
    args: argparse.Namespace
    task: object
    output_dir: str
    results: list


def run(argv=None) -> TrainRun:
    """Train as the command line says; raises UsageError on bad input."""
    rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0)))
    output.setup_logging(primary=rank == 0, to_file_later=True)
    try:
        return _train(argv)
    finally:
        output.close_log_file()


def _train(argv) -> TrainRun:
    args, args_text = parse_train_args(argv)
    if args.plot_summary:  # a picture of a finished (or running) run, no training
        png = plots.plot_summary(args.plot_summary)
        _logger.info(f'Wrote {png}')
        return TrainRun(args, None, os.path.dirname(png), [])
    args.rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0)))
    preflight(args)
    args.prefetcher = not args.no_prefetcher
    device = resolve_device(args)
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    utils.random_seed(args.seed, args.rank)

    # ---- model and data
    model = build_model(args)
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    num_aug_splits = args.aug_splits if args.aug_splits > 1 else 0
    patch_size = model.get_patch_size() if args.naflex_loader and hasattr(model, 'get_patch_size') else None
    model = place_model(args, model, device, model_dtype, num_aug_splits)
    amp_autocast, loss_scaler = mixed_precision(args, device)
    loaders = build_loaders(args, data_config, device, model_dtype, num_aug_splits, patch_size)
    derive_lr(args, loaders.batch_size_reference)

    # ---- task (the method), optimizer, resume, EMA, compile, DDP: timm's order
    criterion = build_criterion(args, num_aug_splits, mixup_kwargs(args) is not None).to(device)
    task = build_task(args, model, criterion, device, model_dtype, verbose=utils.is_primary(args),
                      input_size=data_config['input_size'])
    optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    if utils.is_primary(args):
        defaults = dict(optimizer.defaults, weight_decay=args.weight_decay)
        _logger.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: '
                     + ', '.join(f'{k}: {v}' for k, v in defaults.items()))

    output_dir = os.path.join(args.output or './output/train',
                              output.experiment_name(args, data_config['input_size'][-1]))
    checkpoint_path = resume_path(args, output_dir) if args.resume else ''
    start_epoch = restore(args, checkpoint_path, task, optimizer, loss_scaler) if checkpoint_path else 0
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if checkpoint_path:
            load_task_ema_checkpoint(task, checkpoint_path)
    if args.torchcompile:
        _logger.info(f'Compiling task components with backend={args.torchcompile}, mode={args.torchcompile_mode}')
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)

    # ---- run folder (rank 0): args.yaml, log.txt, summary.csv, checkpoints
    eval_metric = args.eval_metric if loaders.eval is not None else 'loss'
    decreasing = eval_metric == 'loss'
    saver = None
    in_place = args.resume == 'auto' or (
        checkpoint_path and os.path.realpath(os.path.dirname(checkpoint_path)) == os.path.realpath(output_dir))
    if utils.is_primary(args):
        output.claim_output_dir(output_dir, resuming_in_place=bool(in_place))
        output.log_to_file(os.path.join(output_dir, 'log.txt'))
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        saver = output.AtomicCheckpointSaver(
            model=task.get_trainable_module(), optimizer=optimizer, args=args, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=decreasing,
            max_history=args.checkpoint_hist, task=task)
        if in_place and checkpoint_path:
            saver.load_state_dict_from_checkpoint(checkpoint_path)
        trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
        if args.log_wandb:
            start_wandb(args, os.path.basename(output_dir))

    # ---- schedule
    updates_per_epoch = (len(loaders.train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    end_epoch = min(num_epochs, args.stop_epoch or num_epochs)
    if utils.is_primary(args):
        explain = ('(warmup_epochs + epochs + cooldown_epochs). Warmup added to total when warmup_prefix=True'
                   if args.warmup_prefix else
                   '(epochs + cooldown_epochs). Warmup within epochs when warmup_prefix=False')
        _logger.info(f'Scheduled epochs: {num_epochs} {explain}. '
                     f'LR stepped per {"epoch" if lr_scheduler.t_in_epochs else "update"}.')

    # ---- loop
    setup = StepSetup(device=device, amp_autocast=amp_autocast, loss_scaler=loss_scaler, model_dtype=model_dtype,
                      mixup_fn=loaders.mixup_fn, naflex=loaders.naflex, scheduled_batches=loaders.scheduled_batches,
                      batch_size_reference=loaders.batch_size_reference)
    results, best = [], (None, None)
    milestones = set(args.save_epochs or ())
    subnet_monitor = SubnetMonitor.from_args(args, task, data_config['input_size']) \
        if loaders.eval is not None else None
    tensorboard = plots.TensorBoardLog.open(os.path.join(output_dir, 'tensorboard')) \
        if args.log_tensorboard and saver is not None else None
    try:
        for epoch in range(start_epoch, end_epoch):
            seed_epoch(args.seed, epoch, args.rank)
            set_loader_epoch(loaders.train, epoch)
            train_metrics = train_one_epoch(epoch, task, loaders.train, optimizer, args, setup,
                                            lr_scheduler=lr_scheduler, saver=saver, output_dir=output_dir)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                _logger.info('Distributing BatchNorm running means and vars')
                utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')

            completed = epoch + 1
            if completed % args.val_interval and completed not in (num_epochs, end_epoch) \
                    and completed not in milestones:
                _logger.info('Skipping eval and checkpointing ')
                if lr_scheduler is not None:
                    lr_scheduler.step(completed, metric=None)
                continue

            eval_metrics, extra = None, {}
            if hasattr(task, 'before_eval'):
                task.before_eval(loader_images(loaders.train, device, model_dtype, args.channels_last))
            if loaders.eval is not None:
                eval_metrics = evaluate(task.get_eval_model(), loaders.eval, args, device, amp_autocast, model_dtype)
                ema = task.get_trainable_module(ema=True)
                if ema is not None and not args.model_ema_force_cpu:
                    if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                        utils.distribute_bn(ema, args.world_size, args.dist_bn == 'reduce')
                    # timm reports the EMA's metrics in the eval_* columns; the live model's are kept beside
                    extra = {f'model_{k}': v for k, v in eval_metrics.items()}
                    eval_metrics = evaluate(task.get_eval_model(ema=True), loaders.eval, args, device,
                                            amp_autocast, model_dtype, log_suffix=' (EMA)')
                if subnet_monitor is not None:
                    extra.update(subnet_monitor.columns(lambda subnet: evaluate(
                        task.get_eval_model(), loaders.eval, args, device, amp_autocast, model_dtype,
                        log_suffix=f' (subnet {subnet.name})')))
            latest_metric = (eval_metrics or train_metrics)[eval_metric]
            if saver is not None:
                lrs = [group['lr'] for group in optimizer.param_groups]
                row = output.summary_row(epoch, train_metrics, eval_metrics, sum(lrs) / len(lrs), extra)
                output.append_summary(os.path.join(output_dir, 'summary.csv'), row)
                if tensorboard is not None:
                    tensorboard.log(epoch, row)
                if args.log_wandb:
                    log_wandb(epoch, train_metrics, eval_metrics, extra)
                best = saver.save_checkpoint(epoch, metric=latest_metric)
                if completed in milestones:
                    saver.save_milestone(completed)
            if lr_scheduler is not None:
                lr_scheduler.step(completed, latest_metric)
            results.append({'epoch': epoch, 'train': train_metrics,
                            **({'validation': eval_metrics} if eval_metrics is not None else {})})
    except KeyboardInterrupt:
        _logger.warning('Interrupted: the last completed epoch is in last.pth.tar (continue with --resume).')

    if args.distributed:
        torch.distributed.destroy_process_group()
    if best[0] is not None:
        _logger.info(f'*** Best metric: {best[0]} (epoch {best[1]})')
    if utils.is_primary(args):
        if tensorboard is not None:
            tensorboard.close()
        plots.summary_after_training(output_dir)
        ranked = sorted(results, key=lambda r: r.get('validation', r['train']).get(eval_metric, 0),
                        reverse=decreasing)
        print(f'--result\n{json.dumps(ranked[-10:], indent=4)}')
    return TrainRun(args, task, output_dir, results)


def start_wandb(args, run_name: str) -> None:
    try:
        import wandb
    except ImportError:
        _logger.warning("You've requested to log metrics to wandb but package not found. "
                        "Metrics not being logged to wandb, try `pip install wandb`")
        args.log_wandb = False
        return
    wandb.init(project=args.wandb_project, name=run_name, config=args, tags=args.wandb_tags,
               resume='must' if args.wandb_resume_id else None, id=args.wandb_resume_id or None)


def log_wandb(epoch, train_metrics, eval_metrics, extra) -> None:
    import wandb
    row = {'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
           **{f'eval_{k}': v for k, v in (eval_metrics or {}).items()}, **extra}
    wandb.log(row)


def main(argv=None) -> int:
    try:
        run(argv)
        return 0
    except UsageError as e:
        message = str(e)
        if 'Original Traceback' in message:  # raised in a DataLoader worker: keep the original line
            message = message.strip().splitlines()[-1].split('UsageError: ', 1)[-1]
        print(f'train.py: error: {message}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
