#!/usr/bin/env python3
"""Train a timm image model, optionally with a submodel method: a drop-in replacement for timm's train.py.

Every timm option works as in timm (``-c hparams.yaml``, output folder, ``summary.csv``, checkpoints that
timm loads). Add ``--method cosub|st|st++|gkt`` for the methods; ``--method none`` is timm's own training.

    python train.py --data-dir data/fashion-mnist -c hparams/quickstart.yaml
    torchrun --nproc_per_node 8 train.py --data-dir /imagenet -c hparams/cosub_deit3_vit_base.yaml

The script reads top to bottom: parse → check → build (model, data, task, optimizer, run folder, schedule) →
loop (train an epoch, evaluate, checkpoint) → report. The epoch loop is ``subnet/loop.py`` and the step protocol
``subnet/step.py``, evaluation ``subnet/evaluation.py``; the methods are ``subnet/methods/``, one module each. What
keeps a long run alive (signals, mid-epoch resume, unreadable images, non-finite losses) is one ``RunGuard``
(``subnet/guard.py``); one run per folder and atomic checkpoints are ``subnet/run_folder.py``.

As a module it offers timm 1.0.31's API (tools such as timm's sweep.py and its tests import train.py): ``parser``
and ``config_parser``, ``_parse_args()`` → (args, args.yaml text), ``main()``, each reading ``sys.argv`` when
given no argv; ``create_model`` is looked up here at call time, so a caller may replace it. A command line that
does not parse exits 2 with one line from the parse (SystemExit, as argparse); a configuration refused after it
raises ``UsageError`` (a ValueError, as timm's main raises ValueError) from ``main``; ``cli`` is the command line,
which prints either as one ``train.py: error:`` line.

Exit status: 0 done (or nothing left to do); 2 bad input, or a dataset with too many unreadable images; 3 a loss
or weight that is not finite, or a run that diverged (``--divergence-limit``; nothing saved); 4 a checkpoint could
not be written (disk full, permissions; the partial file removed); 128 + N stopped by signal N (SIGINT 130, SIGTERM
143, SIGUSR1 138) after saving a checkpoint that ``--resume auto`` continues from.
"""
import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm import utils
from timm.data import resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import trim_summary, unwrap_model

from subnet import checks, downloads, global_batch, intact, logs, option_ranges, plots, resume, run_folder
from subnet.compile import compile_scope, compile_task
from subnet.criterion import build_criterion
from subnet.data import (Loaders, build_loaders, check_dataset_root, check_multilabel_reader, loader_images,
                         mixup_kwargs, seed_epoch, set_loader_epoch)
from subnet.device import (check_precision_args, limit_workers, model_dtype as dtype_of, training_device,
                           training_precision, use_default_device)
from subnet.divergence import DivergenceLimit
from subnet.errors import InputError, RunStopped, UsageError, WriteFailed, report_bad_input
from subnet.evaluation import SubnetMonitor, evaluate, evaluator_class
from subnet.guard import RunGuard
from subnet.loop import LoopOptions, StepSetup, train_one_epoch
from subnet.methods import method_class
from subnet.models import (accepted_kwargs, check_state_dict_fits, constant_drop_path, load_checkpoint_file,
                           load_initial_checkpoint, model_drop_path_rate, naflex_patch_size, resolve_model_name)
from subnet.spec import SubnetSpecError
from subnet.timm_options import config_parser as _config_parser, parse_train_args, train_option_sources, train_parser

_logger = logging.getLogger('train')

# timm's module-level parsers, for tools that read the options and their defaults (``vars(parser.parse_args([]))``);
# parsing here never changes them: every parse builds its own (``subnet/timm_options.py``), so no YAML default leaks
parser = train_parser()
config_parser = _config_parser()


def check_command_line(args) -> None:
    """The option combinations timm's ``_parse_args`` refuses (SystemExit there, as a parse error)."""
    if args.resume == 'auto' and not args.experiment:
        raise UsageError('--resume auto needs --experiment NAME (the run folder to continue)')


