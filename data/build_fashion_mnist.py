#!/usr/bin/env python3
"""Rebuild the shipped Fashion-MNIST subset from the original IDX files.

The subset is class balanced and deterministic: for each class it takes the first ``--train-per-class``
images of the original training file and the first ``--val-per-class`` images of the original test file,
in file order. Images are written as 28x28 grayscale PNGs in the folder layout timm's ``create_dataset``
reads as it is: ``<out>/train/<class>/<index>.png`` and ``<out>/val/<class>/<index>.png``.

Source: Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which installs
the original files from https://github.com/zalandoresearch/fashion-mnist in /usr/share/datasets/fashion-mnist.
Fashion-MNIST is Copyright (c) 2017 Zalando SE, MIT licence.

    python data/build_fashion_mnist.py            # rewrites data/fashion-mnist
"""
import argparse
import gzip
import shutil
import struct
import sys
from pathlib import Path

from PIL import Image

CLASSES = (
    't-shirt_top', 'trouser', 'pullover', 'dress', 'coat',
    'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot',
)
SOURCE = Path('/usr/share/datasets/fashion-mnist')


def read_idx(path: Path) -> bytes:
    """Return the payload of an IDX file (gzip or plain) after checking its magic number."""
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    magic, = struct.unpack('>I', data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise ValueError(f'{path}: not an unsigned-byte IDX file (magic {magic:#x})')
    return data[4 + 4 * ndim:]


def write_split(images: bytes, labels: bytes, per_class: int, out: Path) -> int:
    """Write the first ``per_class`` images of each class; return how many were written."""
    counts = [0] * len(CLASSES)
    for index, label in enumerate(labels):
        if counts[label] >= per_class:
            if min(counts) >= per_class:
                break
            continue
        pixels = images[index * 784:(index + 1) * 784]
        folder = out / f'{label:02d}_{CLASSES[label]}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.frombytes('L', (28, 28), pixels).save(folder / f'{index:05d}.png', optimize=True)
        counts[label] += 1
    if min(counts) < per_class:
        raise ValueError(f'only {min(counts)} images for some class, {per_class} asked')
    return sum(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--source', type=Path, default=SOURCE, help='folder with the original IDX files')
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parent / 'fashion-mnist')
    parser.add_argument('--train-per-class', type=int, default=600)
    parser.add_argument('--val-per-class', type=int, default=100)
    args = parser.parse_args()

    files = {
        'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', args.train_per_class),
        'val': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', args.val_per_class),
    }
    for split, (images, labels, _) in files.items():
        for name in (images, labels):
            if not (args.source / name).is_file():
                print(f'error: {args.source / name} not found; install it with '
                      f'`apt-get install dataset-fashion-mnist` or pass --source', file=sys.stderr)
                return 2
    for split, (images, labels, per_class) in files.items():
        out = args.out / split
        if out.exists():
            shutil.rmtree(out)
        n = write_split(read_idx(args.source / images), read_idx(args.source / labels), per_class, out)
        print(f'{split}: {n} images in {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
