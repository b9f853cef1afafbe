"""Exact anywhere: a training sample's augmentation comes from streams seeded by (seed, epoch, rank, position), so a
run stopped mid-epoch with loader workers resumes bitwise, runs with different --workers end bitwise equal, and a
torchrun job restarted after one rank was killed (kill -9) finishes with the uninterrupted run's weights; the run
folder's lock lets the restarted attempt of the same torchrun job in and still refuses another job."""
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data

import train
from subnet.errors import InputError
from subnet.run_folder import RunLock
from subnet.sample_seeds import KeyedSampler, SampleKey, SeededSamples, key_samples
from train_helpers import (ROOT, assert_same_weights, make_subset, run_job, run_train, signal_at_batch,
                           state_dict_of, torchrun, train_argv)

# 40 training images in batches of 8 (5 a epoch); RandAugment and random erasing (the prefetcher's, in this process)
# draw per sample and per batch, drop-path in the model
AUGMENT = ('--epochs', '2', '-b', '8', '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25', '--drop-path', '0.1')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=4, val_per_class=1)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """One intra-op thread, as in the torchrun children (OMP_NUM_THREADS=1), so the runs compare bitwise."""


def _argv(data, out, name, workers: int, *extra) -> list:
    return train_argv(data, out, name, *AUGMENT, '--workers', str(workers), *extra)


@pytest.fixture(scope='module')
def with_two_workers(data, tmp_path_factory):
    out, threads = tmp_path_factory.mktemp('w2'), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return state_dict_of(run_train(_argv(data, out, 'w2', 2)))
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------- the streams

class Draws(torch.utils.data.Dataset):
    """What a transform would draw: one number from each of Python's random, numpy and torch."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor([index, random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def _draws(workers: int, epoch: int = 0, seed: int = 0) -> torch.Tensor:
    dataset = SeededSamples(Draws(), seed=seed, rank=0)
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=torch.utils.data.SequentialSampler(dataset),
                                         num_workers=workers)
    assert isinstance(key_samples(loader), KeyedSampler)
    return torch.cat(list(loader))


def test_each_samples_draws_depend_on_its_key_not_on_the_process_that_reads_it():
    torch.manual_seed(5)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    sample = SeededSamples(Draws(), seed=0, rank=0)[SampleKey(index=3, epoch=0, position=3)]
    after = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2]), \
        'reading a sample in this process moved its RNGs'
    in_process = _draws(0)
    assert torch.equal(in_process[3], sample) and torch.equal(in_process, _draws(2))
    assert torch.equal(in_process[:, 0], torch.arange(12, dtype=torch.float64))
    draws = in_process[:, 1:]
    assert len({tuple(row.tolist()) for row in draws}) == 12  # every sample its own stream, all three RNGs seeded
    assert not torch.equal(draws, _draws(0, epoch=1)[:, 1:]) and not torch.equal(draws, _draws(0, seed=1)[:, 1:])


def test_the_same_index_at_two_positions_of_an_epoch_is_augmented_independently():
    """timm's repeated augmentation puts an image in an epoch several times; each copy must get its own draws."""
    dataset = SeededSamples(Draws(), seed=0, rank=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=[4, 4, 4, 7])
    key_samples(loader)
    first, second = list(loader)
    assert first[0, 0] == first[1, 0] == second[0, 0] == 4
    assert not torch.equal(first[0, 1:], first[1, 1:]) and not torch.equal(first[0, 1:], second[0, 1:])


# ---------------------------------------------------------------------------------------- train.py, bitwise

def test_same_seed_runs_with_0_and_2_workers_end_with_the_same_weights(data, tmp_path, with_two_workers):
    assert_same_weights(with_two_workers, state_dict_of(run_train(_argv(data, tmp_path, 'w0', 0))))


@pytest.mark.parametrize('extra', [(), ('--no-prefetcher', '--mixup', '0.2')], ids=['prefetcher', 'no-prefetcher'])
def test_sigterm_mid_epoch_with_workers_then_resume_auto_is_the_uninterrupted_run(extra, data, tmp_path,
                                                                                   with_two_workers):
    """With the prefetcher its random erasing is drawn as a batch is handed over; without it, mixup in the loop."""
    uninterrupted = state_dict_of(run_train(_argv(data, tmp_path, 'straight', 2, *extra))) if extra \
        else with_two_workers
    argv = _argv(data, tmp_path, 'split', 2, *extra, '--resume', 'auto')
    with signal_at_batch(7):  # epoch 1, its second batch
        assert train.main(argv) == 143
    assert (tmp_path / 'split' / 'recovery-1-1.pth.tar').is_file()
    assert_same_weights(uninterrupted, state_dict_of(run_train(argv)))


def test_a_method_with_collate_mixup_in_the_workers_resumes_bit_for_bit(data, tmp_path):
    """cosub with --mixup: the prefetcher's collate mixup runs in the workers, on the batch's own stream."""
    extra = ('--method', 'cosub', '--mixup', '0.2', '--epochs', '1')
    uninterrupted = run_train(_argv(data, tmp_path, 'straight', 2, *extra))
    argv = _argv(data, tmp_path, 'split', 2, *extra, '--resume', 'auto')
    with signal_at_batch(3):
        assert train.main(argv) == 143
    resumed = run_train(argv)
    assert_same_weights(state_dict_of(uninterrupted), state_dict_of(resumed))


# -------------------------------------------------------------------------------------- torchrun's restarts

