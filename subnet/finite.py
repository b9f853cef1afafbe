"""Non-finite numbers: gradients checked before an optimizer step (``--skip-nonfinite``), weights before a save
(``check_state_finite``, on the state a checkpoint is about to write).

The loss itself is checked by the loop on the value it already reads for its meters (``.item()``), so the default
policy (stop at the first non-finite loss) adds nothing to a step. Skipping a step instead must decide before the
optimizer step, on the gradients: that is one host sync per step, paid only with ``--skip-nonfinite``. Under DDP the
gradients are the all-reduced ones, the same on every rank, so every rank skips the same steps.
"""
import math
from typing import Iterable, Optional, Tuple

import torch

from .errors import EXIT_NONFINITE, RunStopped

__all__ = ['grads_finite', 'first_nonfinite', 'check_state_finite']


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (the largest magnitude is: NaN and inf propagate)."""
    grads = [p.grad for group in optimizer.param_groups for p in group['params'] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)))


def first_nonfinite(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in named_tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_state_finite(state: dict) -> None:
    """Stop the run (exit 3) before a checkpoint is written if a weight or buffer in its state (``state_dict``, and
    ``state_dict_ema`` when there is one) is not finite: no checkpoint ever holds one."""
    for key, what in (('state_dict', 'weight'), ('state_dict_ema', 'the EMA weight')):
        bad = first_nonfinite((state.get(key) or {}).items())
        if bad is not None:
            raise RunStopped(f'error: {what} {bad} is not finite: no checkpoint written, the run folder keeps its '
                             f'last good one', EXIT_NONFINITE)
