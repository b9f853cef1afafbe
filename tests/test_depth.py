"""subnet.depth: per-batch subnets, per-sample masks (skip / mask mode, per block or per residual branch), timm
drop-path, and how they live with training machinery (AMP, channels_last, grad checkpointing, EMA, DDP,
torch.compile)."""
import contextlib
import copy
import os
import socket
import tempfile

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from timm.utils import ModelEmaV3

from subnet.blocks import find_blocks
from subnet.depth import DepthEngine
from subnet.sampling import (
    bernoulli_keep, draw_keep, drop_rates, stage_prefix_keep, step_generator, unit_drop_rates)

from conftest import (
    LAYERNORM_FAMILIES, TINY_FAMILIES, calibrate_batch_norm, create_tiny, mask_reference, tiny_input_size)

pytestmark = pytest.mark.usefixtures('single_thread')

FAMILIES = list(TINY_FAMILIES)


def inputs(name, batch=4, seed=0):
    return torch.randn((batch,) + tiny_input_size(name), generator=torch.Generator().manual_seed(seed))


def random_mask(block_map, batch, rate, seed, skippable_only=False, unit='block'):
    rates = drop_rates(len(block_map), rate, 'constant')
    if skippable_only:
        rates = rates * block_map.skippable
    return bernoulli_keep(batch, block_map.per_unit(rates, unit), torch.Generator().manual_seed(seed))


def model_snapshot(model):
    """Everything an engine could leave behind: instance forwards, slot objects, names, state_dict keys."""
    return (sorted(n for n, m in model.named_modules() if 'forward' in m.__dict__),
            [(n, k, id(v)) for n, m in model.named_modules() for k, v in
             list(m._modules.items()) + list(vars(m).items()) if k.startswith('drop_path')],
            [n for n, _ in model.named_modules()], list(model.state_dict()))


# ---- exactness ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', FAMILIES)
def test_all_blocks_active_is_bit_exact(name, tiny_model):
    model, block_map = tiny_model(name)
    engine = DepthEngine(model, block_map)
    x, n, branches = inputs(name), len(block_map), len(block_map.units('branch'))
    with torch.no_grad():
        plain = model(x)
        with engine.subnet(torch.ones(n, dtype=torch.bool)):
            outputs = [model(x)]
        for mode in ('skip', 'mask'):
            with engine.per_sample(torch.ones(4, n, dtype=torch.bool), mode=mode):
                outputs.append(model(x))
            with engine.per_sample(torch.ones(4, branches, dtype=torch.bool), mode=mode, unit='branch'):
                outputs.append(model(x))
    assert all(torch.equal(plain, out) for out in outputs)


@pytest.mark.parametrize('name', FAMILIES)
def test_dropped_blocks_are_exact_identities(name, tiny_model):
    model, block_map = tiny_model(name)
    engine = DepthEngine(model, block_map)
    keep = stage_prefix_keep(block_map, 1, torch.Generator().manual_seed(3))
    keep[block_map.skippable.nonzero()[-1]] = False  # at least one dropped block
    dropped = [b for b in block_map.blocks if not keep[b.index]]
    calls = []
    hooks = [child.register_forward_hook(lambda *a: calls.append(1))
             for b in dropped for child in b.module.children()]
    x = inputs(name)
    try:
        with torch.no_grad(), engine.subnet(keep):
            per_batch = model(x)
    finally:
        for h in hooks:
            h.remove()
    assert not calls  # nothing inside a dropped block ran
    with torch.no_grad(), mask_reference(block_map, keep.expand(4, -1), torch.ones(len(block_map))):
        zero_branches = model(x)
    assert torch.equal(per_batch, zero_branches)


