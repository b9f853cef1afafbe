"""One declared table of option ranges (subnet/option_ranges.py): every value out of range is one ``train.py:
error:`` line and exit 2 before anything is built or written, where timm trains nonsense or fails late; legal but
unusual values stay legal; options wrong only together are caught before the first step."""
import glob
import signal
import warnings

import pytest
import torch
from timm.data import str_to_interp_mode
from timm.scheduler import create_scheduler_v2

import train
import validate
from subnet.option_ranges import INTERPOLATIONS, LR_DECAY_FNS, RANGES, SCHEDULERS, check_ranges, check_together
from subnet.timm_options import parse_train_args, train_parser, validate_parser
from train_helpers import ROOT, last_error_line, make_subset, run_train, signal_at_batch, train_argv

pytestmark = pytest.mark.usefixtures('single_thread')  # the 2 shared cores are not oversubscribed


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=4, val_per_class=1)


BAD = {
    # the fault campaign's values that trained anyway
    'reprob': (['--reprob', '1.5'], '--reprob must be in [0, 1], got 1.5'),
    'momentum': (['--momentum', '2'], '--momentum must be in [0, 1), got 2.0'),
    'weight-decay': (['--weight-decay', '-1'], '--weight-decay must be >= 0, got -1.0'),
    'warmup-epochs': (['--warmup-epochs', '-3'], '--warmup-epochs must be >= 0, got -3'),
    'cooldown-epochs': (['--cooldown-epochs', '-1'], '--cooldown-epochs must be >= 0, got -1'),
    'recovery-interval': (['--recovery-interval', '-1'], '--recovery-interval must be >= 0, got -1'),
    'subnet-kd-weight': (['--method', 'st', '--subnet-kd-weight', '-1'], '--subnet-kd-weight must be >= 0, got -1.0'),
    'st-amplitude': (['--method', 'st', '--st-amplitude', '0'], '--st-amplitude must be > 0, got 0.0'),
    # ... and that ended in a traceback
    'lr': (['--lr', '-1'], '--lr must be > 0, got -1.0'),
    'smoothing': (['--smoothing', '1.5'], '--smoothing must be in [0, 1), got 1.5'),
    'drop-path': (['--drop-path', '2'], '--drop-path must be in [0, 1), got 2.0'),
    'sched': (['--sched', 'bogus'], "--sched must be one of timm's schedulers: " + ', '.join(SCHEDULERS)
              + ", got 'bogus'"),
    'opt': (['--opt', 'adamww'], "--opt must be one of timm's optimizers (timm.optim.list_optimizers(), optionally "
            "with a lookahead_ prefix), got 'adamww' (closest: adamw, "),
    'eval-metric': (['--eval-metric', 'bogus'], '--eval-metric bogus is not a metric the classification evaluation '
                    'produces (one of loss, top1, top5)'),
    'mean': (['--mean', '1', '2'], '--mean takes 1 value or one per input channel (3), got 2'),
    'model-kwargs': (['--model-kwargs', 'depth=abc'], "resnet18 cannot be built with --model-kwargs depth='abc' "
                     "(ResNet.__init__() got an unexpected keyword argument 'depth')"),
    'opt-kwargs': (['--opt-kwargs', 'bogus=1'], "--opt-kwargs: sgd does not take them (SGD.__init__() got an "
                   "unexpected keyword argument 'bogus')"),
    'aa': (['--aa', 'bogus'], "--aa must be a policy timm builds: rand-m9-mstd0.5 (RandAugment), augmix-m5-w4-d2, "
           "original, v0, 3a, ..., got 'bogus'"),
    'train-crop-mode': (['--train-crop-mode', 'bogus'], "--train-crop-mode must be rrc, rkrc or rkrr, got 'bogus'"),
    'empty-train-split': (['--train-split', ''], '--train-split is empty: name the train split folder of '),
    # more of the same kind
    'interpolation': (['--interpolation', 'cubic'], "--interpolation must be '' (the model's) or one of nearest, "
                      "bilinear, bicubic, box, hamming, lanczos, got 'cubic' (closest: bicubic"),
    'scale': (['--scale', '1', '0.08'], '--scale values must be in increasing order, got 1 0.08'),
    'model-ema-decay': (['--model-ema', '--model-ema-decay', '2'], '--model-ema-decay must be in [0, 1], got 2.0'),
    'nan': (['--lr', 'nan'], '--lr must be > 0, got nan'),
    'std': (['--std', '0'], '--std values must each be > 0, got 0'),
    'rsqrt-without-warmup': (['--sched', 'rsqrt'], '--sched rsqrt decays from the end of warmup'),
    # timm 1.0.31's schedules: what its create_scheduler_v2 refuses after the model and data are built
    'lr-decay-fn': (['--sched', 'wsd', '--lr-decay-fn', 'sqrt'], '--lr-decay-fn must be one of linear, 1-sqrt, '
                    "cosine, power, exp, got 'sqrt' (closest: 1-sqrt"),
    'wsd-decay-too-long': (['--sched', 'wsd', '--decay-epochs', '3'], '--sched wsd: the decay phase (--decay-epochs '
                           '3, 3 epochs) must be longer than 0 and at most --epochs - --warmup-epochs (1)'),
    'plateau-on-updates': (['--sched', 'plateau', '--sched-on-updates'], '--sched plateau steps once per epoch'),
}


