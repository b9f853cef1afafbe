"""subnet.evaluation: the SPEC grammar, subnet masks, BN recalibration, validate.py --subnets / --bn-recal and
train.py --subnet-eval, on tiny models and on checkpoints trained on a slice of the shipped data."""
import copy
import csv
import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import train
import validate
from subnet.batchnorm import batchnorm_layers, recalibrate, recalibrated
from subnet.data import FixedSample
from subnet.evaluation import SUBNET_FIELDS, SubnetEvaluation, build_subnets
from subnet.spec import SubnetSpecError, parse_spec
from train_helpers import TINY_VIT, make_subset, run_train, train_argv

from conftest import create_tiny, tiny_input_size

TIMM_FIELDS = ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct',
               'interpolation']


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.single_thread: much faster on the shared 2-core machine
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the grammar

def test_spec_names_subnets_in_order_without_duplicates():
    names = [r.name for r in parse_spec(' prefix:0.25, 0.50 ; random:2@0.2,0.1;first:4;prefix:0.5 ')]
    assert names == ['prefix0.25', 'prefix0.5', 'random0.2_1', 'random0.2_2', 'random0.1_1', 'random0.1_2',
                     'first4']


@pytest.mark.parametrize('spec, message', [
    ('', 'empty subnet spec'),
    (';', 'empty subnet spec'),
    ('depth:3', "'depth:3' is not one of"),
    ('prefix', "'prefix' is not one of"),
    ('prefix:0', 'fraction 0 must lie in (0, 1]'),
    ('prefix:1.5', 'fraction 1.5 must lie in (0, 1]'),
    ('prefix:half', "'half' is not a number"),
    ('random:8', 'write random:N@R'),
    ('random:0@0.2', 'at least 1'),
    ('random:2@1.2', 'drop rate 1.2 must lie in [0, 1]'),
    ('first:0', 'K must be at least 1'),
    ('first:2.5', "'2.5' is not a number"),
])
def test_a_bad_spec_is_one_clear_line(spec, message):
    with pytest.raises(SubnetSpecError) as error:
        parse_spec(spec)
    assert message in str(error.value) and '\n' not in str(error.value)
    assert isinstance(error.value, ValueError)  # the library's error; the command line makes it one line


# ---------------------------------------------------------------------------------------------- the masks

def test_stage_prefixes_keep_the_first_ceil_f_d_blocks_and_never_a_droppable_block_too_few(tiny_model):
    model, block_map = tiny_model('resnet50')  # stages [3, 4, 6, 3], each stage's first block not skippable
    subnets = {s.name: s for s in build_subnets('prefix:0.1,0.5,1', block_map)}
    assert subnets['prefix0.5'].depths == (2, 2, 3, 2)
    assert subnets['prefix0.1'].depths == (1, 1, 1, 1)
    assert subnets['prefix1'].is_full and subnets['full'].is_full
    for subnet in subnets.values():
        assert not bool((~subnet.keep & ~block_map.skippable).any())
        for stage, kept in zip(block_map.stages, subnet.depths):
            assert subnet.keep[list(stage.blocks)].tolist() == [True] * kept + [False] * (len(stage.blocks) - kept)
        assert 0 < subnet.flop_fraction <= 1 and 0 < subnet.kept_fraction <= 1
    assert subnets['prefix0.1'].flop_fraction < subnets['prefix0.5'].flop_fraction < 1
    assert subnets['prefix0.5'].kept_fraction == pytest.approx(9 / 16)
    assert subnets['prefix0.5'].blocks_text(block_map) == '##.|##..|###...|##.'


def test_first_k_keeps_the_first_blocks_and_the_unskippable_ones(tiny_model):
    _, vit = tiny_model('vit_tiny_patch16_224')
    first = {s.name: s for s in build_subnets('first:3,12', vit, include_full=False)}
    assert first['first3'].keep.tolist() == [True] * 3 + [False] * 9
    assert first['first3'].kept_fraction == pytest.approx(0.25) and first['first12'].is_full
    _, cait = tiny_model('cait_xxs24_224')  # the 2 class-attention blocks at the end cannot be skipped
    keep = build_subnets('first:2', cait, include_full=False)[0].keep
    assert keep.nonzero().flatten().tolist() == [0, 1, 24, 25]
    with pytest.raises(ValueError, match='first13: .* has only 12 blocks'):
        build_subnets('first:13', vit)