def assert_gradients_close(actual, expected):
    """fp32 gradients summed in another order: a gradient sums over rows and tokens, so rounding is relative to the
    largest entries of the tensor (a ViT's cls-token gradient reaches ~300 in these tests), not to each element (in
    float64 the branch-skip gradients agree with timm's to 1e-15)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def skip_mask_and_reference(model, block_map, name, unit, seed=1):
    """Outputs of skip mode, mask mode and the independent reference for the same random keep mask (every block
    may drop rows: skippable ones are skipped, the others are mask-multiplied), and of the plain model."""
    engine = DepthEngine(model, block_map)
    keep_mask = random_mask(block_map, 6, 0.4, seed=seed, unit=unit)
    keep_prob = torch.linspace(0.5, 0.9, keep_mask.shape[1])
    dtype = next(model.parameters()).dtype
    x = inputs(name, batch=6).to(dtype)
    with torch.no_grad():
        with engine.per_sample(keep_mask, keep_prob, unit=unit):
            skip = model(x)
        with engine.per_sample(keep_mask, keep_prob, mode='mask', unit=unit):
            mask = model(x)
        with mask_reference(block_map, keep_mask, keep_prob, unit):
            reference = model(x)
        plain = model(x)
    return skip, mask, reference, plain


@pytest.mark.parametrize('unit', ['block', 'branch'])
@pytest.mark.parametrize('name', FAMILIES)
def test_per_sample_skip_is_the_mask_reference_computation_in_float64(name, unit):
    """Skip mode computes what multiplying each block's (or branch's) output by its row mask computes: in float64
    the two agree to 1e-10 of the output on every family, BatchNorm ones included.

    Why float64: skip mode runs a block on the rows that keep it only, and CPU kernels may round a row differently
    in a smaller batch. On an AVX-512 CPU, EfficientNet-B0's squeeze-excite SiLU rounds one row of a 3-row batch
    1 ulp away from the same row in the full 6-row batch (vectorised loop vs. its scalar tail), the same inputs
    otherwise. With the tiny model at 32 px (1x1 feature maps in the last stages), BatchNorm statistics estimated on
    the full net and kept branches rescaled up to 2x, activations reach ~3000 and amplify that ulp 10^4-fold: the
    fp32 comparison failed on some CPUs and passed on others while the computation was the same. float64 pins the
    computation independently of the CPU's kernels; the fp32 test below keeps the model sane instead.
    """
    model = create_tiny(name).double()
    skip, mask, reference, plain = skip_mask_and_reference(model, find_blocks(model, tiny_input_size(name)), name,
                                                           unit)
    scale = max(1.0, float(reference.abs().max()))
    torch.testing.assert_close(skip, reference, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(mask, reference, rtol=0, atol=1e-12 * scale)
    assert (skip - plain).abs().max() > 1e-3  # the mask did change the result


@pytest.mark.parametrize('unit', ['block', 'branch'])
@pytest.mark.parametrize('name', FAMILIES)
def test_per_sample_skip_matches_the_mask_reference_in_fp32(name, unit):
    """fp32, on a model whose BatchNorm statistics are estimated under the mask being tested (so activations stay
    of order 1 whatever the mask drops) and an input where feature maps stay larger than 1x1: rows computed in a
    smaller batch then differ from the reference by fp32 rounding only, within 1e-5 of the output."""
    model = create_tiny(name)
    block_map = find_blocks(model, tiny_input_size(name))
    keep_mask = random_mask(block_map, 6, 0.4, seed=1, unit=unit)
    keep_prob = torch.linspace(0.5, 0.9, keep_mask.shape[1])
    with mask_reference(block_map, keep_mask, keep_prob, unit):
        calibrate_batch_norm(model, [inputs(name, batch=6, seed=10 + i) for i in range(4)])
    skip, mask, reference, plain = skip_mask_and_reference(model, block_map, name, unit)
    scale = max(1.0, float(reference.abs().max()))
    torch.testing.assert_close(skip, reference, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(mask, reference, rtol=0, atol=1e-6 * scale)
    assert (skip - plain).abs().max() > 1e-3


@pytest.mark.parametrize('unit', ['block', 'branch'])
@pytest.mark.parametrize('name', LAYERNORM_FAMILIES)
def test_per_sample_skip_matches_the_reference_in_training_with_gradients(name, unit):
    model = create_tiny(name).train()
    block_map = find_blocks(model, tiny_input_size(name))
    engine = DepthEngine(model, block_map)
    keep_mask = random_mask(block_map, 4, 0.5, seed=2, skippable_only=True, unit=unit)
    keep_prob = torch.full((keep_mask.shape[1],), 0.5)
    x = inputs(name)

    def run(context):
        model.zero_grad(set_to_none=True)
        with context:
            out = model(x)
            out.square().sum().backward()
        # a block no row keeps gets no gradient at all in skip mode, and an exact zero in the reference
        return out.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    out_skip, grads_skip = run(engine.per_sample(keep_mask, keep_prob, unit=unit))
    out_ref, grads_ref = run(mask_reference(block_map, keep_mask, keep_prob, unit))
    torch.testing.assert_close(out_skip, out_ref, rtol=0, atol=1e-5)
    for g_skip, g_ref in zip(grads_skip, grads_ref):
        torch.testing.assert_close(g_skip, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', [n for n in LAYERNORM_FAMILIES if n != 'convnext_atto'])
def test_branch_skip_equals_timm_drop_path_given_the_same_draws(name):
    """timm's DropPath draws one Bernoulli mask per slot call, in call order, from the global RNG. Replayed as a
    branch-level keep mask, skip mode on the same weights gives timm's output and gradients (fp32, training)."""
    timm_model = create_tiny(name, drop_path_rate=0.3).train()
    plain = create_tiny(name).train()
    engine = DepthEngine(plain, input_size=tiny_input_size(name))
    rates = DepthEngine(timm_model, input_size=tiny_input_size(name)).model_drop_path_rates()
    unit_rates = engine.block_map.per_unit(rates, 'branch')
    assert len(unit_rates) > len(engine.block_map) and float(unit_rates.max()) > 0  # branches drop apart
    x = inputs(name)

    def run(model, context):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with context:
            out = model(x)
            out.square().sum().backward()
        return out.detach(), [p.grad for p in model.parameters()]

    expected, expected_grads = run(timm_model, contextlib.nullcontext())
    torch.manual_seed(7)  # timm's draws, replayed: units are in call order, a rate of 0 draws nothing
    keep_mask = torch.ones(4, len(unit_rates), dtype=torch.bool)
    for column, rate in enumerate(unit_rates.tolist()):
        if rate > 0:
            keep_mask[:, column] = torch.empty(4, 1, 1).bernoulli_(1 - rate).flatten().bool()
    assert not keep_mask.all() and keep_mask.any(0).any()
    ours, grads = run(plain, engine.per_sample(keep_mask, 1 - unit_rates, unit='branch'))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    for g_ours, g_timm in zip(grads, expected_grads):
        if g_ours is None:  # no row kept any branch of this block: timm's gradient is exactly zero
            assert not g_timm.any()
        else:
            assert_gradients_close(g_ours, g_timm)