@pytest.mark.parametrize('case', BAD)
def test_a_value_out_of_range_is_one_line_exit_2_and_nothing_written(case, data, tmp_path, capsys):
    extra, message = BAD[case]
    argv = [a for a in train_argv(data, tmp_path, 'x') if a != '--model-kwargs' or case != 'model-kwargs']
    if case == 'model-kwargs':  # the slim ResNet's kwargs replaced by the bad one
        argv = train_argv(data, tmp_path, 'x', model=['--model', 'resnet18', '--img-size', '28', '--num-classes',
                                                     '10'])
    assert train.cli(argv + extra) == 2
    assert last_error_line(capsys).startswith(f'train.py: error: {message}')
    written = [p.name for p in (tmp_path / 'x').iterdir()] if (tmp_path / 'x').exists() else []
    assert written in ([], ['.lock'])  # the *-kwargs cases fail while building, with the folder locked


def test_validate_checks_the_same_table(capsys):
    assert validate.cli(['--model', 'resnet18', '--interpolation', 'cubic', '--device', 'cpu']) == 2
    assert last_error_line(capsys).startswith("validate.py: error: --interpolation must be '' (the model's) or one of ")


@pytest.mark.parametrize('argv', [['--cutmix', '2'], ['--method', 'gkt', '--gkt-drop', '1'], ['--opt', 'AdamW'],
                                  ['--opt', 'lookahead_adamw'], ['--reprob', '1'], ['--mean', '0.5'],
                                  ['--val-split', 'none'], ['--interpolation', 'bilinear'], ['--sched', 'wsd'],
                                  ['--sched', 'wsd', '--epochs', '5', '--warmup-epochs', '0', '--decay-epochs', '0.2'],
                                  ['--sched', 'rsqrt', '--warmup-epochs', '0', '--lr-stable-timescale', '2']])
def test_legal_but_unusual_values_stay_legal(argv):
    args, _ = parse_train_args(argv)
    check_ranges(args)
    check_together(args)
    train.check_method_args(args)


def test_timms_defaults_and_every_shipped_recipe_pass_the_table():
    for argv in [[]] + [['-c', path] for path in sorted(glob.glob(str(ROOT / 'hparams' / '*.yaml')))]:
        args, _ = parse_train_args(argv)
        check_ranges(args)
        check_together(args)
    check_ranges(validate_parser().parse_args([]))


def test_every_entry_names_an_option_and_the_choices_are_timms():
    flags = {s for parser in (train_parser(), validate_parser()) for a in parser._actions for s in a.option_strings}
    assert not [flag for flag in RANGES if flag not in flags]
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    for name in SCHEDULERS:  # every name we accept, timm builds
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # plateau is deprecated in 1.0.31
            create_scheduler_v2(optimizer, sched=name, num_epochs=4, warmup_epochs=1)
    with pytest.raises(ValueError):
        create_scheduler_v2(optimizer, sched='bogus', num_epochs=4)
    for name in LR_DECAY_FNS:
        create_scheduler_v2(optimizer, sched='wsd', num_epochs=4, decay_fn=name)
    with pytest.raises(ValueError, match='decay_fn'):
        create_scheduler_v2(optimizer, sched='wsd', num_epochs=4, decay_fn='bogus')
    for name in INTERPOLATIONS:
        str_to_interp_mode(name)


def test_resuming_mid_epoch_with_another_batch_size_stops_before_the_first_step(data, tmp_path, capsys):
    argv = train_argv(data, tmp_path, 'x', '--epochs', '2', '-b', '8')
    with signal_at_batch(3):
        assert train.main(argv) == 128 + signal.SIGTERM
    recovery = next((tmp_path / 'x').glob('recovery-*.pth.tar'))
    before = {p.name: p.read_bytes() for p in (tmp_path / 'x').iterdir() if p.is_file() and p.name != '.lock'}
    capsys.readouterr()
    assert train.cli(argv + ['--resume', 'auto', '-b', '4']) == 2
    assert last_error_line(capsys) == (f'train.py: error: --resume {recovery} stopped in epoch 0 after 3 batches of '
                                 f'--batch-size 8; this run has --batch-size 4: continue with --batch-size 8, or '
                                 f'resume from a checkpoint written at the end of an epoch')
    assert {p.name: p.read_bytes() for p in (tmp_path / 'x').iterdir() if p.is_file() and p.name != '.lock'} == before
    run = run_train(argv + ['--resume', 'auto'])
    assert [r['epoch'] for r in run.results] == [0, 1]
