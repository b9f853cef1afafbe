"""Every recipe in hparams/ against its source: build what train.py builds from it and compare with the source.

For each recipe, ``build_recipe`` parses the YAML with train.py's parser and builds, as train.py does, the
model, the train and eval loaders (on the shipped images: the transforms do not depend on the data), the
optimizer, the scheduler and the autocast (no training). ``measure`` reads the values that matter off the built
objects, and ``SOURCES`` holds what the source says for each, with where it says it. Line numbers refer to
facebookresearch/deit at 7e160fe and Sunshine-Ye/NIPS22-ST at 89f4f65. A value that differs from its source on
purpose says "deliberate" and is stated in the recipe's header and the README.

ViT-B, ViT-L and ViT-H are built on PyTorch's meta device: timm 1.0.31 creates every layer there, with the
shapes and constructor arguments we check (each LayerScale keeps its init value), without allocating or
initialising up to 630M parameters; the whole file takes seconds. ViT-S, ResNet-50 and the quickstart models are
built for real, so their initial weights are checked too. Each recipe is built once.
"""
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.scheduled_sampler import ScheduledTransformDataset
from timm.data.transforms import RandomResizedCropAndInterpolation, ResizeKeepRatio, str_to_interp_mode
from timm.layers import DropPath, LayerScale
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torchvision import transforms

import train
from subnet.criterion import build_criterion
from subnet.data import build_loaders
from subnet.device import training_precision
from subnet.timm_options import parse_train_args

ROOT = Path(__file__).parents[1]
HPARAMS = ROOT / 'hparams'
SHIPPED_IMAGES = ROOT / 'data' / 'fashion-mnist'
IMAGENET_TRAIN_IMAGES = 1_281_167
ON_META = {'cosub_deit3_vit_base.yaml', 'cosub_deit3_vit_large.yaml', 'cosub_deit3_vit_huge.yaml',
           'cosub_deit3_vit_base_ft224.yaml', 'cosub_deit3_vit_large_ft224.yaml', 'cosub_deit3_vit_huge_ft224.yaml'}


# ------------------------------------------------------------------------------------------ building (retarget here)

@dataclass
class Built:
    """What train.py builds from a recipe, before its first step."""
    args: object
    gpus: int
    model: torch.nn.Module
    loaders: object
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    updates_per_epoch: int
    num_epochs: int
    autocast: object


def header_gpus(path: Path) -> int:
    """GPUs the recipe's Run line asks for ('256 images per GPU x 8 GPUs'); 1 for the CPU quickstarts."""
    found = re.search(r'(\d+) images per GPU x (\d+) GPUs', path.read_text())
    return int(found.group(2)) if found else 1


def build_recipe(name: str) -> Built:
    """Build as train.py does (parse, checks, model, data, criterion, optimizer, schedule, autocast).

    The only place that knows train.py's internals: retarget these calls when train.py is restructured.
    """
    path = HPARAMS / name
    data = ['--data-dir', str(SHIPPED_IMAGES)]
    if 'multilabel' in name:  # the shipped pairs, read by the hfds/ reader (its --data-dir would be HF's cache)
        data = ['--dataset', f'hfds/{ROOT / "data" / "fashion-mnist-pairs"}']
    args, _ = parse_train_args(['-c', str(path), *data, '--workers', '0'])
    # a one-process group stands for torchrun: repeated augmentation needs a distributed sampler
    args.rank, args.world_size, args.distributed = 0, 1, True
    args.prefetcher = not args.no_prefetcher
    train.check_method_args(args)
    args.model = train.resolve_model_name(args.model)
    with torch.device('meta') if name in ON_META else nullcontext():
        model = train.build_model(args)
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    loaders = build_loaders(args, data_config, torch.device('cpu'), None, 0)
    criterion = build_criterion(args, args.num_classes)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    gpus = header_gpus(path)
    images = IMAGENET_TRAIN_IMAGES if 'quickstart' not in name else len(loaders.train.dataset)
    updates_per_epoch = images // (args.batch_size * gpus)  # timm's train loader drops the last batch
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=updates_per_epoch)
    autocast, _ = training_precision(args, torch.device('cpu'))
    return Built(args, gpus, model, loaders, criterion, optimizer, scheduler, updates_per_epoch, num_epochs, autocast)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """Getter for a recipe's Built, each built once, inside a one-process gloo group."""
    store = tmp_path_factory.mktemp('process_group') / 'store'
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group('gloo', init_method=f'file://{store}', rank=0, world_size=1)
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_recipe(name)
        return cache[name]
    yield get
    if own_group:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- measuring

def _interp(mode) -> str:
    return next(name for name in ('bilinear', 'bicubic', 'nearest') if str_to_interp_mode(name) == mode)