def test_skip_mode_runs_each_block_only_on_the_rows_that_keep_it(tiny_model):
    model, block_map = tiny_model('vit_tiny_patch16_224')
    engine = DepthEngine(model, block_map)
    keep_mask = random_mask(block_map, 8, 0.5, seed=4)
    keep_mask[:, 3] = False
    rows_seen = {}

    def record(index):
        def hook(module, args):
            rows_seen[index] = args[0].shape[0]
        return hook
    hooks = [b.module.mlp.register_forward_pre_hook(record(b.index)) for b in block_map.blocks]
    try:
        with torch.no_grad(), engine.per_sample(keep_mask, 0.5):
            model(inputs('vit_tiny_patch16_224', batch=8))
    finally:
        for h in hooks:
            h.remove()
    expected = {i: int(k) for i, k in enumerate(keep_mask.sum(0)) if k > 0}
    assert rows_seen == expected and 3 not in rows_seen


def rows_per_branch(model, block_map, context, x):
    """(block, child) -> rows its first argument had, for the attention and MLP children of ViT-style blocks."""
    seen = {}
    hooks = [getattr(b.module, child).register_forward_pre_hook(
        lambda module, args, key=(b.index, child): seen.__setitem__(key, args[0].shape[0]))
        for b in block_map.blocks if b.separable for child in ('attn', 'mlp')]
    try:
        with torch.no_grad(), context:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 'cait_xxs24_224'])
def test_branch_skip_runs_each_branch_only_on_the_rows_that_keep_it(name, tiny_model):
    model, block_map = tiny_model(name)
    engine = DepthEngine(model, block_map)
    units = block_map.units('branch')
    keep_mask = random_mask(block_map, 8, 0.5, seed=4, skippable_only=True, unit='branch')
    split = [u for u in units if u.branch is not None]
    keep_mask[:, split[1].index] = True  # block 0: attention on 8 rows, the MLP on none
    keep_mask[:, split[0].index] = False
    seen = rows_per_branch(model, block_map, engine.per_sample(keep_mask, 0.5, unit='branch'), inputs(name, 8))
    counts = keep_mask.sum(0).tolist()
    child = ('attn', 'mlp')
    # a branch no row keeps still runs on every row and is multiplied by zero (rare: probability rate ** batch)
    expected = {(u.block, child[u.branch]): counts[u.index] or 8 for u in split}
    assert seen == expected and seen[(0, 'mlp')] == 8 and seen[(0, 'attn')] == 8


def test_fixed_count_rows_keep_every_shape_constant_across_steps(tiny_model):
    model, block_map = tiny_model('vit_tiny_patch16_224')
    engine = DepthEngine(model, block_map)
    rates = unit_drop_rates(block_map, 0.3, 'constant', 'branch')
    generator = torch.Generator().manual_seed(0)
    x = inputs('vit_tiny_patch16_224', batch=8)
    shapes = {}
    for rows in ('fixed', 'bernoulli'):
        shapes[rows] = []
        for _ in range(4):
            keep_mask, keep_prob = draw_keep(8, rates, rows, generator)
            shapes[rows].append(rows_per_branch(model, block_map, engine.per_sample(keep_mask, keep_prob,
                                                                                    unit='branch'), x))
    assert all(step == shapes['fixed'][0] for step in shapes['fixed'])
    assert set(shapes['fixed'][0].values()) == {6}  # round(0.7 * 8)
    assert any(step != shapes['bernoulli'][0] for step in shapes['bernoulli'])


