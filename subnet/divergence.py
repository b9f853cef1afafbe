"""A run that diverges stops, even while its numbers stay finite.

A learning rate far too high with gradient clipping (``--lr 1e6 --clip-grad 1``) trains to a loss of 1e15 and weights
of 1e33 without a NaN: the non-finite checks (``finite.py``) never fire, and every checkpoint after that holds
garbage. The rule, with F = ``--divergence-limit`` (default 1000):

- a weight (parameter, or EMA weight) larger in magnitude than F times the largest weight magnitude the run started
  with (at least 1: a model whose weights start at 0 or 1e-6 may still grow to ordinary sizes);
- an epoch's training loss, or an evaluation loss, that is not finite or above F times ln(number of classes), the
  cross-entropy of a uniform guess (a trained model is far below it; 1000 times it is no longer learning);

stops the run with exit 3 before anything of it is saved: the run folder keeps its last good checkpoint. Checked at
the end of every epoch and before every checkpoint (recovery files included). ``--divergence-limit inf`` turns the
bounds off (a loss that is not finite still stops the run).
``--skip-nonfinite`` (single steps whose loss or gradients are not finite) is unchanged.
"""
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch

from .errors import EXIT_NONFINITE, RunStopped

__all__ = ['DEFAULT_LIMIT', 'DivergenceLimit']

DEFAULT_LIMIT = 1000.


def _largest(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> Tuple[str, float]:
    """(name, magnitude) of the floating-point tensor with the largest magnitude (('', 0.) for none); NaN counts as
    the largest. One host sync for all tensors."""
    names, maxima = [], []
    for name, tensor in named_tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel():
            names.append(name)
            maxima.append(tensor.detach().abs().max().float())
    if not maxima:
        return '', 0.
    stacked = torch.stack([m.to(maxima[0].device) for m in maxima]).nan_to_num(nan=math.inf)
    index = int(stacked.argmax())
    return names[index], float(maxima[index])


@dataclass
class DivergenceLimit:
    """The bounds of one run: ``factor`` x the starting weight scale, ``factor`` x ln(classes) for losses."""
    factor: float
    weight_scale: float
    loss_scale: float
    parameter_names: frozenset = frozenset()  # a checkpoint's weights to check (its buffers, e.g. BN statistics, not)

    @classmethod
    def start(cls, factor: float, model: torch.nn.Module, num_classes: int) -> 'DivergenceLimit':
        """The bounds for a run whose model starts (fresh, pretrained or resumed) as ``model`` is now."""
        _, largest = _largest(model.named_parameters())
        return cls(factor, max(1., largest), math.log(max(2, num_classes or 2)),
                   frozenset(name for name, _ in model.named_parameters()))

    def check_state(self, state: dict) -> None:
        """Stop (exit 3) before a checkpoint whose weights or EMA weights are beyond the bound is written."""
        for key, what in (('state_dict', 'weight'), ('state_dict_ema', 'the EMA weight')):
            weights = state.get(key) or {}
            self.check_weights(((k, v) for k, v in weights.items() if k in self.parameter_names),
                               'when saving a checkpoint', what)

    def check_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]], where: str, what: str = 'weight'):
        """Stop (exit 3) if a tensor is beyond the weight bound."""
        if math.isinf(self.factor):
            return
        name, largest = _largest(named_tensors)
        if not largest <= self.factor * self.weight_scale:
            self._stop(f'{what} {name} reaches {largest:.3g}, beyond --divergence-limit {self.factor:g} x the '
                       f'largest starting weight ({self.weight_scale:.3g}), {where}')

    def check_loss(self, loss: Optional[float], what: str, where: str) -> None:
        """Stop (exit 3) if ``loss`` is not finite or beyond the loss bound (None: not measured)."""
        if loss is None:
            return
        if not math.isfinite(loss):
            self._stop(f'the {what} is {loss} {where}')
        if not math.isinf(self.factor) and loss > self.factor * self.loss_scale:
            self._stop(f'the {what} is {loss:.3g} {where}, beyond --divergence-limit {self.factor:g} x '
                       f'{self.loss_scale:.3g} (the loss of a uniform guess)')

    @staticmethod
    def _stop(what: str) -> None:
        raise RunStopped(f'error: the run diverged: {what}: stopped without saving, the run folder keeps its last '
                         f'good checkpoint; lower --lr (or add --clip-grad), or loosen --divergence-limit',
                         EXIT_NONFINITE)
