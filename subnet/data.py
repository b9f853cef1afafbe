"""Datasets, loaders and mixup exactly as timm's train.py builds them, plus the checks timm leaves out.

Everything is timm's own (``create_dataset``, ``create_loader``, ``create_naflex_loader``, ``Mixup``,
``FastCollateMixup``, ``AugMixDataset``). What we add is up-front validation (a missing or empty data
folder, train and val resolving to the same folder, an odd batch with mixup) and, for image folders, a dataset
wrapper that replaces an unreadable image, names it once and counts it (``subnet/unreadable.py``).
"""
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils.data
from timm import utils
from timm.data import (AugMixDataset, FastCollateMixup, Mixup, MultiLabelTarget, create_dataset, create_loader,
                       get_img_extensions)
from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
from timm.data.scheduled_sampler import ScheduledTransformDataset
from torchvision import transforms

from .criterion import is_multilabel, mixup_active
from .errors import InputError
from .evaluation import NaFlexEval, eval_loader
from .sample_seeds import SeededCollateMixup, SeededSamples, key_samples
from .unreadable import ImageFailures, readable

_logger = logging.getLogger('train')

# timm's split-folder synonyms (timm.data.dataset_factory): the folder reader tries the exact split name
# first, then these, then silently falls back to the root itself
_SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))
# --val-split values that turn evaluation off ('' is timm's; 'none' says it in words)
NO_SPLIT = ('', 'none')


def split_folder(root: str, split: str) -> Optional[str]:
    """The sub-folder of ``root`` timm's folder reader reads for ``split``; None when there is none (timm then reads
    the whole root)."""
    name = split.split('[')[0]
    if os.path.isdir(os.path.join(root, name)):
        return os.path.join(root, name)
    for synonyms in _SPLIT_SYNONYMS:
        if name in synonyms:
            for s in synonyms:
                if os.path.isdir(os.path.join(root, s)):
                    return os.path.join(root, s)
    return None


def _holds_splits(root: str) -> bool:
    """Whether ``root`` has a sub-folder named as a split (it is a dataset root, not a split folder itself)."""
    return any(os.path.isdir(os.path.join(root, name)) for synonyms in _SPLIT_SYNONYMS for name in synonyms)


def _missing_split(role: str, split: str, data_dir: str) -> InputError:
    names = next((synonyms for synonyms in _SPLIT_SYNONYMS if split in synonyms), (split,))
    option = '--train-split' if role == 'train' else '--val-split' if role == 'validation' else '--split'
    if not split:
        return InputError(f'{option} is empty: name the {role} split folder of {data_dir} (timm would read the '
                          f'whole of {data_dir})')
    off = ' or --val-split none to train without evaluation,' if role == 'validation' else ''
    return InputError(f'{role} split {split!r} not found: {data_dir} has no {"/, ".join(names)}/ folder (timm would '
                      f'read the whole of {data_dir} instead); name the folder with {option},{off} or add it')


def check_image_folders(data_dir: Optional[str], splits: dict, class_map: str = '',
                        root_may_be_split: bool = False) -> None:
    """Fail early and clearly on what timm reports late (or not at all) for folder datasets.

    ``splits`` maps a role ('train', 'validation') to a split name; a validation split '' or 'none' is off. A
    split without its folder is an error; with ``root_may_be_split`` (validate.py, given a split folder itself as
    timm's docs do) a root without any split-named sub-folder is read as the split.
    """
    if not data_dir:
        raise InputError('no dataset given: pass --data-dir DIR (a folder with train/ and val/ sub-folders)')
    if not os.path.exists(data_dir):
        raise InputError(f'data dir {data_dir} does not exist')
    if os.path.isfile(data_dir) and data_dir.endswith('.tar'):
        return
    if not os.path.isdir(data_dir):
        raise InputError(f'data dir {data_dir} is not a folder')
    folders = {}
    for role, split in splits.items():
        if role == 'validation' and split.lower() in NO_SPLIT:
            continue
        folder = split_folder(data_dir, split) if split else None
        if folder is None:
            if not root_may_be_split or _holds_splits(data_dir):
                raise _missing_split(role, split, data_dir)
            folder = data_dir
        if not any(files for _, _, files in os.walk(folder, followlinks=True)):
            raise InputError(f'{role} split {split!r} resolves to {folder}, which holds no files')
        if not class_map:
            check_class_folders(role, split, folder)
        folders[role] = os.path.realpath(folder)
    if len(folders) == 2 and len(set(folders.values())) == 1:
        _logger.warning(
            f'Train and validation splits both resolve to {next(iter(folders.values()))}: '
            f'validation accuracy will be measured on training images.')


