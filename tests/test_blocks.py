"""subnet.blocks: generic block discovery, residual branches, stages and FLOP shares, and describing a family that
discovery misses."""
import logging
from collections import Counter

import pytest
import timm
import torch
from timm.layers import DropPath, Mlp
from timm.models import register_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from subnet.blocks import find_blocks, register_drop_path_slots
from subnet.depth import DepthEngine
from subnet.errors import ModelNotSupported

from conftest import TINY_FAMILIES, create_tiny, mask_reference, tiny_input_size

pytestmark = pytest.mark.usefixtures('single_thread')

# Skippable / all drop_path-bearing blocks, and the block count of each stage, of timm's default architectures
# (read off the model definitions in timm 1.0.31).
EXPECTED = {
    'resnet18': (5, 8, (2, 2, 2, 2)),
    'resnet50': (12, 16, (3, 4, 6, 3)),
    'regnetx_002': (9, 13, (1, 1, 4, 7)),
    'convnext_atto': (12, 12, (2, 2, 6, 2)),
    'efficientnet_b0': (9, 16, (1, 2, 2, 3, 3, 4, 1)),
    'mobilenetv3_small_100': (6, 12, (1, 2, 3, 2, 3, 1)),
    'vit_tiny_patch16_224': (12, 12, (12,)),
    'deit_tiny_patch16_224': (12, 12, (12,)),
    'deit3_small_patch16_224': (12, 12, (12,)),
    'cait_xxs24_224': (24, 26, (24, 2)),
    'pit_ti_224': (12, 12, (2, 6, 4)),
    'swin_tiny_patch4_window7_224': (12, 12, (2, 2, 6, 2)),
    'xcit_nano_12_p16_224': (12, 14, (12, 2)),
    'levit_128s': (9, 11, (2, 1, 3, 1, 4)),  # the two LevitDownsample modules are stages of their own
    'eva02_tiny_patch14_224': (12, 12, (12,)),
    'beit_base_patch16_224': (12, 12, (12,)),
}


# Columns of a branch-level mask per block: {columns: blocks}. ViT-style blocks split into attention and MLP, XCiT's
# into attention, local patch interaction and MLP; blocks with one branch, and class-attention blocks (not
# skippable), stay one column.
EXPECTED_UNITS = {
    'resnet18': {1: 8}, 'resnet50': {1: 16}, 'regnetx_002': {1: 13}, 'convnext_atto': {1: 12},
    'efficientnet_b0': {1: 16}, 'mobilenetv3_small_100': {1: 12},
    'vit_tiny_patch16_224': {2: 12}, 'deit_tiny_patch16_224': {2: 12}, 'deit3_small_patch16_224': {2: 12},
    'cait_xxs24_224': {2: 24, 1: 2}, 'pit_ti_224': {2: 12}, 'swin_tiny_patch4_window7_224': {2: 12},
    'xcit_nano_12_p16_224': {3: 12, 1: 2}, 'levit_128s': {2: 9, 1: 2}, 'eva02_tiny_patch14_224': {2: 12},
    'beit_base_patch16_224': {2: 12},
}


def test_every_family_is_listed():
    assert set(EXPECTED) == set(TINY_FAMILIES) == set(EXPECTED_UNITS)


@pytest.mark.parametrize('name', list(EXPECTED))
def test_skippable_counts_match_timm_default_architectures(name, tiny_model):
    _, block_map = tiny_model(name)
    skippable, total, depths = EXPECTED[name]
    assert (int(block_map.skippable.sum()), len(block_map)) == (skippable, total)
    assert block_map.depths == depths
    assert [b.index for b in block_map.blocks] == list(range(total))
    assert all(bool(b.reason) != b.skippable for b in block_map.blocks)


