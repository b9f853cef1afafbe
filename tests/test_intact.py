"""A damaged checkpoint never starts a run afresh, end to end through train.py: ``--resume auto`` passes over a
``last.pth.tar`` or recovery file that is cut short, random, empty or changed inside a tensor (caught by its checksum),
names it, and continues from the furthest intact checkpoint; a folder with none intact stops with one line and keeps
every file. Checkpoints with checksums still load in plain timm."""
import argparse
import random
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import timm
import torch

import train
from subnet.intact import CHECKSUM_KEY, checksums, damaged_part, read_checkpoint
from train_helpers import make_subset, run_train, signal_at_batch, train_argv

pytestmark = pytest.mark.usefixtures('single_thread')  # the 2 shared cores are not oversubscribed

PLAIN = ('--epochs', '2', '-b', '8')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=4, val_per_class=2)


@pytest.fixture(scope='module')
def finished(data, tmp_path_factory):
    """A finished 2-epoch run: last.pth.tar, checkpoint-0/1.pth.tar."""
    out = tmp_path_factory.mktemp('finished')
    run_train(train_argv(data, out, 'x', *PLAIN))
    return out / 'x'


@pytest.fixture(scope='module')
def stopped(data, tmp_path_factory):
    """A run stopped by SIGTERM in epoch 1 (batch 7 of 10): a recovery file, and last.pth.tar of epoch 0."""
    out = tmp_path_factory.mktemp('stopped')
    with signal_at_batch(7):
        assert train.main(train_argv(data, out, 'x', *PLAIN)) == 128 + signal.SIGTERM
    return out / 'x'


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _random(path: Path):
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _empty(path: Path):
    path.write_bytes(b'')


def _flip_tensor_byte(path: Path):
    """Flip one byte in the middle of the checkpoint's largest tensor: the file still loads."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(raw[entry.header_offset + o:entry.header_offset + o + 2], 'little')
                                 for o in (26, 28))
    at = entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert isinstance(torch.load(path, map_location='cpu', weights_only=True), dict)  # loads, yet damaged


CORRUPTIONS = {'truncated': _truncate, 'random-bytes': _random, 'empty': _empty,
               'flipped-tensor-byte': _flip_tensor_byte}


def _copy(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / 'x')
    return tmp_path / 'x'


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(('.pth.tar', '.csv'))}


@pytest.mark.parametrize('corrupt', CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_damaged_last_checkpoint_resumes_from_the_intact_checkpoint_of_the_same_epoch(corrupt, finished, data,
                                                                                        tmp_path, caplog):
    folder = _copy(finished, tmp_path)
    corrupt(folder / 'last.pth.tar')
    before = _files(folder)
    run = run_train(train_argv(data, tmp_path, 'x', *PLAIN, '--resume', 'auto'))
    assert run.results == []  # both epochs were done: nothing trained, nothing started afresh
    assert f'Resuming from {folder / "checkpoint-1.pth.tar"}' in caplog.text
    assert '--resume auto passes over last.pth.tar: it is ' in caplog.text
    assert _files(folder) == before


@pytest.mark.parametrize('corrupt', CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_damaged_recovery_file_resumes_from_last_and_trains_on(corrupt, stopped, data, tmp_path, caplog):
    folder = _copy(stopped, tmp_path)
    recovery = next(folder.glob('recovery-*.pth.tar'))
    corrupt(recovery)
    run = run_train(train_argv(data, tmp_path, 'x', *PLAIN, '--resume', 'auto'))
    assert f'--resume auto passes over {recovery.name}: it ' in caplog.text
    assert f'Resuming from {folder / "last.pth.tar"}' in caplog.text
    assert [r['epoch'] for r in run.results] == [1]  # epoch 1 again from its start
    assert read_checkpoint(str(folder / 'last.pth.tar'))[0]['epoch'] == 1


def test_no_intact_checkpoint_in_a_folder_that_holds_a_run_stops_and_overwrites_nothing(finished, data, tmp_path,
                                                                                         capsys):
    folder = _copy(finished, tmp_path)
    for path, corrupt in zip(sorted(folder.glob('*.pth.tar')), CORRUPTIONS.values()):
        corrupt(path)
    before = _files(folder)
    assert train.cli(train_argv(data, tmp_path, 'x', *PLAIN, '--resume', 'auto')) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f'train.py: error: --resume auto: {folder} holds a run but no intact checkpoint (') and \
        err[-1].endswith('nothing was overwritten: restore a checkpoint from a copy, or choose a new --experiment')
    assert _files(folder) == before and not any('Traceback' in line for line in err)


def test_a_damaged_resume_path_stops_with_one_line(finished, data, tmp_path, capsys):
    folder = _copy(finished, tmp_path)
    _flip_tensor_byte(folder / 'checkpoint-0.pth.tar')
    argv = train_argv(data, tmp_path, 'y', *PLAIN, '--resume', str(folder / 'checkpoint-0.pth.tar'))
    assert train.cli(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f'train.py: error: --resume {folder / "checkpoint-0.pth.tar"} is damaged: the checksum '
                           f'of its ') and last.endswith(' does not match')
    assert not (tmp_path / 'y').exists()


def test_checkpoints_with_checksums_load_in_plain_timm(finished):
    path = str(finished / 'last.pth.tar')
    checkpoint, why = read_checkpoint(path)
    assert why == '' and set(checkpoint[CHECKSUM_KEY]) == {'state_dict', 'optimizer'}
    model = timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                              checkpoint_path=path)
    assert torch.equal(model.fc.weight, checkpoint['state_dict']['fc.weight'])
    timm.models.load_checkpoint(model, path)


@pytest.mark.parametrize('part', ['state_dict', 'task_state', 'optimizer', 'amp_scaler', 'epoch_position'])
def test_the_checksum_covers_the_weights_the_methods_state_the_optimizer_the_scaler_and_the_position(part):
    """A change inside any covered part is caught, the method's state (its RNG streams, GKT's sample memory) too."""
    state = {'state_dict': {'w': torch.ones(3)}, 'task_state': {'rng': torch.arange(4, dtype=torch.uint8)},
             'optimizer': {'state': {0: {'momentum_buffer': torch.zeros(3)}}}, 'amp_scaler': {'scale': 1024.0},
             'epoch_position': {'batches': 3, 'rng': torch.arange(2)}}
    checkpoint = dict(state, **{CHECKSUM_KEY: checksums(state)})
    assert damaged_part(checkpoint) is None
    inner = checkpoint[part]
    key = next(iter(inner)) if part != 'optimizer' else 'state'
    if part == 'optimizer':
        inner['state'][0]['momentum_buffer'][1] = 1e-7
    elif torch.is_tensor(inner[key]):
        inner[key].view(-1)[-1] += 1
    else:
        inner[key] = inner[key] * 2 if isinstance(inner[key], float) else inner[key] + 1
    assert damaged_part(checkpoint) == part
