"""train.py end to end on a slice of the shipped data: timm's outputs, checkpoints, resume, DDP, bad input."""
import csv
import os
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.utils import load_checkpoint_metadata

import train
import validate
from subnet import run_folder
from subnet.device import fall_back_to_cpu, use_default_device
from subnet.timm_options import parse_train_args, train_option_sources, train_options_given
from train_helpers import (ROOT, SHIPPED, assert_same_weights, make_subset, run_job, run_train, state_dict_of,
                           torchrun, train_argv)

TIMM_SUMMARY_COLUMNS = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
TIMM_CHECKPOINT_KEYS = {'epoch', 'arch', 'version', 'state_dict', 'optimizer', 'args', 'metric', 'saver'}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=16, val_per_class=8)


@pytest.fixture(scope='module')
def one_epoch(tmp_path_factory, data):
    """One epoch of the tiny ResNet; shared by the output, checkpoint and validate tests."""
    out = tmp_path_factory.mktemp('runs')
    return run_train(train_argv(data, out, 'one'))


def _summary(folder):
    with open(Path(folder) / 'summary.csv', newline='') as f:
        lines = f.read().splitlines()
    assert sum(line.startswith('epoch,') for line in lines) == 1, 'exactly one header'
    return list(csv.DictReader(lines))


def _plain_timm_model(checkpoint, **kwargs):
    return timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                             checkpoint_path=str(checkpoint), **kwargs).eval()


def test_one_epoch_writes_timms_files_columns_and_checkpoint_keys(one_epoch):
    folder = Path(one_epoch.output_dir)
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'checkpoint-0.pth.tar', 'model_best.pth.tar',
                 'log.txt'):
        assert (folder / name).is_file(), name
    assert not list(folder.glob('*.tmp')) and not (folder / 'tmp.pth.tar').exists()
    rows = _summary(folder)
    assert list(rows[0].keys()) == TIMM_SUMMARY_COLUMNS and [r['epoch'] for r in rows] == ['0']
    assert yaml.safe_load((folder / 'args.yaml').read_text())['experiment'] == 'one'
    checkpoint = load_checkpoint_metadata(folder / 'last.pth.tar')  # weights_only=True, as timm loads it
    assert TIMM_CHECKPOINT_KEYS <= set(checkpoint) and checkpoint['epoch'] == 0 and checkpoint['version'] == 2
    assert checkpoint['arch'] == 'resnet18' and checkpoint['metric'] == float(rows[0]['eval_top1'])
    log = (folder / 'log.txt').read_text()
    assert 'Model resnet18 created' in log and 'Train: 0 [' in log and 'Test: [' in log


def test_checkpoint_is_a_plain_timm_state_dict_with_identical_logits(one_epoch):
    checkpoint = load_checkpoint_metadata(Path(one_epoch.output_dir) / 'last.pth.tar')
    plain = _plain_timm_model(Path(one_epoch.output_dir) / 'last.pth.tar')  # timm's own loader, strict
    assert set(checkpoint['state_dict']) == set(plain.state_dict())
    trained = one_epoch.task.get_eval_model().eval()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(plain(x), trained(x))


def test_validate_reproduces_the_runs_final_top1(one_epoch, data, capsys):
    last = Path(one_epoch.output_dir) / 'last.pth.tar'
    final_top1 = float(_summary(one_epoch.output_dir)[-1]['eval_top1'])
    results = Path(one_epoch.output_dir) / 'results.csv'
    assert validate.main(['--checkpoint', str(last), '--data-dir', str(data), '--workers', '0',
                          '--device', 'cpu', '--results-file', str(results)]) == 0
    with open(results, newline='') as f:
        row = next(csv.DictReader(f))
    assert float(row['top1']) == pytest.approx(final_top1, abs=1e-9)
    assert list(row) == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct',
                         'interpolation']
    assert '--result' in capsys.readouterr().out


