"""Device and precision set-up shared by train.py and validate.py, as timm's scripts do it.

- ``--device cuda`` on a machine without a GPU falls back to the CPU (timm asserts instead): quietly, with one
  info line, when 'cuda' is only timm's default, with a warning when the user asked for it;
- loader workers are capped at the CPUs the process may use (torch warns, twice, and oversubscribes them);
- on CUDA, TF32 matmuls and cuDNN autotuning are switched on, as timm's scripts do;
- ``--amp`` is ``torch.autocast`` in ``--amp-dtype``; train.py adds timm's ``NativeScaler`` for float16 on CUDA
  and on the CPU (timm's train.py only on CUDA).
"""
import importlib
import logging
import os
from contextlib import suppress
from functools import partial
from typing import Callable, Optional, Tuple

import torch
from timm import utils
from timm.utils import NativeScaler

from . import elastic
from .errors import UsageError

__all__ = ['check_precision_args', 'model_dtype', 'use_default_device', 'fall_back_to_cpu', 'limit_workers',
           'training_device', 'validation_device', 'autocast_for', 'training_precision']

_logger = logging.getLogger('train')

_MODEL_DTYPES = ('float32', 'float16', 'bfloat16')
_AMP_DTYPES = ('float16', 'bfloat16')
_SCALED_DEVICES = ('cuda', 'cpu')  # where float16 AMP gets a grad scaler (timm: CUDA only)


def check_precision_args(args, amp_needs_fp32_model: bool = False) -> None:
    """One line for a precision option neither script can use."""
    if args.model_dtype and args.model_dtype not in _MODEL_DTYPES:
        raise UsageError(f'--model-dtype must be float32, float16 or bfloat16, got {args.model_dtype}')
    if args.amp and args.amp_dtype not in _AMP_DTYPES:
        raise UsageError(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype}')
    if amp_needs_fp32_model and args.amp and args.model_dtype not in (None, 'float32'):
        raise UsageError('--amp needs a float32 model (drop --model-dtype)')


def model_dtype(args) -> Optional[torch.dtype]:
    return getattr(torch, args.model_dtype) if args.model_dtype else None


def use_default_device(args, device_given: bool) -> None:
    """timm's default ``--device cuda`` on a machine without a GPU: the CPU, with one info line, so the documented
    CPU quickstart runs without a warning. A ``--device`` the user gave is left to ``fall_back_to_cpu``."""
    if not device_given and args.device == 'cuda' and not torch.cuda.is_available():
        _logger.info('No CUDA GPU found: running on the CPU.')
        args.device = 'cpu'


def limit_workers(args) -> None:
    """At most one loader worker per CPU this process may use (torch only warns, once per loader)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    if cpus and args.workers > cpus:
        _logger.info(f'--workers {args.workers} lowered to {cpus}, the number of CPUs this process may use.')
        args.workers = cpus


def fall_back_to_cpu(args, what: str) -> None:
    """``--device cuda`` without a GPU: the CPU, with a warning (timm's scripts stop with an assertion)."""
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        _logger.warning(f'--device {args.device} asked for but no CUDA GPU is present: {what} on the CPU.')
        args.device = 'cpu'


def _fast_cuda_math() -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def training_device(args) -> torch.device:
    """timm's ``init_distributed_device`` (torchrun / SLURM environment, NCCL on GPUs, gloo on CPUs)."""
    for module in args.device_modules or ():
        importlib.import_module(module)
    fall_back_to_cpu(args, 'training')
    args.dist_url = elastic.dist_url(getattr(args, 'dist_url', None))  # torchrun restarts: keys per attempt
    device = utils.init_distributed_device(args)
    _fast_cuda_math()
    if args.distributed:
        _logger.info(f'Training in distributed mode with multiple processes, 1 device per process. '
                     f'Process {args.rank}, total {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on 1 device ({args.device}).')
    return device


def validation_device(args) -> torch.device:
    fall_back_to_cpu(args, 'validating')
    _fast_cuda_math()
    return torch.device(args.device)


def autocast_for(args, device: torch.device) -> Callable:
    """A context-manager factory: ``torch.autocast`` in ``--amp-dtype`` with ``--amp``, else a no-op."""
    if not args.amp:
        return suppress
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype)


def training_precision(args, device: torch.device) -> Tuple[Callable, Optional[NativeScaler]]:
    """timm's AMP for training: autocast, and timm's grad scaler for float16 on CUDA and, unlike timm, on the CPU.

    float16 gradients underflow without loss scaling wherever they are computed; timm's train.py scales only on
    CUDA, and its ``NativeScaler`` takes the device, so the CPU gets ``torch.amp.GradScaler('cpu')`` through it.
    """
    if not args.amp:
        _logger.info(f'AMP not enabled. Training in {args.model_dtype or torch.float32}.')
        return suppress, None
    scaler = None
    if device.type in _SCALED_DEVICES and args.amp_dtype == 'float16':
        scaler = NativeScaler(device=device.type)
    _logger.info('Using native Torch AMP. Training in mixed precision.')
    if scaler is not None and device.type != 'cuda':
        _logger.info(f"float16 on the {device.type.upper()}: gradients scaled by torch.amp.GradScaler('{device.type}') "
                     f'(timm scales only on CUDA).')
    return autocast_for(args, device), scaler
