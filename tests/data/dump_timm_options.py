#!/usr/bin/env python3
"""Make the option reference our parsers are tested against: timm 1.0.31's train.py / validate.py options as JSON.

timm 1.0.31's scripts are published nowhere we could reach (neither its wheel nor its sdist ships them, and the
GitHub mirror stops at main aa4b5850, 1.0.29.dev0). So the reference is made in two steps:

1. ``dump``: import a timm script from a checkout of huggingface/pytorch-image-models and record its parsers
   (the files were dumped from main at aa4b5850 with the timm 1.0.31 library installed):

       python tests/data/dump_timm_options.py dump /path/to/pytorch-image-models/train.py > tests/data/timm_train_options.json
       python tests/data/dump_timm_options.py dump /path/to/pytorch-image-models/validate.py > tests/data/timm_validate_options.json

2. ``add-1031``: apply what timm 1.0.31's tests, library and README show of its changes (``TRAIN_1031`` and
   ``VALIDATE_1031`` below, each entry saying where it is seen, and which of its fields no source shows and were
   inferred):

       python tests/data/dump_timm_options.py add-1031 tests/data/timm_train_options.json train
       python tests/data/dump_timm_options.py add-1031 tests/data/timm_validate_options.json validate

   It replaces entries by dest, so it can be run again. Options 1.0.31 has that we deliberately do not take go to
   ``not_adopted`` with the reason (the README's differences table says it too).
"""
import argparse
import importlib.util
import json
import sys


def describe(parser: argparse.ArgumentParser) -> list:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        default = action.default
        rows.append(dict(
            dest=action.dest,
            option_strings=list(action.option_strings),
            kind=type(action).__name__,
            type=getattr(action.type, '__name__', None) if action.type else None,
            nargs=action.nargs,
            choices=list(action.choices) if action.choices else None,
            const=action.const,
            default=default if isinstance(default, (type(None), bool, int, float, str, list, dict)) else repr(default),
        ))
    return rows


def dump(path: str) -> None:
    spec = importlib.util.spec_from_file_location('timm_script', path)
    module = importlib.util.module_from_spec(spec)
    sys.argv = [path]
    spec.loader.exec_module(module)
    out = {'parser': describe(module.parser)}
    if hasattr(module, 'config_parser'):
        out['config_parser'] = describe(module.config_parser)
    json.dump(out, sys.stdout, indent=1)
    print()


def _option(dest, flags, kind='_StoreAction', type=None, nargs=None, choices=None, const=None, default=None, *,
            seen, inferred=(), after=None):
    """One 1.0.31 option as ``describe`` records it, with ``seen`` (where 1.0.31 shows it), ``inferred`` (fields no
    source shows) and ``after`` (the dest it follows in our table; None: appended)."""
    row = dict(dest=dest, option_strings=flags, kind=kind, type=type, nargs=nargs, choices=choices, const=const,
               default=default, seen=seen)
    if inferred:
        row['inferred'] = list(inferred)
    return row, after


_README = "timm 1.0.31 README, What's New"
_RESUME_TESTS = 'timm 1.0.31 sdist tests/test_train_resume.py'
_MULTILABEL_TESTS = 'timm 1.0.31 sdist tests/test_multilabel.py'

