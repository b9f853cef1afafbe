"""subnet as a library others extend: a method defined outside the project, registered and trained with --method,
and the package installed with pip and used from another training loop."""
import copy
import csv
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import train
from subnet.depth import DepthEngine
from subnet.errors import InputError, UsageError
from subnet.losses import kl_distill
from subnet.loop import LoopOptions, StepSetup, train_one_epoch
from subnet.methods import SubnetTask, method_class, method_names, register_method
from subnet.methods.plain import PlainTask
from subnet.results import counter, loss_part
from subnet.sampling import nested_keep, stage_prefix_keep, step_generator
from subnet.timm_options import parse_train_args
from train_helpers import ROOT, make_subset, method_training, random_batch, run_train, train_argv


def toy_options(parser):
    group = parser.add_argument_group('toy: the full net and one random subnet learn the labels')
    group.add_argument('--toy-drop', type=float, default=0.5, metavar='Q',
                       help='each skippable block of the subnet is dropped with probability Q')


@register_method('toy')
class ToyTask(SubnetTask):
    """A method defined only here: each step the full net and one random subnet (every skippable block dropped
    with probability Q) both learn the labels."""

    options = (toy_options,)
    result_parts = (loss_part('toy_subnet', "the random subnet's label loss"),)

    def __init__(self, model, criterion, depth, drop=0.5, **kwargs):
        super().__init__(model, criterion, depth, **kwargs)
        self.drop = drop

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        if not 0 <= args.toy_drop <= 1:
            raise InputError(f'--toy-drop must be in [0, 1], got {args.toy_drop}')

    @classmethod
    def from_args(cls, args, model, criterion, *, device=None, dtype=None, input_size=None, verbose=True):
        return cls(model, criterion, cls.depth_engine(model, input_size, verbose), args.toy_drop, seed=args.seed,
                   device=device, dtype=dtype, verbose=verbose)

    def train_step(self, input, target, step):
        keep = nested_keep(torch.ones(self.depth.num_blocks, dtype=torch.bool), self.drop, self.next_generator(),
                           droppable=self.depth.block_map.skippable)
        with self.no_sync():
            with step.autocast():
                logits = self.forward_pass(input)
                label_loss = self.criterion(logits, target)
            step.backward(label_loss)
        with self.depth.subnet(keep):
            with step.autocast():
                subnet_loss = self.criterion(self.forward_pass(input), target)
            step.backward(subnet_loss)
        return {'loss': label_loss.detach() + subnet_loss.detach(), 'output': logits.detach(),
                'toy_subnet': subnet_loss.detach()}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=8, val_per_class=4)


def test_a_method_registered_outside_the_project_trains_with_its_own_options(data, tmp_path):
    run = run_train(train_argv(data, tmp_path, 'toy', '--method', 'toy', '--toy-drop', '0.3', '-b', '8'))
    assert isinstance(run.task, ToyTask) and run.task.drop == 0.3 and run.task.step == 10
    with open(Path(run.output_dir) / 'summary.csv') as f:
        row = next(csv.DictReader(f))
    assert float(row['train_toy_subnet']) > 0  # the method's loss part is a summary column, as the built-in ones
    checkpoint = torch.load(Path(run.output_dir) / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert checkpoint['task_state'] == {'method': 'toy', 'step': 10}


def test_a_registered_methods_checks_stop_bad_input_with_one_line(data, tmp_path, capsys):
    assert train.cli(train_argv(data, tmp_path, 'toy', '--method', 'toy', '--toy-drop', '2')) == 2
    assert capsys.readouterr().err.strip() == 'train.py: error: --toy-drop must be in [0, 1], got 2.0'


def docs_example(folder: Path, module: str = 'my_methods') -> Path:
    """A module docs/extending.md shows (its example method, my_methods.py, or its model family, my_family.py),
    written where the user would put it."""
    text = (ROOT / 'docs' / 'extending.md').read_text()
    code = next(block for block in re.findall(r'```python\n(.*?)```', text, re.S) if f'{module}.py' in block)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{module}.py').write_text(code)
    return folder


def test_the_documented_method_in_the_users_own_module_trains_with_extra_methods(data, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(docs_example(tmp_path / 'user')))
    args, text = parse_train_args(['--extra-methods', 'my_methods', '--method', 'prefix-kd'])
    assert 'prefix-kd' in method_names() and 'extra_methods:\n- my_methods\n' in text  # args.yaml replays it
    assert args.prefix_kd_label_weight == 0.5
    run = run_train(train_argv(data, tmp_path, 'mine', '--extra-methods', 'my_methods', '--method', 'prefix-kd',
                               '--prefix-kd-label-weight', '0.3', '-b', '8'))
    assert type(run.task).__name__ == 'PrefixDistillation' and run.task.label_weight == 0.3
    with open(Path(run.output_dir) / 'summary.csv') as f:
        assert float(next(csv.DictReader(f))['train_prefix_kd_subnet']) > 0


def test_the_documented_methods_step_is_its_label_loss_plus_the_mixed_subnet_loss(tmp_path, monkeypatch):
    """The documented method computes what the page says: its gradient, written out by hand."""
    monkeypatch.syspath_prepend(str(docs_example(tmp_path / 'user')))
    from my_methods import PrefixDistillation
    torch.manual_seed(0)
    model = timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                              zero_init_last=False).train()
    reference = copy.deepcopy(model)
    task = PrefixDistillation(model, torch.nn.CrossEntropyLoss(), DepthEngine(model, input_size=(3, 28, 28)), 0.3)
    images, labels = torch.randn(4, 3, 28, 28), torch.tensor([1, 2, 3, 4])
    result = task.train()(images, labels)
    keep = stage_prefix_keep(task.depth.block_map, 1, step_generator(42, 1))  # the task's first step
    assert not keep.all()
    logits = reference(images)
    with DepthEngine(reference, input_size=(3, 28, 28)).subnet(keep):
        subnet_logits = reference(images)
    total = F.cross_entropy(logits, labels) + 0.3 * F.cross_entropy(subnet_logits, labels) + \
        0.7 * kl_distill(subnet_logits, logits.detach())
    total.backward()
    assert result['loss'].item() == pytest.approx(total.item(), rel=1e-5)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-6), name


