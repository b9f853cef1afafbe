"""Shared fixtures: tiny timm models (default depth, small width and input size) for fast CPU tests."""
import contextlib

import pytest
import timm
import torch
from torch import nn

from subnet.blocks import find_blocks
from subnet.branches import restore_slots, swap_slots

# The families the depth engine must support, at their default depth (so block counts are those of the real
# architecture) with a narrow width and a small input. Values: create_model kwargs; 'img_size' is also the input.
TINY_FAMILIES = {
    'resnet18': dict(zero_init_last=False),  # a zero-initialised branch would make every block a no-op
    'resnet50': dict(zero_init_last=False),
    'regnetx_002': dict(),
    'convnext_atto': dict(),
    'efficientnet_b0': dict(),
    'mobilenetv3_small_100': dict(),
    'vit_tiny_patch16_224': dict(img_size=32, embed_dim=32, num_heads=2),
    'deit_tiny_patch16_224': dict(img_size=32, embed_dim=32, num_heads=2),
    'deit3_small_patch16_224': dict(img_size=32, embed_dim=32, num_heads=2),
    'cait_xxs24_224': dict(img_size=32, embed_dim=32, num_heads=2),
    'pit_ti_224': dict(img_size=64),
    'swin_tiny_patch4_window7_224': dict(img_size=64, window_size=4, embed_dim=24),
    'xcit_nano_12_p16_224': dict(img_size=32),
    'levit_128s': dict(img_size=64),
    'eva02_tiny_patch14_224': dict(img_size=28, embed_dim=32, num_heads=2),
    'beit_base_patch16_224': dict(img_size=32, embed_dim=32, num_heads=2, head_init_scale=1.0),
}

# Families without BatchNorm anywhere: a block run on a subset of rows computes exactly what it computes for
# those rows in the full batch, also in training mode.
LAYERNORM_FAMILIES = ['convnext_atto', 'vit_tiny_patch16_224', 'deit_tiny_patch16_224', 'deit3_small_patch16_224',
                      'cait_xxs24_224', 'pit_ti_224', 'swin_tiny_patch4_window7_224', 'eva02_tiny_patch14_224',
                      'beit_base_patch16_224']


# CNN inputs other than 32 px: at 32 px EfficientNet-B0's last stages are 1x1 and, with its squeeze-excite gates,
# turn fp32 rounding differences of 1e-7 into 1e-3 of the output (see test_depth's exactness tests)
TINY_INPUT = {'efficientnet_b0': 64}


def tiny_input_size(name):
    size = TINY_INPUT.get(name, TINY_FAMILIES[name].get('img_size', 32))
    return (3, size, size)


def create_tiny(name, **overrides):
    """A fresh tiny model (seeded, eval mode) whose residual branches visibly change the output.

    At init, layer scales are 1e-6..1e-5 (DeiT III, ConvNeXt, CaiT), some last-BN weights are zero (RegNet, LeViT)
    and eval-mode BatchNorm has unit running statistics, so activations vanish in deep CNNs. Here layer scales and
    zeroed norm weights become 1 and BatchNorm statistics are estimated on a few random batches.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, **{**TINY_FAMILIES[name], **overrides})
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.rsplit('.', 1)[-1].startswith('gamma'):
                param.fill_(1.0)
        for norm in batch_norms(model):
            if norm.weight is not None and not norm.weight.any():
                norm.weight.fill_(1.0)
    calibrate_batch_norm(model, [torch.randn((8,) + tiny_input_size(name)) for _ in range(2)])
    return model.eval()


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def calibrate_batch_norm(model, batches):
    """BatchNorm running statistics = the plain average over ``batches`` of the batch statistics (training-mode
    forwards, no gradients), estimated for the model as it runs now, e.g. inside a depth-engine context."""
    norms = batch_norms(model)
    if not norms:
        return
    training = model.training
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the calibration batches
        model.train()
        for batch in batches:
            model(batch)
        for norm in norms:
            norm.momentum = 0.1
    model.train(training)


class CallFactors(nn.Module):
    """Reference slot: its i-th call (cyclically) multiplies the branch by ``factors[i]``, one factor per row: what a
    timm DropPath that drew those masks computes."""

    def __init__(self, factors):
        super().__init__()
        self.factors, self.calls = factors, 0

    def forward(self, x):
        factor = self.factors[self.calls % len(self.factors)]
        self.calls += 1
        return x * factor.view((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)


@contextlib.contextmanager
def mask_reference(block_map, keep_mask, keep_prob, unit='block'):
    """Independent reference: every branch is computed on every row and multiplied by keep / keep_prob of its
    column. A column per block multiplies all the block's slots; a column per branch multiplies the slot call that
    closes that branch (CaiT closes both of a block's branches with one slot, called twice)."""
    units = block_map.units(unit)
    saved = []
    for block in block_map.blocks:
        columns = [u for u in units if u.block == block.index]
        factors = [keep_mask[:, u.index].to(torch.float64) / float(keep_prob[u.index]) for u in columns]
        per_slot = {slot: factors for slot in block.slots}  # one column: every call of every slot
        if columns[0].branch is not None:
            per_slot = {slot: [f for f, b in zip(factors, block.branches) if b.slot == slot] for slot in block.slots}
        saved.append((block.module, swap_slots(block.module, block.slots,
                                                lambda slot, original: CallFactors(per_slot[slot]))))
    try:
        yield
    finally:
        for module, slots in reversed(saved):
            restore_slots(module, slots)


@pytest.fixture
def single_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP threads spin-wait for a busy core, which made these
    tiny forwards up to 100x slower with 2 threads than with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_model():
    """Getter for a cached (model, block_map) per family; tests must leave the model as they found it."""
    cache = {}

    def get(name):
        if name not in cache:
            model = create_tiny(name)
            cache[name] = (model, find_blocks(model, tiny_input_size(name)))
        model, block_map = cache[name]
        return model.eval(), block_map
    return get
