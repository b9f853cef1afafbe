"""Behaviour of timm's own train.py / validate.py that a side-by-side run found missing, each pinned here."""
import argparse
import csv
import pickle
import sys
import types
from pathlib import Path

import pytest
import timm
import timm.data
import torch

import train
import validate
from subnet import checks
from subnet.errors import UsageError
from subnet.timm_options import parse_train_args
from train_helpers import make_subset, run_train, train_argv


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=8, val_per_class=4)


def _rows(folder):
    with open(Path(folder) / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def test_validate_naflex_loader_cuts_the_models_patch_size(data, tmp_path, monkeypatch):
    kwargs = ['embed_dim=32', 'depth=2', 'num_heads=2', 'patch_size=7', 'img_size=28']
    model = timm.create_model('naflexvit_base_patch16_gap', num_classes=10,
                              **{k: int(v) for k, v in (a.split('=') for a in kwargs)})
    checkpoint = tmp_path / 'naflex.pth'
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    seen = []
    real = timm.data.create_naflex_loader
    monkeypatch.setattr(timm.data, 'create_naflex_loader', lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    assert validate.main(['--data-dir', str(data), '--model', 'naflexvit_base_patch16_gap', '--model-kwargs', *kwargs,
                          '--num-classes', '10', '--checkpoint', str(checkpoint), '--naflex-loader',
                          '--naflex-max-seq-len', '16', '--workers', '0', '--device', 'cpu', '-b', '8']) == 0
    assert [kw['patch_size'] for kw in seen] == [(7, 7)]  # timm's validate.py reads the model's; 16 was hard-coded


def test_log_wandb_logs_the_summary_row_lr_included(data, tmp_path, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(init=lambda **kwargs: logged.append(('init', kwargs)),
                                 log=lambda row: logged.append(('log', row)))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    run = run_train(train_argv(data, tmp_path, 'w', '--epochs', '2', '--log-wandb'))
    assert logged[0][0] == 'init' and logged[0][1]['name'] == 'w'
    rows = [row for kind, row in logged[1:] if kind == 'log']
    assert [list(row) for row in rows] == [list(r) for r in _rows(run.output_dir)]  # timm's columns, lr too
    assert [row['lr'] for row in rows] == pytest.approx([float(r['lr']) for r in _rows(run.output_dir)])


def test_start_epoch_on_an_in_place_resume_trims_the_summary_at_the_start_epoch(data, tmp_path):
    run_train(train_argv(data, tmp_path, 'a', '--epochs', '2', '--resume', 'auto'))
    assert [r['epoch'] for r in _rows(tmp_path / 'a')] == ['0', '1']
    again = run_train(train_argv(data, tmp_path, 'a', '--epochs', '2', '--resume', 'auto', '--start-epoch', '1'))
    assert [r['epoch'] for r in again.results] == [1]
    assert [r['epoch'] for r in _rows(tmp_path / 'a')] == ['0', '1']  # epoch 1 once: the old row was dropped


def test_sync_bn_converts_with_timms_log_line_and_timms_checks(caplog, monkeypatch):
    args, _ = parse_train_args(['--sync-bn', '--model', 'resnet18'])
    args.distributed, args.rank = True, 0
    model = timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10)
    model = train.place_model(args, model, torch.device('cpu'), None, 0)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) and args.dist_bn == ''
    assert 'Converted model to use Synchronized BatchNorm.' in caplog.text
    monkeypatch.setenv('WORLD_SIZE', '2')  # as torchrun sets it
    args, _ = parse_train_args(['--sync-bn', '--split-bn', '--aug-splits', '2'])
    with pytest.raises(UsageError, match='--sync-bn cannot be combined with --split-bn'):
        checks.check_distributed_options(args)
    args, _ = parse_train_args(['--aug-repeats', '3'])
    checks.check_distributed_options(args)  # with several processes repeated augmentation is fine


def test_a_checkpoint_loads_with_weights_only_once_argparse_namespace_is_allowed(data, tmp_path):
    """What the README tells users: a plain ``torch.load`` refuses the ``args`` Namespace inside (timm's own
    checkpoints have it too, and timm's loaders allow it); allowing that one class loads everything."""
    run = run_train(train_argv(data, tmp_path, 'c', '--method', 'st', '--subnet-eval', 'prefix:0.5'))
    path = Path(run.output_dir) / 'last.pth.tar'
    with pytest.raises(pickle.UnpicklingError, match='argparse.Namespace'):
        torch.load(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, weights_only=True)
    assert checkpoint['args'].method == 'st' and checkpoint['task_state']['method'] == 'st'
    assert timm.utils.load_checkpoint_metadata(path)['epoch'] == 0  # timm's own loader allows it the same way


# ------------------------------------------------------------------------ timm 1.0.31's module-level API

def test_train_parser_and_parse_args_work_as_timms_module_level_api(tmp_path, monkeypatch):
    """Tools import train.py as timm's tests and sweep.py do: ``train.parser`` holds every option with its default,
    ``_parse_args()`` reads sys.argv and the -c file, and parsing never changes ``train.parser``."""
    assert vars(train.parser.parse_args([]))['epochs'] == 300 and train.parser.get_default('sched') == 'cosine'
    config = tmp_path / 'hparams.yaml'
    config.write_text('epochs: 7\nlr: 3e-4\n')
    monkeypatch.setattr(sys, 'argv', ['train.py', '--config', str(config), '--sched', 'wsd', '--lr-decay-fn', 'linear'])
    args, args_text = train._parse_args()
    assert (args.epochs, args.lr, args.sched, args.lr_decay_fn) == (7, 3e-4, 'wsd', 'linear')
    assert 'epochs: 7' in args_text and train.parser.get_default('epochs') == 300


def test_parse_level_errors_exit_2_and_run_time_ones_raise_value_error(data, tmp_path, monkeypatch, capsys):
    """timm's split: ``--resume auto`` without ``--experiment`` fails the parse (SystemExit 2), ``--stop-epoch``
    beyond ``--epochs`` fails in main (ValueError); the command line prints either as one line, exit 2."""
    monkeypatch.setattr(sys, 'argv', ['train.py', '--resume', 'auto'])
    with pytest.raises(SystemExit) as exit_info:
        train._parse_args()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ('train.py: error: --resume auto needs --experiment NAME (the run '
                                               'folder to continue)')
    argv = train_argv(data, tmp_path, 'x', '--epochs', '2', '--stop-epoch', '3')
    monkeypatch.setattr(sys, 'argv', ['train.py', *argv])
    with pytest.raises(ValueError, match='--stop-epoch 3 must be between 1 and --epochs'):
        train.main()
    assert train.cli(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith('train.py: error: --stop-epoch 3 must be')
    assert not (tmp_path / 'x').exists()


def test_create_model_is_looked_up_in_train_at_call_time(monkeypatch):
    """timm's tests replace ``train.create_model``; the overlay of --pretrained-path and --pretrained-cfg-overlay
    reaches it, the command line's keys winning."""
    seen = []
    real = train.create_model
    monkeypatch.setattr(train, 'create_model', lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    args, _ = parse_train_args(['--model', 'resnet18', '--model-kwargs', 'channels=(8,16,32,64)', 'stem_width=8',
                                '--num-classes', '10', '--pretrained-path', 'weights.safetensors',
                                '--pretrained-cfg-overlay', 'num_classes=10', 'mean=(0.5,)'])
    args.rank, args.world_size, args.distributed = 0, 1, False
    train.build_model(args)
    assert seen[-1]['pretrained_cfg_overlay'] == dict(file='weights.safetensors', num_classes=10, mean=(0.5,))


def test_validate_parser_and_validate_return_the_result_row(data, monkeypatch):
    """``validate.validate(validate.parser.parse_args(...))`` as timm's tests call it, with a replaced
    ``validate.create_model``."""
    seen = []
    real = validate.create_model

    def tiny(*args, **kwargs):
        seen.append(args)
        return real('resnet18', **dict(kwargs, pretrained=False), channels=(8, 16, 32, 64), stem_width=8)

    monkeypatch.setattr(validate, 'create_model', tiny)
    args = validate.parser.parse_args(['--data-dir', str(data / 'val'), '--num-classes', '10', '--img-size', '28',
                                       '--device', 'cpu', '--workers', '0', '-b', '8'])
    results = validate.validate(args)
    assert seen == [('dpn92',)] and 0 <= results['top1'] <= 100 and results['img_size'] == 28


# ------------------------------------------------------------------------------- timm 1.0.31's schedules

def _lrs(run):
    return [float(r['lr']) for r in _rows(run.output_dir)]


def test_sched_none_keeps_the_optimizers_lr(data, tmp_path):
    run = run_train(train_argv(data, tmp_path, 'n', '--epochs', '2', '--sched', 'none', '--warmup-epochs', '1'))
    assert _lrs(run) == [0.05, 0.05]  # no warmup either: there is no schedule


def test_sched_wsd_holds_then_decays_and_plateau_warns_once(data, tmp_path, caplog):
    run = run_train(train_argv(data, tmp_path, 'w', '--epochs', '4', '--sched', 'wsd', '--decay-epochs', '2',
                               '--lr-decay-fn', 'linear', '--min-lr', '0.01'))
    assert _lrs(run) == pytest.approx([0.05, 0.05, 0.05, 0.03])  # stable, then linear decay over the last 2 epochs
    caplog.clear()
    run_train(train_argv(data, tmp_path, 'p', '--sched', 'plateau'))
    warned = [r.getMessage() for r in caplog.records if 'deprecated' in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith('--sched plateau: PlateauLRScheduler is deprecated')


def test_gradient_accumulation_scales_the_last_short_window_by_its_own_length():
    """timm 1.0.31's remainder fix (#2821): 10 batches in windows of 4 are 4 + 4 + 2, the last one averaged over 2."""
    from subnet.loop import _Windows
    windows = _Windows(10, 4)
    assert [b for b in range(10) if windows.ends_update(b)] == [3, 7, 9] and windows.updates == 3
    assert [windows.size(b) for b in range(10)] == [4] * 8 + [2] * 2
    assert [_Windows(8, 4).size(b) for b in range(8)] == [4] * 8


def test_the_eval_crop_of_a_non_square_input_keeps_its_shape(data):
    """timm 1.0.31 fixed the eval centre crop of non-square inputs in create_loader, which our evaluation uses."""
    from subnet.evaluation import eval_loader
    dataset = timm.data.create_dataset('', root=str(data / 'val'))
    config = dict(input_size=(3, 24, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    loader = eval_loader(dataset, config, batch_size=4, device=torch.device('cpu'), model_dtype=None, num_workers=0,
                         use_prefetcher=False, pin_memory=False)
    images, _ = next(iter(loader))
    assert images.shape == (4, 3, 24, 32)