def test_unknown_methods_and_modules_are_one_line_errors_never_a_fallback(tmp_path, capsys):
    with pytest.raises(InputError, match="unknown method 'gtk' \\(closest: gkt\\)"):
        method_class('gtk')
    with pytest.raises(SystemExit):
        parse_train_args(['--method', 'gtk'])
    assert "invalid choice: 'gtk'" in capsys.readouterr().err
    with pytest.raises(InputError, match='--extra-methods no_such_module: cannot import it'):
        parse_train_args(['--extra-methods', 'no_such_module'])
    config = tmp_path / 'hparams.yaml'
    config.write_text('method: gtk\n')
    with pytest.raises(UsageError, match="config key 'method': expected one of none, cosub"):
        parse_train_args(['-c', str(config)])


def test_registering_twice_under_another_name_or_a_taken_name_is_refused():
    with pytest.raises(ValueError, match='already registered'):
        register_method('st', ToyTask)
    with pytest.raises(ValueError, match="already registered as 'toy'"):
        register_method('toy2', ToyTask)


def test_shared_options_are_defined_once_under_one_name(tmp_path):
    args, _ = parse_train_args(['--method', 'gkt', '--subnet-bn', 'recal', '--subnet-temperature', '2'])
    assert (args.subnet_bn, args.subnet_temperature) == ('recal', 2.0)
    config = tmp_path / 'shared.yaml'
    config.write_text('method: st\nsubnet_bn: recal\nsubnet_kd_weight: 0.25\n')
    args, text = parse_train_args(['-c', str(config)])
    assert (args.subnet_bn, args.subnet_kd_weight) == ('recal', 0.25)
    saved = yaml.safe_load(text)  # args.yaml carries the one name
    assert saved['subnet_bn'] == 'recal' and not {'st_bn', 'gkt_weight', 'st_kl_weight'} & set(saved)
    with pytest.raises(SystemExit):  # the per-method names of the shared options are gone
        parse_train_args(['--method', 'gkt', '--gkt-bn', 'recal'])


def test_pip_install_makes_the_library_importable_from_another_loop(tmp_path):
    """``pip install .`` (no network: no build isolation, no dependencies) then the public pieces in a new process
    that does not see this checkout."""
    source = tmp_path / 'src'
    shutil.copytree(ROOT / 'subnet', source / 'subnet', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                    '--target', str(target), str(source)], check=True, capture_output=True, timeout=300)
    script = textwrap.dedent('''
        import subnet, timm, torch
        from subnet.depth import DepthEngine
        from subnet.methods import StimulativeTask, method_names
        model = timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10)
        task = StimulativeTask(model, torch.nn.CrossEntropyLoss(), DepthEngine(model, input_size=(3, 28, 28)))
        result = task(torch.randn(4, 3, 28, 28), torch.tensor([0, 1, 2, 3]))
        print(subnet.__file__, sorted(method_names()), bool(torch.isfinite(result['loss'])))
    ''')
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    location, methods, finite = done.stdout.split(' ', 1)[0], done.stdout.split(' ', 1)[1], done.stdout.split()[-1]
    assert location.startswith(str(target)) and finite == 'True'
    assert "'cosub', 'gkt', 'none', 'st', 'st++'" in methods


