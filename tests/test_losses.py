"""subnet.losses against test vectors: small logits whose losses were computed independently (numpy, float64,
printed to 6 decimals) from the definitions in docs/methods.md: cosub's four BCE terms as DeiT's engine.py writes
them, ST's T^2-scaled KL and ST++'s direction-only KL- as the ST repository's train.py computes them, and our GKT
reconstruction's group knowledge.

Vectors run in float64, as they were computed; separate tests pin the fp32 promotion for AMP inputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target

from reference_losses import group_knowledge_loss
from subnet.losses import GroupKnowledge, cosub_loss, direction_kl, kl_distill, standardize_logits

TOL = dict(rtol=0.0, atol=1e-6)


def f64(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def assert_close(actual, expected) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64).detach()
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), **TOL)


def assert_values(tensors, expected) -> None:
    assert_close(torch.stack([t.detach() for t in tensors]), expected)


# ---------------------------------------------------------------- cosub

CASE_A_Z1 = [[2.0, -1.0, 0.5]]
CASE_A_Z2 = [[1.5, -0.5, -1.0]]
CASE_A_Y = [[1.0, 0.0, 0.0]]
CASE_C_Z1 = [[1.0, -2.0, 0.0, -1.0], [0.5, -1.5, 2.0, -3.0]]
CASE_C_Z2 = [[0.0, -1.0, 1.0, -2.0], [-0.5, -1.0, 1.0, -2.5]]


def case_c_targets(smoothing: float) -> torch.Tensor:
    """timm's batch mixup of labels [0, 2] with the flipped batch at λ = 0.7 (what train.py hands the task)."""
    return mixup_target(torch.tensor([0, 2]), 4, lam=0.7, smoothing=smoothing).double()


def test_cosub_case_a_terms_and_total():
    result = cosub_loss(f64(CASE_A_Z1), f64(CASE_A_Z2), f64(CASE_A_Y))
    assert_values(result.label_terms + result.peer_terms, [0.471422, 0.329584, 0.674063, 0.641495])
    assert_close(result.total, 0.529141)
    # the two-term form of §1: ½ label mean + ½ peer mean
    assert_close(0.5 * result.label + 0.5 * result.peer, 0.529141)


def test_cosub_case_a_gradients_have_no_cross_term():
    z1, z2 = f64(CASE_A_Z1, requires_grad=True), f64(CASE_A_Z2, requires_grad=True)
    result = cosub_loss(z1, z2, f64(CASE_A_Y))
    result.total.backward()
    assert_close(z1.grad, [[-0.004665, 0.013362, 0.081331]])
    assert_close(z2.grad, [[-0.020471, 0.040512, -0.007048]])
    sig1, sig2, y = torch.sigmoid(z1.detach()), torch.sigmoid(z2.detach()), f64(CASE_A_Y)
    torch.testing.assert_close(z1.grad, 0.25 * ((sig1 - y) + (sig1 - sig2)) / 3)
    # the peer term of z1 is taught by sg σ(z2): it must not reach z2, and vice versa
    peer_a_wrt_b, = torch.autograd.grad(result.peer_terms[0], z2, retain_graph=True, allow_unused=True)
    peer_b_wrt_a, = torch.autograd.grad(result.peer_terms[1], z1, allow_unused=True)
    assert peer_a_wrt_b is None and peer_b_wrt_a is None


def test_cosub_label_weight_moves_between_label_and_peer():
    z1, z2, y = f64(CASE_A_Z1), f64(CASE_A_Z2), f64(CASE_A_Y)
    only_label = cosub_loss(z1, z2, y, label_weight=1.0)
    only_peer = cosub_loss(z1, z2, y, label_weight=0.0)
    assert_close(only_label.total, (0.471422 + 0.329584) / 2)
    assert_close(only_peer.total, (0.674063 + 0.641495) / 2)
    assert_close(cosub_loss(z1, z2, y, label_weight=0.8).total,
                 0.8 * only_label.total + 0.2 * only_peer.total)
    with pytest.raises(ValueError):
        cosub_loss(z1, z2, y, label_weight=1.5)


