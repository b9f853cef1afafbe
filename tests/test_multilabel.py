"""Multi-label classification (``--task multilabel``, timm 1.0.31) and the ``--loss`` options.

The data is a tiny Hugging Face dataset written to Parquet in a temporary folder, read offline by timm's ``hfds/``
reader as the multi-label quickstart's data is: label lists, the same labels as multi-hot vectors, and one binary
field per class.
"""
import csv
import io
import json
import os
import subprocess

import pytest
import timm
import torch
from PIL import Image

import train
import validate
from subnet.criterion import build_criterion
from subnet.losses import cosub_loss
from subnet.timm_options import parse_train_args
from subnet.unreadable import NOT_COUNTED, drop_not_counted
from train_helpers import ROOT, TINY_RESNET, last_error_line, method_training, torchrun

datasets = pytest.importorskip('datasets')

CLASSES = ('cat', 'dog', 'bird', 'fish')
# each image's classes; a class's images are tinted by it so that a model can learn them
LABELS = ([0], [1, 2], [], [3], [0, 3], [2], [1], [0, 1, 2], [3, 1], [2, 0], [1], [0])


def _image(labels, index) -> dict:
    pixels = torch.full((16, 16, 3), 40, dtype=torch.uint8)
    for label in labels:
        pixels[label * 4:(label + 1) * 4, :, label % 3] = 220
    pixels[:, index % 16, :] = 128
    data = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(data, format='PNG')
    return {'bytes': data.getvalue(), 'path': None}


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """train.parquet and validation.parquet of a 4-class multi-label dataset (12 images each)."""
    folder = tmp_path_factory.mktemp('hf_multilabel')
    features = datasets.Features({
        'image': datasets.Image(),
        'labels': datasets.Sequence(datasets.ClassLabel(names=list(CLASSES))),
        'multihot': datasets.Sequence(datasets.Value('int64')),
        **{name: datasets.Value('bool') for name in CLASSES},
    })
    rows = {'image': [_image(labels, i) for i, labels in enumerate(LABELS)], 'labels': [list(l) for l in LABELS],
            'multihot': [[int(c in labels) for c in range(4)] for labels in LABELS],
            **{name: [c in labels for labels in LABELS] for c, name in enumerate(CLASSES)}}
    for split in ('train', 'validation'):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f'{split}.parquet'))
    return folder


def _run(hf_folder, output, experiment, *extra):
    return ['--task', 'multilabel', '--dataset', f'hfds/{hf_folder}', '--target-key', 'labels', '--output',
            str(output), '--experiment', experiment, '--device', 'cpu', '--workers', '0', '-b', '4', '--epochs', '1',
            '--lr', '0.05', '--warmup-epochs', '0', *TINY_RESNET[:-4], '--img-size', '16', '--num-classes', '4',
            *extra]


