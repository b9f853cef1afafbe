"""A checkpoint write that fails (disk full, permissions, a read-only file system), end to end through train.py:
one line saying what happened and which files are intact, the partial temporary file removed, exit 4 (or 128 + N
when signal N asked for the write), and ``--resume auto`` continues once the cause is gone. The failures come from a
write hook in place of ``torch.save`` and, where this process may mount one, from a real full tmpfs."""
import errno
import os
import signal
import subprocess

import pytest
import torch

import train
from train_helpers import last_error_line, make_subset, run_train, signal_at_batch, train_argv

pytestmark = pytest.mark.usefixtures('single_thread')  # the 2 shared cores are not oversubscribed

PLAIN = ('--epochs', '2', '-b', '8')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=4, val_per_class=1)


def _fail_saves_after(monkeypatch, allowed: int, error: OSError):
    """torch.save writes ``allowed`` files, then writes half of the next one and raises ``error``."""
    save, calls = torch.save, []

    def hook(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) <= allowed:
            return save(obj, f, *args, **kwargs)
        with open(f, 'wb') as partial:
            partial.write(b'PK\x03\x04 partial')
        raise error
    monkeypatch.setattr(torch, 'save', hook)


def _temporary(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(('tmp.pth.tar', '.tmp')))


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EACCES, errno.EROFS], ids=['ENOSPC', 'EACCES', 'EROFS'])
def test_a_failed_epoch_checkpoint_stops_with_one_line_and_resume_continues(code, data, tmp_path, capsys,
                                                                           monkeypatch):
    folder, argv = tmp_path / 'x', train_argv(data, tmp_path, 'x', *PLAIN)
    _fail_saves_after(monkeypatch, 1, OSError(code, os.strerror(code)))
    assert train.main(argv) == 4
    assert last_error_line(capsys) == (
        f'train.py: error: cannot write the checkpoint of epoch 1 in {folder}: {os.strerror(code).lower()}; the '
        f'partial file is removed, intact: checkpoint-0.pth.tar, last.pth.tar, model_best.pth.tar (last.pth.tar: 1 '
        f'of 2 epochs done); make room (or fix the folder) and run the same command with --resume auto')
    assert _temporary(folder) == []
    monkeypatch.undo()
    run = run_train(argv + ['--resume', 'auto'])
    assert [r['epoch'] for r in run.results] == [1]
    assert [row.split(',')[0] for row in (folder / 'summary.csv').read_text().splitlines()[1:]] == ['0', '1']


def test_a_failed_write_asked_for_by_a_signal_still_exits_128_plus_the_signal(data, tmp_path, capsys, monkeypatch):
    folder, argv = tmp_path / 'x', train_argv(data, tmp_path, 'x', *PLAIN)
    _fail_saves_after(monkeypatch, 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with signal_at_batch(7):
        assert train.main(argv) == 128 + signal.SIGTERM
    line = last_error_line(capsys)
    assert line.startswith(f'train.py: error: cannot write a recovery checkpoint of epoch 1 in {folder}: no space '
                           f'left on device; the partial file is removed, intact: ') and \
        line.endswith('--resume auto (stopped by SIGTERM)')
    assert _temporary(folder) == [] and not list(folder.glob('recovery-*'))
    monkeypatch.undo()
    run = run_train(argv + ['--resume', 'auto'])
    assert [r['epoch'] for r in run.results] == [1]


def _mount_tmpfs(folder, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)], capture_output=True)
    return done.returncode == 0


def test_a_really_full_disk_stops_with_one_line_and_resume_continues_once_there_is_room(data, tmp_path, capsys):
    disk = tmp_path / 'disk'
    if not _mount_tmpfs(disk, '2500k'):
        pytest.skip('mounting a small tmpfs needs root and a mount-capable sandbox (the write-hook tests cover the '
                    'same code path without one)')
    try:
        folder, argv = disk / 'x', train_argv(data, disk, 'x', *PLAIN)
        assert train.main(argv) == 4  # epoch 0's checkpoint (1.6 MB) fits, epoch 1's does not
        line = last_error_line(capsys)
        assert line.startswith(f'train.py: error: cannot write the checkpoint of epoch 1 in {folder}: no space left '
                               f'on device; the partial file is removed, intact: checkpoint-0.pth.tar, '
                               f'last.pth.tar, model_best.pth.tar (last.pth.tar: 1 of 2 epochs done)'), line
        assert _temporary(folder) == []
        subprocess.run(['mount', '-o', 'remount,size=8m', str(disk)], check=True)
        run = run_train(argv + ['--resume', 'auto'])
        assert [r['epoch'] for r in run.results] == [1]
    finally:
        subprocess.run(['umount', str(disk)], check=True)


def test_an_epoch_checkpoint_that_fails_after_a_stop_signal_exits_128_plus_the_signal(data, tmp_path, capsys,
                                                                                     monkeypatch):
    """SIGTERM arrives while the epoch's checkpoint is written, and the write fails: still 143."""
    save = torch.save

    def signal_then_fail(obj, f, *args, **kwargs):
        if str(f).endswith('/tmp.pth.tar') and obj['epoch'] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', signal_then_fail)
    assert train.main(train_argv(data, tmp_path, 'x', *PLAIN)) == 128 + signal.SIGTERM
    line = last_error_line(capsys)
    assert line.startswith(f'train.py: error: cannot write the checkpoint of epoch 1 in {tmp_path / "x"}: no space '
                           f'left on device') and line.endswith(' (stopped by SIGTERM)')
