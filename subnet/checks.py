"""Checks of train.py's options that timm leaves to an assertion, a traceback deep inside, or a silently wrong run.

Each check raises one ``UsageError`` that names the option and says what to change. They run in train.py's
preflight, before anything is built or written, except ``check_dataset_classes``, which needs the dataset's class
list (read by timm's dataset factory) and runs as soon as the loaders exist, still before the run folder is made.
"""
import os
from typing import Iterator, Optional

from timm import utils

from .errors import UsageError

__all__ = ['check_distributed_options', 'check_output_folder', 'check_dataset_classes',
           'dataset_classes', 'class_to_idx', 'check_eval_classes', 'check_model_covers_classes']


def check_distributed_options(args) -> None:
    """Options that only make sense with (or without) several processes, as timm's train.py asserts them.

    Whether the run is distributed is read from the environment torchrun / SLURM set, as timm's
    ``init_distributed_device`` will read it.
    """
    distributed = utils.is_distributed_env()
    if args.aug_repeats and not distributed:
        raise UsageError(f'--aug-repeats {args.aug_repeats:g} needs distributed training (torchrun with 2 or more '
                         f"processes): timm's repeated-augmentation sampler spreads the repeats over the processes")
    if args.sync_bn and args.torchscript:
        raise UsageError('--sync-bn cannot be combined with --torchscript (a scripted model keeps its BatchNorm)')
    if args.sync_bn and args.split_bn and distributed:
        raise UsageError('--sync-bn cannot be combined with --split-bn: choose one BatchNorm conversion')
    if args.log_wandb and args.wandb_resume_id and not args.resume:
        raise UsageError('--wandb-resume-id continues a wandb run: add --resume with the checkpoint of that run')


def check_output_folder(args) -> None:
    """The run folder (or, without --experiment, the output root) can be created: its nearest existing ancestor
    is a writable folder. Nothing is created here."""
    root = args.output or './output/train'
    target = os.path.join(root, args.experiment) if args.experiment else root
    existing = os.path.abspath(target)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f'--output {root}: cannot create {target}: {existing} is a file')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'--output {root}: cannot create {target}: {existing} is not writable')


def class_to_idx(dataset) -> Optional[dict]:
    """{class name: label} of a dataset read by a timm reader that names its classes (image folders and tars);
    None otherwise. Loaders and wrappers (``.dataset``) are looked through."""
    for layer in _wrapped(dataset):
        mapping = getattr(getattr(layer, 'reader', None), 'class_to_idx', None)
        if mapping:
            return dict(mapping)
    return None


def _wrapped(dataset) -> Iterator:
    """``dataset`` and what it wraps (loaders and dataset wrappers keep theirs in ``.dataset``), outermost first."""
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        yield dataset
        dataset = getattr(dataset, 'dataset', None)


def _names(names) -> str:
    names = sorted(names)
    return ', '.join(repr(n) for n in names[:5]) + (f' and {len(names) - 5} more' if len(names) > 5 else '')


def check_eval_classes(args, train_dataset, eval_dataset) -> None:
    """The validation split labels its images as the training split does: the same class names under the same
    labels. timm numbers each folder split's classes on its own, so a validation split with other names (or only
    some of them) is evaluated with shifted labels; ``--class-map`` gives both splits one numbering."""
    train, evaluated = class_to_idx(train_dataset), class_to_idx(eval_dataset)
    if train is None or evaluated is None or train == evaluated:
        return
    unknown, absent = set(evaluated) - set(train), set(train) - set(evaluated)
    where = f'the validation split ({args.val_split}) of {args.data_dir}'
    if unknown:
        raise UsageError(f'{where} has classes the training split lacks: {_names(unknown)}; the class folders of '
                         f'the two splits must have the same names')
    if absent:
        raise UsageError(f'{where} lacks {len(absent)} of the training classes ({_names(absent)}), so timm would '
                         f'number its classes differently: give both splits one numbering with --class-map FILE '
                         f'(the training class names, one a line)')
    moved = sorted(name for name in train if train[name] != evaluated[name])
    raise UsageError(f'{where} numbers its classes differently from the training split (e.g. {_names(moved)}); '
                     f'give both one numbering with --class-map FILE')


def dataset_classes(dataset) -> Optional[int]:
    """How many classes a training dataset holds, when its reader knows (image folders and tars, torchvision
    datasets); None otherwise. Loaders and wrappers (``.dataset``) are looked through."""
    for layer in _wrapped(dataset):
        class_to_idx = getattr(getattr(layer, 'reader', None), 'class_to_idx', None)
        if class_to_idx:
            return len(class_to_idx)
        classes = getattr(layer, 'classes', None)
        if isinstance(classes, (list, tuple)) and classes:
            return len(classes)
    return None


def check_dataset_classes(args, dataset) -> None:
    """The model has a logit for every class of the training data (a dataset or its loader), and there are at
    least two classes."""
    classes = dataset_classes(dataset)
    if classes is None:
        return
    if classes < 2 and not args.class_map:
        raise UsageError(f'the training split of {args.data_dir} holds a single class: timm reads one class per '
                         f'sub-folder (train/<class>/image.jpg); put the images in one folder per class')
    if args.num_classes is not None and args.num_classes < classes:
        raise UsageError(f'the model has {args.num_classes} classes (--num-classes) but the training data '
                         f'({args.dataset or args.data_dir}) has {classes}: use --num-classes {classes}')


def check_model_covers_classes(num_classes: Optional[int], dataset, where: str) -> None:
    """An evaluation split with more classes than the model has logits: its labels past the last logit would
    fail deep inside the accuracy (or count as always wrong)."""
    classes = dataset_classes(dataset)
    if classes is not None and num_classes is not None and classes > num_classes:
        raise UsageError(f'{where} has {classes} classes but the model has {num_classes}: evaluate it on the '
                         f'classes the model was trained on')
