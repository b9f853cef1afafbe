"""torch.compile while the methods train (``--torchcompile``), counted with ``benchmarks/compile_methods.py``.

Compiling the whole model (``--compile-scope model``), dynamo compiles one graph for the full net and one per
distinct subnet (the depth engine reuses its slot objects, so a subnet seen before reuses its graph), never one per
step. train.py imports ``timm.optim``, whose kron module raises dynamo's recompile limit to 1,000,000, so under
train.py no subnet is left to run eagerly: every new one is compiled. Compiling each block (``--compile-scope
blocks``, ``subnet/compile.py``) a new subnet compiles nothing. The counts are dynamo's decisions (eager backend:
fast), numerics go through AOTAutograd (aot_eager); one test runs inductor.
"""
import copy
import itertools
import sys
from types import SimpleNamespace

import pytest
import timm
import torch

import train  # noqa: F401  train.py's imports, and so its dynamo settings
from subnet.batchnorm import frozen_running_stats
from subnet.compile import compile_regions, compile_scope, compile_task, compiled_regions
from subnet.depth import DepthEngine
from subnet.loop import LoopOptions, StepSetup, train_one_epoch
from subnet.methods import method_class
from train_helpers import (ROOT, assert_same_weights, make_subset, method_training, random_batch, run_train,
                           state_dict_of, train_argv)

sys.path.insert(0, str(ROOT / 'benchmarks'))
import compile_methods  # noqa: E402
from compile_methods import record_subnets  # noqa: E402
from _common import CompileCounter  # noqa: E402


def test_train_py_runs_with_timms_raised_recompile_limit():
    assert torch._dynamo.config.recompile_limit == 1_000_000  # set by timm.optim.kron when train.py imports it


@pytest.mark.parametrize('method', list(compile_methods.METHODS))
def test_whole_model_scope_compiles_the_full_net_and_each_distinct_subnet_once(method, single_thread):
    counts = compile_methods.measure(method, SimpleNamespace(steps=4, backend='eager', img_size=64, batch_size=4))
    assert counts['breaks'] == 0 and counts['graphs'] == counts['frames'] and not counts['limit']
    if method in ('none', 'cosub'):
        # cosub under --torchcompile skips dropped rows, a fixed count per branch: the shapes never change, so one
        # graph serves every draw
        assert counts['frames'] == 1 and counts['subnets'] == (4 if method == 'cosub' else 0)
        assert (counts['impl'], counts['rows']) == (('skip', 'fixed') if method == 'cosub' else ('', ''))
    else:
        assert counts['frames'] == 1 + counts['subnets'] and counts['subnets'] > 1


def test_inductor_compiles_cosub_fixed_count_skip_once_forward_and_backward(single_thread):
    counts = compile_methods.measure('cosub', SimpleNamespace(steps=2, backend='inductor', img_size=64, batch_size=4))
    assert counts['frames'] == counts['graphs'] == 1 and counts['subnets'] == 2


# ---- the block scope ----------------------------------------------------------------------------------------------

def test_each_method_has_a_compile_scope_and_the_option_overrides_it():
    defaults = {m: compile_scope(SimpleNamespace(compile_scope=None), method_class(m))
                for m in ('none', 'cosub', 'st', 'st++', 'gkt')}
    assert defaults == {'none': 'model', 'cosub': 'model', 'st': 'blocks', 'st++': 'blocks', 'gkt': 'blocks'}
    assert compile_scope(SimpleNamespace(compile_scope='model'), method_class('st')) == 'model'