def test_inductor_compiles_the_fixed_count_branch_skip_once(single_thread):
    """torch.compile with inductor (C++ on this CPU): 6 training steps, a fresh fixed-count mask each, one
    compilation; the compiled steps match the eager ones."""
    from torch._inductor.compile_fx import compile_fx
    torch._dynamo.reset()
    compilations = []

    def counting_inductor(graph_module, example_inputs):
        compilations.append(len(graph_module.graph.nodes))
        return compile_fx(graph_module, example_inputs)

    model = create_tiny('vit_tiny_patch16_224', depth=2).train()
    engine = DepthEngine(model, input_size=tiny_input_size('vit_tiny_patch16_224'))
    compiled = torch.compile(model, backend=counting_inductor)
    rates = unit_drop_rates(engine.block_map, 0.25, 'constant', 'branch')
    generator = torch.Generator().manual_seed(0)
    x = inputs('vit_tiny_patch16_224', batch=8)
    for _ in range(6):
        keep_mask, keep_prob = draw_keep(8, rates, 'fixed', generator)
        with engine.per_sample(keep_mask, keep_prob, unit='branch'):
            model.zero_grad(set_to_none=True)
            compiled(x).square().sum().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            eager = model(x)
            eager.square().sum().backward()
            torch.testing.assert_close(compiled(x).detach(), eager.detach(), rtol=0, atol=1e-5)
        for g_compiled, p in zip(grads, model.parameters()):
            assert_gradients_close(g_compiled, p.grad)
    assert len(compilations) == 1
    torch._dynamo.reset()


def test_scaled_skip_equals_timm_drop_path_given_the_same_draws():
    # ConvNeXt blocks have one branch, so timm's per-branch DropPath and a per-block mask are the same thing
    timm_model = create_tiny('convnext_atto', drop_path_rate=0.4).train()
    plain = create_tiny('convnext_atto').train()
    engine = DepthEngine(plain, input_size=tiny_input_size('convnext_atto'))
    rates = DepthEngine(timm_model, input_size=tiny_input_size('convnext_atto')).model_drop_path_rates()
    assert torch.allclose(rates, drop_rates(12, 0.4, 'linear'))
    x = inputs('convnext_atto')
    torch.manual_seed(7)
    with torch.no_grad():
        expected = timm_model(x)
    # replay timm's draws: one bernoulli_(keep) of shape (B, 1, 1, 1) per block with a nonzero rate, in order
    torch.manual_seed(7)
    keep_mask = torch.ones(4, 12, dtype=torch.bool)
    for i, rate in enumerate(rates.tolist()):
        if rate > 0:
            keep_mask[:, i] = torch.empty(4, 1, 1, 1).bernoulli_(1 - rate).flatten().bool()
    assert not keep_mask.all()
    with torch.no_grad(), engine.per_sample(keep_mask, 1 - rates):
        ours = plain(x)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_timm_drop_path_mode_reproduces_a_model_built_with_those_rates():
    built = create_tiny('vit_tiny_patch16_224', drop_path_rate=0.3).train()
    plain = create_tiny('vit_tiny_patch16_224').train()
    rates = DepthEngine(built, input_size=tiny_input_size('vit_tiny_patch16_224')).model_drop_path_rates()
    engine = DepthEngine(plain, input_size=tiny_input_size('vit_tiny_patch16_224'))
    x = inputs('vit_tiny_patch16_224')
    torch.manual_seed(11)
    expected = built(x)
    torch.manual_seed(11)
    with engine.timm_drop_path(rates):
        ours = plain(x)
    assert torch.equal(ours, expected) and not torch.equal(ours, plain(x))