def test_the_documented_loop_runs_as_written_on_the_cpu(tmp_path):
    """docs/extending.md's my_loop.py, unchanged, in a new process that sees no GPU (the library importable as
    after ``pip install .``)."""
    folder = docs_example(tmp_path / 'user', 'my_loop')
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, 'my_loop.py'], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = [float(loss) for loss in re.findall(r'^epoch \d: loss (\S+)$', done.stdout, re.M)]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), done.stdout
    assert re.search(r'^prefix subnet \(4 of 8 blocks\): top-1 [\d.]+% on the last batch$', done.stdout, re.M)


# ------------------------------------------------------------------------------ a model family the engine misses

def test_the_documented_model_family_gets_blocks_and_branches_and_a_per_branch_cosub_step(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(docs_example(tmp_path / 'user', 'my_family')))
    import my_family  # noqa: F401  (registers the model and its slots)
    from subnet.methods import CosubTask
    from subnet.sampling import drop_rates
    engine = DepthEngine(timm.create_model('my_mixer', drop_path_rate=0.1), input_size=(3, 32, 32))
    block_map = engine.block_map
    assert [b.name for b in block_map.blocks] == [f'blocks.{i}' for i in range(4)]
    assert all(b.skippable and b.separable and b.slots == ('sd_mix', 'sd_mlp') for b in block_map.blocks)
    assert [b.children for b in block_map.blocks[0].branches] == [('norm1', 'mix'), ('norm2', 'mlp')]
    assert engine.model_drop_path_rates().tolist() == pytest.approx([0.1] * 4)
    assert 'branches: norm1 mix | norm2 mlp' in block_map.describe()
    # one cosub step per implementation on the same masks: branch skip computes what the mask-multiply computes
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = F.one_hot(torch.tensor([1, 2, 3, 4]), 10).float()
    results = {}
    for impl in ('skip', 'mask'):
        torch.manual_seed(0)
        model = timm.create_model('my_mixer').train()
        task = CosubTask(model, DepthEngine(model, input_size=(3, 32, 32)), drop_rates(4, 0.5, 'constant'),
                         impl=impl)
        results[impl] = task(images, target)['loss'], {n: p.grad for n, p in model.named_parameters()}
    assert task.unit == 'branch' and len(task.unit_rates) == 8
    assert results['skip'][0].item() == pytest.approx(results['mask'][0].item(), abs=1e-6)
    for name, grad in results['skip'][1].items():
        assert torch.allclose(grad, results['mask'][1][name], atol=1e-6), name


def test_the_documented_model_family_trains_with_train_py(data, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(docs_example(tmp_path / 'user', 'my_family')))
    argv = train_argv(data, tmp_path, 'mixer', '--extra-methods', 'my_family', '--method', 'cosub', '--mixup', '0.2',
                      '--drop-path', '0.1', '-b', '8', model=['--model', 'my_mixer', '--img-size', '32',
                                                                '--num-classes', '10'])
    run = run_train(argv)
    assert run.task.unit == 'branch' and run.task.step == 10
    assert len(run.task.depth.block_map.units('branch')) == 8 and run.task.unit_rates.tolist() == [0.1] * 8


# ------------------------------------------------------------------------------ a SPEC term kind and a plot

def test_the_documented_spec_kind_names_masks_and_evaluates_its_subnets(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(docs_example(tmp_path / 'user', 'my_spec')))
    import my_spec  # noqa: F401  (registers the kind)
    from subnet.evaluation import SubnetEvaluation
    from subnet.plots import plot_subnets
    from subnet.spec import SubnetSpecError, parse_spec, spec_help
    assert [r.name for r in parse_spec('prefix:0.5;every:2,3')] == ['prefix0.5', 'every2', 'every3']
    assert 'every:K[,K...] (every K-th block, counting from the first)' in spec_help()
    with pytest.raises(SubnetSpecError, match="term 'every:0': K must be at least 1, got 0"):
        parse_spec('every:0')
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=6, embed_dim=32, num_heads=2,
                              num_classes=5).eval()
    evaluation = SubnetEvaluation(model, 'every:2', input_size=(3, 32, 32))
    full, every2 = evaluation.subnets
    assert (every2.name, every2.kind) == ('every2', 'every') and every2.keep.tolist() == [True, False] * 3
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = {subnet.name: out for subnet, out, _ in evaluation.run(lambda subnet: model(images))}
        reference = copy.deepcopy(model)
        reference.blocks = torch.nn.Sequential(*[model.blocks[i] for i in (0, 2, 4)])  # the same weights
        torch.testing.assert_close(logits['every2'], reference(images))
        torch.testing.assert_close(logits['full'], model(images))
    png = plot_subnets([('run', [dict(subnet='full', flop_fraction=1.0, top1=50.0),
                                 dict(subnet='every2', flop_fraction=every2.flop_fraction, top1=40.0)])],
                       str(tmp_path / 'subnets.png'))
    assert Path(png).stat().st_size > 0