@pytest.mark.parametrize('name', list(EXPECTED_UNITS))
def test_branches_per_block_of_every_family(name, tiny_model):
    _, block_map = tiny_model(name)
    units = block_map.units('branch')
    assert Counter(Counter(u.block for u in units).values()) == EXPECTED_UNITS[name]
    assert [u.index for u in units] == list(range(len(units)))
    assert len(block_map.units('block')) == len(block_map)
    for block in block_map.blocks:
        assert block.separable == (not block.branch_reason)
        if block.separable:  # a split block's branch FLOPs add up to the block's
            assert sum(b.flops for b in block.branches) == block.flops
        if block.skippable and len(block.branches) > 1:
            assert block.separable, block.branch_reason


def test_branches_are_found_from_the_call_order(tiny_model):
    _, vit = tiny_model('vit_tiny_patch16_224')
    assert [(b.slot, b.children) for b in vit.blocks[0].branches] == [
        ('drop_path1', ('norm1', 'attn', 'ls1')), ('drop_path2', ('norm2', 'mlp', 'ls2'))]
    _, cait = tiny_model('cait_xxs24_224')  # one slot closes both branches; layer scales are parameters
    assert [(b.slot, b.children) for b in cait.blocks[0].branches] == [
        ('drop_path', ('norm1', 'attn')), ('drop_path', ('norm2', 'mlp'))]
    _, xcit = tiny_model('xcit_nano_12_p16_224')  # timm's XCiT calls its third slot second
    assert [(b.slot, b.children) for b in xcit.blocks[0].branches] == [
        ('drop_path1', ('norm1', 'attn')), ('drop_path3', ('norm3', 'local_mp')), ('drop_path2', ('norm2', 'mlp'))]
    _, swin = tiny_model('swin_tiny_patch4_window7_224')  # the attention runs on windows: shared, not per row
    assert [b.children for b in swin.blocks[0].branches] == [('norm1', 'attn'), ('norm2', 'mlp')]
    assert swin.blocks[0].branches[0].shared_args[1] == frozenset({0})
    _, resnet = tiny_model('resnet18')  # one branch (its None slot is called once a module is put there)
    assert all(len(b.branches) == 1 and b.branch_reason == 'one branch' for b in resnet.blocks)
    _, effnet = tiny_model('efficientnet_b0')  # without a shortcut the slot is never called
    assert [b.branch_reason for b in effnet.blocks if not b.branches] == ['its slots are not called'] * 7


def test_branch_flops_match_the_vit_formulas(tiny_model):
    _, block_map = tiny_model('vit_tiny_patch16_224')
    dim, tokens = 32, 2 * 2 + 1
    attention = 8 * tokens * dim * dim + 4 * tokens * tokens * dim  # qkv + proj, q@k and attn@v
    mlp = 16 * tokens * dim * dim  # two linears, ratio 4
    assert all([b.flops for b in block.branches] == [attention, mlp] for block in block_map.blocks)
    keep = torch.ones(24)
    keep[0::2] = 0  # every attention branch dropped
    assert block_map.flop_fraction(keep, unit='branch') == pytest.approx(
        1 - 12 * attention / block_map.total_flops)


def test_resnet_first_block_of_each_stage_is_kept_for_its_projection_shortcut(tiny_model):
    _, block_map = tiny_model('resnet50')
    kept = [b for b in block_map.blocks if not b.skippable]
    assert [b.name for b in kept] == ['layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']
    assert all(b.reason == 'output shape differs from input' for b in kept)
    assert [s.name for s in block_map.stages] == ['layer1', 'layer2', 'layer3', 'layer4']
    assert [s.min_keep for s in block_map.stages] == [1, 1, 1, 1]
    assert block_map.stages[2].blocks == (7, 8, 9, 10, 11, 12)


def test_a_block_whose_shortcut_is_switched_off_is_not_skippable():
    model = create_tiny('efficientnet_b0')
    block_map = find_blocks(model, tiny_input_size('efficientnet_b0'))
    assert {b.name for b in block_map.blocks if not b.skippable} == {f'blocks.{i}.0' for i in range(7)}
    model.blocks[2][1].has_skip = False  # same shape in and out, but no identity shortcut
    block = {b.name: b for b in find_blocks(model, tiny_input_size('efficientnet_b0')).blocks}['blocks.2.1']
    assert not block.skippable and block.reason.startswith('has_skip is False')


