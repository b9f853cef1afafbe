"""The private members of timm and argparse the project reaches into, each in one place: these tests fail loudly
when an upgrade renames them or stops going through them, instead of letting a feature degrade silently."""
import argparse
import os

import pytest
import torch
from timm.utils import CheckpointSaver, NativeScaler

from subnet.run_folder import AtomicCheckpointSaver
from subnet.timm_options import OneLineParser, train_parser


def test_argparse_resolves_abbreviations_through_get_option_tuples(monkeypatch):
    """OneLineParser keeps timm's abbreviations unambiguous by overriding argparse's ``_get_option_tuples``."""
    assert hasattr(argparse.ArgumentParser, '_get_option_tuples')
    calls = []
    original = OneLineParser._get_option_tuples
    monkeypatch.setattr(OneLineParser, '_get_option_tuples',
                        lambda self, option: calls.append(option) or original(self, option))
    assert train_parser().parse_args(['--me', '0.5']).mean == [0.5]
    assert '--me' in calls


class _Task:
    """The two calls CheckpointSaver makes on a task."""

    def __init__(self, model):
        self.model = model

    def get_checkpoint_state(self, ema=False, unwrap_fn=None):
        return {} if ema else {'state_dict': self.model.state_dict()}


def test_checkpoint_saver_writes_through_the_two_file_operations_we_make_atomic(tmp_path, monkeypatch):
    """AtomicCheckpointSaver overrides CheckpointSaver._replace / _duplicate: every save must go through them, and
    with them no save ever unlinks a final file (timm's own versions do, which leaves a window with no file)."""
    for name in ('_replace', '_duplicate', '_save', 'can_hardlink'):
        assert hasattr(CheckpointSaver(model=None, optimizer=None), name), name
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(model=model, optimizer=optimizer, checkpoint_dir=str(tmp_path),
                                  recovery_dir=str(tmp_path), max_history=2, task=_Task(model))
    used = []
    write = saver.write
    monkeypatch.setattr(saver, 'write', lambda *a, **k: used.append('write') or write(*a, **k))
    for name in ('_replace', '_duplicate'):
        original = getattr(saver, name)
        monkeypatch.setattr(saver, name, lambda src, dst, f=original, n=name: used.append(n) or f(src, dst))

    def no_unlink(path, *args, **kwargs):
        raise AssertionError(f'a save unlinked {path}')
    monkeypatch.setattr(os, 'unlink', no_unlink)
    for epoch, metric in enumerate([1.0, 2.0, 3.0]):
        saver.save_checkpoint(epoch, metric=metric)
    saver.save_recovery(2, batch_idx=5)
    assert {'_replace', '_duplicate'} <= set(used)
    assert used.count('write') == 4  # every file timm's saver writes goes through our one write function
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar',
                                                          'last.pth.tar', 'model_best.pth.tar',
                                                          'recovery-2-5.pth.tar']


@pytest.mark.parametrize('attribute', ['_replace', '_duplicate'])
def test_timms_own_file_operations_still_unlink_first(attribute, tmp_path, monkeypatch):
    """Why the override exists: timm's versions remove the destination before putting the new file there."""
    (tmp_path / 'src').write_text('new')
    (tmp_path / 'dst').write_text('old')
    unlinked = []
    real_unlink = os.unlink
    monkeypatch.setattr(os, 'unlink', lambda path, *a, **k: unlinked.append(str(path)) or real_unlink(path))
    getattr(CheckpointSaver(model=None, optimizer=None), attribute)(str(tmp_path / 'src'), str(tmp_path / 'dst'))
    assert unlinked == [str(tmp_path / 'dst')] and (tmp_path / 'dst').read_text() == 'new'


def test_native_scaler_keeps_its_torch_grad_scaler_in_scaler_and_steps_through_it(monkeypatch):
    """``subnet.step.Update`` runs the step half of ``NativeScaler.__call__`` (unscale, clip, step, update) on
    ``NativeScaler._scaler`` after the task's passes: timm must still keep its torch GradScaler there, and its own
    call must still step through it."""
    scaler = NativeScaler(device='cpu')
    assert isinstance(scaler._scaler, torch.amp.GradScaler)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepped = []
    step = scaler._scaler.step
    monkeypatch.setattr(scaler._scaler, 'step', lambda opt, *a, **k: stepped.append(opt) or step(opt, *a, **k))
    scaler(model(torch.ones(1, 2)).sum(), optimizer)
    assert stepped == [optimizer]
