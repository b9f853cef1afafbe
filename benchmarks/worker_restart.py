#!/usr/bin/env python3
"""What restarting the loader workers every epoch costs on an ImageFolder of ImageNet's size.

train.py starts fresh loader workers each epoch (``persistent_workers=False``), from the re-seeded main RNG, so a
resumed run replays the uninterrupted one; timm keeps them alive. This script times the start of an epoch (until
its first batch) both ways, with timm's dataset of the given tree in memory, as in training. The images are never
read (the loader returns a constant tensor): what is timed is starting the workers, not decoding.

    python benchmarks/worker_restart.py --generate 1000 1281 --workers 2 8 --epochs 3

``--generate C N`` builds a throw-away tree of C class folders with N empty files each under a temporary folder
(1000 x 1281 = 1,281,000 files, ImageNet-1k's train split) and deletes it afterwards; ``--root DIR`` times an
existing ImageFolder (its ``train`` split) instead.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch
import torch.utils.data
from timm.data import create_dataset


class NoDecode(torch.utils.data.Dataset):
    """timm's dataset held (its file list is what the workers inherit), its images never opened."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.image = torch.zeros(3, 8, 8)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.image, 0


def generate(root: str, classes: int, per_class: int) -> None:
    for c in range(classes):
        folder = os.path.join(root, 'train', f'n{c:08d}')
        os.makedirs(folder)
        for i in range(per_class):
            open(os.path.join(folder, f'n{c:08d}_{i}.JPEG'), 'wb').close()


def epoch_starts(dataset, workers: int, persistent: bool, epochs: int, batch_size: int) -> list:
    """Seconds from the start of each epoch to its first batch."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=persistent, drop_last=True)
    starts = []
    for _ in range(epochs):
        begin = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        starts.append(time.perf_counter() - begin)
        del iterator  # the rest of the epoch is not timed; without persistence this stops the workers
    return starts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default='', help='an ImageFolder root with a train/ split')
    parser.add_argument('--generate', nargs=2, type=int, metavar=('CLASSES', 'PER_CLASS'))
    parser.add_argument('--workers', type=int, nargs='+', default=[2, 8])
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=256)
    args = parser.parse_args()
    warnings.filterwarnings('ignore', message='This DataLoader will create')  # more workers than CPUs: on purpose
    temp = None
    root = args.root
    if args.generate:
        temp = tempfile.mkdtemp(prefix='worker_restart_')
        root = temp
        begin = time.perf_counter()
        generate(root, *args.generate)
        print(f'generated {args.generate[0] * args.generate[1]:,} empty files in {time.perf_counter() - begin:.0f} s')
    try:
        begin = time.perf_counter()
        dataset = NoDecode(create_dataset('', root=root, split='train', is_training=True))
        print(f"timm's folder scan: {len(dataset):,} images in {time.perf_counter() - begin:.1f} s (once per run, "
              f'both ways)')
        print()
        print('| workers | epoch start, workers restarted (ours) | epoch start, persistent workers (timm) | '
              'restart cost per epoch |')
        print('|---:|---:|---:|---:|')
        for workers in args.workers:
            fresh = epoch_starts(dataset, workers, False, args.epochs, args.batch_size)
            kept = epoch_starts(dataset, workers, True, args.epochs, args.batch_size)
            # the first epoch starts the workers either way; later epochs show the difference
            fresh_mean, kept_mean = sum(fresh[1:]) / len(fresh[1:]), sum(kept[1:]) / len(kept[1:])
            print(f'| {workers} | {fresh_mean:.2f} s | {kept_mean:.2f} s | {fresh_mean - kept_mean:.2f} s |')
            sys.stdout.flush()
    finally:
        if temp:
            shutil.rmtree(temp)


if __name__ == '__main__':
    main()
