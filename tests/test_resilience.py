"""Never lose a run, end to end through train.py on a slice of the shipped data: a run stopped by a real signal
mid-epoch and resumed ends bitwise equal to the uninterrupted one (plain, every method, 2-process gloo, after
kill -9 from a timed recovery file); unreadable images are replaced, named and counted, and a limit stops the run;
a non-finite loss stops without touching the last good checkpoint; one run per folder; failed starts and finished
runs say what they are."""
import argparse
import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.data import create_dataset

import train
import validate
from subnet.errors import RunStopped
from subnet.guard import RunGuard
from subnet.methods import PlainTask, register_method
from subnet.models import load_checkpoint_file
from subnet.run_folder import AtomicCheckpointSaver
from subnet.unreadable import NOT_COUNTED, ImageFailures, ReadableImages
from train_helpers import (ROOT, assert_same_weights, make_subset, run_job, run_train, signal_at_batch,
                           state_dict_of, torchrun, train_argv)

# 40 training images in batches of 8: 5 batches an epoch; random erasing (the prefetcher's own RNG draws) and
# drop-path on, so every RNG the run draws from matters
PLAIN = ('--epochs', '2', '-b', '8', '--reprob', '0.25', '--drop-path', '0.1')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=4, val_per_class=2)


@pytest.fixture(scope='module')
def straight(data, tmp_path_factory):
    """The uninterrupted plain run: (its weights, its summary rows, its folder)."""
    out, threads = tmp_path_factory.mktemp('straight'), torch.get_num_threads()
    torch.set_num_threads(1)  # as every run here (see _one_thread)
    try:
        run = run_train(train_argv(data, out, 'straight', *PLAIN))
    finally:
        torch.set_num_threads(threads)
    return state_dict_of(run), _summary(out / 'straight'), out / 'straight'