def describe_train_transform(transform) -> dict:
    """The augmentations a built training transform applies, by kind."""
    found = dict(train_size=None, crop_scale=None, train_interpolation=None, hflip=0.0, color_jitter=None,
                 policy=None)
    for op in transform.transforms:
        if isinstance(op, transforms.RandomApply) and len(op.transforms) == 1:
            op = op.transforms[0]
        if isinstance(op, RandomResizedCropAndInterpolation):
            found['train_size'] = op.size[0]
            found['crop_scale'] = tuple(op.scale)
            found['train_interpolation'] = ('random' if isinstance(op.interpolation, (list, tuple))
                                            else _interp(op.interpolation))
        elif isinstance(op, transforms.RandomHorizontalFlip):
            found['hflip'] = op.p
        elif isinstance(op, transforms.ColorJitter):
            strengths = {round(op.brightness[1] - 1, 6), round(op.contrast[1] - 1, 6), round(op.saturation[1] - 1, 6)}
            assert len(strengths) == 1 and op.hue is None, f'unexpected jitter {op}'
            found['color_jitter'] = strengths.pop()
        elif isinstance(op, AutoAugment):
            found['policy'] = ('auto', sorted({o.name for sub_policy in op.policy for o in sub_policy}))
        elif isinstance(op, RandAugment):
            first = op.ops[0]
            assert all((o.prob, o.magnitude, o.magnitude_std) == (first.prob, first.magnitude, first.magnitude_std)
                       for o in op.ops)
            found['policy'] = dict(ops=op.num_layers, magnitude=first.magnitude, magnitude_std=first.magnitude_std,
                                   op_prob=first.prob, increasing=any('Increasing' in o.name for o in op.ops))
    return found


def describe_eval_transform(transform) -> dict:
    # timm resizes a non-square input (the multi-label pairs) keeping its aspect ratio
    resize = next(op for op in transform.transforms if isinstance(op, (transforms.Resize, ResizeKeepRatio)))
    crop = next(op for op in transform.transforms if isinstance(op, transforms.CenterCrop))
    return dict(eval_resize=resize.size, eval_crop=crop.size[0], eval_interpolation=_interp(resize.interpolation))


def _block_drop_rates(model) -> list:
    """The drop-path rate of each residual block as built (0 where timm put an Identity or None in its slots)."""
    rates = []
    for module in model.modules():
        slots = [getattr(module, n) for n in ('drop_path', 'drop_path1', 'drop_path2') if hasattr(module, n)]
        if slots and all(isinstance(s, (DropPath, torch.nn.Identity, type(None))) for s in slots):
            rates.append(max((s.drop_prob for s in slots if isinstance(s, DropPath)), default=0.0))
    return rates


def _lr_at(b: Built, t: int) -> float:
    """The learning rate the scheduler sets at epoch t (or update t when it steps per update)."""
    if b.scheduler.t_in_epochs:
        b.scheduler.step(t)
    else:
        b.scheduler.step_update(t)
    rates = {group['lr'] for group in b.optimizer.param_groups}
    assert len(rates) == 1, rates
    return rates.pop()