def test_class_attention_blocks_are_not_skippable(tiny_model):
    _, cait = tiny_model('cait_xxs24_224')
    assert [(b.name, b.reason) for b in cait.blocks if not b.skippable] == [
        ('blocks_token_only.0', 'output shape differs from input'),
        ('blocks_token_only.1', 'output shape differs from input')]
    _, xcit = tiny_model('xcit_nano_12_p16_224')
    impure = [b for b in xcit.blocks if not b.skippable]
    # same shape in and out, but norm2 sits on the main path: caught by the zero-branch check, not by shapes
    assert [b.name for b in impure] == ['cls_attn_blocks.0', 'cls_attn_blocks.1']
    assert all(b.reason.startswith('not a pure residual') for b in impure)


def test_swinv2_cr_extra_norm_blocks_are_not_skippable():
    model = timm.create_model('swinv2_cr_tiny_ns_224', img_size=(64, 64), window_size=4, embed_dim=24).eval()
    block_map = find_blocks(model, (3, 64, 64))
    impure = [b.name for b in block_map.blocks if not b.skippable]
    # norm3 on the main path; comparing whole-model outputs finds only 3 of these 4 (the final norm re-normalises
    # the last)
    extra_norm = [n[:-len('.norm3')] for n, m in model.named_modules()
                  if n.endswith('.norm3') and not isinstance(m, torch.nn.Identity)]
    assert impure == extra_norm and len(impure) == 4


def test_rope_table_is_recorded_as_shared_not_per_row(tiny_model):
    _, block_map = tiny_model('eva02_tiny_patch14_224')
    assert all(b.shared_args == {'rope'} for b in block_map.blocks)


def test_block_flops_match_the_vit_block_formula(tiny_model):
    _, block_map = tiny_model('vit_tiny_patch16_224')
    dim, tokens = 32, 2 * 2 + 1
    # qkv + proj + two MLP linears (ratio 4) = 24 * D^2 per token, plus q@k and attn@v = 4 * N^2 * D
    per_block = 24 * tokens * dim * dim + 4 * tokens * tokens * dim
    assert all(b.flops == per_block for b in block_map.blocks)


def test_total_flops_match_a_separate_count(tiny_model):
    model, block_map = tiny_model('resnet50')
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *tiny_input_size('resnet50')))  # a CNN: no attention kernel to add a formula for
    assert block_map.total_flops == counter.get_total_flops()
    assert sum(b.flops for b in block_map.blocks) < block_map.total_flops


def test_flop_fraction_of_subnets_and_of_keep_probabilities(tiny_model):
    _, block_map = tiny_model('resnet50')
    n = len(block_map)
    assert block_map.flop_fraction(torch.ones(n, dtype=torch.bool)) == pytest.approx(1.0)
    keep = torch.ones(n, dtype=torch.bool)
    keep[[2, 12]] = False
    dropped = block_map.blocks[2].flops + block_map.blocks[12].flops
    assert block_map.flop_fraction(keep) == pytest.approx(1 - dropped / block_map.total_flops)
    # expected cost of per-sample masks is linear in the keep probabilities
    probs = torch.full((n,), 0.75)
    half = 1 - 0.25 * sum(b.flops for b in block_map.blocks) / block_map.total_flops
    assert block_map.flop_fraction(probs) == pytest.approx(half)
    rows = torch.stack([torch.ones(n, dtype=torch.bool), keep])
    assert block_map.flop_fraction(rows) == pytest.approx((1 + block_map.flop_fraction(keep)) / 2)
    with pytest.raises(ValueError, match='resnet50: keep has shape'):
        block_map.flop_fraction(torch.ones(n - 1))