def test_keep_prob_rescaling_matches_timm_drop_path_in_expectation():
    """Only block 5 drops (rate 0.3): its output over many identical rows has mean x + f(x), like timm's."""
    model = create_tiny('convnext_atto').train()
    engine = DepthEngine(model, input_size=tiny_input_size('convnext_atto'))
    rows, rate = 512, 0.3
    rates = torch.zeros(12)
    rates[5] = rate
    x = inputs('convnext_atto', batch=1).expand(rows, -1, -1, -1)
    block = engine.block_map.blocks[5].module
    captured = []
    hook = block.register_forward_hook(lambda m, a, out: captured.append((a[0], out)))
    try:
        with torch.no_grad():
            model(x[:1])
            torch.manual_seed(0)
            with engine.timm_drop_path(rates):
                model(x)
            keep_mask = bernoulli_keep(rows, rates, torch.Generator().manual_seed(0))
            with engine.per_sample(keep_mask, 1 - rates):
                model(x)
    finally:
        hook.remove()
    (block_in, full), (_, timm_out), (_, ours) = captured
    branch = (full - block_in)[0]
    stderr = branch.abs() * ((rate / (1 - rate)) / rows) ** 0.5
    for out in (timm_out, ours):
        assert ((out.mean(0) - full[0]).abs() <= 5 * stderr + 1e-5).all()
        # variance of (mask / keep) * f is f^2 * rate / keep
        ratio = out.var(0).sum() / (branch.square().sum() * rate / (1 - rate))
        assert 0.8 < float(ratio) < 1.2


def test_model_drop_path_does_not_drop_on_top_unless_asked():
    model = create_tiny('vit_tiny_patch16_224', drop_path_rate=0.5).train()
    plain = create_tiny('vit_tiny_patch16_224').train()
    engine = DepthEngine(model, input_size=tiny_input_size('vit_tiny_patch16_224'))
    n, x = len(engine.block_map), inputs('vit_tiny_patch16_224')
    expected = plain(x)
    with engine.subnet(torch.ones(n, dtype=torch.bool)):
        assert torch.equal(model(x), expected)
    with engine.per_sample(torch.ones(4, n, dtype=torch.bool)):
        assert torch.equal(model(x), expected)
    with engine.per_sample(torch.ones(4, n, dtype=torch.bool), mode='mask'):
        assert torch.equal(model(x), expected)
    branches = torch.ones(4, len(engine.block_map.units('branch')), dtype=torch.bool)
    branches[:2, 5] = False  # some rows gathered
    with engine.per_sample(branches, unit='branch'):
        assert torch.equal(model(x)[2:], expected[2:])
    torch.manual_seed(0)
    with engine.subnet(torch.ones(n, dtype=torch.bool), model_drop_path=True):
        assert not torch.allclose(model(x), expected)
    with engine.per_sample(branches, unit='branch', model_drop_path=True):
        assert not torch.allclose(model(x)[2:], expected[2:])
    assert not torch.allclose(model(x), expected)  # the model's own DropPath is back after the context


# ---- the model is left alone --------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['resnet18', 'vit_tiny_patch16_224'])
def test_contexts_restore_the_model_even_after_an_exception(name, tiny_model):
    model, block_map = tiny_model(name)
    engine = DepthEngine(model, block_map)
    before = model_snapshot(model)
    keep = block_map.skippable.logical_not()
    mask = random_mask(block_map, 4, 0.5, seed=0)
    branch_mask = random_mask(block_map, 4, 0.5, seed=0, unit='branch')
    contexts = [lambda: engine.subnet(keep), lambda: engine.per_sample(mask, 0.5),
                lambda: engine.per_sample(mask, 0.5, mode='mask'), lambda: engine.timm_drop_path(0.2),
                lambda: engine.per_sample(branch_mask, 0.5, unit='branch'),
                lambda: engine.per_sample(branch_mask, 0.5, mode='mask', unit='branch')]
    for context in contexts:
        with pytest.raises(ZeroDivisionError):
            with context():
                keys_inside = list(model.state_dict())
                1 / 0
        assert keys_inside == before[3]
        assert model_snapshot(model) == before
    with engine.subnet(keep):  # and the engine is usable again
        pass


def test_nested_contexts_are_refused(tiny_model):
    model, block_map = tiny_model('resnet18')
    engine = DepthEngine(model, block_map)
    with engine.subnet(torch.ones(len(block_map), dtype=torch.bool)):
        with pytest.raises(RuntimeError, match='already active'):
            with engine.per_sample(torch.ones(2, len(block_map), dtype=torch.bool)):
                pass


@pytest.mark.parametrize('name', ['resnet18', 'cait_xxs24_224'])
def test_a_deepcopy_taken_inside_a_context_is_a_plain_model(name, tiny_model):
    model, block_map = tiny_model(name)
    engine = DepthEngine(model, block_map)
    x = inputs(name)
    mask = random_mask(block_map, 4, 0.5, seed=0)
    branch_mask = random_mask(block_map, 4, 0.5, seed=0, unit='branch')
    contexts = [lambda: engine.per_sample(mask, 0.5), lambda: engine.subnet(block_map.skippable.logical_not()),
                lambda: engine.per_sample(mask, 0.5, mode='mask'),
                lambda: engine.per_sample(branch_mask, 0.5, unit='branch')]
    block = block_map.blocks[1]
    with torch.no_grad():
        plain = model(x)
        for context in contexts:
            with context():
                copied = copy.deepcopy(model)
            assert torch.equal(copied(x), plain)
            # the original slots came back (ResNet's None as None, CaiT's Identity as an Identity)
            copied_block = copied.get_submodule(block.name)
            assert [type(getattr(copied_block, s)) for s in block.slots] == [
                type(getattr(block.module, s)) for s in block.slots]
            assert list(copied.state_dict()) == list(model.state_dict())
        next(copied_block.parameters()).mul_(2)  # a true copy: its pieces run their own forward on themselves
        assert not torch.equal(copied(x), plain) and torch.equal(model(x), plain)