def check_class_folders(role: str, split: str, folder: str) -> None:
    """Images directly in a split folder: timm's folder reader makes them one class of their own (the whole
    dataset, when there are no class folders), and the run trains without an error."""
    extensions = get_img_extensions(as_set=True)
    with os.scandir(folder) as entries:
        loose = sum(1 for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions)
    if loose:
        raise InputError(f'{role} split {split!r} resolves to {folder}, which holds {loose} images directly: timm '
                         f'reads one class per sub-folder, so put them in {os.path.join(folder, "<class>")}/')


class DatasetView(torch.utils.data.Dataset):
    """A dataset seen through a wrapper; ``transform`` is forwarded, as timm's ``create_loader`` sets it there."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


class FixedSample(DatasetView):
    """``count`` items of ``dataset`` in a seeded random order (an image folder is sorted by class, so its first
    images are one class, which would give BN recalibration one class's statistics)."""

    def __init__(self, dataset, count: int, seed: int):
        super().__init__(dataset)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        self.indices = order[:count].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


# the readers of timm 1.0.31 that give label lists, multi-hot vectors or one binary field per class
MULTILABEL_READERS = ('hfds', 'hfids', 'wds', 'tfds')


def reader_of(dataset: Optional[str]) -> str:
    """The reader prefix of ``--dataset`` that timm's ``create_dataset`` acts on; '' for an image folder or tar,
    which is what timm reads for a name without one (``--dataset foo`` reads --data-dir as a folder)."""
    prefix, sep, _ = (dataset or '').partition('/')
    prefix = prefix.lower() if sep else ''
    return prefix if prefix in ('torch',) + MULTILABEL_READERS else ''


def check_dataset_root(dataset: Optional[str], root: Optional[str], splits: dict, class_map: str = '',
                       root_may_be_split: bool = False) -> None:
    """The folder a dataset is read from: an image folder's splits (``check_image_folders``), and a torch/
    dataset's root, without which torchvision fails with a TypeError."""
    reader = reader_of(dataset)
    if not reader:
        check_image_folders(root, splits, class_map, root_may_be_split)
    elif reader == 'torch' and not root:
        raise InputError(f'--dataset {dataset} needs --data-dir DIR: the folder it is read from (or downloaded '
                         f'into, with --dataset-download)')


def check_multilabel_reader(args) -> None:
    """``--task multilabel`` needs a dataset whose reader gives several labels per image: an image folder (or a
    torchvision dataset) gives one class, which would fail deep in the first batch."""
    kind = reader_of(args.dataset)
    if is_multilabel(args) and kind not in MULTILABEL_READERS:
        raise InputError(f"--task multilabel needs a dataset whose targets are label lists, read by timm's "
                         f'{"/, ".join(MULTILABEL_READERS)}/ readers (--dataset hfds/NAME --target-key FIELD); '
                         f'{f"a {kind}/ dataset" if kind else "an image folder"} holds one class per image')


def target_options(args) -> dict:
    """``create_dataset``'s target arguments for the task: multi-label targets (class-index lists, multi-hot
    vectors with ``--target-format multihot``, or one binary field per class from ``--target-key a,b,c``, as the
    readers give them) become float multi-hot vectors of ``args.num_classes`` (timm's ``MultiLabelTarget``)."""
    if not is_multilabel(args):
        return dict(target_format=args.target_format)
    return dict(target_format=args.target_format,
                target_transform=MultiLabelTarget(args.num_classes, dense=args.target_format == 'multihot'))


def build_dataset(args, split: str, is_training: bool, input_img_mode: str, num_samples=None):
    """``timm.data.create_dataset`` with train.py's arguments; folder datasets fail clearly."""
    try:
        dataset = create_dataset(
            args.dataset,
            root=args.data_dir,
            split=split,
            is_training=is_training,
            class_map=args.class_map,
            download=args.dataset_download,
            batch_size=args.batch_size,
            seed=args.seed,
            repeats=args.epoch_repeats if is_training else 0,
            input_img_mode=input_img_mode,
            input_key=args.input_key,
            target_key=args.target_key,
            num_samples=num_samples,
            trust_remote_code=args.dataset_trust_remote_code,
            **target_options(args),
        )
    except RuntimeError as e:
        if 'Found 0 images' in str(e):
            raise InputError(str(e).split('. Supported')[0]) from None
        raise
    check_first_target(dataset, args.dataset, split, args.target_key)
    return readable(dataset, training=is_training)


def check_first_target(dataset, name: str, split: str, target_key: Optional[str]) -> None:
    """A --target-key the data lacks, or targets that are not what --target-format says, fail in timm's reader or
    ``MultiLabelTarget`` in the first batch, as a traceback: the first target, read now without its image (readers
    with ``iter_targets``: hfds/), fails here in one line instead."""
    targets = getattr(getattr(dataset, 'reader', None), 'iter_targets', None)
    if targets is None:
        return
    target = None
    try:
        target = next(iter(targets()), None)
        if target is not None and dataset.target_transform is not None:
            dataset.target_transform(target)
    except KeyError as e:
        raise InputError(f'--target-key {target_key}: the {split} split of {name} has no field {e}') from None
    except ValueError as e:
        raise InputError(f'the first target of the {split} split of {name} ({target!r}, --target-key '
                         f'{target_key}) does not fit: {e} (--target-format multihot is for 0/1 vectors of '
                         f'--num-classes entries; lists of class indices need none)') from None


def mixup_kwargs(args) -> Optional[dict]:
    """timm's Mixup/CutMix arguments, or None when neither is on."""
    if not mixup_active(args):
        return None
    return dict(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=args.num_classes,
        multi_label=is_multilabel(args),  # mixes multi-hot targets, smoothing each label towards 0.5
    )


def keep_color_jitter(dataset, color_jitter: float, color_jitter_prob: Optional[float] = None) -> None:
    """Put back the colour jitter timm's transform factory leaves out when an auto-augment policy is set.

    timm's ``transforms_imagenet_train`` keeps it only when called with ``force_color_jitter``, which
    ``create_loader`` and ``create_transform`` do not pass on. The jitter goes where timm puts it then: right
    after the policy, with timm's arguments (one strength for brightness, contrast and saturation).
    """
    composes = dataset.transforms if isinstance(dataset, ScheduledTransformDataset) else (dataset.transform,)
    jitter = transforms.ColorJitter(*((float(color_jitter),) * 3))
    if color_jitter_prob is not None:
        jitter = transforms.RandomApply([jitter], p=color_jitter_prob)
    for compose in composes:
        ops = compose.transforms
        policy = next(i for i, op in enumerate(ops) if isinstance(op, (AutoAugment, RandAugment, AugMixAugment)))
        ops.insert(policy + 1, jitter)


@dataclass
class Loaders:
    train: Any
    eval: Optional[Any]
    mixup_fn: Optional[Callable]  # applied in the loop when the prefetcher (and its collate mixup) is off
    naflex: bool = False
    scheduled_batches: bool = False
    batch_size_reference: float = 0.
    failures: Optional[ImageFailures] = None  # the training set's unreadable images (image folders)


def _common_loader_kwargs(args, data_config: dict, device: torch.device, model_dtype) -> dict:
    return dict(mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem,
                img_dtype=model_dtype or torch.float32, device=device, distributed=args.distributed,
                use_prefetcher=args.prefetcher)


def _augmentation_kwargs(args, data_config: dict, num_aug_splits: int) -> dict:
    """timm's training transform and loader options, as its train.py passes them."""
    interpolation = (data_config['interpolation'] if args.no_aug or not args.train_interpolation
                     else args.train_interpolation)
    return dict(batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
                re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
                train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
                vflip=args.vflip, color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
                grayscale_prob=args.grayscale_prob, gaussian_blur_prob=args.gaussian_blur_prob,
                auto_augment=args.aa, num_aug_repeats=args.aug_repeats, num_aug_splits=num_aug_splits,
                interpolation=interpolation, num_workers=args.workers, worker_seeding=args.worker_seeding)


def _naflex_train_loader(args, dataset, patch_size, common: dict, train_kwargs: dict):
    from timm.data import NaFlexMixup, create_naflex_loader
    mixup = mixup_kwargs(args)
    naflex_mixup = None
    if mixup is not None:
        naflex_mixup = NaFlexMixup(**{k: v for k, v in mixup.items() if k not in ('mode', 'cutmix_minmax')})
    patch = dict(patch_size=patch_size or (16, 16))
    if args.naflex_patch_sizes:
        patch = dict(patch_size_choices=args.naflex_patch_sizes)
        if args.naflex_patch_size_probs:
            patch['patch_size_choice_probs'] = args.naflex_patch_size_probs
    return create_naflex_loader(
        dataset=dataset, train_seq_lens=args.naflex_train_seq_lens, mixup_fn=naflex_mixup, rank=args.rank,
        world_size=args.world_size, patchify_channels_last=not args.naflex_patchify_channels_first,
        **patch, **common, **train_kwargs)


def seeds_samples(args, dataset) -> bool:
    """Whether the training loader draws each sample's augmentation from its own seeded stream
    (``subnet/sample_seeds.py``): timm's standard loader on a map-style dataset. Scheduled sizes and the
    multi-epochs loader bring their own batch samplers, and a streaming dataset has no sampler to key."""
    return (args.train_img_sizes is None and not args.use_multi_epochs_loader
            and not isinstance(dataset, torch.utils.data.IterableDataset))


def _train_loader(args, dataset, data_config: dict, num_aug_splits: int, common: dict, train_kwargs: dict):
    """timm's loader (standard or scheduled sizes) and, without the prefetcher, the Mixup the loop applies."""
    mixup, collate_fn, mixup_fn = mixup_kwargs(args), None, None
    seeded = seeds_samples(args, dataset)
    if mixup is not None:
        if args.prefetcher:
            if num_aug_splits:
                raise InputError('mixup with the prefetcher cannot be combined with --aug-splits; '
                                 'add --no-prefetcher')
            collate_fn = (SeededCollateMixup(**mixup, seed=args.seed, rank=args.rank) if seeded
                          else FastCollateMixup(**mixup))
        else:
            mixup_fn = Mixup(**mixup)
    if num_aug_splits > 1:
        dataset = AugMixDataset(dataset, num_splits=num_aug_splits)
    if seeded:
        dataset = SeededSamples(dataset, args.seed, args.rank)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], input_size_choices=args.train_img_sizes,
        batch_size_choices=args.train_batch_sizes, batch_choice_weights=args.train_size_probs,
        batch_choice_seed=args.seed, batch_choice_schedule=args.train_size_schedule,
        batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
        batch_schedule_spread=args.train_size_schedule_spread, batch_schedule_random_mix=args.train_size_random_mix,
        num_batches=args.train_batches_per_epoch, collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader,
        # workers restart every epoch (timm keeps them alive): --mixup-off-epoch reaches the collate mixup in
        # the workers, and a loader without per-sample seeding starts its workers from the re-seeded main RNG
        persistent_workers=False, **common, **train_kwargs)
    if seeded:
        key_samples(getattr(loader, 'loader', loader))  # timm's PrefetchLoader holds the DataLoader in .loader
    if args.force_color_jitter and args.aa and '3a' not in args.aa and args.color_jitter and not args.no_aug:
        if num_aug_splits:
            raise InputError('--force-color-jitter does not support --aug-splits')
        keep_color_jitter(loader.dataset, args.color_jitter, args.color_jitter_prob)
    return loader, mixup_fn