TRAIN_1031 = [
    _option('pretrained_cfg_overlay', ['--pretrained-cfg-overlay'], 'ParseKwargs', nargs='*', default={},
            seen=f'{_RESUME_TESTS} test_load_config_accepts_valid_values (a YAML mapping); create_model\'s '
                 'pretrained_cfg_overlay', inferred=['kind', 'nargs', 'default'], after='pretrained_path'),
    _option('decay_epochs', ['--decay-epochs'], type='float', default=None,
            seen='timm 1.0.31 create_scheduler_v2: decay_epochs None resolves to 90 (step) or 0.2 of the schedule '
                 '(wsd, rsqrt); main defaulted to 90, which no 50-epoch wsd run could use', inferred=['default'],
            after='decay_milestones'),
    _option('lr_decay_fn', ['--lr-decay-fn'], type='str', default=None,
            seen=f'{_README} October 9 2026 (--sched wsd, --lr-decay-fn); timm.scheduler.scheduler_kwargs reads '
                 'lr_decay_fn', inferred=['type', 'default'], after='decay_rate'),
    _option('lr_stable_timescale', ['--lr-stable-timescale'], type='float', default=None,
            seen=f'{_README} October 9 2026; timm.scheduler.scheduler_kwargs reads lr_stable_timescale',
            inferred=['type', 'default'], after='lr_decay_fn'),
    _option('smoothing', ['--smoothing'], type='float', default=None,
            seen=f'{_README} September 25 2026: label smoothing defaults to 0 for multi-label (0.1 stays the '
                 'single-label default), so the parser default resolves per task', inferred=['default'],
            after='mixup_off_epoch'),
    _option('eval_metric', ['--eval-metric'], type='str', default=None,
            seen=f'{_README} September 25 2026 (mAP is the multi-label default); {_MULTILABEL_TESTS} '
                 'test_train_cli_rejects_metric_the_evaluator_does_not_produce refuses an explicit top1 there, so '
                 'the default is not top1', inferred=['default'], after='experiment'),
    _option('task', ['--task'], type='str', choices=['classification', 'multilabel'], default='classification',
            seen=f'{_MULTILABEL_TESTS} (--task classification, --task multilabel); {_README} September 25 2026',
            inferred=['type', 'default']),
    _option('target_format', ['--target-format'], type='str', choices=['indices', 'multihot'], default=None,
            seen=f'{_MULTILABEL_TESTS} (--target-format multihot); timm.data.readers.targets.TARGET_FORMATS, '
                 'None meaning indices', inferred=['type', 'choices', 'default']),
    _option('multilabel_threshold', ['--multilabel-threshold'], type='float', default=0.5,
            seen=f'{_README} September 25 2026; MultiLabelClassificationEvaluator(threshold=0.5)',
            inferred=['type', 'default']),
    _option('loss', ['--loss'], type='str', choices=['ce', 'bce', 'asl', 'poly', 'jsd', 'twoway', 'zlpr', 'db'],
            default=None,
            seen=f'{_MULTILABEL_TESTS} test_train_cli_loss_flags; timm.loss LOSS_TYPES, None selecting bce or ce '
                 'by task', inferred=['type', 'choices', 'default']),
    _option('loss_pos_weight', ['--loss-pos-weight'], type='str', default=None,
            seen=f"{_MULTILABEL_TESTS} test_train_cli_loss_flags (--bce-pos-weight 2 gives loss_pos_weight '2.0'; "
                 'also neg_pos, a JSON file)', inferred=['default']),
    _option('loss_class_weight', ['--loss-class-weight'], type='str', default=None,
            seen=f'{_MULTILABEL_TESTS} test_train_cli_loss_flags (effective_num, 1,2,3, a JSON file)',
            inferred=['type', 'default']),
    _option('loss_weight_power', ['--loss-weight-power'], type='float', default=1.0,
            seen=f'{_MULTILABEL_TESTS} test_train_cli_loss_flags; timm.loss.resolve_class_weights(power=1.)',
            inferred=['type', 'default']),
    _option('class_stats', ['--class-stats'], type='str', default=None,
            seen=f'{_MULTILABEL_TESTS} test_train_cli_loss_flags (a JSON file of class_weights.py)',
            inferred=['type', 'default']),
    _option('poly_gamma', ['--poly-gamma'], type='float', default=0.0,
            seen=f'{_MULTILABEL_TESTS} test_train_cli_loss_flags; create_classification_loss(poly_gamma=0.)',
            inferred=['type', 'default']),
    _option('poly_epsilon', ['--poly-epsilon'], type='float', default=2.0,
            seen=f'{_MULTILABEL_TESTS} test_train_cli_loss_flags; create_classification_loss(poly_epsilon=2.)',
            inferred=['type', 'default']),
    _option('stop_epoch', ['--stop-epoch'], type='int', default=None,
            seen=f'{_RESUME_TESTS} test_stop_epoch_and_milestones; {_README} October 13 2026',
            inferred=['default']),
    _option('save_epochs', ['--save-epochs'], type='int', nargs='+', default=None,
            seen=f'{_RESUME_TESTS} test_stop_epoch_and_milestones (--save-epochs 1 2)', inferred=['default']),
]

VALIDATE_1031 = [
    _option('task', ['--task'], type='str', choices=['classification', 'multilabel'], default='classification',
            seen=f'{_MULTILABEL_TESTS} test_multilabel_train_and_validate_cli (validate.parser.parse_args with '
                 "--task multilabel); {_README} September 25 2026 ('train.py / validate.py')",
            inferred=['type', 'default']),
    _option('target_format', ['--target-format'], type='str', choices=['indices', 'multihot'], default=None,
            seen=f'{_README} September 25 2026 (targets of both scripts); timm.data.readers.targets.TARGET_FORMATS',
            inferred=['type', 'choices', 'default']),
    _option('multilabel_threshold', ['--multilabel-threshold'], type='float', default=0.5,
            seen=f'{_README} September 25 2026 (validation reports F1 at --multilabel-threshold)',
            inferred=['type', 'default']),
]

# 1.0.31 options we deliberately do not take, with why (the README's differences table says the same)
TRAIN_NOT_ADOPTED = [
    dict(dest='sweep_locks', option_strings=['--sweep-locks'], parser='config_parser',
         seen='timm 1.0.31 sdist tests/test_sweep.py test_coordination_arguments_stay_out_of_the_training_arguments',
         why="timm's sweep.py coordination (its lock files), for sweep.py only; sweep.py is not published, so "
             'there is nothing to coordinate with'),
    dict(dest='sweep_attempt', option_strings=['--sweep-attempt'], parser='config_parser',
         seen='timm 1.0.31 sdist tests/test_sweep.py test_coordination_arguments_stay_out_of_the_training_arguments',
         why='as --sweep-locks'),
]


def add_1031(path: str, script: str) -> None:
    with open(path) as f:
        reference = json.load(f)
    rows = reference['parser']
    for row, after in TRAIN_1031 if script == 'train' else VALIDATE_1031:
        rows[:] = [r for r in rows if r['dest'] != row['dest']]
        where = next((i + 1 for i, r in enumerate(rows) if r['dest'] == after), len(rows))
        rows.insert(where, row)
    if script == 'train':
        reference['not_adopted'] = TRAIN_NOT_ADOPTED
    reference['version'] = ('timm 1.0.31: main aa4b5850 (1.0.29.dev0) dumped, with the 1.0.31 changes its tests, '
                            'library and README show (tests/data/dump_timm_options.py)')
    with open(path, 'w') as f:
        json.dump(reference, f, indent=1)
        f.write('\n')


if __name__ == '__main__':
    command, *rest = sys.argv[1:]
    dump(*rest) if command == 'dump' else add_1031(*rest)