def test_model_ema_copies_and_updates_an_engine_model():
    model = create_tiny('resnet18')
    engine = DepthEngine(model, input_size=tiny_input_size('resnet18'))
    x = inputs('resnet18')
    with torch.no_grad():
        plain = model(x)
    keep = stage_prefix_keep(engine.block_map, 1, torch.Generator().manual_seed(0))
    assert not keep.all()
    with engine.subnet(keep):
        ema = ModelEmaV3(model, decay=0.5)  # deep-copied while blocks are switched off
    with torch.no_grad():
        assert torch.equal(ema.module(x), plain)
        with engine.per_sample(random_mask(engine.block_map, 4, 0.5, seed=1), 0.5):
            assert torch.equal(ema.module(x), plain)  # the engine acts on the model, never on its EMA copy
    model.train()
    with engine.subnet(keep):
        model(x).sum().backward()
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:  # the dropped blocks have none
                p.sub_(0.1 * p.grad)
    ema.update(model)
    for old, new, current in zip(before, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * current)


# ---- training machinery -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name', ['resnet18', 'vit_tiny_patch16_224'])
def test_autocast(name, dtype):
    model = create_tiny(name).train()
    engine = DepthEngine(model, input_size=tiny_input_size(name))
    n, x = len(engine.block_map), inputs(name)
    keep_mask = random_mask(engine.block_map, 4, 0.5, seed=5, skippable_only=True)
    keep_mask[0] = True  # every block runs on some row, so every parameter gets a gradient
    branch_mask = random_mask(engine.block_map, 4, 0.5, seed=5, skippable_only=True, unit='branch')
    branch_mask[0] = True
    with torch.autocast('cpu', dtype=dtype):
        plain = model(x)
        with engine.subnet(torch.ones(n, dtype=torch.bool)):
            assert torch.equal(model(x), plain)
        with engine.per_sample(keep_mask, 0.5):
            skip = model(x)
            skip.float().sum().backward()
        with engine.per_sample(keep_mask, 0.5, mode='mask'):
            mask = model(x)
        with engine.per_sample(branch_mask, 0.5, unit='branch'):
            branch_skip = model(x)
            branch_skip.float().sum().backward()
        with engine.per_sample(branch_mask, 0.5, mode='mask', unit='branch'):
            branch_mask_out = model(x)
    assert skip.dtype == mask.dtype == plain.dtype == branch_skip.dtype == branch_mask_out.dtype
    if name.startswith('vit'):  # BatchNorm sees fewer rows in skip mode, so only the LayerNorm model matches
        torch.testing.assert_close(skip.float(), mask.float(), rtol=0.05, atol=0.05)
        torch.testing.assert_close(branch_skip.float(), branch_mask_out.float(), rtol=0.05, atol=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last(tiny_model):
    model, block_map = tiny_model('resnet18')
    engine = DepthEngine(model, block_map)
    model.to(memory_format=torch.channels_last)
    try:
        x = inputs('resnet18').contiguous(memory_format=torch.channels_last)
        keep_mask = random_mask(block_map, 4, 0.5, seed=6, skippable_only=True)
        keep_mask[:2, 1] = True
        keep_mask[2:, 1] = False
        formats = []
        hook = block_map.blocks[1].module.conv1.register_forward_pre_hook(
            lambda m, a: formats.append(a[0].is_contiguous(memory_format=torch.channels_last)))
        with torch.no_grad():
            with engine.per_sample(keep_mask, 0.5):
                skip = model(x)
            with mask_reference(block_map, keep_mask, torch.full((len(block_map),), 0.5)):
                reference = model(x)
        hook.remove()
        assert formats == [True, True]  # the gathered rows stay channels_last
        assert skip.is_contiguous(memory_format=torch.channels_last) or skip.ndim == 2
        torch.testing.assert_close(skip, reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    finally:
        model.to(memory_format=torch.contiguous_format)


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 'convnext_atto'])
def test_grad_checkpointing_gives_the_same_gradients(name):
    model = create_tiny(name).train()
    engine = DepthEngine(model, input_size=tiny_input_size(name))
    keep_mask = random_mask(engine.block_map, 4, 0.5, seed=8, skippable_only=True)
    branch_mask = random_mask(engine.block_map, 4, 0.5, seed=8, skippable_only=True, unit='branch')
    keep = stage_prefix_keep(engine.block_map, 1, torch.Generator().manual_seed(8))
    x = inputs(name)
    results = {}
    contexts = {'skip': lambda: engine.per_sample(keep_mask, 0.5), 'subnet': lambda: engine.subnet(keep),
                'branch': lambda: engine.per_sample(branch_mask, 0.5, unit='branch')}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        for label, context in contexts.items():
            model.zero_grad(set_to_none=True)
            with context():  # the blocks run again during backward: it must happen inside the context
                model(x).square().sum().backward()
            results[checkpointing, label] = [p.grad for p in model.parameters()]
    for label in contexts:
        for g_plain, g_ckpt in zip(results[False, label], results[True, label]):
            assert (g_plain is None) == (g_ckpt is None)  # dropped blocks: no gradient either way
            if g_plain is not None:
                torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-6)


