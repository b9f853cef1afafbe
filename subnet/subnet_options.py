"""The options subnet adds to timm's scripts: method selection, each method's group, reporting, subnet evaluation.

They live in new namespaces (``--method*``, ``--cosub-*``, ``--st-*``, ``--gkt-*``, ``--subnet-*``,
``--plot-summary``, ``--log-tensorboard``, ``--bad-image-limit``, ``--skip-nonfinite``, ``--recovery-minutes``,
``--divergence-limit``), so
none of them makes an abbreviation of a timm option ambiguous (``--recovery`` stays timm's ``--recovery-interval``,
see ``OneLineParser``). As with every option, the YAML key is the underscore name (``method: cosub``); an
option's other spellings are YAML keys too (``dr`` for timm's ``--decay-rate``). The methods' own groups come from
the method registry.
"""
import argparse

from .divergence import DEFAULT_LIMIT
from .methods import add_method_options, method_names
from .spec import spec_help, subnet_spec


def _method_selection(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Submodel method (subnet)')
    g.add_argument('--method', default='none', choices=method_names(),
                   help="submodel training method; 'none' is plain timm training (default: none)")
    g.add_argument('--extra-methods', default=None, nargs='+', metavar='MODULE',
                   help='import these python modules first, so the methods they register can be chosen with '
                        '--method (docs/extending.md)')


def add_model_and_data_options(parser: argparse.ArgumentParser) -> None:
    """What the papers' recipes need and timm's train.py cannot say."""
    g = parser.add_argument_group('Model and data (subnet)')
    g.add_argument('--drop-schedule', default=None, choices=('linear', 'constant'),
                   help="per-block drop-path rates of the model: timm's linear ramp from 0 to --drop-path, or "
                        "DeiT III's constant --drop-path in every block (default: the method's; constant for "
                        "cosub, as DeiT III, linear otherwise, as timm)")
    g.add_argument('--recipe-global-batch', type=_non_negative_int, default=None, metavar='N',
                   help="the global batch (per-process batch x processes x --grad-accum-steps) a recipe's absolute "
                        '--lr was tuned for; a run at another one warns with the scaled rate (default: none)')
    g.add_argument('--force-color-jitter', action='store_true', default=False,
                   help="keep --color-jitter when --aa is set: timm's transform factory drops it then (the official "
                        "ST++ 400-epoch run uses both)")


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    """What ``--torchcompile`` compiles (subnet/compile.py)."""
    g = parser.add_argument_group('torch.compile (subnet)')
    g.add_argument('--compile-scope', default=None, choices=('model', 'blocks'),
                   help="under --torchcompile: the whole 'model' (timm's), or each residual 'blocks' and the "
                        'modules around them, so that a new subnet compiles nothing (default: the method\'s: '
                        'blocks for st, st++ and gkt, whose subnet changes every step; model for none and cosub)')


def add_report_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Reporting (subnet)')
    g.add_argument('--subnet-eval', default=None, type=subnet_spec, metavar='SPEC',
                   help='at every eval also evaluate these fixed subnets of the live model and append their top-1 '
                        'to summary.csv as subnet_<name>_top1 (_map with --task multilabel; BN statistics as '
                        'trained, no recalibration); '
                        f'SPEC: {spec_help()}; off by default')
    g.add_argument('--plot-summary', default='', metavar='RUN',
                   help='only write RUN/summary.png from RUN/summary.csv (RUN: a run folder or its summary.csv) '
                        'and exit without training; every run writes it at its end anyway (needs matplotlib)')
    g.add_argument('--log-tensorboard', action='store_true', default=False,
                   help="also log the summary.csv numbers to TensorBoard, in the run folder's tensorboard/ "
                        '(needs tensorboard)')


def _fraction_or_count(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f'must be a count >= 1, a fraction in [0, 1), or 0; got {text}')
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
    return value


def add_long_run_options(parser: argparse.ArgumentParser) -> None:
    """What keeps a long run alive: unreadable images, non-finite steps, timed recovery checkpoints."""
    g = parser.add_argument_group('Long runs (subnet)')
    g.add_argument('--bad-image-limit', type=_fraction_or_count, default=0.01, metavar='N|F',
                   help='unreadable training images are replaced by the next readable one, named once in the log '
                        'and counted (summary.csv: train_unreadable_images); more than N (>= 1) or than a fraction '
                        'F (< 1) of an epoch\'s images in one epoch stops the run: the dataset, not a file, is '
                        'broken then; 0 stops at the first (default: 0.01)')
    g.add_argument('--skip-nonfinite', type=_non_negative_int, default=0, metavar='N',
                   help='skip up to N optimizer steps per epoch whose gradients are not finite (not applied, '
                        'counted in summary.csv: train_nonfinite_steps) and stop at the next one; costs one host '
                        'sync per step on a GPU (default: 0: stop at the first non-finite loss, checked on the '
                        'value logging reads anyway, without saving)')
    g.add_argument('--recovery-minutes', type=_non_negative_float, default=0., metavar='M',
                   help='also write a recovery checkpoint every M minutes of training (rank 0\'s clock), which '
                        '--resume auto continues from mid-epoch; like --recovery-interval (in updates), it is '
                        'removed once the epoch\'s checkpoint is written (default: 0, off)')
    g.add_argument('--divergence-limit', type=float, default=DEFAULT_LIMIT, metavar='F',
                   help='stop (exit 3, nothing saved) when a weight grows beyond F x the largest starting weight '
                        'magnitude (at least 1), or an epoch\'s training or evaluation loss beyond F x ln(classes), '
                        'the loss of a uniform guess: a diverged run that stays finite; inf turns the bounds off '
                        '(default: 1000)')


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Everything train.py accepts beyond timm's options."""
    _method_selection(parser)
    add_method_options(parser)
    add_model_and_data_options(parser)
    add_compile_options(parser)
    add_report_options(parser)
    add_long_run_options(parser)


def add_validate_options(parser: argparse.ArgumentParser) -> None:
    """Everything validate.py accepts beyond timm's options: subnet evaluation and its picture."""
    g = parser.add_argument_group('Subnet evaluation (subnet)')
    g.add_argument('--subnets', default=None, type=subnet_spec, metavar='SPEC',
                   help='evaluate the full net and these subnets, one result row each (with subnet, depths, '
                        f'blocks, kept_fraction, flop_fraction, bn_recal); random subsets are drawn from --seed; '
                        f'SPEC: {spec_help()}')
    g.add_argument('--bn-recal', type=int, default=0, metavar='N',
                   help='re-estimate the BatchNorm statistics of every evaluated net, the full net included, on N '
                        "training images before evaluating it (ST's code uses 2048), so that all rows compare; the "
                        'checkpoint file is never changed (default: 0, off: measure the checkpoint as it is, no '
                        'training data needed)')
    g.add_argument('--bn-recal-split', default='train', metavar='NAME',
                   help='split of --data-dir the --bn-recal images come from (a seeded random sample), read with '
                        'the evaluation transforms: the statistics of the inputs being evaluated, the same every '
                        'run (default: train)')
    g.add_argument('--plot', default='', metavar='FILE.png',
                   help='draw top-1 against FLOPs of the --subnets rows, one colour per checkpoint (a folder or '
                        "a glob pattern in --checkpoint gives several) (needs matplotlib)")
    g.add_argument('--plot-x', default='flops', choices=('flops', 'latency'),
                   help="--plot's x-axis: the subnets' FLOPs, or their measured time per image at --speed-batch "
                        '(needs --export), both in percent of the full net (default: flops)')
    g.add_argument('--export', default='', metavar='DIR',
                   help='write each --subnets subnet into DIR as a checkpoint that plain timm loads '
                        "(timm.create_model(NAME, layers=.../depth=.../depths=..., checkpoint_path=FILE), the call "
                        'is printed and in the result rows), with the BatchNorm statistics --bn-recal estimated; '
                        'then time each exported model against the full net (docs/export.md)')
    g.add_argument('--speed-batch', type=int, default=32, metavar='N',
                   help='--export times the models at batch 1 and at batch N (img_per_s, speedup columns); '
                        '0: do not time them (default: 32)')