def _summary(folder: Path) -> list:
    if not (folder / 'summary.csv').exists():
        return []
    with open(folder / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def _last_line(capsys) -> str:
    """The one ``train.py:`` line a planned stop prints (last on stderr, no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('train.py:')]
    assert 'Traceback' not in err and len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-2000:]
    return lines[0]


def _harness(out: Path, argv: list, signal_at: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py in a child process whose loader signals itself (tests/ddp_harness.py, one process)."""
    return subprocess.run([sys.executable, str(ROOT / 'tests' / 'ddp_harness.py'), str(out), '--', *argv],
                          env=dict(ENV, SUBNET_SIGNAL_AT=signal_at), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """In-process runs on one thread, as the child processes (OMP_NUM_THREADS=1): results are bitwise comparable
    across the two, and the 2 shared cores are not oversubscribed."""


# ------------------------------------------------------------------------------------------ preemption, resume

@pytest.mark.parametrize('at, epoch, done', [(7, 1, 2), (5, 0, 5)], ids=['mid-epoch', 'after-last-batch'])
def test_sigterm_then_resume_auto_is_the_uninterrupted_run_bit_for_bit(at, epoch, done, data, tmp_path, straight,
                                                                       capsys):
    """At the 7th batch (epoch 1, its second): the step finishes, then the run saves and stops. At the 5th (epoch
    0's last): the position is saved before the epoch's evaluation, which the resumed run does."""
    weights, summary, _ = straight
    argv = train_argv(data, tmp_path, 'split', *PLAIN, '--resume', 'auto')
    with signal_at_batch(at):
        assert train.main(argv) == 143
    folder = tmp_path / 'split'
    recovery = folder / f'recovery-{epoch}-{done - 1}.pth.tar'
    assert _last_line(capsys) == (f'train.py: stopped by SIGTERM in epoch {epoch} after {done} of its 5 batches: '
                                  f'saved {recovery}; the same command with --resume auto continues from there')
    assert recovery.is_file() and _summary(folder) == summary[:epoch]
    resumed = run_train(argv)
    assert_same_weights(weights, state_dict_of(resumed))
    assert _summary(folder) == summary  # the meters came back too: same train_loss for the interrupted epoch
    assert not list(folder.glob('recovery-*')), 'a recovery file outlived the epoch checkpoint'
    log = (folder / 'log.txt').read_text()
    assert f'Resuming from {recovery} (--resume auto)' in log and f'Continuing epoch {epoch} after its batch {done}' \
        in log
    capsys.readouterr()
    assert run_train(argv).results == []  # finished: nothing trained, and it says so
    assert (f'Run {folder} is finished: epoch 2 of 2 done; results in {folder / "summary.csv"}, best top1'
            in capsys.readouterr().err)


@pytest.mark.parametrize('method', [('--method', 'cosub', '--mixup', '0.2', '--drop-path', '0.1'), ('--method', 'st'),
                                    ('--method', 'st++', '--st-min-keep', '1'), ('--method', 'gkt')], ids=lambda m: m[1])
def test_every_method_resumes_mid_epoch_bit_for_bit(method, data, tmp_path, capsys):
    extra = ('--epochs', '1', '-b', '8', *method)
    uninterrupted = run_train(train_argv(data, tmp_path, 'straight', *extra))
    argv = train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto')
    with signal_at_batch(3):
        assert train.main(argv) == 143
    assert 'saved' in _last_line(capsys)
    resumed = run_train(argv)
    assert resumed.task.step == uninterrupted.task.step == 5  # the subnet sampler's step counter came back
    assert_same_weights(state_dict_of(uninterrupted), state_dict_of(resumed))
    assert _summary(tmp_path / 'split') == _summary(tmp_path / 'straight')


def test_gkt_knowledge_across_steps_resumes_mid_epoch_bit_for_bit(data, tmp_path, capsys):
    """Stopped in epoch 1 (every sample's knowledge already stored in epoch 0), resumed: the memory came back with
    the checkpoint and the run ends bitwise the uninterrupted one."""
    extra = ('--epochs', '2', '-b', '8', '--method', 'gkt', '--gkt-knowledge', 'sample')
    uninterrupted = run_train(train_argv(data, tmp_path, 'straight', *extra))
    argv = train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto')
    with signal_at_batch(7):
        assert train.main(argv) == 143
    assert 'saved' in _last_line(capsys)
    saved = load_checkpoint_file(str(tmp_path / 'split' / 'recovery-1-1.pth.tar'), 'test')['task_state']
    assert bool(saved['sample_knowledge']['seen'].all())  # 40 images, all seen in epoch 0
    resumed = run_train(argv)
    assert_same_weights(state_dict_of(uninterrupted), state_dict_of(resumed))
    assert _summary(tmp_path / 'split') == _summary(tmp_path / 'straight')
    assert torch.equal(resumed.task.memory.values, uninterrupted.task.memory.values)


def test_ctrl_c_exits_130_names_the_checkpoint_it_wrote_and_resume_path_continues_from_it(data, tmp_path, straight,
                                                                                     capsys):
    argv = train_argv(data, tmp_path, 'x', *PLAIN)
    with signal_at_batch(2, signal.SIGINT):
        assert train.main(argv) == 130
    folder = tmp_path / 'x'
    assert _last_line(capsys).startswith(f'train.py: stopped by SIGINT in epoch 0 after 2 of its 5 batches: saved '
                                         f'{folder / "recovery-0-1.pth.tar"};')
    assert not (folder / 'last.pth.tar').exists() and (folder / 'recovery-0-1.pth.tar').is_file()
    assert train.cli(argv) == 2  # the folder holds a run now: continue it, do not overwrite it
    assert 'already holds a run (no completed epoch yet' in _last_line(capsys)
    # --resume PATH continues mid-epoch too, here into a new folder
    elsewhere = train_argv(data, tmp_path, 'y', *PLAIN, '--resume', str(folder / 'recovery-0-1.pth.tar'))
    assert_same_weights(straight[0], state_dict_of(run_train(elsewhere)))


@pytest.mark.parametrize('signals, expected', [('SIGINT,SIGINT:1.2', -signal.SIGINT), ('SIGINT,SIGINT', 130),
                                              ('SIGTERM,SIGTERM:1.2', 143)])
def test_a_second_ctrl_c_exits_at_once_a_forwarded_or_repeated_signal_does_not(signals, expected, data, tmp_path):
    """torchrun forwards a terminal's Ctrl-C and a scheduler's SIGTERM to workers that got it already, within
    milliseconds: that must not cost the checkpoint. A second Ctrl-C a second later is the user's."""
    done = _harness(tmp_path, train_argv(data, tmp_path, 'x', *PLAIN), f'0:3:{signals}')
    assert done.returncode == expected, done.stderr[-3000:]
    assert bool(list((tmp_path / 'x').glob('recovery-*.pth.tar'))) == (expected > 0)


def test_kill_9_then_resume_from_a_timed_recovery_file_is_the_uninterrupted_run(data, tmp_path, straight):
    argv = train_argv(data, tmp_path, 'x', *PLAIN, '--recovery-minutes', '1e-9')  # a recovery file every update
    done = _harness(tmp_path, argv, '0:7:SIGKILL')
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    folder = tmp_path / 'x'
    # the epoch checkpoint removed epoch 0's recovery files; the one after epoch 1's first update is there
    assert [p.name for p in folder.glob('recovery-*')] == ['recovery-1-0.pth.tar']
    for name in ('tmp.pth.tar', 'recovery_tmp.pth.tar', 'last.pth.tar.tmp'):  # what a kill during a save leaves
        (folder / name).write_bytes(b'partial')
    resumed = run_train(argv + ['--resume', 'auto'])
    assert_same_weights(straight[0], state_dict_of(resumed))
    assert sorted(p.name for p in folder.iterdir() if 'tmp' in p.name or 'recovery' in p.name) == []
    assert 'Removed temporary files of an interrupted process: last.pth.tar.tmp, recovery_tmp.pth.tar, ' \
           'tmp.pth.tar' in (folder / 'log.txt').read_text()


@pytest.mark.parametrize('method', [(), ('--method', 'gkt', '--gkt-knowledge', 'sample')], ids=['plain', 'gkt-sample'])
def test_two_process_gloo_run_stopped_on_one_rank_resumes_bit_for_bit(method, data, tmp_path):
    """Also GKT's knowledge across steps: each rank's memory holds what both ranks stored (rank 0 saves it)."""
    def torchrun_train(name: str, result: Path, **env) -> subprocess.CompletedProcess:
        result.mkdir()
        argv = train_argv(data, tmp_path, name, '--epochs', '2', '-b', '4', '--reprob', '0.25', '--drop-path', '0.1',
                          '--resume', 'auto', *method)
        return run_job(torchrun(str(ROOT / 'tests' / 'ddp_harness.py'), str(result), '--', *argv),
                       dict(ENV, **env), 300)
    assert torchrun_train('straight', tmp_path / 'a').returncode == 0
    stopped = torchrun_train('split', tmp_path / 'b', SUBNET_SIGNAL_AT='1:7')  # rank 1 only: rank 0 learns it
    assert [(tmp_path / 'b' / f'exit{r}.txt').read_text() for r in (0, 1)] == ['143', '143'], stopped.stderr[-3000:]
    # each rank has 5 batches of 4; the ranks agree one update late, so both stop after 3 batches of epoch 1
    assert f'saved {tmp_path / "split" / "recovery-1-2.pth.tar"}' in stopped.stderr
    resumed = torchrun_train('split', tmp_path / 'c')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        assert_same_weights(torch.load(tmp_path / 'a' / f'rank{rank}.pt'),
                            torch.load(tmp_path / 'c' / f'rank{rank}.pt'))
    assert _summary(tmp_path / 'split') == _summary(tmp_path / 'straight')


def test_ctrl_c_on_a_torchrun_job_stops_every_rank_after_one_save(data, tmp_path):
    """A terminal's Ctrl-C reaches torchrun and every worker, and torchrun forwards it to the workers again."""
    (tmp_path / 'r').mkdir()
    argv = train_argv(data, tmp_path, 'x', '--epochs', '100', '-b', '4')
    job = subprocess.Popen(torchrun(str(ROOT / 'tests' / 'ddp_harness.py'), str(tmp_path / 'r'), '--', *argv),
                           env=dict(ENV, SUBNET_SIGNAL_AT='0:0'), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        for line in job.stderr:
            if line.startswith('Train: 1 ['):  # both ranks are in the loop, past epoch 0's checkpoint
                break
        os.killpg(job.pid, signal.SIGINT)
        rest = job.stderr.read()
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.stderr.close()
    assert [(tmp_path / 'r' / f'exit{rank}.txt').read_text() for rank in (0, 1)] == ['130', '130'], rest[-3000:]
    assert rest.count('train.py: stopped by SIGINT') == 2
    ours = [line for line in rest.splitlines()  # a venv inside the clone (CI's .venv) is not our code
            if f'File "{ROOT}' in line and f'File "{ROOT}/.venv' not in line]
    assert not ours, f'a traceback through our code (torchrun prints its own SignalException): {ours}'
    saved = re.search(r'saved (\S+); the same command', rest) or re.search(r': (\S+) holds it;', rest)
    assert saved and Path(saved.group(1)).is_file()


# ------------------------------------------------------------------------------------------- unreadable images

def _break(folder: Path, count: int = 2) -> list:
    """The first images of ``folder``'s first class become a corrupt PNG and (``count`` 2) a zero-byte file; they
    are neighbours, so replacing the first one also meets the second."""
    class_dir = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    broken = sorted(class_dir.iterdir())[:count]
    for path, content in zip(broken, (b'\x89PNG\r\n\x1a\n not an image after all', b'')):
        path.write_bytes(content)
    return broken


def test_unreadable_images_are_replaced_named_once_and_counted(tmp_path, capsys):
    data = make_subset(tmp_path / 'data', 4, 2)
    bad = _break(data / 'train') + _break(data / 'val', 1)
    run = run_train(train_argv(data, tmp_path, 'x', '-b', '8', '--epochs', '2', '--workers', '1',
                               '--bad-image-limit', '2'))
    log = (Path(run.output_dir) / 'log.txt').read_text()
    for path in bad:
        assert log.count(f'Unreadable image skipped: {path} (') == 1, path  # once, though read every epoch
    rows = _summary(Path(run.output_dir))
    assert [r['train_unreadable_images'] for r in rows] == ['2', '2'] and [r['eval_unreadable_images'] for r in rows] \
        == ['1', '1']
    assert len(rows) == 2 and all(float(r['train_loss']) > 0 for r in rows)


def test_more_unreadable_images_than_the_limit_stop_the_run_with_one_line(tmp_path, capsys):
    data = make_subset(tmp_path / 'data', 4, 2)
    bad = _break(data / 'train')
    assert train.cli(train_argv(data, tmp_path, 'x', '-b', '8', '--bad-image-limit', '1')) == 2
    line = _last_line(capsys)
    assert line in [f'train.py: error: unreadable image file {path}: 2 unreadable images in epoch 0, more than '
                    f'--bad-image-limit 1 allows: the dataset, not a file, looks broken (each is named in the log)'
                    for path in bad], line
    assert not list((tmp_path / 'x').glob('*.pth.tar'))
    # a start that failed before its first checkpoint does not block a plain retry
    assert train.main(train_argv(data, tmp_path, 'x', '-b', '8', '--bad-image-limit', '2')) == 0
    assert (tmp_path / 'x' / 'last.pth.tar').is_file()


def test_validate_leaves_unreadable_images_out_and_says_how_many(data, straight, tmp_path):
    broken, clean = make_subset(tmp_path / 'broken', 0, 2), make_subset(tmp_path / 'clean', 0, 2)
    victim, = _break(broken / 'val', 1)
    (clean / 'val' / victim.parent.name / victim.name).unlink()
    rows = {}
    for name, folder in (('broken', broken), ('clean', clean)):
        results = tmp_path / f'{name}.csv'
        assert validate.main(['--checkpoint', str(straight[2] / 'last.pth.tar'), '--data-dir', str(folder),
                              '--workers', '0', '--device', 'cpu', '-b', '8', '--results-file', str(results)]) == 0
        with open(results, newline='') as f:
            rows[name] = next(csv.DictReader(f))
    assert rows['broken']['unreadable_images'] == '1' and 'unreadable_images' not in rows['clean']
    assert rows['broken']['top1'] == rows['clean']['top1'] and rows['broken']['top5'] == rows['clean']['top5']


def test_readable_images_match_timms_dataset_and_replace_a_broken_file_deterministically(tmp_path):
    """ReadableImages reads samples through the dataset's public parts; for readable files it must give exactly
    what timm's ImageDataset gives (this fails loudly if timm changes how it reads a sample)."""
    data = make_subset(tmp_path / 'data', 2, 0)
    timm_dataset = create_dataset('', root=str(data), split='train', is_training=True)
    ours = ReadableImages(create_dataset('', root=str(data), split='train', is_training=True), ImageFailures())
    evaluation = ReadableImages(create_dataset('', root=str(data), split='train'), ImageFailures(),
                                count_replacements=False)
    for dataset in (timm_dataset, ours):
        dataset.transform = __import__('torchvision').transforms.PILToTensor()
    evaluation.transform = ours.transform
    for index in range(len(timm_dataset)):
        (a, label_a), (b, label_b) = timm_dataset[index], ours[index]
        assert torch.equal(a, b) and label_a == label_b
    bad = Path(timm_dataset.filename(0, absolute=True))
    bad.write_bytes(b'')
    image, label = ours[0]
    assert torch.equal(image, ours[1][0]) and label == ours[1][1]  # the next readable one, its own label
    assert evaluation[0][1] == NOT_COUNTED and torch.equal(evaluation[0][0], image)
    assert ours.failures.drain() == 1 and ours.failures.named == {str(bad)}


# -------------------------------------------------------------------------------------------- non-finite losses

def nan_options(parser):
    group = parser.add_argument_group('nan-at: timm training whose loss is NaN at chosen steps (tests only)')
    group.add_argument('--nan-at', type=int, nargs='+', default=[], metavar='STEP')


@register_method('nan-at')
class NanAtTask(PlainTask):
    """timm's classification step, with its loss multiplied by NaN at the chosen steps (counted from 1)."""

    options = (nan_options,)

    @classmethod
    def from_args(cls, args, model, criterion, *, device=None, dtype=None, input_size=None, verbose=True):
        task = cls(model=model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
        task.nan_at, task.calls = set(args.nan_at), 0
        return task

    def forward(self, input, target):
        result = super().forward(input, target)
        self.calls += 1
        if self.calls in self.nan_at:
            result['loss'] = result['loss'] * float('nan')
        return result


def test_a_non_finite_loss_stops_with_one_line_and_leaves_the_last_checkpoint_untouched(data, tmp_path, capsys):
    argv = train_argv(data, tmp_path, 'x', *PLAIN)
    run_train(argv + ['--stop-epoch', '1'])
    last = tmp_path / 'x' / 'last.pth.tar'
    before = (last.read_bytes(), last.stat().st_mtime_ns, sorted(os.listdir(last.parent)))
    assert train.main(argv + ['--resume', 'auto', '--lr', '1e8', '--no-resume-opt']) == 3
    line = _last_line(capsys)
    assert line.startswith('train.py: error: the loss is not finite at epoch 1, batch ') and \
        line.endswith(' of 5: stopped without saving, the run folder keeps its last good checkpoint; lower --lr, '
                      'add --clip-grad, or skip such steps with --skip-nonfinite N')
    assert (last.read_bytes(), last.stat().st_mtime_ns, sorted(os.listdir(last.parent))) == before
    assert len(_summary(tmp_path / 'x')) == 1


def test_no_checkpoint_is_ever_written_with_a_non_finite_weight(tmp_path):
    """The saver's last line of defence, whatever path led to the save (epoch end, recovery, signal)."""
    model = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path),
                                  task=PlainTask(model=model, criterion=torch.nn.CrossEntropyLoss()))
    saver.save_checkpoint(0, metric=1.0)
    good = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    with torch.no_grad():
        model.bias[1] = float('inf')
    for save in (lambda: saver.save_checkpoint(1, metric=2.0), lambda: saver.save_recovery(1, batch_idx=3)):
        with pytest.raises(RunStopped, match='weight bias is not finite: no checkpoint written') as stopped:
            save()
        assert stopped.value.exit_code == 3
        assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == good


def test_a_position_checkpoint_gets_its_position_as_an_argument_and_passes_the_guards_checks(tmp_path):
    """The guard's position writer hands the position to the saver's one write function; the guard's checks
    before a save refuse a non-finite weight there too, and the files written before stay as they were."""
    model = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path),
                                  task=PlainTask(model=model, criterion=torch.nn.CrossEntropyLoss()))
    args = argparse.Namespace(distributed=False, rank=0, skip_nonfinite=0, recovery_minutes=0., bad_image_limit=0.01,
                              recovery_interval=0)
    guard = RunGuard.for_run(args, train_loader=[], failures=None, start=None, saver=saver)
    assert saver.before_save == guard.before_save
    path = guard.positions.save(epoch=2, batches=10, updates=5, meters={'loss': 1.5})
    assert Path(path).name == 'recovery-2-4.pth.tar'
    position = torch.load(path, map_location='cpu', weights_only=False)['epoch_position']
    assert (position['epoch'], position['batches'], position['updates'], position['world_size']) == (2, 10, 5, 1)
    assert position['ranks'][0]['meters'] == {'loss': 1.5}
    good = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    with pytest.raises(RunStopped, match='weight weight is not finite: no checkpoint written') as stopped:
        guard.positions.save(epoch=2, batches=12, updates=6, meters={'loss': 1.5})
    assert stopped.value.exit_code == 3
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == good