def measure(b: Built) -> dict:
    """The values that matter, read off the built objects."""
    args, model, opt = b.args, b.model, b.optimizer
    prefetcher = b.loaders.train  # timm's PrefetchLoader (every recipe keeps timm's prefetcher on)
    loader, dataset = prefetcher.loader, prefetcher.dataset
    train_transform = dataset.transforms[0] if isinstance(dataset, ScheduledTransformDataset) else dataset.transform
    sampler = loader.batch_sampler.sampler if b.loaders.scheduled_batches else loader.sampler
    mixing = loader.collate_fn if hasattr(loader.collate_fn, 'mixup_alpha') else None
    per_epoch = 1 if b.scheduler.t_in_epochs else b.updates_per_epoch
    block_rates = _block_drop_rates(model)
    schedule = 'constant' if len(set(block_rates)) == 1 else 'linear'
    layer_scales = {m.init_values for m in model.modules() if isinstance(m, LayerScale)}
    last_bns = [m.bn3.weight for m in model.modules() if hasattr(m, 'bn3')]
    measured = dict(
        model=args.model,
        epochs=b.num_epochs,
        global_batch=args.batch_size * b.gpus,
        optimizer=type(opt).__name__,
        lr=opt.defaults['lr'],
        opt_eps=opt.defaults.get('eps'),
        betas=tuple(opt.defaults['betas']) if 'betas' in opt.defaults else None,
        momentum=opt.defaults.get('momentum'),
        nesterov=opt.defaults.get('nesterov'),
        weight_decay=max(g['weight_decay'] for g in opt.param_groups),
        decay_norm_and_bias=all(g['weight_decay'] > 0 for g in opt.param_groups),
        start_lr=_lr_at(b, 0),
        warmup_epochs=b.scheduler.warmup_t / per_epoch,
        final_lr=_lr_at(b, b.num_epochs * per_epoch),
        lr_per_iteration=not b.scheduler.t_in_epochs,
        drop_path=max(block_rates),
        drop_path_schedule=schedule if max(block_rates, default=0) > 0 else None,
        layer_scale_init=layer_scales.pop() if len(layer_scales) == 1 else (sorted(layer_scales) or None),
        last_bn_init=None if not last_bns or last_bns[0].is_meta else
        sorted({float(v) for w in last_bns for v in w.detach().unique()}),
        random_erasing=prefetcher.random_erasing.probability if prefetcher.random_erasing is not None else 0.0,
        aug_repeats=getattr(sampler, 'num_repeats', 0),
        mixup=mixing.mixup_alpha if mixing else 0.0,
        cutmix=mixing.cutmix_alpha if mixing else 0.0,
        label_smoothing=mixing.label_smoothing if mixing else getattr(b.criterion, 'smoothing', 0.0),
        binarised_label_targets=bool(args.bce_loss and args.bce_target_thresh is not None),
        criterion=type(b.criterion).__name__,
        amp=str(b.autocast.keywords['dtype']).removeprefix('torch.') if args.amp else None,
        model_ema=args.model_ema,
        method=args.method,
        **describe_train_transform(train_transform),
        **describe_eval_transform(b.loaders.eval.dataset.transform),
    )
    for key in METHOD_KEYS.get(args.method, ()):
        measured[key] = getattr(args, key)
    return measured


METHOD_KEYS = {
    'cosub': ('cosub_label_weight',),
    'st': ('st_subnets', 'st_min_keep', 'st_loss', 'st_norm_ce', 'st_min_size', 'st_min_side', 'st_side_step',
           'st_amplitude', 'subnet_temperature', 'subnet_kd_weight', 'subnet_bn', 'subnet_bn_images'),
    'gkt': ('gkt_groups', 'gkt_loops', 'gkt_drop', 'gkt_ema', 'gkt_knowledge', 'subnet_temperature', 'subnet_kd_weight',
            'subnet_bn', 'subnet_bn_images'),
}
METHOD_KEYS['st++'] = METHOD_KEYS['st']


# -------------------------------------------------------------------------------------------- the sources

@dataclass(frozen=True)
class Fact:
    value: object
    source: str


RANDOM_CROP = dict(crop_scale=Fact((0.08, 1.0), "the ImageNet default random-resized crop, scale 0.08-1"),
                   hflip=Fact(0.5, 'horizontal flip with probability 0.5'))