def test_stage_depths_count_kept_blocks_per_stage(tiny_model):
    _, block_map = tiny_model('resnet50')
    keep = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert block_map.stage_depths(keep) == (3, 3, 5, 3)


def test_discovery_leaves_the_model_and_global_rng_untouched():
    model = create_tiny('vit_tiny_patch16_224').train()
    model.head.weight.requires_grad_(False)
    model.blocks[0].eval()  # a frozen part must stay frozen
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    rng = torch.get_rng_state()
    block_map = find_blocks(model, tiny_input_size('vit_tiny_patch16_224'))
    assert len(block_map) == 12
    assert torch.equal(rng, torch.get_rng_state())
    assert [m.training for m in model.modules()] == [not n.startswith('blocks.0') for n, _ in model.named_modules()]
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == names
    assert not model.head.weight.requires_grad and model.blocks[0].attn.qkv.weight.requires_grad


def test_find_blocks_defaults_to_the_pretrained_input_size():
    model = timm.create_model('resnet18').eval()
    assert find_blocks(model).input_size == (3, 224, 224)


def test_wrong_input_size_is_a_one_line_model_error():
    model = create_tiny('vit_tiny_patch16_224')  # built for 32 px, pretrained_cfg still says 224
    with pytest.raises(ModelNotSupported) as err:
        find_blocks(model)
    assert str(err.value).startswith('vit_tiny_patch16_224: dry forward at input size (3, 224, 224) failed')
    assert '\n' not in str(err.value)


def test_model_without_residual_blocks_is_a_model_error():
    with torch.device('meta'):  # never run: the error comes before any forward
        model = timm.create_model('vgg11')
    with pytest.raises(ModelNotSupported) as err:
        find_blocks(model, (3, 32, 32))
    assert str(err.value).startswith('vgg11: no skippable residual block')
    assert '\n' not in str(err.value)


# ---- blocks whose branches cannot run apart ------------------------------------------------------------------------
class TwoBranchBlock(nn.Module):
    """A pre-norm block with two residual branches, each reading its own normalised input: they run apart."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.fc1, self.drop_path1 = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Identity()
        self.norm2, self.fc2, self.drop_path2 = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.fc1(self.norm1(x)))
        return x + self.drop_path2(self.fc2(self.norm2(x)))


class SharedNormBlock(TwoBranchBlock):
    """Both branches read one normalised input computed in the first: the second branch would see the first
    branch's rows (a silent mix-up whenever the two keep as many rows)."""

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.drop_path1(self.fc1(h))
        return x + self.drop_path2(self.fc2(h))


class BatchSizeBlock(TwoBranchBlock):
    """The second branch reshapes with the batch size of the block's input."""

    def forward(self, x):
        batch = x.shape[0]
        x = x + self.drop_path1(self.fc1(self.norm1(x)))
        return x + self.drop_path2(self.fc2(self.norm2(x)).reshape(batch, -1))