def test_touching_skipped_blocks_gives_every_parameter_a_gradient(tiny_model):
    model, block_map = tiny_model('vit_tiny_patch16_224')
    keep = torch.ones(len(block_map), dtype=torch.bool)
    keep[[4, 9]] = False
    keep_mask = torch.ones(4, len(block_map), dtype=torch.bool)
    keep_mask[:, 2] = False  # no row keeps block 2
    keep_mask[1:, 6] = False
    x = inputs('vit_tiny_patch16_224')
    outputs = {}
    for touch in (False, True):
        engine = DepthEngine(model, block_map, touch_unused=touch)
        for label, context in (('subnet', engine.subnet(keep)), ('skip', engine.per_sample(keep_mask))):
            model.zero_grad(set_to_none=True)
            with context:
                out = model(x)
                out.sum().backward()
            unused = {b for b in range(len(block_map))
                      if any(p.grad is None for p in block_map.blocks[b].module.parameters())}
            zero = {b for b in range(len(block_map)) if all(
                p.grad is not None and not p.grad.any() for p in block_map.blocks[b].module.parameters())}
            outputs[touch, label] = out.detach()
            expected = {4, 9} if label == 'subnet' else {2}
            assert (unused, zero) == ((set(), expected) if touch else (expected, set()))
    assert torch.equal(outputs[False, 'subnet'], outputs[True, 'subnet'])
    assert torch.equal(outputs[False, 'skip'], outputs[True, 'skip'])
    model.zero_grad(set_to_none=True)


def test_torch_compile_mask_mode_keeps_one_graph_and_subnets_recompile():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = create_tiny('vit_tiny_patch16_224', depth=3).train()
    engine = DepthEngine(model, input_size=tiny_input_size('vit_tiny_patch16_224'))
    compiled = torch.compile(model, backend='eager')
    x = inputs('vit_tiny_patch16_224')
    graphs = []
    for seed in range(3):  # new mask values each step, same structure
        keep_mask = random_mask(engine.block_map, 4, 0.5, seed=seed)
        with engine.per_sample(keep_mask, 0.5, mode='mask'):
            out = compiled(x)
            torch.testing.assert_close(out, model(x), rtol=0, atol=1e-6)
        graphs.append(counters['stats']['unique_graphs'])
    assert graphs[0] == graphs[1] == graphs[2]
    for keep in ([True, True, False], [True, False, False], [True, True, False]):
        with engine.subnet(keep):
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)
    assert counters['stats']['unique_graphs'] == graphs[0] + 2  # one per distinct pattern
    torch._dynamo.reset()


# ---- DDP ---------------------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    from train_helpers import broadcast_from_rank0
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=4, embed_dim=32, num_heads=2,
                              num_classes=5).train()
    engine = DepthEngine(model, input_size=(3, 32, 32))  # touch_unused turns itself on under DDP
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False, as timm's train.py
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    steps = []
    for step in range(3):
        keep = stage_prefix_keep(engine.block_map, 1, step_generator(1, step))  # same subnet on every rank
        keep[3] = False
        rank_gen = step_generator(2, step, rank)
        x = torch.randn(4, 3, 32, 32, generator=rank_gen)
        with engine.subnet(keep):
            ddp(x).logsumexp(-1).mean().backward()
        keep_mask = bernoulli_keep(4, torch.full((4,), 0.5), rank_gen)
        keep_mask[:, 1] = rank == 1  # block 1 keeps no row on rank 0
        with engine.per_sample(keep_mask, 0.5):
            ddp(x).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(keep.tolist())
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    shared = broadcast_from_rank0(torch.tensor([rank == 0, rank == 1]))
    torch.save(dict(weights=weights, steps=steps, shared=shared), os.path.join(result_dir, f'{rank}.pt'))

    # without the zero-parameter touch, DDP refuses the next step: proof the touch is what made the above work
    plain = DepthEngine(model, engine.block_map, touch_unused=False)
    error = ''
    try:
        for _ in range(2):
            with plain.subnet(keep):
                ddp(x).sum().backward()
    except RuntimeError as err:
        error = str(err)
    torch.save(error, os.path.join(result_dir, f'{rank}.err'))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_without_find_unused_parameters():
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), result_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(result_dir, f'{r}.pt')) for r in range(2)]
        errors = [torch.load(os.path.join(result_dir, f'{r}.err')) for r in range(2)]
    assert torch.equal(results[0]['weights'], results[1]['weights'])
    assert results[0]['steps'] == results[1]['steps']
    assert all(r['shared'].tolist() == [True, False] for r in results)
    assert all('finished reduction' in e for e in errors)


