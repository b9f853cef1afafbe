"""BatchNorm running statistics when subnets share the full net's BN layers.

A subnet pass in training mode normalises with its own batch statistics (what it should do), but it also
folds them into the running statistics that evaluation uses, so the full net would be evaluated with a mix
of shallow-subnet statistics. Two remedies:

- ``frozen_running_stats``: subnet passes leave the running statistics alone (our default; EMA-safe);
- ``recalibrate``: re-estimate them with the full net on training images (the official ST code, before
  every evaluation); ``recalibrated`` does it for the time of a ``with`` block (``validate.py --bn-recal``
  per subnet) and puts the model's own statistics back.

LayerNorm models (ViT, ConvNeXt) need neither.
"""
import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Inside, BN layers still use batch statistics in training mode but do not update their running ones."""
    layers = batchnorm_layers(model)
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in layers]
    for m in layers:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[torch.Tensor], num_images: int) -> int:
    """Replace BN running statistics by their average over ``num_images`` training images; returns the count.

    Each batch is normalised with its own statistics (training mode) and PyTorch's cumulative average
    (``momentum=None``) averages the per-batch statistics. The official ST code (``set_running_statistics``,
    2048 images) weights batches by size and uses the biased variance; with equal batches (the last one is cut
    to size) the difference is the factor n/(n-1), n = values per channel per batch. Only the BN layers switch
    to training mode; dropout and drop-path stay as the model is (call it in eval mode).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(m, m.momentum, m.training) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for images in batches:
            if seen >= num_images:
                break
            images = images[:num_images - seen]
            model(images)
            seen += images.shape[0]
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return seen


@contextlib.contextmanager
def recalibrated(model: nn.Module, batches: Iterable[torch.Tensor], num_images: int) -> Iterator[int]:
    """BN running statistics re-estimated on ``num_images`` images inside, the model's own ones back on exit.

    Yields the number of images used (0 for a model without BatchNorm). Only the buffers change, in memory:
    the checkpoint file is never touched.
    """
    layers = batchnorm_layers(model)
    saved = [{name: buffer.clone() for name, buffer in layer.named_buffers(recurse=False)} for layer in layers]
    try:
        yield recalibrate(model, batches, num_images) if layers and num_images > 0 else 0
    finally:
        with torch.no_grad():
            for layer, buffers in zip(layers, saved):
                for name, value in buffers.items():
                    getattr(layer, name).copy_(value)