def test_cosub_case_b_identical_submodels_peer_term_is_binary_entropy_with_zero_gradient():
    z1, z2 = f64(CASE_A_Z1, requires_grad=True), f64(CASE_A_Z1, requires_grad=True)
    result = cosub_loss(z1, z2, f64(CASE_A_Y))
    assert_values(result.label_terms + result.peer_terms, [0.471422, 0.471422, 0.536795, 0.536795])
    assert_close(result.total, 0.504108)
    prob = torch.sigmoid(z1.detach())
    assert_close(result.peer_terms[0], (-(prob * prob.log() + (1 - prob) * (1 - prob).log())).mean())
    peer_grad, = torch.autograd.grad(result.peer_terms[0], z1)
    assert_close(peer_grad, torch.zeros_like(peer_grad))


def test_cosub_case_c_binarised_mixup_targets():
    targets = case_c_targets(smoothing=0.0)
    assert_close(targets, [[0.7, 0, 0.3, 0], [0.3, 0, 0.7, 0]])
    result = cosub_loss(f64(CASE_C_Z1), f64(CASE_C_Z2), targets, binarize_threshold=0.0)
    assert_values(result.label_terms + result.peer_terms, [0.287201, 0.390761, 0.616849, 0.564325])
    assert_close(result.total, 0.464784)
    multi_hot = f64([[1, 0, 1, 0], [1, 0, 1, 0]])
    assert_close(cosub_loss(f64(CASE_C_Z1), f64(CASE_C_Z2), multi_hot).total, 0.464784)


def test_cosub_case_c_soft_mixup_targets():
    result = cosub_loss(f64(CASE_C_Z1), f64(CASE_C_Z2), case_c_targets(smoothing=0.0))
    assert_values(result.label_terms + result.peer_terms, [0.443451, 0.472011, 0.616849, 0.564325])
    assert_close(result.total, 0.524159)


def test_cosub_case_d_smoothing_then_threshold_zero_makes_every_class_positive():
    smoothed = case_c_targets(smoothing=0.1)
    assert_close(smoothed, [[0.655, 0.025, 0.295, 0.025], [0.295, 0.025, 0.655, 0.025]])
    binarised = cosub_loss(f64(CASE_C_Z1), f64(CASE_C_Z2), smoothed, binarize_threshold=0.0)
    all_ones = cosub_loss(f64(CASE_C_Z1), f64(CASE_C_Z2), torch.ones(2, 4, dtype=torch.float64))
    assert_close(binarised.total, all_ones.total)
    assert not torch.allclose(binarised.total, cosub_loss(f64(CASE_C_Z1), f64(CASE_C_Z2), smoothed).total)


def test_cosub_case_f_threshold_leaves_peer_targets_soft():
    result = cosub_loss(f64(CASE_A_Z1), f64(CASE_A_Z2), f64(CASE_A_Y), binarize_threshold=0.2)
    # 0.638089 would mean σ(z2) = [0.82, 0.38, 0.27] had been binarised to [1, 1, 1]
    assert_close(result.peer_terms[0], 0.674063)
    assert_close(result.label_terms[0], 0.471422)


def test_cosub_class_index_targets_raise_value_error():
    with pytest.raises(ValueError, match='dense'):
        cosub_loss(f64(CASE_C_Z1), f64(CASE_C_Z2), torch.tensor([0, 2]))


def test_cosub_mismatched_submodel_logits_raise():
    with pytest.raises(ValueError):
        cosub_loss(f64(CASE_C_Z1), f64(CASE_A_Z2), f64(CASE_A_Y))


# ---------------------------------------------------------------- ST / ST++

TEACHER = [[2.0, 1.0, 0.1, -1.0]]
STUDENT = [[1.0, 3.0, 0.0, 0.5]]


def test_st_tv1_standardize_uses_biased_variance():
    assert_close(standardize_logits(f64(TEACHER)), [[1.331655, 0.428838, -0.383697, -1.376796]])
    assert_close(standardize_logits(f64(STUDENT)), [[-0.109764, 1.646464, -0.987878, -0.548821]])