def _parse_args(argv=None) -> tuple:
    """timm's ``_parse_args``: the command line (``sys.argv`` by default) and its ``-c`` YAML, as (args, the
    args.yaml text). What does not parse, or a combination timm refuses there, exits 2 with one line."""
    try:
        args, args_text = parse_train_args(argv)
        check_command_line(args)
    except (UsageError, InputError) as e:  # the -c file, --extra-methods, check_command_line
        raise SystemExit(report_bad_input('train.py', e)) from None
    return args, args_text


def check_method_args(args) -> None:
    """The chosen method's configuration checks (one line each); they may fill the method's defaults."""
    method_class(args.method).check_args(args)


def check_task_args(args) -> None:
    """Every task ranks checkpoints by a metric its evaluator produces; ``--task multilabel`` needs a reader
    that gives label lists."""
    metrics = evaluator_class(args).metric_names
    if args.eval_metric not in metrics:
        raise UsageError(f'--eval-metric {args.eval_metric} is not a metric the {args.task} evaluation produces '
                         f'(one of {", ".join(metrics)})')
    check_multilabel_reader(args)


def preflight(args) -> None:
    """Every check that needs no model or data loading, so bad input stops before anything is built."""
    option_ranges.check_ranges(args)
    option_ranges.check_together(args)
    if args.stop_epoch is not None and not 0 < args.stop_epoch <= args.epochs:
        raise UsageError(f'--stop-epoch {args.stop_epoch} must be between 1 and --epochs ({args.epochs})')
    check_precision_args(args, amp_needs_fp32_model=True)
    if args.aug_splits == 1:
        raise UsageError('--aug-splits 1 makes no sense: use 0 (off) or 2 or more')
    check_task_args(args)
    checks.check_distributed_options(args)
    if args.compile_scope and not args.torchcompile:
        raise UsageError(f'--compile-scope {args.compile_scope} needs --torchcompile (it says what to compile)')
    check_method_args(args)
    args.model = resolve_model_name(args.model)
    if args.data and not args.data_dir:
        args.data_dir = args.data
    check_dataset_root(args.dataset, args.data_dir, {'train': args.train_split, 'validation': args.val_split},
                       args.class_map)
    if mixup_kwargs(args) is not None and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix need an even batch size, got --batch-size {args.batch_size}')
    if utils.is_primary(args):
        checks.check_output_folder(args)
        folder = os.path.join(args.output or './output/train', args.experiment)
        if args.experiment and not resumes_in(args, args.resume, folder):
            run_folder.check_output_dir(folder)
    if args.resume and args.resume != 'auto':
        load_checkpoint_file(args.resume, '--resume')
    if args.initial_checkpoint and not args.initial_checkpoint.endswith(('.safetensors', '.npz', '.npy')):
        load_checkpoint_file(args.initial_checkpoint, '--initial-checkpoint')


def resumes_in(args, checkpoint_path: str, folder: str) -> bool:
    """Whether this run continues the run in ``folder`` (``--resume auto``, or a checkpoint from that folder)."""
    return args.resume == 'auto' or bool(checkpoint_path) and checkpoint_path != 'auto' and (
        os.path.realpath(os.path.dirname(checkpoint_path)) == os.path.realpath(folder))


# ------------------------------------------------------------------------------------------------- building

# create_model keyword arguments that take a train.py option as it is
_MODEL_ARGS = (('num_classes', 'num_classes'), ('drop_rate', 'drop'), ('drop_path_rate', 'drop_path'),
               ('drop_block_rate', 'drop_block'), ('global_pool', 'gp'), ('bn_momentum', 'bn_momentum'),
               ('bn_eps', 'bn_eps'))