def test_random_subsets_are_reproducible_per_seed_draw_and_rate_whatever_else_the_spec_holds(tiny_model):
    _, block_map = tiny_model('resnet50')
    alone = {s.name: s.keep for s in build_subnets('random:2@0.3', block_map, seed=7)}
    mixed = {s.name: s.keep for s in build_subnets('prefix:0.5;random:6@0.5;random:2@0.3', block_map, seed=7)}
    assert all(torch.equal(alone[name], mixed[name]) for name in ('random0.3_1', 'random0.3_2'))
    other_seed = build_subnets('random:2@0.3', block_map, seed=8)
    assert any(not torch.equal(alone[s.name], s.keep) for s in other_seed if s.name != 'full')
    draws = torch.stack([s.keep for s in build_subnets('random:400@0.3', block_map, include_full=False)])
    assert bool(draws[:, ~block_map.skippable].all())  # fixed blocks always run
    assert draws[:, block_map.skippable].float().mean().item() == pytest.approx(0.7, abs=0.03)


# ---------------------------------------------------------------------------------------------- evaluating

def _bn_state(model):
    return [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in batchnorm_layers(model)]


def _same_state(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_run_recalibrates_every_net_alike_and_installs_each_subnet(single_thread):
    model = create_tiny('resnet18')
    evaluation = SubnetEvaluation(model, 'prefix:0.5;first:3', input_size=tiny_input_size('resnet18'))
    x = torch.randn(4, *tiny_input_size('resnet18'))
    batches = [torch.randn(8, *tiny_input_size('resnet18')) * 3 + 1 for _ in range(3)]
    before = _bn_state(model)
    seen = {}

    def measure(subnet):
        installed = any('forward' in b.module.__dict__ for b in evaluation.block_map.blocks)
        seen[subnet.name] = (installed, _same_state(_bn_state(model), before))
        with torch.no_grad():
            return model(x)

    with torch.no_grad():
        plain = model.eval()(x)
    assert [(s.name, images) for s, _, images in evaluation.run(measure)] == [
        ('full', 0), ('prefix0.5', 0), ('first3', 0)]
    assert seen['full'] == (False, True)  # without recalibration: a plain evaluation of the checkpoint
    results = evaluation.run(measure, lambda: iter(batches), recal_images=20)
    # the full net is recalibrated like its subnets, so their accuracies compare (ST's code does it too)
    assert [(s.name, images) for s, _, images in results] == [('full', 20), ('prefix0.5', 20), ('first3', 20)]
    assert seen['full'] == (False, False)  # nothing installed, statistics re-estimated
    assert seen['prefix0.5'] == (True, False) and seen['first3'] == (True, False)
    assert _same_state(_bn_state(model), before)  # restored after every net
    recalibrated_copy = copy.deepcopy(model)
    recalibrate(recalibrated_copy, batches, 20)
    with torch.no_grad():
        assert torch.equal(results[0][1], recalibrated_copy.eval()(x))
        assert not torch.allclose(results[0][1], plain) and torch.equal(model(x), plain)
    assert not torch.allclose(results[1][1], results[0][1])
    assert not any('forward' in b.module.__dict__ for b in evaluation.block_map.blocks)


def test_recalibration_estimates_the_statistics_the_subnet_sees(single_thread):
    model = create_tiny('resnet18')
    evaluation = SubnetEvaluation(model, 'prefix:0.5', input_size=tiny_input_size('resnet18'))
    images = torch.randn(16, *tiny_input_size('resnet18'))
    before = _bn_state(model)

    def statistics(keep):
        with evaluation.engine.subnet(keep), recalibrated(model, [images[:8], images[8:]], 16) as count:
            return count, model.bn1.running_mean.clone(), model.layer2[0].bn1.running_mean.clone()

    count, stem, deep = statistics(evaluation.subnets[1].keep)
    _, stem_full, deep_full = statistics(evaluation.subnets[0].keep)
    assert count == 16 and _same_state(_bn_state(model), before)
    with torch.no_grad():  # the stem runs before any block: its mean is the batch mean of conv1's output
        assert torch.allclose(stem, model.conv1(images).mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(stem, stem_full, atol=1e-6)
    # layer2.0 sees layer1's output, which differs when layer1.1 is dropped
    assert not torch.allclose(deep, deep_full, atol=1e-4)


def test_fixed_sample_is_a_seeded_mix_of_classes_and_forwards_the_transform():
    class Folder(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return 100

        def __getitem__(self, index):
            return index, index // 10  # sorted by class, as an image folder is

    folder = Folder()
    sample = FixedSample(folder, 20, seed=3)
    assert len(sample) == 20 and sample.indices == FixedSample(folder, 20, seed=3).indices
    assert len({sample[i][1] for i in range(10)}) > 3  # the first batch is not one class
    sample.transform = 'eval transform'
    assert folder.transform == 'eval transform'


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=16, val_per_class=8)


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is not installed here)."""
    scalars = []

    def __init__(self, log_dir):
        self.log_dir = log_dir

    def add_scalar(self, tag, value, step):
        FakeWriter.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        pass


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data):
    """A ResNet (with --subnet-eval and TensorBoard) and a ViT, one epoch each."""
    out = tmp_path_factory.mktemp('runs')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fake = types.ModuleType('torch.utils.tensorboard')
    fake.SummaryWriter = FakeWriter
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, 'torch.utils.tensorboard', fake)
            resnet = run_train(train_argv(data, out, 'resnet', '--subnet-eval', 'prefix:0.5;first:3',
                                          '--log-tensorboard'))
        vit = run_train(train_argv(data, out, 'vit', model=TINY_VIT))
    finally:
        torch.set_num_threads(threads)
    return {'resnet': Path(resnet.output_dir), 'vit': Path(vit.output_dir), 'out': out}


def _validate(capsys, *argv):
    assert validate.main([*argv, '--workers', '0', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index('--result') + len('--result'):])


def _csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_subnet_eval_columns_in_summary_equal_validate_subnet_rows(runs, data, capsys, one_thread):
    summary = _csv(runs['resnet'] / 'summary.csv')
    assert list(summary[0])[-2:] == ['subnet_prefix0.5_top1', 'subnet_first3_top1']
    rows = _validate(capsys, '--checkpoint', str(runs['resnet'] / 'last.pth.tar'), '--data-dir', str(data),
                     '--subnets', 'prefix:0.5;first:3')
    by_name = {row['subnet']: row for row in rows}
    # --method none: the live model is the checkpoint, and train.py's eval is validate.py's
    for name in ('prefix0.5', 'first3'):
        assert float(summary[0][f'subnet_{name}_top1']) == pytest.approx(by_name[name]['top1'], abs=1e-4)
    assert float(summary[0]['eval_top1']) == pytest.approx(by_name['full']['top1'], abs=1e-4)
    logged = {tag for tag, _, step in FakeWriter.scalars if step == 0}
    assert {'train_loss', 'eval_top1', 'lr', 'subnet_prefix0.5_top1'} <= logged


def test_summary_png_is_written_at_the_end_of_a_run(runs):
    with Image.open(runs['resnet'] / 'summary.png') as image:
        assert image.format == 'PNG' and image.width >= 600 and image.height >= 300


@pytest.mark.parametrize('model, spec', [('resnet', 'prefix:0.25,0.5;random:2@0.5;first:3'),
                                         ('vit', 'first:1,2,3;prefix:0.5;random:2@0.5')])
def test_subnet_rows_follow_the_full_row_which_is_plain_validate(model, spec, runs, data, capsys, tmp_path,
                                                                 one_thread):
    checkpoint = str(runs[model] / 'last.pth.tar')
    plain = _validate(capsys, '--checkpoint', checkpoint, '--data-dir', str(data))
    results = tmp_path / 'results.csv'
    rows = _validate(capsys, '--checkpoint', checkpoint, '--data-dir', str(data), '--subnets', spec,
                     '--results-file', str(results))
    assert rows[0] == {**plain, 'subnet': 'full', 'depths': rows[0]['depths'], 'blocks': rows[0]['blocks'],
                       'kept_fraction': 1.0, 'flop_fraction': 1.0, 'bn_recal': 0}
    assert [row['subnet'] for row in rows] == ['full'] + [r.name for r in parse_spec(spec)]
    written = _csv(results)
    assert list(written[0]) == TIMM_FIELDS + list(SUBNET_FIELDS) and len(written) == len(rows)
    for row in rows:
        assert set(row) == set(TIMM_FIELDS) | set(SUBNET_FIELDS)
        assert 0 < row['kept_fraction'] <= 1 and 0 < row['flop_fraction'] <= 1 and 0 <= row['top1'] <= 100
        assert row['kept_fraction'] == pytest.approx(row['blocks'].count('#') / (len(row['blocks'])
                                                                               - row['blocks'].count('|')))
    by_name = {row['subnet']: row for row in rows}
    if model == 'vit':  # 4 blocks in one stage
        assert [by_name[f'first{k}']['kept_fraction'] for k in (1, 2, 3)] == [0.25, 0.5, 0.75]
        assert by_name['first1']['flop_fraction'] < by_name['first2']['flop_fraction'] < \
            by_name['first3']['flop_fraction'] < 1
        assert by_name['prefix0.5']['blocks'] == '##..' and by_name['first2']['top1'] == by_name['prefix0.5']['top1']
    else:  # ResNet-18 stages of 2, the first block of stages 2-4 cannot be skipped
        assert by_name['prefix0.5']['depths'] == '1-1-1-1' and by_name['first3']['blocks'] == '##|#.|#.|#.'


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_bn_recal_re_estimates_every_row_and_leaves_the_checkpoint_file_alone(runs, data, capsys, one_thread):
    checkpoint = runs['resnet'] / 'last.pth.tar'
    before = _sha256(checkpoint)
    common = ['--checkpoint', str(checkpoint), '--data-dir', str(data), '--subnets', 'prefix:0.5']
    plain = _validate(capsys, *common)
    recal = _validate(capsys, *common, '--bn-recal', '32')
    assert _sha256(checkpoint) == before
    assert [row['bn_recal'] for row in plain] == [0, 0]
    assert [row['bn_recal'] for row in recal] == [32, 32]  # the full net's row too: every point compares
    vit = _validate(capsys, '--checkpoint', str(runs['vit'] / 'last.pth.tar'), '--data-dir', str(data),
                    '--subnets', 'prefix:0.5', '--bn-recal', '32')
    assert [row['bn_recal'] for row in vit] == [0, 0]  # LayerNorm: nothing to re-estimate, no train split read


def test_the_plot_title_says_which_points_were_re_estimated():
    assert validate.recalibration_note([{'bn_recal': 0}, {'bn_recal': 0}]) == ''
    assert validate.recalibration_note([{'bn_recal': 32}, {'bn_recal': 32}]) == \
        ', BN statistics of every net (full nets too) re-estimated on 32 images'
    assert validate.recalibration_note([{'bn_recal': 32}, {'bn_recal': 0}]) == \
        ', BN statistics re-estimated on 32 images for the BatchNorm models only'


def test_plot_of_several_runs_has_one_curve_per_run_folder(runs, data, capsys, tmp_path, one_thread):
    png = tmp_path / 'subnets.png'
    rows = _validate(capsys, '--checkpoint', str(runs['out'] / '*' / 'last.pth.tar'), '--data-dir', str(data),
                     '--subnets', 'prefix:0.5;first:2', '--plot', str(png))
    assert {Path(row['checkpoint']).parent.name for row in rows} == {'resnet', 'vit'}
    assert list(rows[0])[:len(TIMM_FIELDS) + 1] == TIMM_FIELDS + ['checkpoint']  # timm's fields, then ours
    assert [row['subnet'] for row in rows] == ['full', 'prefix0.5', 'first2'] * 2
    assert rows[0]['top1'] >= rows[3]['top1']  # runs ranked by their full net, subnets kept with theirs
    with Image.open(png) as image:
        assert image.format == 'PNG' and image.width >= 600 and image.height >= 400


def _exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse: bad values of typed options
        return exit_info.code


@pytest.mark.parametrize('argv, message', [
    (['--subnets', 'prefix:0.5;bogus:1'], "argument --subnets: subnet spec term 'bogus:1' is not one of"),
    (['--plot', 'x.png'], '--plot works on the --subnets rows'),
    (['--subnets', 'prefix:0.5', '--bn-recal', '-1'], '--bn-recal must be >= 0'),
    (['--subnets', 'prefix:0.5', '--plot', 'x.txt'], 'the file name must end in one of'),
    (['--subnets', 'first:9'], 'first9: resnet18 has only 8 blocks'),  # known once the model is built
])
def test_bad_subnet_options_give_one_line_and_exit_2(argv, message, runs, data, capsys, one_thread):
    code = _exit_code(validate.cli, ['--checkpoint', str(runs['resnet'] / 'last.pth.tar'), '--data-dir',
                                      str(data), '--workers', '0', '--device', 'cpu', *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and 'Traceback' not in err and lines[-1].startswith('validate.py: error: ')
    assert message in lines[-1] and sum('error' in line for line in lines) == 1
    if 'first:9' not in argv:  # caught before the model is built: nothing else is printed
        assert len(lines) == 1


def test_bad_subnet_eval_spec_stops_train_py_before_anything_is_built(data, tmp_path, capsys):
    assert _exit_code(train.main, train_argv(data, tmp_path, 'x', '--subnet-eval', 'prefix:0')) == 2
    config = tmp_path / 'hparams.yaml'
    config.write_text(yaml.safe_dump({'subnet_eval': 'random:4'}))
    assert train.cli(['-c', str(config), *train_argv(data, tmp_path, 'y')]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith('train.py: error: ') for line in lines)
    assert 'argument --subnet-eval: subnet spec term' in lines[0] and 'fraction 0 must lie in' in lines[0]
    assert 'write random:N@R' in lines[1]
    assert not (tmp_path / 'x').exists() and not (tmp_path / 'y').exists()


def test_a_spec_kind_needs_a_free_lower_case_name():
    from subnet.spec import SpecKind, register_kind, spec_kind

    class Prefix(SpecKind):
        name = 'prefix'

    class Named(SpecKind):
        name = 'Deep2'

    for kind, message in ((Prefix(), "'prefix' is registered already"), (Named(), 'lower-case letters')):
        with pytest.raises(ValueError, match=message):
            register_kind(kind)
    assert type(spec_kind('prefix')).__name__ == 'StagePrefix'