def deit3_pretraining(deit_name, line, timm_name, per_gpu, gpus, lr, drop_path, px):
    cmd = f'deit README_revenge.md:{line} ({deit_name}, {per_gpu} per GPU on {gpus} GPUs)'
    return dict(
        model=Fact(timm_name, f"timm's port of deit models_v2.py {deit_name}"),
        epochs=Fact(800, f'{cmd}: --epochs 800'),
        global_batch=Fact(2048, f'{cmd}: --batch {per_gpu} on {gpus} GPUs'),
        optimizer=Fact('Lamb', f'{cmd}: --opt fusedlamb (apex FusedLAMB; timm Lamb is written to match it)'),
        lr=Fact(lr, f'{cmd}: --lr {lr} with --unscale-lr (main.py:349-351 then skips batch scaling)'),
        opt_eps=Fact(1e-8, 'deit main.py:58: --opt-eps defaults to 1e-8 and reaches the optimizer'),
        betas=Fact((0.9, 0.999), "deit main.py:60 leaves betas to the optimizer's default, 0.9/0.999"),
        weight_decay=Fact(0.05, f'{cmd}: --weight-decay 0.05'),
        decay_norm_and_bias=Fact(False, "timm's create_optimizer (deit main.py:352) exempts 1-D weights, biases "
                                        'and no_weight_decay() (pos_embed, cls_token)'),
        start_lr=Fact(1e-6, f'{cmd}: --warmup-lr 1e-6'),
        warmup_epochs=Fact(5, f'{cmd}: --warmup-epochs 5'),
        final_lr=Fact(1e-5, 'deit main.py:81: --min-lr defaults to 1e-5'),
        lr_per_iteration=Fact(False, 'deit main.py:432 steps the schedule once per epoch'),
        drop_path=Fact(drop_path, f'{cmd}: --drop-path {drop_path}'),
        drop_path_schedule=Fact('constant', 'deit models_v2.py:200: the same rate in every block'),
        layer_scale_init=Fact(1e-4, 'deit models_v2.py:182 init_scale=1e-4, the init of every gamma (:77-78)'),
        train_size=Fact(px, f'{cmd}: --input-size {px}'),
        **RANDOM_CROP,
        train_interpolation=Fact('bicubic', 'deit augment.py:96 (3-Augment crops bicubic)'),
        color_jitter=Fact(0.3, f'{cmd}: --color-jitter 0.3, applied after 3-Augment (augment.py:115-116)'),
        policy=Fact(('auto', ['Desaturate', 'GaussianBlurRand', 'Solarize']),
                    'deit augment.py:111-113 (--ThreeAugment): grayscale, solarize or blur, one per image'),
        random_erasing=Fact(0.0, f'{cmd}: --reprob 0.0'),
        aug_repeats=Fact(3, f'{cmd}: --repeated-aug, RASampler with 3 repeats (samplers.py:16)'),
        mixup=Fact(0.8, f'{cmd}: --mixup .8'),
        cutmix=Fact(1.0, f'{cmd}: --cutmix 1.0'),
        label_smoothing=Fact(0.0, f'{cmd}: --smoothing 0.0'),
        binarised_label_targets=Fact(True, f'{cmd}: --bce-loss, targets.gt(0.0) (engine.py:43-44)'),
        eval_resize=Fact(px, 'deit datasets.py:101: int(input size / --eval-crop-ratio 1.0)'),
        eval_crop=Fact(px, 'deit datasets.py:105: centre crop of the input size'),
        eval_interpolation=Fact('bicubic', 'deit datasets.py:103: Resize(interpolation=3), bicubic'),
        amp=Fact('float16', 'deit engine.py:46: torch.cuda.amp.autocast(), fp16, with a loss scaler (main.py:353)'),
        model_ema=Fact(False, 'deliberate: deit keeps an EMA (main.py:49-52) but evaluates the live model '
                              '(main.py:447)'),
        method=Fact('cosub', 'deit main.py:150 --cosub, the flag this recipe adds to DeiT III'),
        cosub_label_weight=Fact(0.5, 'deit engine.py:52-55: four terms of weight 1/4, labels and peer alike'),
    )


def deit3_fine_tuning(deit_name, line, timm_name, per_gpu, gpus, drop_path):
    cmd = f'deit README_revenge.md:{line} ({deit_name} at 224, {per_gpu} per GPU on {gpus} GPUs)'
    return dict(
        model=Fact(timm_name, f"timm's port of deit models_v2.py {deit_name}"),
        epochs=Fact(20, f'{cmd}: --epochs 20'),
        global_batch=Fact(512, f'{cmd}: --batch {per_gpu} on {gpus} GPUs'),
        optimizer=Fact('AdamW', f'{cmd}: --opt adamw'),
        lr=Fact(1e-5, f'{cmd}: --lr 1e-5 with --unscale-lr'),
        opt_eps=Fact(1e-8, 'deit main.py:58: --opt-eps defaults to 1e-8'),
        betas=Fact((0.9, 0.999), "deit main.py:60 leaves betas to AdamW's default"),
        weight_decay=Fact(0.1, f'{cmd}: --weight-decay 0.1'),
        decay_norm_and_bias=Fact(False, "timm's create_optimizer (deit main.py:352) exempts 1-D weights and biases"),
        start_lr=Fact(1e-6, f'{cmd}: --warmup-lr 1e-6'),
        warmup_epochs=Fact(5, f'{cmd}: --warmup-epochs 5'),
        final_lr=Fact(1e-5, 'deit main.py:81: --min-lr defaults to 1e-5, the same as --lr: no decay after warmup'),
        lr_per_iteration=Fact(False, 'deit main.py:432 steps the schedule once per epoch'),
        drop_path=Fact(drop_path, f'{cmd}: --drop-path {drop_path}'),
        drop_path_schedule=Fact('constant', 'deit models_v2.py:200: the same rate in every block'),
        train_size=Fact(224, f'{cmd}: --input-size 224'),
        **RANDOM_CROP,
        train_interpolation=Fact('bicubic', 'deit main.py:102: --train-interpolation defaults to bicubic'),
        color_jitter=Fact(None, "deit datasets.py build_transform sets --aa, and timm's transform factory then "
                                'leaves out the colour jitter'),
        policy=Fact(dict(ops=2, magnitude=9, magnitude_std=0.5, op_prob=0.5, increasing=True),
                    f'{cmd}: --aa rand-m9-mstd0.5-inc1'),
        random_erasing=Fact(0.0, f'{cmd}: --reprob 0.0'),
        aug_repeats=Fact(0, f'{cmd}: --no-repeated-aug'),
        mixup=Fact(0.8, f'{cmd}: --mixup .8'),
        cutmix=Fact(1.0, f'{cmd}: --cutmix 1.0'),
        label_smoothing=Fact(0.1, f'{cmd}: --smoothing 0.1, in the mixup targets (main.py:257-260)'),
        binarised_label_targets=Fact(False, f'{cmd}: no --bce-loss'),
        criterion=Fact('SoftTargetCrossEntropy', 'deit main.py:359-361: soft-target CE under mixup'),
        eval_resize=Fact(224, 'deit datasets.py:101: int(224 / --eval-crop-ratio 1.0)'),
        eval_crop=Fact(224, 'deit datasets.py:105'),
        eval_interpolation=Fact('bicubic', 'deit datasets.py:103: bicubic'),
        amp=Fact('float16', 'deit engine.py:46: torch.cuda.amp.autocast(), fp16'),
        model_ema=Fact(False, 'deliberate: deit keeps an EMA (main.py:49-52) but evaluates the live model'),
        method=Fact('none', f'{cmd}: no --cosub in any fine-tuning command'),
    )