def build_model(args) -> nn.Module:
    """timm's ``create_model`` with train.py's arguments (and the method's kwargs), checked initial weights."""
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    factory_kwargs = {}
    overlay = dict(dict(file=args.pretrained_path, num_classes=-1) if args.pretrained_path else {},
                   **args.pretrained_cfg_overlay)  # --pretrained-cfg-overlay wins per key
    if overlay:
        factory_kwargs['pretrained_cfg_overlay'] = overlay
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    create = partial(create_model, args.model, pretrained=args.pretrained, in_chans=in_chans,
                     scriptable=args.torchscript, **{kwarg: getattr(args, option) for kwarg, option in _MODEL_ARGS},
                     **factory_kwargs)
    method_kwargs = {k: v for k, v in method_class(args.method).model_kwargs(args).items()
                     if k not in args.model_kwargs}
    # a model without the option (e.g. dynamic_img_size on a CNN) does not need it
    method_kwargs = accepted_kwargs(args.model, method_kwargs, in_chans=in_chans, **args.model_kwargs)
    model_kwargs = dict(method_kwargs, **args.model_kwargs)
    model = create(**model_kwargs)
    schedule = args.drop_schedule or method_class(args.method).drop_schedule
    if schedule == 'constant':
        constant_drop_path(model, args.drop_path if args.drop_path is not None else model_drop_path_rate(model))
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
        _logger.info(f'Model kwargs: {model_kwargs} (the config file\'s model_kwargs, --model-kwargs winning per '
                     f'key, and the method\'s)')
    return model


def build_model_explained(args) -> nn.Module:
    """``build_model``; a model that its ``--model-kwargs`` values break stops with one line naming them (timm's
    model classes raise TypeError/ValueError/AssertionError deep inside their constructors)."""
    try:
        return build_model(args)
    except (InputError, UsageError):  # a one-line error already saying what is wrong
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        given = ([f'--model-kwargs {" ".join(f"{k}={v!r}" for k, v in args.model_kwargs.items())}']
                 if args.model_kwargs else []) + ([f'--gp {args.gp}'] if args.gp else [])
        if not given:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise UsageError(f'{args.model} cannot be built with {" and ".join(given)} ({reason})') from None


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
        if utils.is_primary(args):
            _logger.info('Converted model to use Synchronized BatchNorm. WARNING: You may have issues if using '
                         'zero initialized BN layers (enabled by default for ResNets) while sync-bn enabled.')
    if args.torchscript:
        model = torch.jit.script(model)
    return model


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