def test_the_documented_spec_kind_is_evaluated_by_train_py(data, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(docs_example(tmp_path / 'user', 'my_spec')))
    run = run_train(train_argv(data, tmp_path, 'every', '--extra-methods', 'my_spec', '--subnet-eval',
                               'prefix:0.5;every:2', '-b', '8'))
    with open(Path(run.output_dir) / 'summary.csv') as f:
        row = next(csv.DictReader(f))
    assert 0 <= float(row['subnet_every2_top1']) <= 100 and 'subnet_prefix0.5_top1' in row


def test_the_documented_panel_is_one_more_picture_in_summary_png(tmp_path, monkeypatch):
    from PIL import Image
    from subnet import plots
    monkeypatch.setattr(plots, 'SUMMARY_PANELS', list(plots.SUMMARY_PANELS))  # the example appends to it
    code = (docs_example(tmp_path / 'user', 'my_panels') / 'my_panels.py').read_text()
    exec(compile(code, 'my_panels.py', 'exec'), {'__name__': 'my_panels'})
    widths = {}
    for name, cost in (('st', True), ('plain', False)):
        folder = tmp_path / name
        folder.mkdir()
        rows = [dict(epoch=e, train_loss=2.0 - e / 4, eval_top1=20.0 + e, lr=0.1, train_st_kl=0.5,
                     **({'train_st_subnet_flops': 0.6} if cost else {})) for e in range(3)]
        with open(folder / 'summary.csv', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with Image.open(plots.plot_summary(str(folder))) as image:
            widths[name] = image.width
    assert widths['st'] / widths['plain'] == pytest.approx(4 / 3, rel=0.02)  # losses, top-1, lr (+ the cost)


class _PlainWithParts(PlainTask):
    """timm's classification step, with a constant loss part and a counter of 3 per step in its result; the
    subclasses below declare them or not."""

    def forward(self, input, target):
        result = super().forward(input, target)
        result.update(half_loss=torch.tensor(0.123456), skipped_rows=torch.tensor(3))
        return result


class _Undeclared(_PlainWithParts):
    result_parts = (loss_part('half_loss'),)  # skipped_rows is not declared


class _Declared(_PlainWithParts):
    result_parts = (loss_part('half_loss'), counter('skipped_rows', 'rows a step left out'))


def _epoch(task_class, caplog, batches=2):
    task, optimizer, args = method_training('none', size=32)
    task.__class__ = task_class  # the same task, with the parts its subclass returns
    options = LoopOptions.from_args(args)
    options.log_interval = 1
    with caplog.at_level(logging.INFO, logger='train'):
        return train_one_epoch(0, task, [random_batch('none', 32, seed=s) for s in range(batches)], optimizer,
                               options, StepSetup(device=torch.device('cpu')))


def test_a_result_part_the_method_does_not_declare_is_refused_naming_it(caplog, single_thread):
    with pytest.raises(ValueError, match="a scalar 'skipped_rows' that the method does not declare: add it to "
                                         r'Method.result_parts \(loss_part, cost_part or counter'):
        _epoch(_Undeclared, caplog)


def test_the_train_line_prints_counters_as_integers_and_losses_with_three_digits(caplog, single_thread):
    metrics = _epoch(_Declared, caplog)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Train: 0 [')]
    assert len(lines) == 2
    assert '  half_loss: 0.123  skipped_rows: 3  ETA' in lines[0]
    assert '  half_loss: 0.123  skipped_rows: 6  ETA' in lines[1]  # counters add up over the epoch
    assert metrics['skipped_rows'] == 6 and isinstance(metrics['skipped_rows'], int)
    assert metrics['half_loss'] == pytest.approx(0.123456)