def st_code_resnet50(n_epochs, command_line, **overrides):
    """ResNet-50 as the official ST code trains it (every value but the method's own)."""
    cmd = f'ST README.md:{command_line}'
    facts = dict(
        model=Fact('resnet50', 'ST models/resnet_randwidth.py: torchvision-style ResNet-50'),
        epochs=Fact(n_epochs, f'{cmd}: --epoch={n_epochs}'),
        global_batch=Fact(512, 'ST train.py:41: --batch_size 512, on 2 GPUs (README.md:8)'),
        optimizer=Fact('SGD', 'ST train.py:295'),
        lr=Fact(0.2, 'ST train.py:43: --lr 0.2'),
        momentum=Fact(0.9, 'ST configs/resnet50_randwidth.yml:18'),
        nesterov=Fact(True, 'ST configs/resnet50_randwidth.yml:20'),
        weight_decay=Fact(1e-4, 'ST train.py:44: --weight_decay 1e-4'),
        decay_norm_and_bias=Fact(True, 'ST train.py:295: one group, model.parameters(), BN and biases included'),
        start_lr=Fact(0.2, 'ST train.py:766: cosine from the base lr, no warmup'),
        warmup_epochs=Fact(0, 'ST train.py:766: no warmup'),
        final_lr=Fact(0.0, 'ST train.py:766: CosineAnnealingLR down to 0'),
        lr_per_iteration=Fact(True, 'ST train.py:766: T_max = epochs x iterations, stepped every batch'),
        drop_path=Fact(0.0, 'ST: no stochastic depth in the model'),
        drop_path_schedule=Fact(None, 'ST: no stochastic depth in the model'),
        last_bn_init=Fact([1.0], 'ST models/resnet_randwidth.py:142: every BN weight starts at 1'),
        train_size=Fact(224, 'ST train.py:65: --train_crop_size defaults to 224'),
        **RANDOM_CROP,
        train_interpolation=Fact('bilinear', "ST train.py:101: torchvision's RandomResizedCrop, bilinear"),
        color_jitter=Fact(0.4, 'ST train.py:67,89: ColorJitter(0.4, 0.4, 0.4)'),
        policy=Fact(None, f'{cmd}: --train_trans default'),
        random_erasing=Fact(0.0, 'ST train.py:99-107: none'),
        aug_repeats=Fact(0, 'ST train.py:187-190: a plain shuffled loader'),
        mixup=Fact(0.0, 'ST train.py:186: --mix default, no mixup'),
        cutmix=Fact(0.0, 'ST train.py:186: --mix default, no cutmix'),
        label_smoothing=Fact(0.0, 'ST train.py:293: plain CrossEntropyLoss'),
        binarised_label_targets=Fact(False, 'ST train.py:293: cross-entropy'),
        criterion=Fact('CrossEntropyLoss', 'ST train.py:293'),
        eval_resize=Fact(256, 'ST train.py:63,265: Resize(--val_resize_size 256)'),
        eval_crop=Fact(224, 'ST train.py:64,266: CenterCrop(224)'),
        eval_interpolation=Fact('bilinear', "ST train.py:265: torchvision's Resize, bilinear"),
        amp=Fact(None, 'ST train.py trains in fp32 (its autocast Model_amp is never used)'),
        model_ema=Fact(False, 'ST train.py: no EMA'),
    )
    facts.update(overrides)
    return facts


