"""subnet.blocks: generic block discovery, stages and FLOP shares (timm.md section 4.3)."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from subnet.blocks import find_blocks
from subnet.errors import UsageError

from conftest import TINY_FAMILIES, create_tiny, tiny_input_size

pytestmark = pytest.mark.usefixtures('single_thread')

# timm.md section 4.3: skippable / all drop_path-bearing blocks, and the block count of each stage.
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


def test_every_family_is_listed():
    assert set(EXPECTED) == set(TINY_FAMILIES)


@pytest.mark.parametrize('name', list(EXPECTED))
def test_skippable_counts_match_timm_default_architectures(name, tiny_model):
    _, block_map = tiny_model(name)
    skippable, total, depths = EXPECTED[name]
    assert (int(block_map.skippable.sum()), len(block_map)) == (skippable, total)
    assert block_map.depths == depths
    assert [b.index for b in block_map.blocks] == list(range(total))
    assert all(bool(b.reason) != b.skippable for b in block_map.blocks)


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
    # norm3 on the main path; timm.md's model-level probe saw 3 of these 4, as the final norm re-normalises the last
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
    with pytest.raises(UsageError, match='resnet50: keep has shape'):
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


def test_wrong_input_size_is_a_one_line_usage_error():
    model = create_tiny('vit_tiny_patch16_224')  # built for 32 px, pretrained_cfg still says 224
    with pytest.raises(UsageError) as err:
        find_blocks(model)
    assert str(err.value).startswith('vit_tiny_patch16_224: dry forward at input size (3, 224, 224) failed')
    assert '\n' not in str(err.value)


def test_model_without_residual_blocks_is_a_usage_error():
    with torch.device('meta'):  # never run: the error comes before any forward
        model = timm.create_model('vgg11')
    with pytest.raises(UsageError) as err:
        find_blocks(model, (3, 32, 32))
    assert str(err.value).startswith('vgg11: no skippable residual block')
    assert '\n' not in str(err.value)