def test_standardize_uses_the_actual_class_count():
    logits = torch.randn(3, 7, dtype=torch.float64) * 5 + 2
    standardized = standardize_logits(logits)
    assert_close(standardized.mean(dim=-1), torch.zeros(3))
    assert_close(standardized.var(dim=-1, unbiased=False), torch.ones(3))


def test_st_tv2_direction_kl():
    assert_close(direction_kl(f64(STUDENT), f64(TEACHER)), 0.723339)


def test_st_tv3_direction_kl_ignores_scale_and_shift():
    assert_close(direction_kl(10 * f64(STUDENT) + 5, 0.3 * f64(TEACHER) - 7), 0.723338)


def test_st_tv4_plain_kl_is_not_scale_invariant():
    assert_close(kl_distill(f64(STUDENT), f64(TEACHER)), 0.917998)
    assert_close(kl_distill(10 * f64(STUDENT) + 5, f64(TEACHER)), 15.457882)


def test_st_tv5_temperature_and_amplitude():
    assert_close(kl_distill(f64(STUDENT), f64(TEACHER), temperature=4.0), 0.812862)
    assert_close(direction_kl(f64(STUDENT), f64(TEACHER), temperature=4.0), 0.635966)
    assert_close(direction_kl(f64(STUDENT), f64(TEACHER), amplitude=2.0), 2.585805)


def test_st_tv6_batchmean_averages_per_sample_sums():
    teacher = f64([[2.0, 1.0, 0.1, -1.0], [0.0, 0.0, 1.0, 0.0]])
    student = f64([[1.0, 3.0, 0.0, 0.5], [0.5, 0.0, 0.0, 0.0]])
    per_sample = [direction_kl(student[i:i + 1], teacher[i:i + 1]) for i in range(2)]
    assert_values(per_sample, [0.723339, 1.602533])
    assert_close(direction_kl(student, teacher), 1.162936)


def test_st_tv7_cross_entropy_on_standardized_logits():
    label = torch.tensor([0])
    assert_close(F.cross_entropy(standardize_logits(f64(TEACHER)), label), 0.501966)
    assert_close(F.cross_entropy(f64(TEACHER), label), 0.449313)


def test_st_tv9_standardized_one_hot_bounds_for_ten_classes():
    one_hot_shaped = torch.zeros(1, 10, dtype=torch.float64)
    one_hot_shaped[0, 3] = 7.5  # any positive scale standardises to the same vector
    standardized = standardize_logits(one_hot_shaped)
    assert_close(standardized.max(), 3.0)
    assert_close(standardized.softmax(-1).max(), 0.756964)
    assert_close(F.cross_entropy(standardized, torch.tensor([3])), 0.278439)