ST_KNOBS = dict(
    method=Fact('st', 'ST README.md:17'),
    st_subnets=Fact(1, 'ST train.py:46: --multi_Snet defaults to 1'),
    st_min_keep=Fact(1, "ST train.py:776: the 'default' space keeps at least 1 block per stage"),
    st_loss=Fact('kl', 'ST train.py:602-603: KL on raw logits'),
    st_norm_ce=Fact(False, 'ST train.py:451: the full net trains on raw logits without --norm_kd'),
    st_min_size=Fact(1.0, 'ST train.py:475: no --Snet_Dtrans, subnets see the full batch'),
    st_min_side=Fact(None, 'not in the ST code: our floor, by default twice the output stride (64 px on ResNet-50), '
                           'below the official smallest side (86 px), so the official sides are drawn '
                           '(tests/test_methods.py pins them)'),
    st_side_step=Fact(None, 'not in the ST code: ours, resolved as the task is built: 1 (every side of the '
                            'official draw) without --torchcompile, the output stride with it (tests/test_methods.py)'),
    subnet_temperature=Fact(1.0, 'ST train.py:51: --Temp 1'),
    st_amplitude=Fact(1.0, 'ST train.py:50: --amplitude 1'),
    subnet_kd_weight=Fact(1.0, 'ST train.py:33: --kl_coef 1'),
    subnet_bn=Fact('recal', 'ST train.py:331-332: BN statistics re-estimated before every evaluation'),
    subnet_bn_images=Fact(2048, 'ST train.py:395: batches until >= 2000 images, 4 x 512'),
)


STPP = dict(
    ST_KNOBS,
    method=Fact('st++', 'ST README.md:37, the 80.5 % command'),
    st_subnets=Fact(6, 'ST README.md:37: --multi_Snet=6'),
    st_min_keep=Fact(3, "ST README.md:37 --sample_space='space3', train.py:781: at least 3 blocks per stage"),
    st_loss=Fact('kl-', 'ST README.md:37 --norm_kd: KL on standardised logits (train.py:453, :593)'),
    st_norm_ce=Fact(True, 'ST train.py:451-460: with --norm_kd the full net CE takes the standardised logits'),
    st_min_size=Fact(0.43, 'ST README.md:37 --Dtrans Dtrans7: sides in [int(0.43 crop), crop] (train.py:66, :519)'),
    train_size=Fact(200, 'ST README.md:37: --train_crop_size=200'),
    eval_resize=Fact(240, 'ST README.md:37: --val_resize_size=240'),
)

GKT_KNOBS = dict(
    method=Fact('gkt', 'GKT (AAAI 2024): no released code; our reconstruction'),
    gkt_groups=Fact(3, "GKT paper, Figure 3's caption: three groups"),
    gkt_loops=Fact(2, 'GKT paper, Figure 3: two sampling loops'),
    gkt_drop=Fact(0.2, 'no source: our choice for the "inheriting exponential decay" rule'),
    gkt_ema=Fact(0.5, "ST train.py:55: the same group's --direct_KD_ema default"),
    gkt_knowledge=Fact('step', "our reading of Figure 3's caption ('different steps': the loops of one step)"),
    subnet_temperature=Fact(1.0, 'ST train.py:51: the same group\'s --Temp default'),
    subnet_kd_weight=Fact(1.0, "ST train.py:33: the same group's --kl_coef default"),
    subnet_bn=Fact('recal', 'ST train.py:331-332, as the ST recipe it borrows'),
    subnet_bn_images=Fact(2048, 'ST train.py:395'),
)


STUDY = "this project: the accuracy study's shared recipe (benchmarks/accuracy.py)"


def quickstart(method, opt, lr, wd, smoothing, **extra):
    ours = 'this project: CPU quickstart on the shipped images (README, quickstarts)'
    return dict(
        epochs=Fact(5, ours), global_batch=Fact(64, ours), optimizer=Fact(opt, ours), lr=Fact(lr, ours),
        weight_decay=Fact(wd, ours), start_lr=Fact(lr, ours), warmup_epochs=Fact(0, ours), train_size=Fact(32, ours),
        crop_scale=Fact((0.35, 1.0), ours), color_jitter=Fact(0.4, "timm's default, kept"),
        label_smoothing=Fact(smoothing, ours), amp=Fact(None, ours), method=Fact(method, ours),
        eval_resize=Fact(33, "timm's resnet crop_pct 0.95 at 32 px"), eval_crop=Fact(32, ours), **extra)


