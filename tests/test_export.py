"""subnet.export and validate.py --export: subnets written as checkpoints that plain timm loads, checked in a fresh
process that never imports this project; refusals; the round trip through validate.py with re-estimated BN."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import validate
from subnet.depth import DepthEngine
from subnet.evaluation import Subnet, build_subnets
from subnet.export import DEPTH_KEYWORDS, EXPORT_FIELDS, ExportError, SubnetExporter
from subnet.speed import SPEED_FIELDS, images_per_second, speed_fields
from train_helpers import make_subset, run_train, train_argv

from conftest import TINY_FAMILIES, tiny_input_size

# the families of TINY_FAMILIES that timm builds from a depth keyword, and those it cannot
EXPORTABLE = ['resnet18', 'resnet50', 'convnext_atto', 'vit_tiny_patch16_224', 'deit_tiny_patch16_224',
              'deit3_small_patch16_224', 'cait_xxs24_224', 'pit_ti_224', 'swin_tiny_patch4_window7_224',
              'xcit_nano_12_p16_224', 'levit_128s', 'eva02_tiny_patch14_224', 'beit_base_patch16_224']
NOT_EXPORTABLE = ['regnetx_002', 'efficientnet_b0', 'mobilenetv3_small_100']

# Run in a fresh interpreter, outside the repository: plain timm loads each exported file with the printed call.
LOADER = r'''
import json, sys
import timm, torch
torch.set_num_threads(1)
manifest = json.load(open(sys.argv[1]))
for entry in manifest:
    model = timm.create_model(entry['model'], **entry['kwargs'], checkpoint_path=entry['path']).eval()
    with torch.no_grad():
        torch.save(model(torch.load(entry['input'])), entry['output'])
    entry['params'] = sum(p.numel() for p in model.parameters())
json.dump(manifest, open(sys.argv[1], 'w'))
assert not any(name == 'subnet' or name.startswith('subnet.') for name in sys.modules), 'subnet was imported'
print('loaded', len(manifest))
'''


def _exporter(model, block_map, name):
    kwargs = {**TINY_FAMILIES[name], 'num_classes': model.num_classes}
    return SubnetExporter(DepthEngine(model, block_map), name, kwargs)


def _random_plan(exporter, block_map):
    """The first draw of random:16@0.2 that timm can build (for Swin: one whose kept blocks keep their index
    parity) and that drops a block."""
    for subnet in build_subnets('random:16@0.2', block_map, include_full=False):
        if subnet.keep.all():
            continue
        try:
            return exporter.plan(subnet)
        except ExportError:
            continue
    raise AssertionError('no draw of random:16@0.2 exports')


@pytest.fixture(scope='module')
def exported(tiny_model, tmp_path_factory):
    """Per family, a prefix and a random subnet exported, and their logits on one batch: the depth engine's
    (here) and plain timm's (one fresh process for all families)."""
    folder = tmp_path_factory.mktemp('exported')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    manifest, expected = [], {}
    try:
        for name in EXPORTABLE:
            model, block_map = tiny_model(name)
            exporter = _exporter(model, block_map, name)
            prefix = build_subnets('prefix:0.5', block_map, include_full=False)[0]
            images = torch.randn((3,) + tiny_input_size(name), generator=torch.Generator().manual_seed(1))
            torch.save(images, folder / f'{name}.input.pt')
            for kind, plan in (('prefix', exporter.plan(prefix)), ('random', _random_plan(exporter, block_map))):
                path = exporter.write(plan, str(folder / name))
                with torch.no_grad(), exporter.engine.subnet(plan.subnet.keep):
                    expected[(name, kind)] = model(images)
                manifest.append(dict(family=name, kind=kind, model=plan.model_name, kwargs=plan.kwargs, path=path,
                                     full_params=sum(p.numel() for p in model.parameters()),
                                     input=str(folder / f'{name}.input.pt'),
                                     output=str(folder / f'{name}.{kind}.logits.pt')))
    finally:
        torch.set_num_threads(threads)
    (folder / 'manifest.json').write_text(json.dumps(manifest))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ''}
    done = subprocess.run([sys.executable, '-c', LOADER, str(folder / 'manifest.json')], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((folder / 'manifest.json').read_text())
    return {(e['family'], e['kind']): (e, expected[(e['family'], e['kind'])], torch.load(e['output']))
            for e in manifest}


def test_the_exportable_families_are_the_tiny_families_with_a_depth_keyword():
    assert sorted(EXPORTABLE + NOT_EXPORTABLE) == sorted(TINY_FAMILIES)


@pytest.mark.parametrize('name', EXPORTABLE)
@pytest.mark.parametrize('kind', ['prefix', 'random'])
def test_plain_timm_loads_the_exported_subnet_and_computes_the_subnets_logits(exported, name, kind):
    entry, expected, got = exported[(name, kind)]
    keyword = next(d.keyword for d in DEPTH_KEYWORDS if d.keyword in entry['kwargs'])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max())))
    assert entry['params'] < entry['full_params']  # a smaller architecture, not the full one with blocks unused
    depth = entry['kwargs'][keyword]
    checkpoint = torch.load(entry['path'], weights_only=False)
    assert checkpoint['model_kwargs'] == entry['kwargs'] and checkpoint['args'].model_kwargs[keyword] == depth
    assert checkpoint['args'].model == entry['model'] == name