def test_kl_distill_sends_no_gradient_to_the_teacher():
    student, teacher = f64(STUDENT, requires_grad=True), f64(TEACHER, requires_grad=True)
    direction_kl(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kl_distill_rejects_bad_temperature_and_shapes():
    with pytest.raises(ValueError):
        kl_distill(f64(STUDENT), f64(TEACHER), temperature=0.0)
    with pytest.raises(ValueError):
        kl_distill(f64(STUDENT), f64([[1.0, 2.0, 3.0]]))


# ---------------------------------------------------------------- GKT

MAIN = [[2.0, 0.5, -1.0]]
TV2_SUBNETS = [[[1.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]], [[1.5, 0.0, 0.0]], [[0.5, 0.5, 0.5]]]  # (1,1) (1,2) (2,1) (2,2)
LABEL = torch.tensor([0])


def gkt(subnets, groups: int, ema_weight: float = 0.5, temperature: float = 1.0, main=MAIN, label=LABEL):
    knowledge = GroupKnowledge(groups, ema_weight)
    result = group_knowledge_loss(f64(main), label, [f64(z) for z in subnets], knowledge, temperature)
    return result, knowledge


def test_gkt_tv1_one_group_one_loop_is_st():
    result, _ = gkt(TV2_SUBNETS[:1], groups=1)
    assert_close(result.label, 0.241311)
    assert_values(result.distill_terms, [0.279523])
    assert_close(result.total, 0.520834)


def test_gkt_tv2_two_groups_two_loops():
    result, knowledge = gkt(TV2_SUBNETS, groups=2)
    assert_values(result.distill_terms, [0.279523, 0.111769, 0.069001, 0.128904])
    assert_close(result.total, 0.830508)
    assert_close(knowledge.teacher(0), [MAIN[0]])
    assert_close(knowledge.teacher(1), [[1.25, 0.5, 0.0]])
    assert_close(knowledge.teacher(2), [[0.25, 0.75, 0.25]])


def test_gkt_tv3_temperature_four():
    result, _ = gkt(TV2_SUBNETS, groups=2, temperature=4.0)
    assert_values(result.distill_terms, [0.373904, 0.112277, 0.205599, 0.133800])
    assert_close(result.total, 1.066892)


def test_gkt_tv4_ema_weight_quarter():
    result, knowledge = gkt(TV2_SUBNETS, groups=2, ema_weight=0.25)
    assert_values(result.distill_terms, [0.279523, 0.111769, 0.069001, 0.089877])
    assert_close(knowledge.teacher(1), [[1.125, 0.75, 0.0]])
    assert_close(knowledge.teacher(2), [[0.125, 0.875, 0.125]])
    assert_close(result.total, 0.791481)


def test_gkt_tv5_batch_of_two_three_groups():
    subnets = [
        [[2, 1, 0, 0], [0.5, 1.5, 0.5, 0]], [[1, 1, 0, 0], [0, 1, 1, 0]], [[0.5, 0.5, 0.5, 0], [0, 0.5, 0.5, 0.5]],
        [[2.5, 0.5, 0, -0.5], [0, 2.5, 0.5, 0]], [[1.5, 0.5, 0.5, 0], [0.5, 1, 0.5, 0]], [[1, 0, 0, 0], [0, 0, 1, 0]],
    ]
    result, knowledge = gkt(subnets, groups=3, main=[[3, 1, 0, -1], [0, 2, 1, 0]], label=torch.tensor([0, 2]))
    assert_close(result.label, 0.839497)
    assert_values(result.distill_terms, [0.089518, 0.106085, 0.074631, 0.045505, 0.121692, 0.081889])
    assert_close(result.total, 1.358818)
    assert_close(knowledge.teacher(1), [[2.25, 0.75, 0, -0.25], [0.25, 2, 0.5, 0]])
    assert_close(knowledge.teacher(2), [[1.25, 0.75, 0.25, 0], [0.25, 1, 0.75, 0]])
    assert_close(knowledge.teacher(3), [[0.75, 0.25, 0.25, 0], [0, 0.25, 0.75, 0.25]])


def test_gkt_tv6_one_loop_is_a_teacher_assistant_chain():
    result, _ = gkt(TV2_SUBNETS[:2], groups=2)
    assert_values(result.distill_terms, [0.279523, 0.111769])
    assert_close(result.total, 0.632603)


def test_gkt_tv7_gradients_stop_at_every_teacher():
    main = f64(MAIN, requires_grad=True)
    subnets = [f64(z, requires_grad=True) for z in TV2_SUBNETS]
    result = group_knowledge_loss(main, LABEL, subnets, GroupKnowledge(2, 0.5))
    result.total.backward()
    assert_close(main.grad, [[-0.214403, 0.175290, 0.039113]])
    assert_close(subnets[0].grad, [[-0.363278, 0.247028, 0.116250]])


def test_gkt_distill_weight_scales_only_the_subnet_terms():
    knowledge = GroupKnowledge(2)
    result = group_knowledge_loss(f64(MAIN), LABEL, [f64(z) for z in TV2_SUBNETS], knowledge, distill_weight=0.5)
    assert_close(result.total, 0.241311 + 0.5 * (0.830508 - 0.241311))


def test_gkt_accepts_dense_mixup_targets():
    dense = group_knowledge_loss(f64(MAIN), f64([[1.0, 0.0, 0.0]]), [f64(TV2_SUBNETS[0])], GroupKnowledge(1))
    assert_close(dense.total, 0.520834)


def test_gkt_subnet_count_must_fill_whole_loops():
    with pytest.raises(ValueError):
        gkt(TV2_SUBNETS[:3], groups=2)


def test_group_knowledge_first_update_initialises_then_averages_and_reset_forgets():
    knowledge = GroupKnowledge(num_groups=1, ema_weight=0.25)
    logits = torch.tensor([[4.0, 0.0]], requires_grad=True)
    knowledge.update(1, logits)
    with torch.no_grad():
        logits.mul_(0.0)  # the buffer must be a copy, not a view of the caller's tensor
    assert_close(knowledge.teacher(1), [[4.0, 0.0]])
    knowledge.update(1, torch.tensor([[0.0, 8.0]]))
    assert_close(knowledge.teacher(1), [[3.0, 2.0]])
    assert not knowledge.teacher(1).requires_grad
    knowledge.reset()
    with pytest.raises(LookupError):  # group 1 holds no knowledge after the reset
        knowledge.teacher(1)


def test_group_knowledge_keeps_fp32_buffers_for_bf16_logits():
    knowledge = GroupKnowledge(num_groups=1)
    knowledge.update(0, torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16))
    assert knowledge.teacher(0).dtype == torch.float32


