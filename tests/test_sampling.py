"""subnet.sampling: drop-rate schedules (per block and per branch), Bernoulli and fixed-count masks, ST's stage
prefixes, GKT's nested subsets, and masks shared across ranks."""
from collections import Counter

import pytest
import torch
from timm.layers import calculate_drop_path_rates

from subnet.sampling import (
    bernoulli_keep, draw_keep, drop_rates, fixed_count_keep, fixed_counts, nested_keep,
    stage_prefix_keep, step_generator, unit_drop_rates)
from train_helpers import broadcast_from_rank0

pytestmark = pytest.mark.usefixtures('single_thread')


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_linear_drop_rates_are_timms_schedule_and_constant_is_deit3s():
    assert drop_rates(16, 0.2, 'linear').tolist() == pytest.approx(calculate_drop_path_rates(0.2, 16))
    assert drop_rates(12, 0.1, 'constant').tolist() == [0.1] * 12
    with pytest.raises(ValueError, match="unknown drop-rate schedule 'cosine'"):
        drop_rates(12, 0.1, 'cosine')
    with pytest.raises(ValueError, match='must lie in'):
        drop_rates(12, 1.5)


def test_bernoulli_keep_frequencies_follow_the_rates():
    rates = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    keep = bernoulli_keep(20000, rates, gen(0))
    assert keep.shape == (20000, 5) and keep.dtype == torch.bool
    assert keep[:, 0].all() and not keep[:, 4].any()
    torch.testing.assert_close(keep.double().mean(0), 1 - rates.double(), rtol=0, atol=0.01)
    # rows and blocks are independent: the joint keep rate of two blocks is the product
    assert (keep[:, 1] & keep[:, 2]).double().mean().item() == pytest.approx(0.9 * 0.5, abs=0.01)


def test_fixed_count_keep_keeps_exactly_the_rounded_count_of_uniformly_chosen_rows():
    rates = torch.tensor([0.0, 0.05, 0.2, 0.45, 0.99, 1.0])
    assert fixed_counts(32, rates).tolist() == [32, 30, 26, 18, 1, 0]  # round((1 - rate) * 32), at least one row
    g = gen(0)
    masks = torch.stack([fixed_count_keep(32, rates, g) for _ in range(4000)])
    assert (masks.sum(1) == fixed_counts(32, rates)).all()  # every draw, every column
    # every row is equally likely to be kept, and columns are drawn independently
    torch.testing.assert_close(masks[:, :, 2].double().mean(0), torch.full((32,), 26 / 32, dtype=torch.float64),
                               rtol=0, atol=0.03)
    joint = (masks[:, 0, 2] & masks[:, 0, 3]).double().mean().item()
    assert joint == pytest.approx(26 / 32 * 18 / 32, abs=0.03)
    assert len({tuple(m[:, 3].nonzero().flatten().tolist()) for m in masks[:50]}) == 50  # subsets vary


def test_draw_keep_gives_the_unbiased_keep_probabilities_of_each_row_sampling():
    rates = torch.tensor([0.0, 0.2, 0.45])
    mask, keep_prob = draw_keep(32, rates, 'bernoulli', gen(1))
    assert torch.equal(mask, bernoulli_keep(32, rates, gen(1)))
    assert keep_prob.tolist() == pytest.approx([1.0, 0.8, 0.55])
    mask, keep_prob = draw_keep(32, rates, 'fixed', gen(1))
    assert torch.equal(mask, fixed_count_keep(32, rates, gen(1)))
    assert keep_prob.tolist() == [1.0, 26 / 32, 18 / 32]  # DINOv2's scale: batch / kept rows
    with pytest.raises(ValueError, match="unknown row sampling 'poisson'"):
        draw_keep(32, rates, 'poisson')
    with pytest.raises(ValueError, match='must lie in'):
        draw_keep(32, [1.5], 'fixed')


def test_unit_drop_rates_give_every_branch_its_blocks_rate(tiny_model):
    _, vit = tiny_model('vit_tiny_patch16_224')
    assert unit_drop_rates(vit, 0.1).tolist() == [0.1] * 24  # DeiT III: the same rate on every branch
    linear = drop_rates(12, 0.1, 'linear')
    assert torch.equal(unit_drop_rates(vit, 0.1, 'linear'), linear.repeat_interleave(2))
    assert torch.equal(unit_drop_rates(vit, 0.1, 'linear', unit='block'), linear)
    _, cait = tiny_model('cait_xxs24_224')  # class-attention blocks cannot be skipped: rate 0, one column each
    assert unit_drop_rates(cait, 0.2).tolist() == [0.2] * 48 + [0.0, 0.0]


