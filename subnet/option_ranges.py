"""The valid range or choices of every option value, declared once and checked before anything is built.

timm's parsers take any number for a rate, any string for a schedule or optimizer name: a bad value trains nonsense
(``--reprob 1.5``, ``--momentum 2``, ``--weight-decay -1``, a negative ``--cooldown-epochs``) or ends in a traceback
after the model, the data and sometimes a whole epoch (``--sched bogus``, ``--eval-metric bogus``, ``--smoothing
1.5``). ``RANGES`` says what each option may be; ``check_ranges`` checks a parsed command line (train.py's or
validate.py's: the entries whose option the script has) and names the first value out of range in one line. Values
that are legal but unusual stay legal (``--cutmix 2``, ``--gkt-drop 1``). ``None`` (the model's or method's default)
is always allowed. Options that are wrong only together are checked where both facts are known (``check_together``
here for the command line alone; a resumed checkpoint's batch size in train.py).
"""
import argparse
import difflib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

from timm.data import str_to_interp_mode
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.optim import get_optimizer_info, list_optimizers

from .errors import UsageError

__all__ = ['Interval', 'OneOf', 'Values', 'RANGES', 'SCHEDULERS', 'check_ranges', 'check_together',
           'check_resumed_position']


@dataclass(frozen=True)
class Interval:
    """A number between ``low`` and ``high`` (open or closed ends); NaN is never in it."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def allows(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f'{">" if self.low_open else ">="} {self.low:g}'
        if self.low == -math.inf:
            return f'{"<" if self.high_open else "<="} {self.high:g}'
        return f'in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}{")" if self.high_open else "]"}'


@dataclass(frozen=True)
class OneOf:
    """A name from a list (``names``: a tuple, or a function for lists that come from timm's registries);
    ``accepts`` decides for names a list cannot hold (timm's ``lookahead_`` optimizer prefix)."""
    names: object
    what: str
    accepts: Optional[Callable[[str], bool]] = None

    def choices(self) -> Sequence[str]:
        return self.names() if callable(self.names) else self.names

    def allows(self, value) -> bool:
        return value in self.choices() or (self.accepts is not None and self.accepts(value))

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class Values:
    """A list option: each value in ``each``; ``counts``: how many values it may have; ``ordered``: non-decreasing
    (a min/max pair)."""
    each: Interval
    counts: Tuple[int, ...] = ()
    ordered: bool = False


def _accepted(lookup, name: str, rejects) -> bool:
    """Whether timm's ``lookup`` takes ``name`` (it raises one of ``rejects`` when it does not)."""
    try:
        lookup(name)
    except rejects:
        return False
    return True


def _optimizer_known(name: str) -> bool:
    """timm's create_optimizer_v2 reads ``lookahead_<name>`` as <name> wrapped in Lookahead, any letter case."""
    return _accepted(get_optimizer_info, name.lower().removeprefix('lookahead_'), ValueError)


def _interpolation(name: str) -> bool:
    return _accepted(str_to_interp_mode, name, KeyError)


def _augment_policy(name: str) -> bool:
    """Whether timm's transform factory can build ``--aa name``: it dispatches on the prefix (``rand``, ``augmix``,
    else the AutoAugment policies, ``3a`` among them), as here; a bad name fails there with an AssertionError."""
    params = dict(translate_const=100, img_mean=(124, 116, 104))
    try:
        if name.startswith('rand'):
            rand_augment_transform(name, params)
        elif name.startswith('augmix'):
            augment_and_mix_transform(name, dict(params, translate_pct=0.3))
        else:
            auto_augment_transform(name, params)
    except (AssertionError, ValueError, KeyError, IndexError):
        return False
    return True


# timm's create_scheduler_v2 (1.0.31) builds these; any other name raises there, after the model and data
SCHEDULERS = ('cosine', 'tanh', 'step', 'constant', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'none')
# the decay shapes timm 1.0.31's WSDLRScheduler takes (it raises ValueError for any other, after the model and data)
LR_DECAY_FNS = ('linear', '1-sqrt', 'cosine', 'power', 'exp')
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')

POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
AT_LEAST_ONE = Interval(1)
PROBABILITY = Interval(0, 1)
RATE = Interval(0, 1, high_open=True)  # a drop or smoothing rate: 1 would drop (or smooth away) everything
DECAY = Interval(0, 1)

RANGES = {
    # data and model
    '--batch-size': AT_LEAST_ONE, '--validation-batch-size': AT_LEAST_ONE, '--workers': NON_NEGATIVE,
    '--img-size': AT_LEAST_ONE, '--in-chans': AT_LEAST_ONE, '--num-classes': AT_LEAST_ONE,
    '--input-size': Values(AT_LEAST_ONE, counts=(3,)), '--crop-pct': Interval(0, 1, low_open=True),
    '--mean': Values(Interval()), '--std': Values(POSITIVE),
    '--interpolation': OneOf(('',) + INTERPOLATIONS, f"'' (the model's) or one of {', '.join(INTERPOLATIONS)}",
                             _interpolation),
    '--train-num-samples': AT_LEAST_ONE, '--val-num-samples': AT_LEAST_ONE, '--num-samples': AT_LEAST_ONE,
    '--grad-accum-steps': AT_LEAST_ONE, '--seed': Interval(0, 2 ** 32 - 1),
    # optimizer
    '--opt': OneOf(list_optimizers, "one of timm's optimizers (timm.optim.list_optimizers(), optionally with a "
                                    "lookahead_ prefix)", _optimizer_known),
    '--opt-eps': POSITIVE, '--opt-betas': Values(Interval(0, 1, high_open=True), counts=(2, 3)),
    '--momentum': Interval(0, 1, high_open=True), '--weight-decay': NON_NEGATIVE, '--clip-grad': POSITIVE,
    '--clip-mode': OneOf(('norm', 'value', 'agc'), 'norm, value or agc'),
    '--layer-decay': POSITIVE, '--layer-decay-min-scale': PROBABILITY, '--layer-decay-no-opt-scale': NON_NEGATIVE,
    # schedule
    '--sched': OneOf(SCHEDULERS, f"one of timm's schedulers: {', '.join(SCHEDULERS)}"),
    '--lr': POSITIVE, '--lr-base': POSITIVE, '--lr-base-size': AT_LEAST_ONE,
    '--lr-base-scale': OneOf(('', 'linear', 'sqrt'), "'' (by optimizer), linear or sqrt"),
    '--lr-noise': Values(NON_NEGATIVE, counts=(1, 2), ordered=True), '--lr-noise-pct': NON_NEGATIVE,
    '--lr-noise-std': NON_NEGATIVE, '--lr-cycle-mul': POSITIVE, '--lr-cycle-decay': POSITIVE,
    '--lr-cycle-limit': AT_LEAST_ONE, '--lr-k-decay': POSITIVE, '--warmup-lr': NON_NEGATIVE, '--min-lr': NON_NEGATIVE,
    '--epochs': AT_LEAST_ONE, '--epoch-repeats': NON_NEGATIVE, '--start-epoch': NON_NEGATIVE,
    '--decay-milestones': Values(NON_NEGATIVE, ordered=True), '--decay-epochs': POSITIVE,
    '--warmup-epochs': NON_NEGATIVE, '--cooldown-epochs': NON_NEGATIVE, '--patience-epochs': NON_NEGATIVE,
    '--decay-rate': POSITIVE, '--lr-decay-fn': OneOf(LR_DECAY_FNS, f"one of {', '.join(LR_DECAY_FNS)}"),
    '--lr-stable-timescale': POSITIVE,
    # augmentation, regularization, losses
    '--scale': Values(NON_NEGATIVE, counts=(2,), ordered=True), '--ratio': Values(POSITIVE, counts=(2,), ordered=True),
    '--aa': OneOf((), "a policy timm builds: rand-m9-mstd0.5 (RandAugment), augmix-m5-w4-d2, original, v0, 3a, ...",
                  _augment_policy),
    '--train-crop-mode': OneOf(('rrc', 'rkrc', 'rkrr'), 'rrc, rkrc or rkrr'),
    '--hflip': PROBABILITY, '--vflip': PROBABILITY, '--color-jitter': NON_NEGATIVE,
    '--color-jitter-prob': PROBABILITY, '--grayscale-prob': PROBABILITY, '--gaussian-blur-prob': PROBABILITY,
    '--aug-repeats': NON_NEGATIVE, '--aug-splits': NON_NEGATIVE,
    '--bce-target-thresh': PROBABILITY, '--bce-pos-weight': POSITIVE,
    '--reprob': PROBABILITY, '--remode': OneOf(('const', 'rand', 'pixel'), 'const, rand or pixel'),
    '--recount': AT_LEAST_ONE, '--mixup': NON_NEGATIVE, '--cutmix': NON_NEGATIVE,
    '--cutmix-minmax': Values(PROBABILITY, counts=(2,), ordered=True), '--mixup-prob': PROBABILITY,
    '--mixup-switch-prob': PROBABILITY, '--mixup-mode': OneOf(('batch', 'pair', 'elem'), 'batch, pair or elem'),
    '--mixup-off-epoch': NON_NEGATIVE, '--smoothing': RATE,
    '--multilabel-threshold': Interval(0, 1, low_open=True, high_open=True), '--loss-weight-power': NON_NEGATIVE,
    '--poly-gamma': NON_NEGATIVE,
    '--train-interpolation': OneOf(('random',) + INTERPOLATIONS, f"random or one of {', '.join(INTERPOLATIONS)}",
                                   _interpolation),
    '--drop': RATE, '--drop-connect': RATE, '--drop-path': RATE, '--drop-block': RATE,
    '--kd-temperature': POSITIVE, '--distill-loss-weight': NON_NEGATIVE, '--task-loss-weight': NON_NEGATIVE,
    # batch norm, EMA
    '--bn-momentum': PROBABILITY, '--bn-eps': POSITIVE,
    '--dist-bn': OneOf(('', 'broadcast', 'reduce'), "'', broadcast or reduce"), '--model-ema-decay': DECAY,
    # run control
    '--worker-seeding': OneOf(('all', 'part'), 'all or part'), '--log-interval': AT_LEAST_ONE,
    '--val-interval': AT_LEAST_ONE, '--recovery-interval': NON_NEGATIVE, '--checkpoint-hist': AT_LEAST_ONE,
    '--tta': NON_NEGATIVE, '--train-batches-per-epoch': AT_LEAST_ONE,
    '--train-img-sizes': Values(AT_LEAST_ONE), '--train-batch-sizes': Values(AT_LEAST_ONE),
    '--train-size-probs': Values(NON_NEGATIVE), '--train-size-schedule-spread': PROBABILITY,
    '--train-size-random-mix': PROBABILITY, '--stop-epoch': AT_LEAST_ONE, '--save-epochs': Values(AT_LEAST_ONE),
    '--naflex-train-seq-lens': Values(AT_LEAST_ONE), '--naflex-max-seq-len': AT_LEAST_ONE,
    '--naflex-patch-sizes': Values(AT_LEAST_ONE), '--naflex-patch-size-probs': Values(NON_NEGATIVE),
    # subnet's methods: the options they share, and method options no check_args looks at (each method's
    # check_args checks the rest of its own, with the method's reasons)
    '--subnet-temperature': POSITIVE, '--subnet-kd-weight': NON_NEGATIVE, '--subnet-bn-images': AT_LEAST_ONE,
    '--st-amplitude': POSITIVE, '--divergence-limit': Interval(1, low_open=True),
    # validate.py --export's timing (0: no timing)
    '--speed-batch': NON_NEGATIVE,
}


def _dest(flag: str) -> str:
    return flag.lstrip('-').replace('-', '_')


def _problem(rule, value) -> Optional[str]:
    """What is wrong with ``value`` under ``rule`` (None: nothing)."""
    if isinstance(rule, Values):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if rule.counts and len(values) not in rule.counts:
            return f'takes {" or ".join(map(str, rule.counts))} values, got {len(values)}'
        bad = next((v for v in values if not rule.each.allows(v)), None)
        if bad is not None:
            return f'values must each be {rule.each.describe()}, got {bad:g}'
        if rule.ordered and values != sorted(values):
            return f'values must be in increasing order, got {" ".join(f"{v:g}" for v in values)}'
        return None
    if rule.allows(value):
        return None
    if isinstance(rule, OneOf):
        close = difflib.get_close_matches(str(value), list(rule.choices()), n=3)
        return f'must be {rule.describe()}, got {value!r}' + (f' (closest: {", ".join(close)})' if close else '')
    return f'must be {rule.describe()}, got {value}'


def check_ranges(args: argparse.Namespace, flags: Optional[Sequence[str]] = None) -> None:
    """Every value of ``args`` that ``RANGES`` declares (or only those of ``flags``) is in its range: else one line
    naming the first that is not."""
    for flag, rule in RANGES.items():
        if flags is not None and flag not in flags:
            continue
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        problem = _problem(rule, value)
        if problem is not None:
            raise UsageError(f'{flag} {problem}')


def check_together(args: argparse.Namespace) -> None:
    """Values that are each in range but wrong together (what the command line alone tells)."""
    channels = getattr(args, 'in_chans', None) or (args.input_size[0] if getattr(args, 'input_size', None) else 3)
    for flag in ('--mean', '--std'):
        values = getattr(args, _dest(flag), None)
        if values is not None and len(values) not in (1, channels):
            raise UsageError(f'{flag} takes 1 value or one per input channel ({channels}), got {len(values)}')
    sched = getattr(args, 'sched', None)
    if sched == 'rsqrt' and not args.warmup_epochs and not args.lr_stable_timescale:
        raise UsageError('--sched rsqrt decays from the end of warmup: give it --warmup-epochs 1 or more (or '
                         '--lr-stable-timescale)')
    if sched in ('wsd', 'rsqrt'):
        _check_decay_phase(args)
    if sched == 'plateau' and args.sched_on_updates:
        raise UsageError('--sched plateau steps once per epoch (on the eval metric): drop --sched-on-updates')
    low, high = getattr(args, 'min_lr', None), getattr(args, 'lr', None)
    if low is not None and high is not None and low > high:
        raise UsageError(f'--min-lr {low:g} is above --lr {high:g}: the schedule would raise the learning rate')


def _check_decay_phase(args: argparse.Namespace) -> None:
    """wsd/rsqrt fit stable + decay into --epochs (less the warmup unless --warmup-prefix), as timm's
    create_scheduler_v2 does; a decay that does not fit is one line here instead of its ValueError after the build."""
    length = args.epochs if args.warmup_prefix else args.epochs - args.warmup_epochs
    within = '--epochs' if args.warmup_prefix else '--epochs - --warmup-epochs'
    if length <= 0:
        raise UsageError(f'--sched {args.sched} needs epochs after the warmup: {within} is {length}')
    decay = 0.2 if args.decay_epochs is None else args.decay_epochs
    decay_epochs = decay * length if 0 < decay < 1 else decay
    if not args.sched_on_updates:
        decay_epochs = round(decay_epochs)  # stepped per epoch: whole epochs
    if not 0 < decay_epochs <= length:
        raise UsageError(f'--sched {args.sched}: the decay phase (--decay-epochs {decay:g}, {decay_epochs:g} epochs) '
                         f'must be longer than 0 and at most {within} ({length}); a value below 1 is a fraction of it')


def check_resumed_position(args: argparse.Namespace, checkpoint: dict, path: str) -> None:
    """A checkpoint written mid-epoch counts the epoch's done part in batches of its run's batch size (and updates
    of its ``--grad-accum-steps``): the run that continues it must use the same, or it would skip other images."""
    written = checkpoint.get('args')
    position = checkpoint.get('epoch_position')
    if written is None or not position:
        return
    for flag in ('--batch-size', '--grad-accum-steps'):
        theirs, ours = getattr(written, _dest(flag), None), getattr(args, _dest(flag))
        if theirs is not None and theirs != ours:
            raise UsageError(f'--resume {path} stopped in epoch {position["epoch"]} after {position["batches"]} '
                             f'batches of {flag} {theirs}; this run has {flag} {ours}: continue with {flag} '
                             f'{theirs}, or resume from a checkpoint written at the end of an epoch')
