"""Back-propagation and the optimizer step, exactly as timm's train.py does them, shared by the loop and the methods.

A method that must back-propagate inside its forward (several passes per step, each freed right after its
backward; or a pass whose backward has to run while its subnet is installed, as grad checkpointing recomputes
blocks) calls ``early`` / ``final`` on the ``StepBackward`` the loop gives it: the same AMP scaling,
accumulation division, clipping and optimizer step as the loop's own backward, so there is still one optimizer
step (and one gradient all-reduce) per step. Both the loop (``subnet/loop.py``) and the methods
(``subnet/methods/``) import this module; neither imports the other.

With ``--skip-nonfinite N`` a step whose gradients are not finite is not applied (``StepBackward.skipped``); the
loop counts such steps. With the fp16 grad scaler the scaler already skips them, as in timm.
"""
import torch
from timm import utils

from .finite import grads_finite

__all__ = ['StepBackward', 'backward_and_step']


def backward_and_step(loss: torch.Tensor, task, optimizer, args, loss_scaler=None, need_update: bool = True,
                      second_order: bool = False) -> bool:
    """timm's backward + (clipped) optimizer step, through the AMP grad scaler when there is one.

    Returns False when the step was not applied because its gradients are not finite (``--skip-nonfinite``).
    """
    clip_parameters = None
    if args.clip_grad is not None:
        clip_parameters = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=clip_parameters, create_graph=second_order, need_update=need_update)
        return True
    loss.backward(create_graph=second_order)
    if need_update:
        if getattr(args, 'skip_nonfinite', 0) and not grads_finite(optimizer):
            optimizer.zero_grad()
            return False
        if args.clip_grad is not None:
            utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
        optimizer.step()
    return True


class StepBackward:
    """Back-propagation of one step's passes, for methods that back-propagate inside their forward.

    ``early(loss)``: a pass whose gradients are only accumulated (DDP decides at *forward* time whether a pass
    all-reduces, so run such a pass, forward and backward, inside ``task.no_sync()``). ``final(loss)``: the last
    pass of the step, outside ``no_sync``; it also clips and steps the optimizer when the loop's accumulation
    window ends. Without an optimizer (a task used outside the loop, e.g. in tests) both just back-propagate.
    """

    def __init__(self, task=None, optimizer=None, args=None, loss_scaler=None, second_order: bool = False):
        self.task, self.optimizer, self.args = task, optimizer, args
        self.loss_scaler = loss_scaler
        self.second_order = second_order
        self.scale = 1.0  # 1 / accumulation steps, times the variable-batch loss scale
        self.need_update = False
        self.skipped = False  # this step's gradients were not finite and were not applied

    def early(self, loss: torch.Tensor) -> None:
        loss = loss * self.scale
        if self.loss_scaler is not None:
            # timm's scaler back-propagates the scaled loss and, with need_update=False, does nothing else
            self.loss_scaler(loss, self.optimizer, create_graph=self.second_order, need_update=False)
        else:
            loss.backward(create_graph=self.second_order)

    def final(self, loss: torch.Tensor) -> None:
        if self.optimizer is None:
            loss.backward()
            return
        applied = backward_and_step(loss * self.scale, self.task, self.optimizer, self.args, self.loss_scaler,
                                    self.need_update, self.second_order)
        self.skipped = not applied

