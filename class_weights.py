#!/usr/bin/env python3
"""Count each class's positive samples in a training split, for train.py's class-frequency loss options.

timm 1.0.31 ships a script of this name (its README, "New loss options": "label counts gathered by
``class_weights.py``"; its tests drive it); the script itself is not published, so this one is written from what
its tests and ``timm.loss.load_class_stats`` read: a JSON file of ``num_samples``, ``pos_counts`` (one count per
class) and ``class_names``, which ``train.py --class-stats FILE`` takes for ``--loss-pos-weight neg_pos``,
``--loss-class-weight inv_freq|effective_num`` and ``--loss db``.

    python class_weights.py --dataset hfds/data/fashion-mnist-pairs --task multilabel --target-key labels \\
        --output stats.json --method neg_pos      # --method: log the weights that method would give

Without ``--output`` the JSON goes to stdout. Targets are read without decoding images where the reader can
(``iter_targets``: the Hugging Face readers), else sample by sample.
"""
import argparse
import json
import logging
import sys

import torch
from timm.data import create_dataset
from timm.loss import CLASS_WEIGHT_METHODS, compute_class_weights

from subnet.criterion import TASKS
from subnet.data import check_dataset_root
from subnet.errors import InputError

_logger = logging.getLogger('class_weights')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-dir', default=None, help='dataset root (image folders), or the cache folder of hfds/')
    p.add_argument('--dataset', default='', help='dataset type + name, as train.py takes it (e.g. hfds/NAME)')
    p.add_argument('--split', default='train', help='split to count (default: train)')
    p.add_argument('--task', default='classification', choices=TASKS)
    p.add_argument('--target-key', default=None, help='target field(s), as train.py takes them')
    p.add_argument('--target-format', default=None, choices=('indices', 'multihot'))
    p.add_argument('--input-key', default=None, help='input field of dict-style datasets')
    p.add_argument('--class-map', default='', help='class name to index map file')
    p.add_argument('--num-classes', type=int, default=None, help='classes to count (default: the dataset\'s)')
    p.add_argument('--dataset-trust-remote-code', action='store_true', default=False)
    p.add_argument('--output', default='', help='JSON file to write (default: stdout)')
    p.add_argument('--method', default=None, choices=CLASS_WEIGHT_METHODS,
                   help='also log the weights this method computes from the counts (not written)')
    p.add_argument('--power', type=float, default=1.0, help='--method exponent, as train.py --loss-weight-power')
    return p


def targets_of(dataset):
    """The raw targets of a timm dataset, without decoding images where its reader can."""
    reader = getattr(dataset, 'reader', None)
    if hasattr(reader, 'iter_targets'):
        yield from reader.iter_targets()
        return
    for index in range(len(dataset)):
        yield dataset[index][1]


def count(targets, num_classes: int, dense: bool) -> list:
    """Positive samples per class: a class counts once per sample that has it (a class index, a list of them, or
    with ``dense`` a 0/1 vector)."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for target in targets:
        values = torch.as_tensor(target)
        if dense:
            counts += (values.reshape(-1)[:num_classes] > 0.5).long()
            continue
        classes = values.reshape(-1).long().unique()
        if classes.numel() and not 0 <= int(classes.min()) <= int(classes.max()) < num_classes:
            raise InputError(f'a target has classes {classes.tolist()}, outside the {num_classes} classes counted '
                             f'(--num-classes)')
        counts[classes] += 1
    return counts.tolist()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target_format == 'multihot' and args.task != 'multilabel':
        parser.error('--target-format multihot needs --task multilabel')
    try:
        check_dataset_root(args.dataset, args.data_dir, {'counted': args.split}, args.class_map,
                           root_may_be_split=True)
    except InputError as e:
        parser.error(str(e))
    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, class_map=args.class_map,
                             input_key=args.input_key, target_key=args.target_key, target_format=args.target_format,
                             trust_remote_code=args.dataset_trust_remote_code)
    class_to_idx = dict(getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) or {})
    num_classes = args.num_classes or len(class_to_idx)
    if not num_classes:
        parser.error('the dataset does not name its classes: give --num-classes')
    targets = list(targets_of(dataset))
    try:
        pos_counts = count(targets, num_classes, args.target_format == 'multihot')
    except InputError as e:
        parser.error(str(e))
    stats = dict(num_samples=len(targets), pos_counts=pos_counts)
    if class_to_idx:
        names = {index: name for name, index in class_to_idx.items()}
        stats['class_names'] = [str(names.get(i, i)) for i in range(num_classes)]
    if args.method:
        kind, weights = compute_class_weights(pos_counts, len(targets), method=args.method, power=args.power)
        _logger.info(f'{args.method} {kind} (--loss-{kind.replace("_", "-")} {args.method} with --class-stats): '
                     + ', '.join(f'{w:.4g}' for w in weights.tolist()))
    text = json.dumps(stats)
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text + '\n')
        _logger.info(f'Wrote the counts of {len(targets)} samples to {args.output}')
    else:
        print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
