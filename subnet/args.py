"""The options subnet adds to timm's train.py: the submodel method group and reporting.

They live in new namespaces (``--method``, ``--cosub-*``, ``--st-*``, ``--gkt-*``, ``--plot-summary``,
``--subnet-eval``, ``--log-tensorboard``), so none of them makes an abbreviation of a timm option
ambiguous. As with every option, the YAML key is the underscore name (``method: cosub``).
"""
import argparse

from .evaluation import SPEC_HELP, subnet_spec

METHODS = ('none', 'cosub', 'st', 'st++', 'gkt')


def add_method_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Submodel method (subnet)')
    g.add_argument('--method', default='none', choices=METHODS,
                   help="submodel training method; 'none' is plain timm training (default: none)")

    g = parser.add_argument_group('cosub: co-training of two stochastic-depth submodels (Touvron et al. 2023)')
    g.add_argument('--cosub-label-weight', type=float, default=0.5, metavar='LAMBDA',
                   help='weight of the label terms; the peer terms get 1 - LAMBDA (default: 0.5, the paper)')
    g.add_argument('--cosub-impl', default='skip', choices=('skip', 'mask', 'timm'),
                   help="'skip': dropped blocks are not computed for the rows that drop them (fast, default); "
                        "'mask': same masks, branches multiplied (full cost); 'timm': timm's own per-branch "
                        "DropPath, DeiT's implementation")
    g.add_argument('--cosub-drop-schedule', default='linear', choices=('linear', 'constant'),
                   help="per-block drop-path rates: timm's linear ramp to --drop-path, or DeiT III's constant "
                        "rate (default: linear)")

    g = parser.add_argument_group('st / st++: stimulative training (Ye et al. 2022, 2023); defaults per method')
    g.add_argument('--st-subnets', type=int, default=None, metavar='K',
                   help='subnets sampled per step, their KL terms summed (st: 1, st++: 6)')
    g.add_argument('--st-min-keep', type=int, default=None, metavar='M',
                   help='each stage keeps at least min(depth, M) blocks (st: 1, st++: 3, the official space3)')
    g.add_argument('--st-loss', default=None, choices=('kl', 'kl-'),
                   help="'kl' (ST) or the direction-only 'kl-' on standardised logits (ST++) (st: kl, st++: kl-)")
    g.add_argument('--st-norm-ce', default=None, action=argparse.BooleanOptionalAction,
                   help="full net's label loss on the standardised logits, as the official ST++ code does "
                        "(default: on with kl-)")
    g.add_argument('--st-min-size', type=float, default=None, metavar='FRACTION',
                   help='subnet inputs are resized to a random side in [FRACTION * crop, crop] (st: 1.0, st++: 0.43)')
    g.add_argument('--st-temperature', type=float, default=1.0, metavar='T', help='distillation temperature')
    g.add_argument('--st-amplitude', type=float, default=1.0, metavar='A', help='scale of the standardised logits')
    g.add_argument('--st-kl-weight', type=float, default=1.0, help='weight of each subnet KL term (default: 1)')
    g.add_argument('--st-bn', default='freeze', choices=('freeze', 'recal'),
                   help="BatchNorm running statistics: 'freeze' them during subnet passes (default), or 'recal' "
                        "them with the full net before each evaluation (the official code)")
    g.add_argument('--st-recal-images', type=int, default=2048, metavar='N',
                   help='training images for --st-bn recal (default: 2048, the official code)')

    g = parser.add_argument_group('gkt: group knowledge training (Tang et al. 2024; a reconstruction)')
    g.add_argument('--gkt-groups', type=int, default=3, metavar='G', help='nested subnets per loop (default: 3)')
    g.add_argument('--gkt-loops', type=int, default=2, metavar='R', help='sampling loops per step (default: 2)')
    g.add_argument('--gkt-drop', type=float, default=0.2, metavar='Q',
                   help="a child subnet drops each of its parent's blocks with probability Q (default: 0.2)")
    g.add_argument('--gkt-ema', type=float, default=0.5, metavar='BETA',
                   help='group knowledge: weight of the newest subnet logits in the EMA (default: 0.5)')
    g.add_argument('--gkt-temperature', type=float, default=1.0, metavar='T', help='distillation temperature')
    g.add_argument('--gkt-weight', type=float, default=1.0, help='weight of each subnet KL term (default: 1)')
    g.add_argument('--gkt-bn', default='freeze', choices=('freeze', 'recal'),
                   help='BatchNorm running statistics during subnet passes, as --st-bn')
    g.add_argument('--gkt-recal-images', type=int, default=2048, metavar='N', help='images for --gkt-bn recal')


def add_report_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Reporting (subnet)')
    g.add_argument('--subnet-eval', default=None, type=subnet_spec, metavar='SPEC',
                   help='at every eval also evaluate these fixed subnets of the live model and append their top-1 '
                        'to summary.csv as subnet_<name>_top1 (BN statistics as trained, no recalibration); '
                        f'SPEC: {SPEC_HELP}; off by default')
    g.add_argument('--plot-summary', default='', metavar='RUN',
                   help='only write RUN/summary.png from RUN/summary.csv (RUN: a run folder or its summary.csv) '
                        'and exit without training; every run writes it at its end anyway (needs matplotlib)')
    g.add_argument('--log-tensorboard', action='store_true', default=False,
                   help="also log the summary.csv numbers to TensorBoard, in the run folder's tensorboard/ "
                        '(needs tensorboard)')


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Everything train.py accepts beyond timm's options."""
    add_method_options(parser)
    add_report_options(parser)


def add_validate_options(parser: argparse.ArgumentParser) -> None:
    """Everything validate.py accepts beyond timm's options: subnet evaluation and its picture."""
    g = parser.add_argument_group('Subnet evaluation (subnet)')
    g.add_argument('--subnets', default=None, type=subnet_spec, metavar='SPEC',
                   help='evaluate the full net and these subnets, one result row each (with subnet, depths, '
                        f'blocks, kept_fraction, flop_fraction, bn_recal); random subsets are drawn from --seed; '
                        f'SPEC: {SPEC_HELP}')
    g.add_argument('--bn-recal', type=int, default=0, metavar='N',
                   help='re-estimate the BatchNorm statistics of each subnet on N training images before '
                        "evaluating it (ST's code uses 2048); the full net keeps the checkpoint's, the checkpoint "
                        'file is never changed (default: 0, off: measure the checkpoint as it is, no training '
                        'data needed)')
    g.add_argument('--bn-recal-split', default='train', metavar='NAME',
                   help='split of --data-dir the --bn-recal images come from (a seeded random sample), read with '
                        'the evaluation transforms: the statistics of the inputs being evaluated, the same every '
                        'run (default: train)')
    g.add_argument('--plot', default='', metavar='FILE.png',
                   help='draw top-1 against FLOPs of the --subnets rows, one colour per checkpoint (a folder or '
                        "a glob pattern in --checkpoint gives several) (needs matplotlib)")
