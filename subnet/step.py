"""The training step as a protocol between the epoch loop and a task (a method).

The loop decides what a step is and hands it to the task as a ``Step``: the autocast to run forward passes in,
the loss scale (1 / accumulation steps, times timm's variable-batch scale), whether this batch ends an update, and
the ``Update`` that back-propagates and applies it. The task runs its passes (``Method.train_step``): each forward
pass under ``step.autocast()``, each pass's loss handed to ``step.backward(loss)`` *outside* autocast (as timm's
train.py and PyTorch's AMP documentation do it) and while its subnet is still installed (grad checkpointing
recomputes blocks in backward). When the task returns, the loop calls ``Update.apply``: clipping and the optimizer
step, in this one place, outside autocast; it returns whether the update was applied.

A ``Step()`` with no ``Update`` just back-propagates every pass: a task called on its own (``task(input, target)``,
tests, another training loop) leaves the optimizer to its caller.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from timm import utils

from .finite import grads_finite

__all__ = ['Step', 'Update']


class Update:
    """How an update is applied: timm's backward (through its AMP grad scaler when there is one), clipping and
    optimizer step. ``skip_nonfinite``: an update whose gradients are not finite is dropped (without a grad
    scaler; the scaler skips those itself, as in timm)."""

    def __init__(self, task, optimizer: torch.optim.Optimizer, loss_scaler=None, clip_grad: Optional[float] = None,
                 clip_mode: str = 'norm', skip_nonfinite: int = 0):
        self.task, self.optimizer, self.loss_scaler = task, optimizer, loss_scaler
        self.clip_grad, self.clip_mode, self.skip_nonfinite = clip_grad, clip_mode, skip_nonfinite
        self.second_order = getattr(optimizer, 'is_second_order', False)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of an already scaled loss (the grad scaler multiplies it by its scale)."""
        if self.loss_scaler is not None:
            # timm's scaler with need_update=False back-propagates the scaled loss and does nothing else
            self.loss_scaler(loss, self.optimizer, create_graph=self.second_order, need_update=False)
        else:
            loss.backward(create_graph=self.second_order)

    def apply(self) -> bool:
        """Clip and step the optimizer on the accumulated gradients; False when the update was not applied because
        its gradients are not finite (``--skip-nonfinite``)."""
        parameters = None
        if self.clip_grad is not None:
            parameters = self.task.get_clip_parameters(exclude_head='agc' in self.clip_mode)
        if self.loss_scaler is not None:
            self._scaled_step(parameters)
            return True
        if self.skip_nonfinite and not grads_finite(self.optimizer):
            self.optimizer.zero_grad()
            return False
        if parameters is not None:
            utils.dispatch_clip_grad(parameters, value=self.clip_grad, mode=self.clip_mode)
        self.optimizer.step()
        return True

    def _scaled_step(self, parameters) -> None:
        """The second half of timm's ``NativeScaler.__call__`` (unscale for clipping, clip, step, update the scale).
        timm joins it to the backward of the last pass; its torch ``GradScaler`` (``NativeScaler._scaler``, the one
        private member reached here; ``tests/test_timm_private.py`` pins it) lets the step run on its own, after
        the task's passes."""
        scaler = self.loss_scaler._scaler
        if parameters is not None:
            scaler.unscale_(self.optimizer)
            utils.dispatch_clip_grad(parameters, self.clip_grad, mode=self.clip_mode)
        scaler.step(self.optimizer)
        scaler.update()


@dataclass
class Step:
    """What the loop decided for one loader batch, handed to ``task.train_step``."""
    autocast: Callable[[], ContextManager] = contextlib.nullcontext  # wrap forward passes (and their losses) only
    loss_scale: float = 1.0  # 1 / accumulation steps, times the variable-batch loss scale
    updates: bool = True  # this batch ends an accumulation window: the loop applies the update after the task
    update: Optional[Update] = None  # how passes are back-propagated; None: plain ``loss.backward()``

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one pass's loss; call it outside ``autocast`` (and inside ``no_sync`` for every pass
        but the step's last, so DDP all-reduces once per step)."""
        if self.update is None:
            loss.backward()
        else:
            self.update.backward(loss * self.loss_scale)