def test_torchrun_restarts_after_a_rank_is_killed_and_finishes_with_the_uninterrupted_weights(data, tmp_path):
    """2 processes, 1 loader worker each, a recovery file every update; rank 0 (the one holding the folder's lock,
    whose loader worker was forked with it) is killed with SIGKILL at its 9th batch (epoch 1, batch 4 of 5)."""
    def job(name: str, result: Path, restarts: int, **env) -> subprocess.CompletedProcess:
        result.mkdir()
        argv = train_argv(data, tmp_path, name, '--epochs', '2', '-b', '4', '--reprob', '0.25', '--drop-path', '0.1',
                          '--workers', '1', '--resume', 'auto', '--recovery-minutes', '1e-9')
        return run_job(torchrun('--max-restarts', str(restarts), str(ROOT / 'tests' / 'ddp_harness.py'),
                                str(result), '--', *argv), dict(ENV, **env), 300)
    straight = job('straight', tmp_path / 'a', 0)
    assert straight.returncode == 0, straight.stderr[-3000:]
    restarted = job('killed', tmp_path / 'b', 1, SUBNET_SIGNAL_AT='0:9:SIGKILL')
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert 'exitcode: -9' in restarted.stderr  # the first attempt did lose rank 0
    log = (tmp_path / 'killed' / 'log.txt').read_text()
    assert '--resume auto: no checkpoint in' in log  # the first attempt started fresh
    assert f'Resuming from {tmp_path / "killed" / "recovery-1-2.pth.tar"} (--resume auto)' in log
    assert 'Continuing epoch 1 after its batch 3' in log
    for rank in (0, 1):
        assert_same_weights(torch.load(tmp_path / 'a' / f'rank{rank}.pt'),
                            torch.load(tmp_path / 'b' / f'rank{rank}.pt'))


# ---------------------------------------------------------------------------------------------- the folder lock

_HOLD = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {root!r})
    from subnet.run_folder import RunLock
    lock = RunLock({folder!r})
    if os.fork() == 0:  # a child that outlives its parent, as a loader worker of a killed run does
        time.sleep(30)
        os._exit(0)
    print('locked', flush=True)
    time.sleep(float(sys.argv[1]))
    os._exit(0)
''')


def _hold_lock(folder: Path, seconds: float, **env) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, '-c', _HOLD.format(root=str(ROOT), folder=str(folder)), str(seconds)],
                              env=dict(ENV, **env), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    return holder


_JOB = dict(TORCHELASTIC_RUN_ID='job1', TORCHELASTIC_RESTART_COUNT='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='29500')


def test_a_restarted_attempt_of_the_same_torchrun_job_waits_for_the_lock_another_job_is_refused(tmp_path,
                                                                                               monkeypatch):
    holder = _hold_lock(tmp_path, 2, **_JOB)
    try:
        monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
        for key in ('TORCHELASTIC_RUN_ID', 'MASTER_ADDR', 'MASTER_PORT'):
            monkeypatch.setenv(key, _JOB[key])
        monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'job2')
        with pytest.raises(InputError, match=r'is in use by a running run \(pid \d+ on .*, torchrun job job1@'):
            RunLock(str(tmp_path))
        monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'job1')
        started = time.monotonic()
        lock = RunLock(str(tmp_path))  # waits until the holder exits (its forked child lives on)
        assert holder.poll() is not None and time.monotonic() - started > 0.5
        assert 'torchrun job job1@127.0.0.1:29500' in (tmp_path / '.lock').read_text()
        lock.release()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_forked_child_does_not_keep_a_dead_runs_lock(tmp_path):
    holder = _hold_lock(tmp_path, 0)
    holder.wait()
    holder.stdout.close()
    RunLock(str(tmp_path)).release()  # at once, though the holder's child still runs


def test_the_training_transform_is_timms_own_only_its_stream_is_per_sample(data):
    """--method none samples timm's distributions: the loader's transform is the one timm's create_transform builds
    for the same options, and over many samples a flip happens half the time."""
    from timm.data import create_transform, resolve_data_config
    from subnet.data import build_loaders
    from subnet.timm_options import parse_train_args
    args, _ = parse_train_args(['--data-dir', str(data), '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25',
                                '--color-jitter', '0.3', '--img-size', '28', '-b', '8', '--workers', '0',
                                '--no-prefetcher'])
    args.prefetcher, args.distributed, args.rank, args.world_size, args.num_classes = False, False, 0, 1, 10
    config = resolve_data_config(vars(args))
    loader = build_loaders(args, config, torch.device('cpu'), None, 0).train
    assert isinstance(loader.dataset, SeededSamples)
    timms = create_transform(config['input_size'], is_training=True, auto_augment='rand-m9-mstd0.5', re_prob=0.25,
                             re_mode='pixel', color_jitter=0.3, interpolation='random', mean=config['mean'], std=config['std'])
    assert repr(loader.dataset.transform) == repr(timms)
    flips = SeededSamples(Flips(), seed=0, rank=0)
    flipped = sum(flips[SampleKey(0, 0, position)] for position in range(4000)) / 4000
    assert abs(flipped - 0.5) < 0.03, flipped  # 4000 fair coins: 3 % is over 3.5 standard deviations


class Flips(torch.utils.data.Dataset):
    """torchvision's random horizontal flip (timm's) of a 1x2 image: 1 when flipped."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        from torchvision import transforms
        return int(transforms.RandomHorizontalFlip()(torch.tensor([[[0., 1.]]]))[0, 0, 0].item())