def test_kept_blocks_are_renumbered_and_the_dropped_ones_left_out(tiny_model, tmp_path):
    model, block_map = tiny_model('resnet50')
    exporter = _exporter(model, block_map, 'resnet50')
    # layer3 keeps its blocks 0, 2 and 5: they become layer3.0, layer3.1, layer3.2
    keep = torch.ones(len(block_map.blocks), dtype=torch.bool)
    for index, block in enumerate(block_map.blocks):
        if block.name in ('layer3.1', 'layer3.3', 'layer3.4'):
            keep[index] = False
    plan = exporter.plan(Subnet('custom', 'random', keep, block_map.stage_depths(keep), 0.8, 0.8))
    assert plan.kwargs['layers'] == [3, 4, 3, 3]
    state = torch.load(exporter.write(plan, str(tmp_path)), weights_only=False)['state_dict']
    original = model.state_dict()
    for new, old in (('layer3.1', 'layer3.2'), ('layer3.2', 'layer3.5'), ('layer4.0', 'layer4.0')):
        assert torch.equal(state[f'{new}.conv2.weight'], original[f'{old}.conv2.weight'])
    assert not any(key.startswith('layer3.3.') for key in state) and state['fc.weight'].shape == (1000, 2048)


@pytest.mark.parametrize('name', NOT_EXPORTABLE)
def test_a_family_timm_cannot_build_from_keywords_is_refused_naming_what_is_supported(tiny_model, name):
    model, block_map = tiny_model(name)
    with pytest.raises(ExportError, match=r'cannot be exported: .* --export supports ResNet/ResNeXt \(layers=\)'):
        _exporter(model, block_map, name)


@pytest.mark.parametrize('name, spec, message', [
    ('resnet18', 'prefix:1', 'keeps every block: it is the full net'),
    ('convnext_atto', 'first:2', 'keeps no block of stages.1.blocks'),
    ('vit_tiny_patch16_224', 'random:1@1', 'keeps no block of blocks'),
])
def test_a_subnet_that_is_the_full_net_or_keeps_nothing_of_a_stage_is_refused(tiny_model, tmp_path, name, spec,
                                                                            message):
    model, block_map = tiny_model(name)
    exporter = _exporter(model, block_map, name)
    with pytest.raises(ExportError, match=message):
        exporter.plan_all(build_subnets(spec, block_map), str(tmp_path / 'out'))
    with pytest.raises(ExportError, match='needs a subnet to export'):
        exporter.plan_all(build_subnets('prefix:0.5', block_map)[:1], str(tmp_path / 'out'))  # the full net alone
    assert not (tmp_path / 'out').exists()