def _summary(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.mark.usefixtures('single_thread')
def test_multilabel_training_and_validation_report_map_and_f1_under_timms_names(hf_folder, tmp_path):
    train.run(_run(hf_folder, tmp_path, 'ml', '--mixup', '0.4', '--smoothing', '0.1', '--model-ema',
                   '--subnet-eval', 'prefix:0.5'))
    row = _summary(tmp_path / 'ml' / 'summary.csv')[0]
    for name in ('map', 'micro_f1', 'macro_f1', 'sample_f1'):
        assert 0 <= float(row[f'eval_{name}']) <= 100 and f'model_{name}' in row
    assert 'eval_top1' not in row and 'eval_top5' not in row
    assert 0 <= float(row['subnet_prefix0.5_map']) <= 100  # the subnet columns carry the task's metric
    assert (tmp_path / 'ml' / 'summary.png').is_file()  # its mAP panels drawn from those columns
    # validate.py: the task (and the model) adopted from the checkpoint, the same mAP under timm's field names
    argv = ['--checkpoint', str(tmp_path / 'ml' / 'model_best.pth.tar'), '--use-ema', '--dataset',
            f'hfds/{hf_folder}', '--target-key', 'labels', '--device', 'cpu', '--workers', '0',
            '--subnets', 'prefix:0.5', '--results-file', str(tmp_path / 'results.json'), '--results-format', 'json']
    assert validate.cli(argv) == 0
    full, subnet = json.loads((tmp_path / 'results.json').read_text())
    assert list(full)[1:5] == ['map', 'micro_f1', 'macro_f1', 'sample_f1'] and 'top1' not in full
    assert full['map'] == pytest.approx(float(row['eval_map']), abs=1e-3)
    assert subnet['subnet'] == 'prefix0.5' and 0 <= subnet['map'] <= 100


def test_multihot_vectors_and_binary_fields_read_as_the_same_targets(hf_folder):
    from subnet.data import build_dataset
    targets = {}
    for name, extra in (('lists', ['--target-key', 'labels']),
                        ('multihot', ['--target-key', 'multihot', '--target-format', 'multihot']),
                        ('fields', ['--target-key', ','.join(CLASSES)])):
        args, _ = parse_train_args(['--task', 'multilabel', '--dataset', f'hfds/{hf_folder}', '--num-classes', '4',
                                    *extra])
        dataset = build_dataset(args, 'validation', False, 'RGB')
        targets[name] = torch.stack([dataset[i][1] for i in range(len(LABELS))])
    expected = torch.zeros(len(LABELS), 4)
    for row, labels in enumerate(LABELS):
        expected[row, list(labels)] = 1
    for name, got in targets.items():
        assert torch.equal(got, expected), name


def test_a_multihot_format_without_the_multilabel_task_and_a_folder_dataset_are_refused(hf_folder, tmp_path, capsys):
    assert train.cli(['--target-format', 'multihot', '--dataset', f'hfds/{hf_folder}']) == 2
    assert 'needs --task multilabel' in last_error_line(capsys)
    assert train.cli(['--task', 'multilabel', '--data-dir', str(tmp_path), '--device', 'cpu']) == 2
    assert 'an image folder holds one class per image' in last_error_line(capsys)
    assert validate.cli(['--task', 'multilabel', '--data-dir', str(tmp_path), '--model', 'resnet18',
                         '--device', 'cpu']) == 2
    assert 'needs a dataset whose targets are label lists' in last_error_line(capsys)
    assert validate.cli(['--task', 'multilabel', '--dataset', f'hfds/{hf_folder}', '--metrics-avg', 'micro',
                         '--model', 'resnet18', '--device', 'cpu']) == 2
    assert '--metrics-avg scores single-label predictions' in last_error_line(capsys)


def test_an_eval_metric_the_task_does_not_produce_is_one_line(hf_folder, tmp_path, capsys):
    args, _ = parse_train_args(['--task', 'multilabel'])
    assert args.eval_metric == 'map' and args.smoothing == 0.0  # the multi-label defaults
    args, _ = parse_train_args([])
    assert args.eval_metric == 'top1' and args.smoothing == 0.1
    assert train.cli(_run(hf_folder, tmp_path, 'm', '--eval-metric', 'top1')) == 2
    assert last_error_line(capsys) == ('train.py: error: --eval-metric top1 is not a metric the multilabel evaluation '
                                       'produces (one of loss, map, micro_f1, macro_f1, sample_f1)')
    assert not (tmp_path / 'm').exists()


def test_a_missing_target_field_a_wrong_target_format_or_too_few_classes_is_one_line(hf_folder, tmp_path, capsys):
    """timm's reader and MultiLabelTarget raise these in the first batch; we read the first target up front."""
    assert train.cli(_run(hf_folder, tmp_path, 'k', '--target-key', 'nosuch')) == 2
    assert last_error_line(capsys) == (f"train.py: error: --target-key nosuch: the train split of hfds/{hf_folder} "
                                       f"has no field 'nosuch'")
    assert train.cli(_run(hf_folder, tmp_path, 'f', '--target-format', 'multihot')) == 2
    assert last_error_line(capsys).startswith(f'train.py: error: the first target of the train split of '
                                              f'hfds/{hf_folder} ([0], --target-key labels) does not fit: Dense')
    assert train.cli(_run(hf_folder, tmp_path, 'c', '--num-classes', '3')) == 2
    assert last_error_line(capsys) == (f'train.py: error: the model has 3 classes (--num-classes) but the training '
                                       f'data (hfds/{hf_folder}) has 4: use --num-classes 4')
    checkpoint = tmp_path / 'tiny.pth'  # without one, validate.py would fetch pretrained weights
    torch.save(timm.create_model('resnet18', num_classes=4, channels=(8, 16, 32, 64), stem_width=8).state_dict(),
               checkpoint)
    assert validate.cli(['--task', 'multilabel', '--dataset', f'hfds/{hf_folder}', '--target-key', 'nosuch',
                         '--checkpoint', str(checkpoint), *TINY_RESNET[:-4], '--num-classes', '4', '--device', 'cpu',
                         '--workers', '0']) == 2
    assert "the validation split of" in last_error_line(capsys)


# ------------------------------------------------------------------------------------------------ losses

@pytest.mark.parametrize('extra, message', [
    (['--task', 'multilabel', '--bce-loss', '--loss', 'asl'], '--bce-loss (the legacy spelling of --loss bce) '
                                                              'conflicts with --loss asl'),
    (['--task', 'multilabel', '--loss', 'twoway', '--mixup', '0.5'], "--loss twoway: Loss type 'twoway' requires "
                                                                     'binary targets'),
    (['--task', 'multilabel', '--loss', 'zlpr', '--loss-pos-weight', '2'], '--loss zlpr: Class and positive weights '
                                                                           'are only supported by bce'),
    (['--jsd-loss'], '--loss jsd: JSD loss requires jsd_splits > 1'),
    (['--loss', 'zlpr'], "--loss zlpr: Loss type 'zlpr' requires multi-label targets"),
    (['--task', 'multilabel', '--loss-class-weight', 'missing.json'], '--loss-class-weight missing.json: no such '
                                                                      'file'),
    (['--task', 'multilabel', '--loss', 'db'], '--loss db: The db loss requires class_counts'),
    (['--task', 'multilabel', '--loss-pos-weight', 'neg_pos'], "--loss-pos-weight neg_pos: Class weight method "
                                                               "'neg_pos' requires class stats"),
    (['--task', 'multilabel', '--class-stats', '{stats}', '--loss-pos-weight', 'inv_freq'],
     "--loss-pos-weight inv_freq: Method 'inv_freq' computes class_weight values"),
    (['--smoothing', '1.5'], '--smoothing must be in [0, 1), got 1.5'),
])
def test_loss_configurations_timm_refuses_stop_the_parse_with_one_line(extra, message, tmp_path, capsys):
    stats = tmp_path / 'stats.json'
    stats.write_text(json.dumps(dict(pos_counts=[2, 2, 1, 3], num_samples=8)))
    with pytest.raises(SystemExit) as stop:
        parse_train_args([a.format(stats=stats) for a in extra])
    assert stop.value.code == 2
    assert last_error_line(capsys).startswith(f'train.py: error: {message}')


def test_legacy_loss_flags_map_onto_loss_and_the_losses_are_timms(tmp_path):
    args, text = parse_train_args(['--task', 'multilabel', '--bce-loss', '--bce-pos-weight', '2'])
    assert (args.loss, args.loss_pos_weight) == ('bce', '2.0')
    replay = tmp_path / 'args.yaml'  # the run folder's args.yaml, with both spellings, replays
    replay.write_text(text)
    assert vars(parse_train_args(['-c', str(replay)])[0]) == vars(args)
    assert parse_train_args(['--jsd-loss', '--aug-splits', '3'])[0].loss == 'jsd'
    from timm.loss import (AsymmetricLossMultiLabel, BinaryCrossEntropy, DistributionBalancedLoss, PolyCrossEntropy,
                           SoftTargetCrossEntropy)
    stats = tmp_path / 'stats.json'
    stats.write_text(json.dumps(dict(pos_counts=[2, 2, 1, 3], num_samples=8)))
    criterion = build_criterion(parse_train_args(['--task', 'multilabel', '--smoothing', '0.2'])[0], 4)
    assert isinstance(criterion, BinaryCrossEntropy) and criterion.smooth_dense and criterion.smoothing == 0.2
    criterion = build_criterion(parse_train_args(['--task', 'multilabel', '--class-stats', str(stats),
                                                  '--loss-pos-weight', 'neg_pos'])[0], 4)
    torch.testing.assert_close(criterion.pos_weight, torch.tensor([3., 3., 7., 5 / 3]))
    assert isinstance(build_criterion(parse_train_args(['--task', 'multilabel', '--loss', 'asl'])[0], 4),
                      AsymmetricLossMultiLabel)
    assert isinstance(build_criterion(parse_train_args(['--task', 'multilabel', '--loss', 'db', '--class-stats',
                                                        str(stats)])[0], 4), DistributionBalancedLoss)
    assert isinstance(build_criterion(parse_train_args(['--loss', 'poly'])[0], 4), PolyCrossEntropy)
    assert isinstance(build_criterion(parse_train_args(['--mixup', '0.2'])[0], 4), SoftTargetCrossEntropy)


def test_class_weights_of_another_class_count_stop_the_run_before_training(hf_folder, tmp_path, capsys):
    assert train.cli(_run(hf_folder, tmp_path, 'w', '--loss-class-weight', '1,2,3')) == 2
    assert last_error_line(capsys) == 'train.py: error: --loss-class-weight has 3 entries but the model has 4 classes'
    assert not (tmp_path / 'w' / 'summary.csv').exists()


# ------------------------------------------------------------------------------------------------ methods

def _bce(logits, target):
    """Mean binary cross-entropy written out: -(t log σ(z) + (1 - t) log(1 - σ(z)))."""
    p = torch.sigmoid(logits.double())
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


def test_cosub_loss_on_multi_hot_targets_matches_a_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(6, 5, generator=g) < 0.4).double()  # multi-hot: any number of labels per row
    terms = cosub_loss(z1, z2, y, label_weight=0.3, label_smoothing=0.2)
    smoothed = y * 0.8 + 0.1  # timm's multi-label smoothing: towards 0.5
    peer_1, peer_2 = torch.sigmoid(z2).detach(), torch.sigmoid(z1).detach()  # per label, the other's sigmoid
    reference = 0.3 / 2 * (_bce(z1, smoothed) + _bce(z2, smoothed)) + 0.7 / 2 * (_bce(z1, peer_1) + _bce(z2, peer_2))
    torch.testing.assert_close(terms.total, reference)
    # the peer targets are teachers only: z2's gradient comes from its own terms
    grad, = torch.autograd.grad(terms.total, z2)
    own = 0.3 / 2 * _bce(z2, smoothed) + 0.7 / 2 * _bce(z2, peer_2)
    torch.testing.assert_close(grad, torch.autograd.grad(own, z2)[0])