@pytest.fixture
def compiled_blocks(single_thread):
    """A slim ResNet-18 (8 blocks, 4 of them skippable) with each block, the stem and the head compiled by a
    counting eager backend; ``run(keep, size)``: one training pass of that subnet (frozen BN, as ST's subnet
    passes) and the graphs compiled so far."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                              drop_path_rate=0.1).train()
    depth = DepthEngine(model, input_size=(3, 64, 64))
    backend = CompileCounter('eager')
    backend.label = 'blocks'
    regions = compile_regions(model, [b.module for b in depth.block_map.blocks], backend=backend)

    def run(keep, size=64):
        with frozen_running_stats(model), depth.subnet(keep):
            model(torch.randn(2, 3, size, size)).sum().backward()
        return backend.counts.get('blocks', 0)
    yield SimpleNamespace(model=model, depth=depth, regions=regions, run=run)
    torch._dynamo.reset()


def test_block_scope_compiles_blocks_stem_and_head_and_no_new_subnet_or_input_size_compiles(compiled_blocks):
    model, depth, run = compiled_blocks.model, compiled_blocks.depth, compiled_blocks.run
    # the 8 blocks, conv1 and bn1 (the stem) and fc (the head); layer1-4 only hold blocks and are walked into
    assert compiled_regions(model) == compiled_blocks.regions and len(compiled_blocks.regions) == 11
    assert {type(r).__name__ for r in compiled_blocks.regions} == {'BasicBlock', 'Conv2d', 'BatchNorm2d', 'Linear'}
    skippable = [b.index for b in depth.block_map.blocks if b.skippable]
    subnets = []
    for bits in itertools.product((True, False), repeat=len(skippable)):
        keep = [True] * depth.num_blocks
        for index, bit in zip(skippable, bits):
            keep[index] = bit
        subnets.append(keep)
    # every block kept and skipped once; then every subnet compiles nothing
    warm = [run(subnets[0]), run(subnets[5]), run(subnets[10])][-1]
    assert [run(keep) for keep in subnets] == [warm] * len(subnets)
    # every input size ST++ draws from a 64 px crop (27..64; dynamic shapes after the second), each with a subnet;
    # again with other subnets: nothing more is compiled
    sized = [run(subnets[size % len(subnets)], size) for size in range(27, 65)]
    assert [run(subnets[size * 7 % len(subnets)], size) for size in range(27, 65)] == [sized[-1]] * len(sized)
    assert sized[-1] <= 2 * len(compiled_blocks.regions)


def test_block_scope_compiles_each_region_on_its_own_with_static_shapes_at_a_fixed_input_size(single_thread):
    """Blocks of one class but other widths, spatial sizes and drop-path rates are separate frames: sharing one
    (one compiled class forward) made dynamo see the sizes change from block to block and make them symbolic."""
    torch._dynamo.reset()
    symbolic, graphs = [], []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        symbolic.extend(size for value in example_inputs if torch.is_tensor(value) for size in value.shape
                        if isinstance(size, torch.SymInt))
        symbolic.extend(value for value in example_inputs if isinstance(value, torch.SymInt))
        return graph_module.forward

    torch.manual_seed(0)
    model = timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                              drop_path_rate=0.1).train()
    depth = DepthEngine(model, input_size=(3, 64, 64))
    regions = compile_regions(model, [b.module for b in depth.block_map.blocks], backend=backend)
    codes = {region.forward.__func__._torchdynamo_orig_callable.__code__ for region in regions}
    assert len(codes) == len(regions) == 11
    keep = [True] * depth.num_blocks
    keep[[b.index for b in depth.block_map.blocks if b.skippable][0]] = False
    for _ in range(2):
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        with frozen_running_stats(model), depth.subnet(keep):
            model(torch.randn(2, 3, 64, 64)).sum().backward()
    torch._dynamo.reset()
    # a graph per region for the full net; for the subnet pass (BN frozen: momentum 0) one per kept region that
    # holds a BN (7 blocks and the stem's BN; conv1 and fc reuse theirs): all with static shapes
    assert len(graphs) == 11 + 8 and symbolic == []


@pytest.mark.parametrize('method', ['st', 'st++', 'gkt'])
def test_block_scope_counts_a_bounded_number_of_graphs_over_many_distinct_subnets(method, single_thread):
    counts = compile_methods.measure(method, SimpleNamespace(steps=12, backend='eager', img_size=64, batch_size=4,
                                                             scope='blocks'))
    assert counts['breaks'] == 0 and not counts['limit']
    assert counts['subnets'] >= 6  # whole-model compilation would compile a graph for each
    # per region class, input width and variant (full net or subnet, BN frozen or not): not per subnet; every one
    # of them compiled in the first step (compile_ahead)
    assert counts['graphs'] <= 24 and counts['recompiles'] == counts['late_graphs'] == 0


def test_block_scope_runs_the_full_nets_pass_as_one_graph_of_the_whole_model(single_thread):
    """ST's label pass, the full net unchanged in every step, is one graph that holds every parameter, compiled in
    the first step; the subnet passes (a new subnet each step) and evaluation run the regions, never that graph."""
    torch._dynamo.reset()
    graphs = []  # per graph compiled: how many of the model's parameters it takes

    def backend(graph_module, example_inputs):
        graphs.append(sum(isinstance(value, torch.nn.Parameter) for value in example_inputs))
        return graph_module.forward

    task, optimizer, args = method_training('st', [], 64)
    model = task.get_trainable_module()
    compile_task(task, 'blocks', backend=backend, verbose=False)
    whole = len(list(model.parameters()))
    subnets = record_subnets(task)
    for step in range(4):
        train_one_epoch(0, task, [random_batch('st', 64, 4, seed=step)], optimizer, LoopOptions.from_args(args),
                        StepSetup(device=torch.device('cpu')))
        if step == 0:
            first = list(graphs)
    assert len(subnets) >= 3 and graphs == first and first.count(whole) == 1
    assert max(g for g in first if g != whole) < whole / 2  # the rest are regions
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    torch._dynamo.reset()
    assert len(graphs) > len(first) and graphs.count(whole) == 1 and not task.full_net_graph.on


@pytest.mark.parametrize('bn', ['freeze', 'recal'])
def test_compile_ahead_compiles_every_later_graph_first_and_changes_nothing_the_run_keeps(bn, single_thread):
    """ST++ at 6 snapped sides (27 to 64 px, --st-side-step 8): without compile_ahead the regions compile new
    graphs in later steps (a side or a block first met then); with it, all in the first step, and the losses and
    weights are bit for bit those of the run without it (random states, BN buffers and .grad left as they were;
    --subnet-bn recal: the subnet passes update BN statistics)."""
    runs = []
    for ahead in (False, True):
        torch._dynamo.reset()
        counter = CompileCounter('eager')
        counter.label = 'st++'
        task, optimizer, args = method_training('st++', ['--st-min-keep', '1', '--st-min-side', '0', '--torchcompile',
                                                         '--st-side-step', '8', '--subnet-bn', bn], 64)
        assert task.sides(64) == [27, 32, 40, 48, 56, 64]
        compile_task(task, 'blocks', backend=counter, verbose=False)
        task.compile_ahead_pending = ahead
        losses, graphs = [], []
        for step in range(4):
            metrics = train_one_epoch(0, task, [random_batch('st++', 64, 4, seed=step)], optimizer,
                                      LoopOptions.from_args(args), StepSetup(device=torch.device('cpu')))
            losses.append(metrics['loss'])
            graphs.append(counter.counts['st++'])
        runs.append((losses, graphs, copy.deepcopy(task.get_trainable_module().state_dict())))
    torch._dynamo.reset()
    (losses, late, weights), (ahead_losses, ahead, ahead_weights) = runs
    assert late[-1] > late[0] and ahead[-1] == ahead[0] >= late[-1]
    assert ahead_losses == losses
    assert_same_weights(weights, ahead_weights)


@pytest.mark.parametrize('method', ['st', 'st++', 'gkt'])
def test_block_scope_trains_as_eager_within_float_tolerance(method, single_thread):
    """The same steps (ST++: inputs of varying size) block-compiled through AOTAutograd (the regions, the full net's
    pass as one graph, compile-ahead) and eagerly."""
    torch._dynamo.reset()
    extra = ['--st-min-keep', '1', '--st-min-size', '0.5'] if method == 'st++' else []
    runs = []
    for compiled in (False, True):
        task, optimizer, args = method_training(method, extra, 64)
        if compiled:
            compile_task(task, 'blocks', backend='aot_eager', verbose=False)
            assert len(compiled_regions(task.get_trainable_module())) == 11 and task.full_net_graph is not None
        losses = []
        for step in range(2):
            metrics = train_one_epoch(0, task, [random_batch(method, 64, 4, seed=step)], optimizer,
                                      LoopOptions.from_args(args), StepSetup(device=torch.device('cpu')))
            losses.append(metrics['loss'])
        runs.append((losses, copy.deepcopy(task.get_trainable_module().state_dict())))
    torch._dynamo.reset()
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('method, extra, warned', [('st++', ['--st-min-keep', '1', '--st-min-size', '0.5'], True),
                                                    ('st++', ['--st-min-keep', '1', '--torchcompile'], False),
                                                    ('st++', ['--st-min-keep', '1', '--st-min-size', '1'], False),
                                                    ('st', [], False)])
def test_inductor_with_inputs_resized_per_subnet_warns_that_it_recompiles(method, extra, warned, caplog):
    """ST++ under inductor at every side of its draw compiles again for each new side (README, Speed): said once,
    as the run starts; with --torchcompile its sides are snapped to a few (--st-side-step) and nothing is said."""
    task, _, _ = method_training(method, extra, 64)
    with caplog.at_level('INFO', logger='train'):
        compile_task(task, 'blocks', backend='inductor', input_size=(3, 64, 64))  # wraps; nothing compiles yet
    torch._dynamo.reset()
    said = [r for r in caplog.records if 'inductor compiles again for new input sides' in r.getMessage()]
    assert len(said) == int(warned) and all(r.levelname == 'WARNING' for r in said)


def _st_plus_plus_symbolic_sizes(options, steps=4):
    """ST++ (sides from 27 to 64 px) trained ``steps`` steps under the block scope with a recording eager backend:
    (graphs compiled, sizes among their inputs that were symbolic)."""
    torch._dynamo.reset()
    graphs, symbolic = [], []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        sizes = [size for value in example_inputs
                 for size in (value.shape if torch.is_tensor(value) else (value,))]
        symbolic.extend(size for size in sizes if isinstance(size, torch.SymInt))
        return graph_module.forward

    task, optimizer, args = method_training('st++', ['--st-min-keep', '1', '--st-min-side', '0', *options], 64)
    compile_task(task, 'blocks', backend=backend, verbose=False)
    for step in range(steps):
        train_one_epoch(0, task, [random_batch('st++', 64, 4, seed=step)], optimizer, LoopOptions.from_args(args),
                        StepSetup(device=torch.device('cpu')))
    torch._dynamo.reset()
    return len(graphs), len(symbolic)


def test_st_plus_plus_snapped_sides_compile_static_graphs_and_every_side_symbolic_ones(single_thread):
    """--st-side-step (ST++'s default under --torchcompile) compiles the regions with ``dynamic=False``: a static
    graph per side, nothing symbolic for inductor to specialise again; at every side dynamo makes sizes symbolic."""
    graphs, symbolic = _st_plus_plus_symbolic_sizes(['--torchcompile', '--st-side-step', '8'])
    assert graphs > 11 and symbolic == 0
    graphs, symbolic = _st_plus_plus_symbolic_sizes(['--st-side-step', '1'])
    assert graphs > 11 and symbolic > 0


def test_inductor_compiles_a_static_region_once_per_side_and_then_nothing(single_thread):
    """What snapped sides buy under inductor: regions compiled with ``dynamic=False`` and met at 3 sides compile a
    graph per side and region, and nothing when the sides come again (at every side of ST++'s draw inductor
    compiles a graph per new side: README, Speed)."""
    import torch.nn.functional as F
    torch._dynamo.reset()
    counter = CompileCounter('inductor', {'layout_optimization': False})
    counter.label = 'regions'
    layers = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8))
    assert len(compile_regions(layers, [], backend=counter, dynamic=False)) == 2
    images, counts = torch.randn(2, 8, 32, 32), []
    for _ in range(2):
        for side in (16, 24, 32):
            layers(F.interpolate(images, size=(side, side), mode='bilinear', align_corners=False)).sum().backward()
        counts.append(counter.counts['regions'])
    torch._dynamo.reset()
    assert counts == [2 * 3, 2 * 3]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=4, val_per_class=2)


def test_train_py_block_scope_logs_once_and_resumes_bit_for_bit(data, tmp_path, caplog, single_thread):
    """``--method st --torchcompile aot_eager``: the block scope (st's default), 2 epochs straight and as 1 + 1 (each
    process compiles ahead before its first step, which changes nothing the run keeps)."""
    torch._dynamo.reset()
    extra = ('--method', 'st', '--torchcompile', 'aot_eager', '--epochs', '2', '-b', '8')
    with caplog.at_level('INFO', logger='train'):
        straight = run_train(train_argv(data, tmp_path, 'straight', *extra))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith('Compiling each block (--compile-scope blocks)') for m in messages) == 1
    assert sum(m.startswith('Compiled ahead of the first step') for m in messages) == 1
    assert len(compiled_regions(straight.task.get_trainable_module())) == 11
    run_train(train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto', '--stop-epoch', '1'))
    resumed = run_train(train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto'))
    torch._dynamo.reset()
    assert resumed.results[0]['epoch'] == 1 and resumed.task.step == straight.task.step == 10
    assert_same_weights(state_dict_of(straight), state_dict_of(resumed))


def test_compile_scope_without_torchcompile_is_one_line(tmp_path, capsys):
    assert train.cli(['--data-dir', str(tmp_path), '--method', 'st', '--compile-scope', 'blocks']) == 2
    assert capsys.readouterr().err == ('train.py: error: --compile-scope blocks needs --torchcompile (it says what to '
                                       'compile)\n')


def test_a_deepcopy_of_a_block_compiled_model_runs_its_own_weights(compiled_blocks):
    """EMA copies the model: the copy's compiled forwards are bound to the copy."""
    model = compiled_blocks.model.eval()
    copied = copy.deepcopy(model)
    assert len(compiled_regions(copied)) == 11
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        for p in copied.parameters():
            p.mul_(0.5)
        assert torch.equal(model(x), before) and not torch.allclose(copied(x), before)


def test_inductor_block_scope_backpropagates_a_convolution_through_changing_input_sizes(single_thread):
    """ST++'s resized inputs reach the stem's convolution: with inductor's layout optimisation (off in the block
    scope) torch 2.14 fails a stride assertion in its backward at the second size."""
    import torch.nn.functional as F
    torch._dynamo.reset()
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False))  # ResNet's stem
    assert len(compile_regions(stem, [])) == 1
    images = torch.randn(4, 3, 64, 64)
    for side in (64, 53, 57):
        x = F.interpolate(images, size=(side, side), mode='bilinear', align_corners=False) if side != 64 else images
        stem(x).sum().backward()
    torch._dynamo.reset()
    assert stem[0].weight.grad is not None
