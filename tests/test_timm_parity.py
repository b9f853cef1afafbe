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