def test_cosub_trains_multi_hot_targets_without_mixup():
    task, optimizer, args = method_training('cosub', ['--task', 'multilabel', '--smoothing', '0.1'], size=32)
    assert task.criterion.label_smoothing == 0.1  # no mixup to smooth the multi-hot targets: cosub does
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[1., 0, 0, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                           [0] * 10, [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]])
    result = task(images, target)
    assert torch.isfinite(result['loss']) and result['output'].shape == (4, 10)
    assert result['loss'] == pytest.approx(0.5 * result['cosub_label'] + 0.5 * result['cosub_peer'])
    with pytest.raises(Exception, match="cosub's loss is its own binary cross-entropy"):
        method_training('cosub', ['--task', 'multilabel', '--loss', 'asl'])


@pytest.mark.parametrize('method', ['st', 'st++', 'gkt'])
def test_softmax_distillation_methods_refuse_multilabel_in_one_line(method, hf_folder, tmp_path, capsys):
    assert train.cli(_run(hf_folder, tmp_path, 'x', '--method', method)) == 2
    assert last_error_line(capsys) == (f'train.py: error: --method {method} distils softmax distributions, which a '
                                       f'multi-label head does not have: it cannot train --task multilabel (cosub can)')


def test_unreadable_multilabel_images_are_left_out_of_the_metrics():
    from timm.task.evaluator import MultiLabelClassificationEvaluator
    evaluator = MultiLabelClassificationEvaluator()
    output = torch.tensor([[2., -2.], [-2., 2.], [5., 5.]])
    target = torch.tensor([[1., 0.], [0., 1.], [NOT_COUNTED, NOT_COUNTED]])
    kept_output, kept_target, dropped = drop_not_counted(evaluator, output, target)
    assert dropped == 1 and torch.equal(kept_target, target[:2]) and torch.equal(kept_output, output[:2])