def build_optimizer(args, task) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` on the task's trainable module; an ``--opt-kwargs`` key the optimizer does
    not take is one line."""
    try:
        optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except TypeError as e:  # raised by the optimizer's constructor
        if not args.opt_kwargs:
            raise
        raise UsageError(f'--opt-kwargs: {args.opt} does not take them ({e})') from None
    if utils.is_primary(args):
        defaults = dict(optimizer.defaults, weight_decay=args.weight_decay)
        _logger.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: '
                     + ', '.join(f'{k}: {v}' for k, v in defaults.items()))
    return optimizer


def log_global_batch(args, batch_size_reference: float, on_command_line: set, in_config: set) -> None:
    """The global batch and the learning rate in use, and a warning when the config file's absolute lr was
    declared (``recipe_global_batch``) for another global batch."""
    if 'lr' in on_command_line:
        origin = 'from --lr'
    elif 'lr' in in_config:
        origin = 'absolute, from the config file'
    else:
        origin = f'--lr-base {args.lr_base:g} per {args.lr_base_size} images, {args.lr_base_scale} scaling'
    warning = global_batch.mismatch_warning(args, batch_size_reference,
                                            lr_from_config='lr' in in_config and 'lr' not in on_command_line)
    if utils.is_primary(args):
        _logger.info(global_batch.describe(args, batch_size_reference, origin))
        if warning:
            _logger.warning(warning)


def resume_path(args, output_dir: str) -> str:
    """The checkpoint to continue from: ``--resume PATH``, or for ``auto`` the run folder's furthest intact one
    (a recovery file written mid-epoch, last.pth.tar, checkpoint-N.pth.tar), naming those it passes over. A folder
    that holds a run but no intact checkpoint stops the run: a fresh start would overwrite it."""
    if args.resume != 'auto':
        return args.resume
    path, skipped = intact.intact_candidates(output_dir) if os.path.isdir(output_dir) else ('', [])
    if skipped and utils.is_primary(args):
        _logger.warning(f'--resume auto passes over {"; ".join(skipped)}.')
    if path:
        _logger.info(f'Resuming from {path} (--resume auto).')
        return path
    if run_folder.holds_run(output_dir):
        raise UsageError(f'--resume auto: {output_dir} holds a run but no intact checkpoint '
                         f'({"; ".join(skipped) or "none left"}); nothing was overwritten: restore a checkpoint '
                         f'from a copy, or choose a new --experiment')
    _logger.info(f'--resume auto: no checkpoint in {output_dir} yet, starting a fresh run there.')
    return ''


def restore(args, path: str, task, optimizer, loss_scaler) -> tuple:
    """Load model, task state, optimizer and scaler from a checkpoint; return the epoch to start from and, for a
    checkpoint written mid-epoch, where in it this rank continues (``resume.EpochStart``)."""
    started = time.perf_counter()
    checkpoint = load_checkpoint_file(path, '--resume')
    check_state_dict_fits(task.get_eval_model(), checkpoint, path, '--resume')
    try:
        epoch = resume_task_checkpoint(task, path, optimizer=None if args.no_resume_opt else optimizer,
                                       loss_scaler=None if args.no_resume_opt else loss_scaler,
                                       log_info=utils.is_primary(args))
    except (ValueError, KeyError) as e:
        raise UsageError(f'--resume {path}: its optimizer state does not fit this run ({e}); '
                         f'add --no-resume-opt to start the optimizer afresh') from None
    start = resume.epoch_start_from(checkpoint, args.rank, args.world_size)
    if start is not None:
        option_ranges.check_resumed_position(args, checkpoint, path)
    if start is None:
        return epoch or 0, None
    if utils.is_primary(args):
        _logger.info(f'Continuing epoch {start.epoch} after its batch {start.batches} ({start.updates} updates done; '
                     f'checkpoint restored in {time.perf_counter() - started:.2f} s).')
    return start.epoch, start


@dataclass
class Training:
    """Everything the epoch loop needs, built once by ``build``."""
    args: argparse.Namespace
    task: object
    optimizer: torch.optim.Optimizer
    loaders: Loaders
    setup: StepSetup
    output_dir: str
    checkpoint_path: str
    start_epoch: int = 0
    epoch_start: Optional[resume.EpochStart] = None  # where a checkpoint written mid-epoch continues
    lr_scheduler: object = None
    num_epochs: int = 0
    guard: RunGuard = field(default_factory=RunGuard)
    lock: Optional[run_folder.RunLock] = None
    saver: Optional[run_folder.AtomicCheckpointSaver] = None
    subnet_monitor: Optional[SubnetMonitor] = None
    limit: Optional[DivergenceLimit] = None  # the weight and loss bounds of a run that diverges
    tensorboard: Optional[plots.TensorBoardLog] = None
    results: list = field(default_factory=list)
    best: tuple = (None, None)

    @property
    def eval_metric(self) -> str:
        return self.args.eval_metric if self.loaders.eval is not None else 'loss'

    @property
    def decreasing(self) -> bool:
        return self.eval_metric == 'loss'

    @property
    def end_epoch(self) -> int:
        return min(self.num_epochs, self.args.stop_epoch or self.num_epochs)


def build(args) -> Training:
    """Model, data, task (the method), optimizer, resume, EMA, compile and DDP, in timm's order."""
    device = training_device(args)
    model_dtype = dtype_of(args)
    utils.random_seed(args.seed, args.rank)
    with downloads.model_download(args.model, args.pretrained, '--pretrained-path FILE'):
        model = build_model_explained(args)
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    num_aug_splits = args.aug_splits if args.aug_splits > 1 else 0
    patch_size = naflex_patch_size(model) if args.naflex_loader else None
    model = place_model(args, model, device, model_dtype, num_aug_splits)
    amp_autocast, loss_scaler = training_precision(args, device)
    with downloads.dataset_download(args.dataset, args.data_dir, args.dataset_download):
        loaders = build_loaders(args, data_config, device, model_dtype, num_aug_splits, patch_size)
    checks.check_dataset_classes(args, loaders.train)
    checks.check_eval_classes(args, loaders.train, loaders.eval)
    derive_lr(args, loaders.batch_size_reference)

    criterion = build_criterion(args, args.num_classes).to(device)
    task = method_class(args.method).from_args(args, model, criterion, device=device, dtype=model_dtype,
                                               input_size=data_config['input_size'], verbose=utils.is_primary(args))
    optimizer = build_optimizer(args, task)

    output_dir = os.path.join(args.output or './output/train',
                              run_folder.experiment_name(args, data_config['input_size'][-1]))
    checkpoint_path = resume_path(args, output_dir) if args.resume else ''
    start_epoch, epoch_start = restore(args, checkpoint_path, task, optimizer, loss_scaler) if checkpoint_path \
        else (0, None)
    if args.start_epoch is not None:  # overrides the checkpoint's, as in timm (summary.csv is trimmed there too)
        start_epoch, epoch_start = args.start_epoch, None
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if checkpoint_path:
            load_task_ema_checkpoint(task, checkpoint_path)
    if args.torchcompile:
        compile_task(task, compile_scope(args, method_class(args.method)), backend=args.torchcompile,
                     mode=args.torchcompile_mode, input_size=data_config['input_size'], verbose=utils.is_primary(args))
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)

    setup = StepSetup(device=device, amp_autocast=amp_autocast, loss_scaler=loss_scaler, model_dtype=model_dtype,
                      mixup_fn=loaders.mixup_fn, naflex=loaders.naflex, scheduled_batches=loaders.scheduled_batches,
                      batch_size_reference=loaders.batch_size_reference)
    training = Training(args, task, optimizer, loaders, setup, output_dir, checkpoint_path, start_epoch,
                        epoch_start)
    training.limit = DivergenceLimit.start(args.divergence_limit, unwrap_model(task.get_trainable_module()),
                                           args.num_classes)
    if loaders.eval is not None:
        try:
            training.subnet_monitor = SubnetMonitor.from_args(args, task, data_config['input_size'])
        except SubnetSpecError as e:  # a term this model cannot have (first:K past its last block)
            raise UsageError(str(e)) from None
    return training


def lock_experiment(args) -> Optional[run_folder.RunLock]:
    """Rank 0 of a named experiment locks its folder before anything is built: a second run on it stops at once."""
    if not (args.experiment and utils.is_primary(args)):
        return None
    return run_folder.RunLock(os.path.join(args.output or './output/train', args.experiment))


def open_run_folder(training: Training, args_text: str) -> None:
    """Rank 0: the locked run folder with args.yaml, log.txt, summary.csv (trimmed on resume) and the checkpoint
    saver. Then, on every rank, the guard of the run (built here and nowhere else)."""
    if utils.is_primary(training.args):
        open_primary_folder(training, args_text)
    training.guard = RunGuard.for_run(training.args, training.loaders.train, training.loaders.failures,
                                      training.epoch_start, training.saver)
    training.guard.limit = training.limit
    try:  # after the guard: a method's sampler wrapper goes above its resume cursor
        training.task.attach_train_loader(training.loaders.train)
    except ValueError as e:
        raise UsageError(f'--method {training.args.method}: {e}') from None


def open_primary_folder(training: Training, args_text: str) -> None:
    args, out = training.args, training.output_dir
    in_place = resumes_in(args, training.checkpoint_path, out)
    training.lock = run_folder.claim_output_dir(out, resuming_in_place=in_place, lock=training.lock)
    logs.log_to_file(os.path.join(out, 'log.txt'))
    with open(os.path.join(out, 'args.yaml'), 'w') as f:
        f.write(args_text)
    training.saver = run_folder.AtomicCheckpointSaver(
        model=training.task.get_trainable_module(), optimizer=training.optimizer, args=args,
        amp_scaler=training.setup.loss_scaler, checkpoint_dir=out, recovery_dir=out,
        decreasing=training.decreasing, max_history=args.checkpoint_hist, task=training.task)
    if in_place and training.checkpoint_path:
        training.saver.load_state_dict_from_checkpoint(training.checkpoint_path)
    trim_summary(os.path.join(out, 'summary.csv'), training.start_epoch)
    if args.log_wandb:
        start_wandb(args, os.path.basename(out))
    if args.log_tensorboard:
        training.tensorboard = plots.TensorBoardLog.open(os.path.join(out, 'tensorboard'))


def build_schedule(training: Training) -> None:
    """timm's scheduler (none for ``--sched none``), moved on to the start epoch. What the library warns of while
    building it (``--sched plateau`` is deprecated in 1.0.31) is logged once, into log.txt too."""
    args = training.args
    updates_per_epoch = (len(training.loaders.train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter('always', FutureWarning)
        training.lr_scheduler, training.num_epochs = create_scheduler_v2(
            training.optimizer, **scheduler_kwargs(args, decreasing_metric=training.decreasing),
            updates_per_epoch=updates_per_epoch)
    for message in dict.fromkeys(str(w.message) for w in warned):
        if utils.is_primary(args):
            _logger.warning(f'--sched {args.sched}: {message}')
    done_in_epoch = training.epoch_start.updates if training.epoch_start is not None else 0
    if training.lr_scheduler is not None and (training.start_epoch > 0 or done_in_epoch):
        if args.sched_on_updates:
            training.lr_scheduler.step_update(training.start_epoch * updates_per_epoch + done_in_epoch)
        else:
            training.lr_scheduler.step(training.start_epoch)
    if utils.is_primary(args) and training.lr_scheduler is None:
        _logger.info(f'Scheduled epochs: {training.num_epochs}. No LR schedule (--sched none): the optimizer keeps '
                     f'lr {args.lr:g}.')
    elif utils.is_primary(args):
        explain = ('(warmup_epochs + epochs + cooldown_epochs). Warmup added to total when warmup_prefix=True'
                   if args.warmup_prefix else
                   '(epochs + cooldown_epochs). Warmup within epochs when warmup_prefix=False')
        _logger.info(f'Scheduled epochs: {training.num_epochs} {explain}. '
                     f'LR stepped per {"epoch" if training.lr_scheduler.t_in_epochs else "update"}.')


# --------------------------------------------------------------------------------------------------- the loop

def evaluate_all(training: Training, evaluate_model: Callable) -> tuple:
    """The live model, the EMA (timm reports its metrics in eval_*) and the --subnet-eval subnets."""
    args, task = training.args, training.task
    task.before_eval(loader_images(training.loaders.train, training.setup.device, training.setup.model_dtype,
                                   args.channels_last))
    if training.loaders.eval is None:
        return None, {}
    eval_metrics, extra = evaluate_model(task.get_eval_model()), {}
    ema = task.get_trainable_module(ema=True)
    if ema is not None and not args.model_ema_force_cpu:
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(ema, args.world_size, args.dist_bn == 'reduce')
        extra = {f'model_{k}': v for k, v in eval_metrics.items()}
        eval_metrics = evaluate_model(task.get_eval_model(ema=True), log_suffix=' (EMA)')
    if training.subnet_monitor is not None:
        extra.update(training.subnet_monitor.columns(
            lambda subnet: evaluate_model(task.get_eval_model(), log_suffix=f' (subnet {subnet.name})')))
    return eval_metrics, extra


def end_of_epoch(training: Training, epoch: int, train_metrics: dict) -> None:
    """Evaluate, then (rank 0) the summary row, the logs, the checkpoints; then step the schedule."""
    args, setup = training.args, training.setup
    evaluate_model = partial(evaluate, loader=training.loaders.eval, args=args, device=setup.device,
                             amp_autocast=setup.amp_autocast, model_dtype=setup.model_dtype)
    eval_metrics, extra = evaluate_all(training, evaluate_model)
    for key, what in (('loss', 'evaluation loss'), ('model_loss', 'evaluation loss of the live model')):
        training.limit.check_loss(({**extra, **(eval_metrics or {})}).get(key), what, f'after epoch {epoch}')
    latest_metric = (eval_metrics or train_metrics)[training.eval_metric]
    saver = training.saver
    if saver is not None:
        lrs = [group['lr'] for group in training.optimizer.param_groups]
        row = run_folder.summary_row(epoch, train_metrics, eval_metrics, sum(lrs) / len(lrs), extra)
        with run_folder.stop_on_failed_write(training.output_dir, f'the summary row of epoch {epoch}'):
            run_folder.append_summary(os.path.join(training.output_dir, 'summary.csv'), row)
        if training.tensorboard is not None:
            training.tensorboard.log(epoch, row)
        if args.log_wandb:
            log_wandb(row)
        training.best = saver.save_checkpoint(epoch, metric=latest_metric)
        run_folder.remove_recovery_files(training.output_dir)  # last.pth.tar is further on than any of them
        if epoch + 1 in set(args.save_epochs or ()):
            saver.save_milestone(epoch + 1)
    if training.lr_scheduler is not None:
        training.lr_scheduler.step(epoch + 1, latest_metric)
    training.results.append({'epoch': epoch, 'train': train_metrics,
                             **({'validation': eval_metrics} if eval_metrics is not None else {})})


def skips_eval(training: Training, completed: int) -> bool:
    """timm's ``--val-interval``: no eval or checkpoint between intervals, except at the end and milestones."""
    args = training.args
    return bool(completed % args.val_interval) and completed not in (training.num_epochs, training.end_epoch) \
        and completed not in set(args.save_epochs or ())


def train_epochs(training: Training) -> None:
    args, task, loaders = training.args, training.task, training.loaders
    options = LoopOptions.from_args(args, naflex=loaders.naflex, output_dir=training.output_dir)
    for epoch in range(training.start_epoch, training.end_epoch):
        seed_epoch(args.seed, epoch, args.rank)
        set_loader_epoch(loaders.train, epoch)
        train_metrics = train_one_epoch(epoch, task, loaders.train, training.optimizer, options, training.setup,
                                        lr_scheduler=training.lr_scheduler, guard=training.guard)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            _logger.info('Distributing BatchNorm running means and vars')
            utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
        training.limit.check_weights(unwrap_model(task.get_trainable_module()).named_parameters(),
                                     f'at the end of epoch {epoch}')
        training.limit.check_loss(train_metrics.get('loss'), 'training loss', f'of epoch {epoch}')
        if skips_eval(training, epoch + 1):
            _logger.info('Skipping eval and checkpointing ')
            if training.lr_scheduler is not None:
                training.lr_scheduler.step(epoch + 1, metric=None)
        else:
            end_of_epoch(training, epoch, train_metrics)
        # a signal during the evaluation or checkpoint stops the run now that last.pth.tar holds the epoch (an
        # epoch that wrote no checkpoint, under --val-interval, stops after the next update instead)
        training.guard.after_checkpoint(epoch, os.path.join(training.output_dir, 'last.pth.tar'),
                                        going_on=epoch + 1 < training.end_epoch and not skips_eval(training, epoch + 1))


def say_finished(training: Training) -> None:
    """A resumed run with nothing left to train says so, and where its results are."""
    args, out = training.args, training.output_dir
    best = ''
    if training.saver is not None and training.saver.best_metric is not None:
        best = (f', best {training.eval_metric} {training.saver.best_metric:g} at epoch {training.saver.best_epoch} '
                f'in {os.path.join(out, "model_best.pth.tar")}')
    state = (f'is finished: epoch {training.start_epoch} of {training.num_epochs} done'
             if training.end_epoch >= training.num_epochs else
             f'stopped at --stop-epoch {args.stop_epoch}: epoch {training.start_epoch} of {training.num_epochs} '
             f'done (raise or drop --stop-epoch to go on)')
    _logger.info(f'Run {out} {state}; results in {os.path.join(out, "summary.csv")}{best}. Nothing to train.')


def report(training: Training) -> None:
    """timm's closing lines: the best metric and the ``--result`` JSON of the last ten epochs."""
    if training.best[0] is not None:
        _logger.info(f'*** Best metric: {training.best[0]} (epoch {training.best[1]})')
    if not utils.is_primary(training.args):
        return
    if training.tensorboard is not None:
        training.tensorboard.close()
    plots.summary_after_training(training.output_dir)
    metric = training.eval_metric
    ranked = sorted(training.results, key=lambda r: r.get('validation', r['train']).get(metric, 0),
                    reverse=training.decreasing)
    print(f'--result\n{json.dumps(ranked[-10:], indent=4)}')


@dataclass
class TrainRun:
    """What a finished run leaves behind, for scripts and tests that call ``run`` in-process."""
    args: argparse.Namespace
    task: object
    output_dir: str
    results: list


def run(argv=None) -> TrainRun:
    """Train as the command line says; exits 2 on a command line that does not parse, raises UsageError (or the
    library's InputError) on a configuration refused after it, RunStopped on a planned stop."""
    rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0)))
    logs.setup_logging(primary=rank == 0, to_file_later=True)
    try:
        return _train(argv)
    finally:
        logs.close_log_file()


def with_signal_status(failed: WriteFailed, signum: int) -> WriteFailed:
    """A failed checkpoint write after stop signal ``signum`` (the write it asked for, or one under way) still exits
    with 128 + the signal: the scheduler reads the status to tell a preemption from a failure."""
    if not signum:
        return failed
    return WriteFailed(f'{failed} (stopped by {signal.Signals(signum).name})', 128 + signum)


def _train(argv) -> TrainRun:
    args, args_text = _parse_args(argv)
    if args.plot_summary:  # a picture of a finished (or running) run, no training
        png = plots.plot_summary(args.plot_summary)
        _logger.info(f'Wrote {png}')
        return TrainRun(args, None, os.path.dirname(png), [])
    args.rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0)))
    preflight(args)
    on_command_line, in_config = train_option_sources(argv)
    use_default_device(args, device_given='device' in (on_command_line | in_config))
    limit_workers(args)
    args.prefetcher = not args.no_prefetcher
    locks = [lock_experiment(args)]
    try:
        training = build(args)
        log_global_batch(args, training.loaders.batch_size_reference, on_command_line, in_config)
        training.lock = locks[0]
        open_run_folder(training, args_text)
        locks.append(training.lock)
        build_schedule(training)
        if training.checkpoint_path and training.start_epoch >= training.end_epoch:
            say_finished(training)
        with training.guard:
            try:
                train_epochs(training)
            except WriteFailed as failed:
                raise with_signal_status(failed, training.guard.policy.signals.received) from None
    except RunStopped:
        if args.distributed:  # every rank stopped at the same update
            torch.distributed.destroy_process_group()
        raise
    finally:
        for lock in locks:
            if lock is not None:
                lock.release()
    if args.distributed:
        torch.distributed.destroy_process_group()
    report(training)
    return TrainRun(args, training.task, training.output_dir, training.results)


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


def log_wandb(row: dict) -> None:
    """The summary.csv row, as timm's ``update_summary`` logs it (lr included)."""
    import wandb
    wandb.log(dict(row))


def main(argv=None) -> int:
    """timm's ``main``: train as the command line (``sys.argv`` by default) says. Returns 0, or the exit status of a
    planned stop, with its one line (see the module docstring). A command line that does not parse exits 2
    (SystemExit); a configuration refused after parsing raises UsageError or InputError, both ValueError."""
    try:
        run(argv)
        return 0
    except RunStopped as e:
        print(f'train.py: {e}', file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before or after the training loop (it handles signals itself)
        print('train.py: interrupted outside the training loop, where there is nothing to save', file=sys.stderr)
        return 128 + signal.SIGINT


def cli(argv=None) -> int:
    """The command line: ``main``, with bad input as one ``train.py: error:`` line and exit status 2."""
    try:
        return main(argv)
    except (UsageError, InputError) as e:
        return report_bad_input('train.py', e)
    except SystemExit as e:  # the parse's own exit (its line already printed), or --help
        return e.code


if __name__ == '__main__':
    sys.exit(cli())