def test_validate_matches_an_independent_timm_evaluation(one_epoch, data):
    """What timm's validate.py computes (its library calls, none of ours): same top-1."""
    last = Path(one_epoch.output_dir) / 'last.pth.tar'
    model = _plain_timm_model(last)
    config = timm.data.resolve_data_config({'img_size': 28}, model=model, use_test_size=False)
    loader = timm.data.create_loader(timm.data.create_dataset('', root=str(data), split='validation'),
                                     input_size=config['input_size'], batch_size=32, use_prefetcher=False,
                                     interpolation=config['interpolation'], mean=config['mean'], std=config['std'],
                                     crop_pct=config['crop_pct'], crop_mode=config['crop_mode'], num_workers=0)
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    ours = validate.validate(validate.validate_parser().parse_args(
        ['--checkpoint', str(last), '--data-dir', str(data), '--workers', '0', '--device', 'cpu',
         '--model', 'resnet18', '--model-kwargs', 'channels=(8,16,32,64)', 'stem_width=8', '--num-classes',
         '10', '--img-size', '28', '--use-train-size']))
    assert ours['top1'] == pytest.approx(100 * correct / total, abs=1e-4)


def test_resume_at_an_epoch_boundary_matches_the_uninterrupted_run(data, tmp_path):
    extra = ('--epochs', '3', '--mixup', '0.2', '--reprob', '0.25', '--drop-path', '0.1')
    straight = run_train(train_argv(data, tmp_path, 'straight', *extra))
    run_train(train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto', '--stop-epoch', '1'))
    assert [r['epoch'] for r in _summary(tmp_path / 'split')] == ['0']
    resumed = run_train(train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto'))
    assert resumed.results[0]['epoch'] == 1  # continued at the next epoch
    assert_same_weights(state_dict_of(straight), state_dict_of(resumed))
    assert [r['epoch'] for r in _summary(tmp_path / 'split')] == ['0', '1', '2']
    assert [r['eval_top1'] for r in _summary(tmp_path / 'split')] == \
        [r['eval_top1'] for r in _summary(tmp_path / 'straight')]
    # already complete: a further --resume auto trains nothing and keeps the summary
    again = run_train(train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto'))
    assert again.results == [] and len(_summary(tmp_path / 'split')) == 3


def test_resume_from_a_path_continues_the_schedule_in_a_new_folder(data, tmp_path):
    first = run_train(train_argv(data, tmp_path, 'a', '--epochs', '2', '--stop-epoch', '1', '--sched', 'step',
                                 '--decay-epochs', '1', '--decay-rate', '0.5'))
    last = Path(first.output_dir) / 'last.pth.tar'
    second = run_train(train_argv(data, tmp_path, 'b', '--epochs', '2', '--sched', 'step', '--decay-epochs', '1',
                                  '--decay-rate', '0.5', '--resume', str(last)))
    assert second.results[0]['epoch'] == 1
    assert float(_summary(second.output_dir)[0]['lr']) == pytest.approx(0.025)  # epoch 1 of the step schedule
    assert [r['epoch'] for r in _summary(first.output_dir)] == ['0']  # the source run is left alone


def test_a_fresh_run_never_overwrites_a_previous_run(one_epoch, data, capsys):
    folder = Path(one_epoch.output_dir)
    before = (folder / 'last.pth.tar').stat().st_mtime_ns
    argv = train_argv(data, folder.parent, folder.name)
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'already holds a run' in err[0] and '--resume auto' in err[0]
    assert (folder / 'last.pth.tar').stat().st_mtime_ns == before


def test_two_process_gloo_run_ends_with_identical_weights_on_both_ranks(data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    argv = train_argv(data, tmp_path, 'ddp', '--epochs', '1')
    cmd = torchrun(str(ROOT / 'tests' / 'ddp_harness.py'), str(tmp_path), '--', *argv)
    done = run_job(cmd, env, 300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    assert_same_weights(rank0, rank1)
    assert 'Training in distributed mode' in done.stderr
    # each rank saw half the data: 160 images / (2 ranks x 16) = 5 updates per epoch
    assert 'Train: 0 [   4/5 (100%)]' in done.stderr
    checkpoint = torch.load(tmp_path / 'ddp' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])
    assert_same_weights(checkpoint['state_dict'], rank0)


# ---------------------------------------------------------------------------------------------- bad input

def _one_error_line(capsys, early=True):
    """The error line; when the input could be checked before anything was built, stderr holds only it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert 'Traceback' not in err and lines[-1].startswith('train.py: error: ')
    assert sum(line.startswith('train.py: error') for line in lines) == 1
    if early:
        assert len(lines) == 1, lines
    return lines[-1]


def _corrupt(path: Path, content: bytes):
    path.write_bytes(content)
    return path


def _flat_images(root: Path, per_folder=2, classes=()) -> Path:
    """A data folder whose train/ and val/ hold images directly, or in the given class folders only."""
    for split in ('train', 'val'):
        for folder in [root / split / c for c in classes] or [root / split]:
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_folder):
                Image.new('L', (28, 28), color=i * 40).save(folder / f'{i}.png')
    return root


# bad inputs caught only once the model or the dataset exists: log lines come before the error line
LATE = {'wrong_model_resume', 'single_class', 'num_classes_below_data', 'st_plus_plus_full_net'}


def _bad_input(case, data, tmp_path, last):
    return {
        'unknown_model': (train_argv(data, tmp_path, 'x', '--model', 'resnet51'),
                          "unknown model 'resnet51'; closest timm names: resnet51q, resnet50"),
        'missing_data': (train_argv(tmp_path / 'nowhere', tmp_path, 'x'), 'does not exist'),
        'empty_data': (train_argv(tmp_path, tmp_path / 'out', 'x'), 'holds no files'),
        'odd_mixup_batch': (train_argv(data, tmp_path, 'x', '--mixup', '0.8', '-b', '15'),
                            'mixup/cutmix need an even batch size, got --batch-size 15'),
        'corrupt_resume': (train_argv(data, tmp_path, 'x', '--resume',
                                      str(_corrupt(tmp_path / 'bad.pth.tar', b'not a checkpoint'))),
                           'is not a readable checkpoint'),
        'wrong_model_resume': (train_argv(data, tmp_path, 'x', '--resume', str(last), '--model-kwargs',
                                          'channels=(8,16,32,32)', 'stem_width=8'),
                               'does not fit this model (checkpoint arch: resnet18)'),
        'corrupt_initial': (train_argv(data, tmp_path, 'x', '--initial-checkpoint',
                                       str(_corrupt(tmp_path / 'half.pth', last.read_bytes()[:4000]))),
                            '--initial-checkpoint'),
        'stop_epoch': (train_argv(data, tmp_path, 'x', '--stop-epoch', '5'), '--stop-epoch 5 must be between'),
        'auto_without_experiment': ([a for a in train_argv(data, tmp_path, '') if a != '--experiment'] +
                                    ['--resume', 'auto'], '--resume auto needs --experiment'),
        'images_without_class_folders': (
            train_argv(_flat_images(tmp_path / 'flat'), tmp_path, 'x'),
            f"train split 'train' resolves to {tmp_path / 'flat' / 'train'}, which holds 2 images directly: timm "
            f"reads one class per sub-folder, so put them in {tmp_path / 'flat' / 'train' / '<class>'}/"),
        'single_class': (train_argv(_flat_images(tmp_path / 'one', 8, ['images']), tmp_path, 'x', '-b', '4'),
                         f'the training split of {tmp_path / "one"} holds a single class'),
        'num_classes_below_data': (train_argv(data, tmp_path, 'x', '--num-classes', '5'),
                                   f'the model has 5 classes (--num-classes) but the training data ({data}) has '
                                   f'10: use --num-classes 10'),
        'st_plus_plus_full_net': (train_argv(data, tmp_path, 'x', '--method', 'st++'),
                                  '--method st++ on resnet18 samples only the full net: --st-min-keep 3 keeps every '
                                  'block of its stages (layer1, layer2, layer3, layer4 hold 2, 2, 2, 2 blocks); use '
                                  '--st-min-keep 1, the most that lets a stage be shortened'),
        'zero_batch': (train_argv(data, tmp_path, 'x', '-b', '0'), '--batch-size must be >= 1, got 0'),
        'negative_batch': (train_argv(data, tmp_path, 'x', '-b', '-8'), '--batch-size must be >= 1, got -8'),
        'zero_epochs': (train_argv(data, tmp_path, 'x', '--epochs', '0'), '--epochs must be >= 1, got 0'),
        'zero_val_interval': (train_argv(data, tmp_path, 'x', '--val-interval', '0'),
                              '--val-interval must be >= 1, got 0'),
        'zero_log_interval': (train_argv(data, tmp_path, 'x', '--log-interval', '0'),
                              '--log-interval must be >= 1, got 0'),
        'zero_grad_accum': (train_argv(data, tmp_path, 'x', '--grad-accum-steps', '0'),
                            '--grad-accum-steps must be >= 1, got 0'),
        'negative_workers': (train_argv(data, tmp_path, 'x', '--workers', '-1'), '--workers must be >= 0, got -1'),
        'output_under_a_file': (train_argv(data, _corrupt(tmp_path / 'plain', b'') / 'runs', 'x'),
                                f'--output {tmp_path / "plain" / "runs"}: cannot create '
                                f'{tmp_path / "plain" / "runs" / "x"}: {tmp_path / "plain"} is a file'),
        'aug_repeats_without_ddp': (train_argv(data, tmp_path, 'x', '--aug-repeats', '3'),
                                    '--aug-repeats 3 needs distributed training (torchrun with 2 or more processes)'),
        'sync_bn_with_torchscript': (train_argv(data, tmp_path, 'x', '--sync-bn', '--torchscript'),
                                     '--sync-bn cannot be combined with --torchscript'),
        'wandb_resume_without_resume': (train_argv(data, tmp_path, 'x', '--log-wandb', '--wandb-resume-id', 'abc'),
                                        '--wandb-resume-id continues a wandb run: add --resume'),
    }[case]


BAD_INPUTS = ['unknown_model', 'missing_data', 'empty_data', 'odd_mixup_batch', 'corrupt_resume', 'wrong_model_resume',
              'corrupt_initial', 'stop_epoch', 'auto_without_experiment', 'images_without_class_folders',
              'single_class', 'num_classes_below_data', 'st_plus_plus_full_net', 'zero_batch', 'negative_batch',
              'zero_epochs', 'zero_val_interval', 'zero_log_interval', 'zero_grad_accum', 'negative_workers',
              'output_under_a_file', 'aug_repeats_without_ddp', 'sync_bn_with_torchscript',
              'wandb_resume_without_resume']


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(case, data, tmp_path, capsys, one_epoch):
    last = Path(one_epoch.output_dir) / 'last.pth.tar'
    if case == 'empty_data':
        (tmp_path / 'train').mkdir()
        (tmp_path / 'validation').mkdir()
    argv, expected = _bad_input(case, data, tmp_path, last)
    assert train.cli(argv) == 2
    assert expected in _one_error_line(capsys, early=case not in LATE)
    assert not run_folder.holds_run(str(tmp_path / 'x'))  # nothing that would refuse the corrected command


def test_a_start_that_failed_late_leaves_nothing_that_blocks_the_corrected_run(data, tmp_path, capsys):
    assert train.cli(train_argv(data, tmp_path, 'x', '--num-classes', '5')) == 2
    assert 'use --num-classes 10' in _one_error_line(capsys, early=False)
    assert train.main(train_argv(data, tmp_path, 'x')) == 0
    assert [r['epoch'] for r in _summary(tmp_path / 'x')] == ['0']


def test_unreadable_image_is_named(data, tmp_path, capsys):
    broken = make_subset(tmp_path / 'data', 2, 1)
    bad = next((broken / 'train').iterdir()) / 'broken.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n this is not an image')
    assert train.cli(train_argv(broken, tmp_path, 'x', '-b', '4', '--workers', '1', '--bad-image-limit', '0')) == 2
    line = _one_error_line(capsys, early=False)
    assert 'unreadable image file' in line and str(bad) in line


def test_train_and_val_in_the_same_folder_warns(tmp_path, caplog):
    from subnet.data import check_image_folders
    folder = tmp_path / 'flat' / 'train' / 'class_a'
    folder.mkdir(parents=True)
    Image.new('L', (8, 8)).save(folder / 'a.png')
    check_image_folders(str(tmp_path / 'flat'), {'train': 'train', 'validation': 'training'})
    assert 'both resolve to' in caplog.text


def test_the_global_batch_and_lr_in_use_are_logged_at_start(one_epoch):
    log = (Path(one_epoch.output_dir) / 'log.txt').read_text()
    assert 'Global batch 16 (16 per process x 1 process x 1 accumulated); learning rate 0.05 (from --lr)' in log


def _global_batch_lines(tmp_path, caplog, *command_line, world_size=1):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text('lr: 0.2\nrecipe_global_batch: 512\nbatch_size: 256\nopt: sgd\n')
    argv = ['-c', str(cfg), *command_line]
    args, _ = parse_train_args(argv)
    args.rank, args.world_size = 0, world_size
    caplog.clear()
    with caplog.at_level('INFO', logger='train'):
        train.log_global_batch(args, float(args.batch_size), *train_option_sources(argv))
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_a_recipes_absolute_lr_at_another_global_batch_warns(tmp_path, caplog):
    # the README's ST++ example once ran the 512-image recipe on 2 x 8 processes: 4096 images per update
    lines = _global_batch_lines(tmp_path, caplog, world_size=16)
    assert lines[0] == ('INFO', 'Global batch 4096 (256 per process x 16 processes x 1 accumulated); learning rate '
                                '0.2 (absolute, from the config file)')
    assert lines[1][0] == 'WARNING' and 'lr 0.2 is for a global batch of 512' in lines[1][1]
    assert "--lr 1.6 (timm's scaling rule) or --batch-size 32 for the declared batch" in lines[1][1]
    assert len(_global_batch_lines(tmp_path, caplog, world_size=2)) == 1  # 256 x 2 = 512: as declared
    assert len(_global_batch_lines(tmp_path, caplog, '--batch-size', '32', world_size=16)) == 1
    chosen = _global_batch_lines(tmp_path, caplog, '--lr', '1.6', world_size=16)  # the user chose the rate
    assert chosen == [('INFO', 'Global batch 4096 (256 per process x 16 processes x 1 accumulated); learning rate '
                               '1.6 (from --lr)')]


def test_short_model_names_resolve_with_a_log_line(caplog):
    from subnet.models import resolve_model_name
    assert resolve_model_name('vit_base') == 'vit_base_patch16_224'
    assert resolve_model_name('vit_huge') == 'vit_huge_patch14_224'
    assert resolve_model_name('resnet50.a1_in1k') == 'resnet50.a1_in1k'
    assert "resolved to timm's vit_base_patch16_224" in caplog.text
    assert SHIPPED.is_dir()


# ------------------------------------------------------------------------------------ a quiet CPU quickstart

def test_default_device_falls_back_quietly_and_an_explicit_cuda_warns(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    argv = [a for a in train_argv(data, tmp_path, 'q') if a not in ('--device', 'cpu')]
    assert 'device' not in train_options_given(argv)
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert 'No CUDA GPU found: running on the CPU.' in err and 'WARNING' not in err
    assert yaml.safe_load((tmp_path / 'q' / 'args.yaml').read_text())['device'] == 'cuda'  # as parsed, as timm
    config = tmp_path / 'cuda.yaml'
    config.write_text('device: cuda\n')
    for given in (['--device', 'cuda'], ['--device=cuda:0'], ['-c', str(config)]):
        assert 'device' in train_options_given(argv + given)
    args, _ = parse_train_args(['--device', 'cuda'])
    use_default_device(args, device_given=True)
    fall_back_to_cpu(args, 'training')
    assert args.device == 'cpu'
    assert 'WARNING: --device cuda asked for but no CUDA GPU is present: training on the CPU.' in \
        capsys.readouterr().err


def test_loader_workers_are_capped_at_the_cpus_with_one_line(one_epoch, data, capsys, monkeypatch, recwarn):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0})
    last = Path(one_epoch.output_dir) / 'last.pth.tar'
    assert validate.main(['--checkpoint', str(last), '--data-dir', str(data), '--device', 'cpu',
                          '--workers', '4']) == 0
    err = capsys.readouterr().err
    assert err.count('--workers 4 lowered to 1, the number of CPUs this process may use.') == 1
    assert not [w for w in recwarn if 'worker' in str(w.message)]