def test_swin_refuses_a_subnet_that_moves_a_block_to_the_other_window_shift(tiny_model):
    model, block_map = tiny_model('swin_tiny_patch4_window7_224')
    exporter = _exporter(model, block_map, 'swin_tiny_patch4_window7_224')

    def subnet(dropped):
        keep = torch.tensor([b.name not in dropped for b in block_map.blocks])
        return Subnet('custom', 'random', keep, block_map.stage_depths(keep), 0.9, 0.9)
    # dropping layers.0.blocks.0 would make the shifted block 1 the unshifted block 0 of the exported model
    with pytest.raises(ExportError, match=r'layers.0.blocks.1 would become layers.0.blocks.0, which timm builds '
                                          r'with shift_size=\(0, 0\), not \(2, 2\)'):
        exporter.plan(subnet({'layers.0.blocks.0'}))
    # dropping a pair keeps every later block's parity; dropping the stage's last block moves nothing
    assert exporter.plan(subnet({'layers.2.blocks.2', 'layers.2.blocks.3', 'layers.0.blocks.1'})).kwargs['depths'] \
        == [1, 2, 4, 2]


# ---------------------------------------------------------------------------------------------- validate.py

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One epoch of a slim ResNet-18 on a slice of the shipped data."""
    data = make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=16, val_per_class=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = run_train(train_argv(data, tmp_path_factory.mktemp('runs'), 'resnet'))
    finally:
        torch.set_num_threads(threads)
    return {'data': data, 'checkpoint': Path(trained.output_dir) / 'last.pth.tar'}


def _validate(capsys, *argv):
    assert validate.main([*argv, '--workers', '0', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index('--result') + len('--result'):])


def test_validate_export_round_trip_gives_the_subnet_rows_top1_with_the_re_estimated_bn(run, capsys, tmp_path,
                                                                                        single_thread):
    folder, png = tmp_path / 'exported', tmp_path / 'latency.png'
    rows = _validate(capsys, '--checkpoint', str(run['checkpoint']), '--data-dir', str(run['data']),
                     '--subnets', 'prefix:0.5;random:1@0.5', '--bn-recal', '32', '--export', str(folder),
                     '--speed-batch', '4', '--plot', str(png), '--plot-x', 'latency')
    assert [row['subnet'] for row in rows] == ['full', 'prefix0.5', 'random0.5_1'] and png.is_file()
    assert rows[0]['exported'] == '' and rows[0]['speedup'] == rows[0]['speedup_batch1'] == 1.0
    assert all(list(row)[-6:] == list(EXPORT_FIELDS + SPEED_FIELDS) for row in rows)  # after the subnet fields
    original = torch.load(run['checkpoint'], weights_only=False)['state_dict']
    for row in rows[1:]:
        assert row['exported'] == str(folder / f'{row["subnet"]}.pth.tar') and row['bn_recal'] == 32
        assert row['load_call'].startswith("timm.create_model('resnet18', num_classes=10, channels=(8, 16, 32, 64), "
                                           f"stem_width=8, layers=[{row['depths'].replace('-', ', ')}], ")
        assert row['img_per_s'] > 0 and row['img_per_s_batch1'] > 0 and row['speedup'] > 0
        exported = torch.load(row['exported'], weights_only=False)
        # the statistics the evaluation re-estimated, not the checkpoint's
        assert not torch.equal(exported['state_dict']['bn1.running_mean'], original['bn1.running_mean'])
        assert exported['subnet']['top1'] == row['top1'] and exported['subnet']['bn_recal'] == 32
        again = _validate(capsys, '--checkpoint', row['exported'], '--data-dir', str(run['data']))
        assert (again['top1'], again['top5']) == (row['top1'], row['top5'])
        assert again['param_count'] < rows[0]['param_count']
    assert not [p for p in os.listdir(folder) if p.endswith('.tmp')]


def _error(capsys, argv):
    code = validate.cli([*argv, '--workers', '0', '--device', 'cpu'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith('validate.py: error: ')
    return lines[-1]


def test_validate_export_refusals_are_one_line_and_write_nothing(run, capsys, tmp_path, single_thread):
    folder = tmp_path / 'exported'
    common = ['--checkpoint', str(run['checkpoint']), '--data-dir', str(run['data']), '--export', str(folder)]
    assert 'keeps every block: it is the full net' in _error(capsys, [*common, '--subnets', 'prefix:0.5,1'])
    assert '--export writes the --subnets subnets' in _error(capsys, common)
    assert '--plot-x latency draws the times --export measures' in _error(
        capsys, ['--checkpoint', str(run['checkpoint']), '--subnets', 'prefix:0.5', '--plot', str(tmp_path / 'p.png'),
                 '--plot-x', 'latency'])
    assert '--export works on one checkpoint' in _error(
        capsys, [*common[:1], str(run['checkpoint'].parent / '*.pth.tar'), *common[2:], '--subnets', 'prefix:0.5'])
    assert not folder.exists()
    folder.mkdir()
    (folder / 'prefix0.5.pth.tar').write_bytes(b'mine')
    assert 'prefix0.5.pth.tar exists already' in _error(capsys, [*common, '--subnets', 'first:2;prefix:0.5'])
    assert sorted(os.listdir(folder)) == ['prefix0.5.pth.tar']
    assert (folder / 'prefix0.5.pth.tar').read_bytes() == b'mine'


def test_speed_times_each_model_at_each_batch_size_in_eval_mode_and_relates_it_to_the_full_net(single_thread):
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 512), torch.nn.Dropout(0.5),
                               torch.nn.Linear(512, 10))
    narrow = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10), torch.nn.Dropout(0.5))
    models = {'full': wide.train(), 'small': narrow.train()}
    speeds = images_per_second(models, (3, 8, 8), (1, 4), device=torch.device('cpu'), rounds=3, round_seconds=0.01)
    assert not wide.training and not narrow.training  # dropout off: inference is what is timed
    assert set(speeds) == {'full', 'small'} and all(set(s) == {1, 4} and min(s.values()) > 0 for s in speeds.values())
    full, small = speed_fields(speeds, 'full', 'full', 4), speed_fields(speeds, 'small', 'full', 4)
    assert full['speedup'] == full['speedup_batch1'] == 1.0 and set(full) == set(SPEED_FIELDS)
    assert small['speedup'] == pytest.approx(speeds['small'][4] / speeds['full'][4], rel=1e-2)
    assert small['img_per_s_batch1'] == pytest.approx(speeds['small'][1], abs=0.01)


def test_plot_x_latency_puts_the_measured_time_per_image_on_the_x_axis(monkeypatch, tmp_path):
    from subnet import plots
    drawn = []
    monkeypatch.setattr(plots, '_save', lambda figure, path: drawn.append(figure) or path)
    rows = [{'subnet': 'full', 'flop_fraction': 1.0, 'speedup': 1.0, 'top1': 80.0},
            {'subnet': 'prefix0.5', 'flop_fraction': 0.7, 'speedup': 1.25, 'top1': 78.0},
            {'subnet': 'prefix0.25', 'flop_fraction': 0.5, 'speedup': 2.0, 'top1': 75.0}]
    for x, expected in (('flops', [50, 70, 100]), ('latency', [50, 80, 100])):
        plots.plot_subnets([('st', rows)], str(tmp_path / f'{x}.png'), x=x)
        axes = drawn[-1].axes[0]
        assert list(axes.get_lines()[0].get_xdata()) == pytest.approx(expected)
        assert axes.get_xlabel().startswith('FLOPs' if x == 'flops' else 'measured time per image')
    with pytest.raises(ValueError, match='x must be one of flops, latency'):
        plots.plot_subnets([('st', rows)], str(tmp_path / 'bad.png'), x='params')