def test_masks_are_reproducible_from_the_generator():
    rates = drop_rates(12, 0.3, 'constant')
    assert torch.equal(bernoulli_keep(8, rates, gen(5)), bernoulli_keep(8, rates, gen(5)))
    assert not torch.equal(bernoulli_keep(8, rates, gen(5)), bernoulli_keep(8, rates, gen(6)))


def test_stage_prefix_space3_on_resnet50_gives_the_eight_st_subnets(tiny_model):
    _, block_map = tiny_model('resnet50')
    g = gen(0)
    depths = Counter()
    for _ in range(1600):
        keep = stage_prefix_keep(block_map, 3, g)
        for stage in block_map.stages:  # a prefix: kept blocks come first in every stage
            kept = keep[list(stage.blocks)].tolist()
            assert kept == sorted(kept, reverse=True)
        depths[block_map.stage_depths(keep)] += 1
    # ST's space3: (3, {3,4}, {3..6}, 3), 8 subnets with probability 1/8 each
    assert set(depths) == {(3, a, b, 3) for a in (3, 4) for b in (3, 4, 5, 6)}
    assert all(abs(count / 1600 - 1 / 8) < 0.03 for count in depths.values())


def test_stage_prefix_default_space_keeps_the_projection_block(tiny_model):
    _, block_map = tiny_model('resnet50')
    g = gen(1)
    seen = {block_map.stage_depths(stage_prefix_keep(block_map, 0, g)) for _ in range(3000)}
    # min_keep 0 is raised to 1 because each stage's first block cannot be skipped: the 216 subnets of ST's default
    assert len(seen) == 216 and min(min(d) for d in seen) == 1
    assert all(1 <= d[i] <= block_map.depths[i] for d in seen for i in range(4))


def test_stage_prefix_per_stage_minimum_and_its_error(tiny_model):
    _, block_map = tiny_model('resnet50')
    g = gen(2)
    seen = {block_map.stage_depths(stage_prefix_keep(block_map, [3, 4, 5, 3], g)) for _ in range(200)}
    assert seen == {(3, 4, 5, 3), (3, 4, 6, 3)}
    with pytest.raises(ValueError, match='resnet50: min_keep has 2 entries but the model has 4 stages'):
        stage_prefix_keep(block_map, [1, 1], g)


def test_nested_keep_inherits_every_parent_drop():
    parent = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    child = nested_keep(parent, 0.25, gen(3))
    assert not (child & ~parent).any()
    # the rule, replayed with the same draws: a block survives iff the parent kept it and u >= q
    uniforms = torch.rand(8, generator=gen(3), dtype=torch.float64)
    assert torch.equal(child, parent & (uniforms >= 0.25))


def test_nested_keep_decays_exponentially_down_the_chain():
    # N=8, q=0.25: 6, 4.5, 3.375 active units on average for groups 1, 2, 3 (8 * 0.75^k)
    g = gen(4)
    parent = torch.ones(20000, 8, dtype=torch.bool)
    means = []
    for _ in range(3):
        parent = nested_keep(parent, 0.25, g)
        means.append(parent.double().sum(1).mean().item())
    assert means == pytest.approx([6.0, 4.5, 3.375], abs=0.05)


def test_nested_keep_never_drops_what_is_not_droppable(tiny_model):
    _, block_map = tiny_model('resnet50')
    parent = torch.ones(len(block_map), dtype=torch.bool)
    child = nested_keep(parent, 1.0, gen(5), droppable=block_map.skippable)
    assert torch.equal(child, ~block_map.skippable)


def test_step_generator_gives_the_same_mask_on_every_rank_or_one_per_rank():
    rates = drop_rates(12, 0.5, 'constant')
    shared = [bernoulli_keep(4, rates, step_generator(42, 7)) for _ in range(2)]
    assert torch.equal(shared[0], shared[1])
    per_rank = [bernoulli_keep(4, rates, step_generator(42, 7, rank)) for rank in range(2)]
    assert not torch.equal(per_rank[0], per_rank[1])
    assert not torch.equal(bernoulli_keep(4, rates, step_generator(42, 8)), shared[0])
    assert not torch.equal(bernoulli_keep(4, rates, step_generator(43, 7)), shared[0])


def test_broadcast_without_distributed_is_the_identity():
    mask = torch.tensor([True, False, True])
    assert broadcast_from_rank0(mask) is mask