SOURCES = {
    'cosub_deit3_vit_small.yaml': deit3_pretraining('deit_small_patch16_LS', 81, 'deit3_small_patch16_224',
                                                    256, 8, 4e-3, 0.05, 224),
    'cosub_deit3_vit_base.yaml': deit3_pretraining('deit_base_patch16_LS', 412, 'deit3_base_patch16_224',
                                                   256, 8, 3e-3, 0.2, 192),
    'cosub_deit3_vit_large.yaml': deit3_pretraining('deit_large_patch16_LS', 745, 'deit3_large_patch16_224',
                                                    64, 32, 3e-3, 0.45, 192),
    'cosub_deit3_vit_huge.yaml': deit3_pretraining('deit_huge_patch14_LS', 1078, 'deit3_huge_patch14_224',
                                                   64, 32, 3e-3, 0.6, 160),
    'cosub_deit3_vit_base_ft224.yaml': deit3_fine_tuning('deit_base_patch16_LS', 1411, 'deit3_base_patch16_224',
                                                         64, 8, 0.2),
    'cosub_deit3_vit_large_ft224.yaml': deit3_fine_tuning('deit_large_patch16_LS', 1432, 'deit3_large_patch16_224',
                                                          64, 8, 0.45),
    'cosub_deit3_vit_huge_ft224.yaml': deit3_fine_tuning('deit_huge_patch14_LS', 1453, 'deit3_huge_patch14_224',
                                                         32, 16, 0.55),
    'st_resnet50_200ep.yaml': st_code_resnet50(200, 17, **ST_KNOBS),
    'st_resnet50_400ep.yaml': st_code_resnet50(400, 17, **ST_KNOBS, epochs=Fact(
        400, 'deliberate: not a published run, the ST command of README.md:17 run for 400 epochs')),
    'stpp_resnet50_200ep.yaml': st_code_resnet50(200, 37, **STPP),
    'stpp_resnet50_400ep.yaml': st_code_resnet50(
        400, 42, **dict(STPP, method=Fact('st++', 'ST README.md:42, the 81.0 % command')),
        policy=Fact(dict(ops=2, magnitude=10, magnitude_std=math.inf, op_prob=0.5, increasing=True),
                    "deliberate: timm's nearest to UniAugment (ST README.md:42 --train_trans='with_UA', "
                    'aug_lib.py:657-663: 2 ops, each with probability 0.5, level uniform in 0..30)'),
        color_jitter=Fact(0.4, "ST train.py:160-169: 'with_UA' keeps ColorJitter(0.4) before UniAugment")),
    'gkt_resnet50.yaml': st_code_resnet50(200, 17, **GKT_KNOBS),
    'quickstart.yaml': quickstart('none', 'SGD', 0.1, 5e-4, 0.1),
    'st_quickstart.yaml': quickstart('st', 'SGD', 0.1, 5e-4, 0.0, st_subnets=Fact(1, 'ST train.py:46'),
                                     st_min_keep=Fact(1, 'ST train.py:776')),
    'stpp_quickstart.yaml': quickstart('st++', 'SGD', 0.1, 5e-4, 0.0,
                                       st_subnets=Fact(2, 'this project: 2 of the paper\'s 6, for the CPU'),
                                       st_min_keep=Fact(3, 'ST train.py:781, space3')),
    'gkt_quickstart.yaml': quickstart('gkt', 'SGD', 0.1, 5e-4, 0.0, gkt_groups=Fact(3, 'GKT paper, Figure 3'),
                                      gkt_loops=Fact(1, 'this project: 1 loop of the default 2, for the CPU')),
    'cosub_quickstart.yaml': quickstart('cosub', 'AdamW', 3e-3, 0.05, 0.0, drop_path=Fact(0.2, 'this project'),
                                        drop_path_schedule=Fact('constant', 'deit models_v2.py:200'),
                                        mixup=Fact(0.2, 'this project')),
    'multilabel_quickstart.yaml': dict(
        quickstart('none', 'AdamW', 3e-3, 0.05, 0.0), epochs=Fact(4, 'this project: the multi-label quickstart'),
        crop_scale=Fact((0.7, 1.0), 'this project: crops that keep both items of a pair'),
        eval_resize=Fact((33, 67), "timm's resnet crop_pct 0.95 at 32x64 px"),
        criterion=Fact('BinaryCrossEntropy', "timm 1.0.31's multi-label default loss")),
    # every arm of the accuracy study trains with this recipe and adds its own --method
    'study_fashion_mnist.yaml': dict(
        quickstart('none', 'AdamW', 3e-3, 0.05, 0.0),
        epochs=Fact(25, STUDY), mixup=Fact(0.2, STUDY + ': cosub needs mixed targets, so every arm gets them')),
    'study_vit_fashion_mnist.yaml': dict(
        quickstart('none', 'AdamW', 3e-3, 0.05, 0.0),
        model=Fact('deit3_small_patch16_224', STUDY + ' --study vit: a DeiT III model (layer scale), scaled down'),
        layer_scale_init=Fact(0.1, "CaiT's rule for depth <= 18 (Touvron et al. 2021, sec. 2), chosen by the study's "
                                   'pilot (docs/results-vit.md) over DeiT III\'s 1e-4'),
        lr=Fact(3e-3, STUDY + " --study vit: its pilot (docs/results-vit.md)"),
        global_batch=Fact(32, STUDY + ' --study vit: 100 images in batches of 32 (docs/results-vit.md)'),
        epochs=Fact(1000, STUDY + ' --study vit: the pilot in which plain training over-fits (docs/results-vit.md)'),
        start_lr=Fact(1e-5, "timm's default --warmup-lr"),
        warmup_epochs=Fact(5, STUDY + ' --study vit'), mixup=Fact(0.8, 'DeiT III README_revenge.md: --mixup .8'),
        cutmix=Fact(1.0, 'DeiT III README_revenge.md: --cutmix 1.0'),
        eval_resize=Fact(35, "timm's deit3 default crop_pct (0.9) at 32 px")),
}