def test_skip_nonfinite_skips_up_to_its_limit_and_counts(data, tmp_path, capsys):
    assert train.main(train_argv(data, tmp_path, 'a', '--method', 'nan-at', '--nan-at', '3', '-b', '8')) == 3
    assert 'the loss is not finite at epoch 0, batch 2 of 5' in _last_line(capsys)
    assert not (tmp_path / 'a' / 'last.pth.tar').exists()
    run = run_train(train_argv(data, tmp_path, 'b', '--method', 'nan-at', '--nan-at', '3', '-b', '8',
                               '--skip-nonfinite', '1'))
    assert _summary(Path(run.output_dir))[0]['train_nonfinite_steps'] == '1'
    assert all(torch.isfinite(v).all() for v in state_dict_of(run).values() if v.is_floating_point())
    assert train.main(train_argv(data, tmp_path, 'c', '--method', 'nan-at', '--nan-at', '2', '4', '-b', '8',
                                 '--skip-nonfinite', '1')) == 3
    assert 'more than --skip-nonfinite 1 steps had a non-finite loss or gradients (the last at epoch 0, batch 3 ' \
           'of 5)' in _last_line(capsys)


# ---------------------------------------------------------------------------------------------- one run per folder

def test_a_second_run_on_a_running_experiment_is_refused_and_a_killed_ones_lock_does_not_block(data, tmp_path,
                                                                                                 capsys):
    argv = train_argv(data, tmp_path, 'x', '-b', '8', '--epochs', '1000')
    first = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *argv], env=ENV, cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stderr:  # running: past its set-up, into its first epoch
            if line.startswith('Train: 0 ['):
                break
        for extra in ([], ['--resume', 'auto']):
            assert train.cli(argv + extra) == 2
            assert _last_line(capsys) == (f'train.py: error: output folder {tmp_path / "x"} is in use by a running '
                                          f'run (pid {first.pid} on {os.uname().nodename}, started '
                                          f'{_lock_time(tmp_path / "x")}); wait for it to end, stop it, or choose '
                                          f'another --experiment')
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.wait()
        first.stderr.close()
    resumed = run_train(train_argv(data, tmp_path, 'x', '-b', '8', '--epochs', '1', '--resume', 'auto'))
    assert resumed.output_dir == str(tmp_path / 'x')


def _lock_time(folder: Path) -> str:
    return (folder / '.lock').read_text().split('started ', 1)[1].strip()