# ---- errors ------------------------------------------------------------------------------------------------------
def one_line_error(call, starts_with):
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert message.startswith(starts_with) and '\n' not in message, message


def test_misuse_errors_name_the_model_and_the_problem(tiny_model):
    model, block_map = tiny_model('resnet50')
    engine = DepthEngine(model, block_map)
    n = len(block_map)
    before = model_snapshot(model)

    def enter(context):
        with context:
            model(inputs('resnet50', batch=2))

    one_line_error(lambda: enter(engine.subnet([0, 1, 20])), 'resnet50: block index 20 out of range (16 blocks)')
    one_line_error(lambda: enter(engine.subnet(torch.ones(n - 1, dtype=torch.bool))),
                   'resnet50: keep has shape (15,), expected (16,)')
    keep = torch.ones(n, dtype=torch.bool)
    keep[3] = False
    one_line_error(lambda: enter(engine.subnet(keep)),
                   'resnet50: block 3 (layer2.0) cannot be skipped: output shape differs from input')
    one_line_error(lambda: enter(engine.per_sample(torch.ones(4, n - 2, dtype=torch.bool))),
                   'resnet50: keep mask has shape (4, 14), expected (batch, 16)')
    one_line_error(lambda: enter(engine.per_sample(random_mask(block_map, 4, 0.5, 0, skippable_only=True))),
                   'resnet50: keep mask has 4 rows but block')
    one_line_error(lambda: enter(engine.per_sample(torch.ones(4, n, dtype=torch.bool), mode='mask')),
                   'resnet50: keep mask has 4 rows but the batch has 2')
    one_line_error(lambda: enter(engine.per_sample(torch.ones(2, n, dtype=torch.bool), mode='drop')),
                   "resnet50: per-sample mode must be 'skip' or 'mask'")
    one_line_error(lambda: enter(engine.per_sample(torch.ones(2, n, dtype=torch.bool), keep_prob=1.5)),
                   'resnet50: keep_prob must lie in [0, 1]')
    one_line_error(lambda: enter(engine.timm_drop_path(torch.zeros(3))),
                   'resnet50: drop-path rates has shape (3,), expected (16,)')
    one_line_error(lambda: enter(engine.per_sample(torch.ones(2, n, dtype=torch.bool), unit='layer')),
                   "resnet50: drop unit must be one of block, branch, not 'layer'")
    assert model_snapshot(model) == before


def test_branch_masks_are_checked_against_the_branch_columns(tiny_model):
    model, block_map = tiny_model('vit_tiny_patch16_224')
    engine = DepthEngine(model, block_map)
    x = inputs('vit_tiny_patch16_224', batch=2)
    one_line_error(lambda: engine.per_sample(torch.ones(2, 12, dtype=torch.bool), unit='branch').__enter__(),
                   "vit_tiny_patch16_224: keep mask has shape (2, 12), expected (batch, 24) (one column per drop "
                   "unit of block_map.units('branch'))")
    keep_mask = torch.ones(4, 24, dtype=torch.bool)
    keep_mask[1, 3] = False
    with engine.per_sample(keep_mask, unit='branch'):
        one_line_error(lambda: model(x),
                       'vit_tiny_patch16_224: keep mask has 4 rows but block blocks.1 got a batch of 2')
    with engine.per_sample(keep_mask, 0.5, mode='mask', unit='branch'):
        one_line_error(lambda: model(x), 'vit_tiny_patch16_224: keep mask has 4 rows but the batch has 2')


def test_engine_on_a_model_without_residual_blocks_is_a_model_error():
    with torch.device('meta'):
        model = timm.create_model('vgg11')
    one_line_error(lambda: DepthEngine(model), 'vgg11: no skippable residual block')