def test_class_weights_counts_each_class_once_per_sample_for_class_stats(hf_folder, tmp_path):
    import class_weights
    stats = tmp_path / 'stats.json'
    assert class_weights.main(['--dataset', f'hfds/{hf_folder}', '--task', 'multilabel', '--target-key', 'labels',
                               '--output', str(stats)]) == 0
    written = json.loads(stats.read_text())
    expected = [sum(c in set(labels) for labels in LABELS) for c in range(4)]
    assert written == dict(num_samples=len(LABELS), pos_counts=expected, class_names=list(CLASSES))
    args, _ = parse_train_args(['--task', 'multilabel', '--class-stats', str(stats), '--loss', 'db'])
    assert build_criterion(args, 4) is not None  # timm's loader takes the file


def test_two_process_evaluation_covers_the_whole_split_once_without_the_samplers_padding(hf_folder, tmp_path):
    """11 validation images on 2 ranks: the sampler pads rank 1 with a repeat, which must not count. The gathered
    mAP and F1 equal validate.py's on one process."""
    argv = [a if a != 'ml' else 'ddp' for a in _run(hf_folder, tmp_path, 'ml', '--val-split', 'validation[:11]',
                                                     '-vb', '4')]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    done = subprocess.run(torchrun(str(ROOT / 'train.py'), *argv), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = _summary(tmp_path / 'ddp' / 'summary.csv')[0]
    argv = ['--checkpoint', str(tmp_path / 'ddp' / 'last.pth.tar'), '--dataset', f'hfds/{hf_folder}', '--split',
            'validation[:11]', '--target-key', 'labels', '--device', 'cpu', '--workers', '0', '-b', '5',
            '--results-file', str(tmp_path / 'results.json'), '--results-format', 'json']
    assert validate.cli(argv) == 0
    result = json.loads((tmp_path / 'results.json').read_text())
    for name in ('map', 'micro_f1', 'macro_f1', 'sample_f1'):
        assert result[name] == pytest.approx(float(row[f'eval_{name}']), abs=1e-3), name


def test_class_weights_bad_input_is_one_line(hf_folder, tmp_path, capsys):
    import class_weights
    for argv, message in (([], 'no dataset given'),
                          (['--data-dir', str(tmp_path / 'nowhere')], 'does not exist'),
                          (['--dataset', f'hfds/{hf_folder}', '--task', 'multilabel', '--target-key', 'labels',
                            '--num-classes', '3'], 'outside the 3 classes counted')):
        with pytest.raises(SystemExit) as stop:
            class_weights.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and 'Traceback' not in err
        assert message in err.splitlines()[-1], err