def test_blocks_whose_branches_cannot_run_apart_keep_block_granularity(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(TwoBranchBlock(8), SharedNormBlock(8), BatchSizeBlock(8), TwoBranchBlock(8)).eval()
    with caplog.at_level(logging.WARNING, logger='subnet.blocks'):
        block_map = find_blocks(model, (8,))
    assert [b.separable for b in block_map.blocks] == [True, False, False, True]
    assert block_map.blocks[1].branch_reason.startswith('differs from masking each branch')
    assert block_map.blocks[2].branch_reason.startswith('fails on a subset of rows')
    assert [(u.block, u.branch) for u in block_map.units('branch')] == [
        (0, 0), (0, 1), (1, None), (2, None), (3, 0), (3, 1)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all('\n' not in line for line in lines)
    assert "the residual branches of 1 cannot run on their own rows" in lines[0]
    assert "the residual branches of 2 cannot run on their own rows" in lines[1]
    # and branch-level masks on such a model are exact: the two unsplit blocks drop as a whole
    engine = DepthEngine(model, block_map)
    keep_mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    x = torch.randn(6, 8)
    with torch.no_grad():
        with engine.per_sample(keep_mask, 0.5, unit='branch'):
            skip = model(x)
        with mask_reference(block_map, keep_mask, torch.full((6,), 0.5), 'branch'):
            reference = model(x)
    torch.testing.assert_close(skip, reference, rtol=0, atol=1e-6)


# ---- a family discovery does not know ------------------------------------------------------------------------------
class ToyBlock(nn.Module):
    """A pre-norm residual block whose stochastic-depth slots are not called drop_path*: discovery cannot see it."""

    def __init__(self, dim, drop_path_rate=0.0):
        super().__init__()
        self.norm1, self.mix = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 2 * dim)
        self.skip_mix = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()
        self.skip_mlp = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        x = x + self.skip_mix(self.mix(self.norm1(x)))
        return x + self.skip_mlp(self.mlp(self.norm2(x)))


class ToyNet(nn.Module):
    def __init__(self, depth=4, dim=16, num_classes=5, drop_path_rate=0.0, **kwargs):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, stride=8)
        self.blocks = nn.Sequential(*[ToyBlock(dim, drop_path_rate) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


@register_model
def toy_stochastic_depth_net(pretrained=False, **kwargs):
    return ToyNet(**kwargs)


def test_register_drop_path_slots_describes_a_family_discovery_misses():
    torch.manual_seed(0)
    model = timm.create_model('toy_stochastic_depth_net').eval()
    with pytest.raises(ModelNotSupported, match='no module has a drop_path slot'):
        find_blocks(model, (3, 32, 32))
    register_drop_path_slots('skip_mix', 'skip_mlp', block=ToyBlock)
    block_map = find_blocks(model, (3, 32, 32))
    assert [b.name for b in block_map.blocks] == ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3']
    assert all(b.skippable and b.separable and b.slots == ('skip_mix', 'skip_mlp') for b in block_map.blocks)
    assert [b.children for b in block_map.blocks[0].branches] == [('norm1', 'mix'), ('norm2', 'mlp')]

    engine = DepthEngine(model, block_map)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with engine.subnet([0, 2]):  # a per-batch subnet: blocks 1 and 3 skipped
            subnet = model(x)
        tokens = model.blocks[2](model.blocks[0](model.embed(x).flatten(2).transpose(1, 2)))
        torch.testing.assert_close(subnet, model.head(tokens.mean(1)), rtol=0, atol=0)
        for unit in ('block', 'branch'):  # per-sample skip, per block and per branch
            keep_mask = torch.rand(6, len(block_map.units(unit)), generator=torch.Generator().manual_seed(1)) < 0.5
            with engine.per_sample(keep_mask, 0.5, unit=unit):
                skip = model(x)
            with mask_reference(block_map, keep_mask, torch.full((keep_mask.shape[1],), 0.5), unit):
                reference = model(x)
            torch.testing.assert_close(skip, reference, rtol=0, atol=1e-6)
            assert not torch.allclose(skip, model(x))
    # the model's own slots still read as drop-path rates
    built = timm.create_model('toy_stochastic_depth_net', drop_path_rate=0.2)
    assert DepthEngine(built, input_size=(3, 32, 32)).model_drop_path_rates().tolist() == [0.2] * 4


def test_register_drop_path_slots_rejects_what_is_not_a_slot_name_or_a_block_class():
    for call, message in ((lambda: register_drop_path_slots(), 'slot names must be attribute names'),
                          (lambda: register_drop_path_slots('drop path'), 'slot names must be attribute names'),
                          (lambda: register_drop_path_slots('sd', block='ToyBlock'),
                           'block must be an nn.Module subclass')):
        with pytest.raises((ValueError, TypeError)) as err:
            call()
        assert str(err.value).startswith('register_drop_path_slots: ' + message) and '\n' not in str(err.value)