# ------------------------------------------------------------------------------------------------------ tests

def test_every_recipe_has_a_source_table():
    assert sorted(SOURCES) == sorted(p.name for p in HPARAMS.glob('*.yaml'))


@pytest.mark.parametrize('recipe', sorted(SOURCES))
def test_recipe_builds_what_its_source_says(recipe, built):
    measured = measure(built(recipe))
    wrong = []
    for key, fact in SOURCES[recipe].items():
        value = measured[key]
        same = (value == pytest.approx(fact.value) if isinstance(fact.value, float) and value is not None
                else value == fact.value)
        if not same:
            wrong.append(f'{key}: built {value!r}, source {fact.value!r} ({fact.source})')
    assert not wrong, f'{recipe} differs from its source:\n' + '\n'.join(wrong)


def test_recipe_header_batch_is_the_yaml_batch():
    for path in HPARAMS.glob('*.yaml'):
        found = re.search(r'(\d+) images per GPU x (\d+) GPUs', path.read_text())
        if found:
            args, _ = parse_train_args(['-c', str(path)])
            assert int(found.group(1)) == args.batch_size, path.name


@pytest.mark.parametrize('recipe', sorted(SOURCES))
def test_recipe_declares_the_global_batch_its_lr_is_for(recipe):
    # train.py warns when a run's global batch differs from this one while the recipe's absolute lr is kept
    args, _ = parse_train_args(['-c', str(HPARAMS / recipe)])
    assert args.recipe_global_batch == SOURCES[recipe]['global_batch'].value


def test_layer_scale_weights_start_at_deit3s_value(built):
    # ViT-S is built for real: the init value reaches the weights, not only the module's attribute
    model = built('cosub_deit3_vit_small.yaml').model
    gammas = [p for n, p in model.named_parameters() if n.endswith(('ls1.gamma', 'ls2.gamma'))]
    assert len(gammas) == 2 * 12 and all(torch.all(g == 1e-4) for g in gammas)


@pytest.mark.parametrize('recipe', ['cosub_deit3_vit_base.yaml', 'cosub_deit3_vit_huge.yaml'])
def test_low_resolution_pretraining_builds_its_model_at_that_resolution(recipe, built):
    b = built(recipe)
    side = SOURCES[recipe]['train_size'].value
    assert tuple(b.model.patch_embed.img_size) == (side, side)
    assert resolve_data_config(vars(b.args), model=b.model)['input_size'] == (3, side, side)


def test_fine_tuning_starts_from_the_lower_resolution_checkpoint(tmp_path):
    # the fine-tuning recipes load the 192 / 160 px run's weights at 224, as DeiT's --finetune does (main.py:274-308,
    # bicubic resampling of the position embedding); shown on ViT-S so the test stays small
    torch.manual_seed(0)
    pretrained = timm.create_model('deit3_small_patch16_224', img_size=192)
    path = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': pretrained.state_dict(), 'arch': 'deit3_small_patch16_224'}, path)
    args, _ = parse_train_args(['-c', str(HPARAMS / 'cosub_deit3_vit_base_ft224.yaml'),
                                '--model', 'deit3_small_patch16_224', '--initial-checkpoint', str(path)])
    args.rank = 0
    model = train.build_model(args)
    assert tuple(model.patch_embed.img_size) == (224, 224)
    # deit3 adds no position to the class token: the whole embedding is the 12x12 grid, resampled to 14x14
    grid = pretrained.pos_embed.detach().reshape(1, 12, 12, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 14), mode='bicubic', align_corners=False)
    torch.testing.assert_close(model.pos_embed.detach(), expected.permute(0, 2, 3, 1).reshape(1, 196, -1))
    torch.testing.assert_close(model.blocks[5].mlp.fc1.weight, pretrained.blocks[5].mlp.fc1.weight)
    torch.testing.assert_close(model.head.weight, pretrained.head.weight)