def _eval_loader(args, dataset, data_config: dict, patch_size, device: torch.device, model_dtype):
    workers = args.workers
    if args.distributed and ('tfds' in args.dataset or 'wds' in args.dataset):
        workers = min(2, args.workers)  # timm: limits padding issues of iterable datasets
    naflex = NaFlexEval(patch_size, args.naflex_max_seq_len, not args.naflex_patchify_channels_first) \
        if args.naflex_loader else None
    return eval_loader(dataset, data_config, batch_size=args.validation_batch_size or args.batch_size, device=device,
                       model_dtype=model_dtype, num_workers=workers, use_prefetcher=args.prefetcher,
                       pin_memory=args.pin_mem, distributed=args.distributed, naflex=naflex)


def build_loaders(args, data_config: dict, device: torch.device, model_dtype, num_aug_splits: int,
                  patch_size=None) -> Loaders:
    """Train and eval loaders as timm's train.py builds them (standard, scheduled-resolution or NaFlex).

    The data folders and the batch size have been checked by train.py's preflight.
    """
    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset_train = build_dataset(args, args.train_split, True, input_img_mode, args.train_num_samples)
    common = _common_loader_kwargs(args, data_config, device, model_dtype)
    train_kwargs = _augmentation_kwargs(args, data_config, num_aug_splits)
    loaders = Loaders(train=None, eval=None, mixup_fn=None, batch_size_reference=float(args.batch_size),
                      failures=getattr(dataset_train, 'failures', None))
    if args.naflex_loader:
        loaders.train = _naflex_train_loader(args, dataset_train, patch_size, common, train_kwargs)
        loaders.naflex = True
    else:
        loaders.train, loaders.mixup_fn = _train_loader(args, dataset_train, data_config, num_aug_splits, common,
                                                        train_kwargs)
        if args.train_img_sizes is not None:
            loaders.scheduled_batches = True
            loaders.batch_size_reference = loaders.train.batch_sampler.average_batch_size
    if len(loaders.train) == 0:
        raise InputError(f'the training split has fewer images than one batch (--batch-size {args.batch_size})')
    if args.val_split.lower() not in NO_SPLIT:
        dataset_eval = build_dataset(args, args.val_split, False, input_img_mode, args.val_num_samples)
        loaders.eval = _eval_loader(args, dataset_eval, data_config, patch_size, device, model_dtype)
    return loaders


def set_loader_epoch(loader, epoch: int) -> None:
    """Tell epoch-aware datasets and samplers the epoch (distributed shuffling, scheduled sizes)."""
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)
    sampler = getattr(loader, 'batch_sampler', None)
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    elif hasattr(getattr(loader, 'sampler', None), 'set_epoch'):
        loader.sampler.set_epoch(epoch)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Re-seed every RNG at each epoch start, so resuming at an epoch boundary replays the same run."""
    utils.random_seed(seed + 100_003 * epoch, rank)


def loader_images(loader, device: torch.device, dtype: Optional[torch.dtype] = None,
                  channels_last: bool = False) -> Iterator[torch.Tensor]:
    """The images of a loader's batches on the model's device (prefetched batches are there already)."""
    for images, _ in loader:
        images = images.to(device=device, dtype=dtype)
        yield images.contiguous(memory_format=torch.channels_last) if channels_last else images