def test_group_knowledge_rejects_bad_settings():
    with pytest.raises(ValueError):
        GroupKnowledge(num_groups=0)
    with pytest.raises(ValueError):
        GroupKnowledge(num_groups=2, ema_weight=0.0)
    with pytest.raises(ValueError):
        GroupKnowledge(num_groups=2).update(3, torch.zeros(1, 2))


# ---------------------------------------------------------------- precision and range

def _all_losses(first: torch.Tensor, second: torch.Tensor, dense_target: torch.Tensor) -> list[torch.Tensor]:
    gkt_terms = group_knowledge_loss(first, dense_target.argmax(-1), [second, first], GroupKnowledge(2))
    return [cosub_loss(first, second, dense_target).total, kl_distill(second, first), direction_kl(second, first),
            gkt_terms.total]


def test_bf16_logits_give_fp32_losses_matching_fp32_computation():
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(4, 10, generator=generator) * 3
    second = torch.randn(4, 10, generator=generator) * 3
    target = F.one_hot(torch.arange(4), 10).float()
    bf16_losses = _all_losses(first.bfloat16(), second.bfloat16(), target)
    fp32_on_same_values = _all_losses(first.bfloat16().float(), second.bfloat16().float(), target)
    fp32_losses = _all_losses(first, second, target)
    for from_bf16, same_values, exact in zip(bf16_losses, fp32_on_same_values, fp32_losses):
        assert from_bf16.dtype == torch.float32
        torch.testing.assert_close(from_bf16, same_values, rtol=0.0, atol=1e-6)
        torch.testing.assert_close(from_bf16, exact, rtol=2e-2, atol=1e-3)  # bf16 rounding of the inputs only


def test_bf16_gradients_flow_back_in_bf16():
    logits = (torch.randn(2, 5) * 2).bfloat16().requires_grad_()
    direction_kl(logits, torch.randn(2, 5).bfloat16()).backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()


def test_losses_and_gradients_stay_finite_for_huge_logits():
    first = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], requires_grad=True)
    second = torch.tensor([[-1e4, 1e4, 1e4], [1e4, -1e4, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    losses = _all_losses(first, second, target)
    assert all(torch.isfinite(loss) for loss in losses)
    assert losses[1] > 1e3  # the mismatch is huge, not silently zeroed
    sum(losses).backward()
    assert torch.isfinite(first.grad).all() and torch.isfinite(second.grad).all()


def test_standardize_constant_logits_is_zero_not_nan_in_half_precision():
    constant = torch.full((2, 6), 3.0, dtype=torch.float16)
    standardized = standardize_logits(constant)
    assert standardized.dtype == torch.float32
    assert_close(standardized, torch.zeros(2, 6))
    assert math.isclose(direction_kl(constant, constant).item(), 0.0, abs_tol=1e-7)
