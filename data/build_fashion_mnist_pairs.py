#!/usr/bin/env python3
"""Build the multi-label quickstart's dataset from the shipped Fashion-MNIST subset.

Each example is two Fashion-MNIST items of two different classes side by side (a 56x28 grayscale image), labelled
with both classes. Each shipped image goes into one pair at most, paired in a seeded random order (deterministic):
the 6,000 training images give 2,999 training pairs (the last two left over are of one class) and the 1,000
validation images 500 validation pairs.

An image folder cannot hold several labels per image, so the pairs are written as a Hugging Face dataset in
Parquet (``train.parquet``, ``validation.parquet``; an ``image`` column and a ``labels`` column, a list of class
indices whose names the file's features keep), which timm's ``hfds/`` reader loads from the local folder without
any network: ``--dataset hfds/data/fashion-mnist-pairs --target-key labels --task multilabel``. Needs the
``datasets`` package (``pip install datasets``).

    python data/build_fashion_mnist_pairs.py     # rewrites data/fashion-mnist-pairs
"""
import argparse
import io
import random
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
CLASSES = (
    't-shirt_top', 'trouser', 'pullover', 'dress', 'coat',
    'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot',
)
SPLITS = (('train', 'train'), ('val', 'validation'))  # shipped folder -> split name the hfds reader finds


def shipped_images(folder: Path) -> list:
    """(path, class index) of every image of a shipped split folder (``<NN>_<class>/<index>.png``)."""
    images = []
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = CLASSES.index(class_folder.name.split('_', 1)[1])
        images += [(path, label) for path in sorted(class_folder.glob('*.png'))]
    if not images:
        raise ValueError(f'{folder} holds no images: rebuild it with data/build_fashion_mnist.py')
    return images


def pair_up(images: list, seed: int) -> list:
    """Pairs of images of two different classes, each image in exactly one pair (an odd one out is dropped)."""
    order = list(images)
    random.Random(seed).shuffle(order)
    pairs = []
    while len(order) >= 2:
        first = order.pop()
        other = next((i for i in range(len(order) - 1, -1, -1) if order[i][1] != first[1]), None)
        if other is None:  # only this class left
            break
        pairs.append((first, order.pop(other)))
    return pairs


def side_by_side(left: Path, right: Path) -> bytes:
    """The two 28x28 items as one 56x28 PNG."""
    canvas = Image.new('L', (56, 28))
    for x, path in ((0, left), (28, right)):
        with Image.open(path) as item:
            canvas.paste(item.convert('L'), (x, 0))
    data = io.BytesIO()
    canvas.save(data, format='PNG', optimize=True)
    return data.getvalue()


def write_split(pairs: list, path: Path) -> None:
    import datasets
    features = datasets.Features({'image': datasets.Image(),
                                  'labels': datasets.Sequence(datasets.ClassLabel(names=list(CLASSES)))})
    rows = {'image': [{'bytes': side_by_side(a[0], b[0]), 'path': None} for a, b in pairs],
            'labels': [sorted((a[1], b[1])) for a, b in pairs]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--source', type=Path, default=HERE / 'fashion-mnist', help='the shipped subset')
    parser.add_argument('--out', type=Path, default=HERE / 'fashion-mnist-pairs')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    try:
        import datasets  # noqa: F401
    except ImportError:
        print('error: the datasets package is needed: pip install datasets', file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for folder, split in SPLITS:
        pairs = pair_up(shipped_images(args.source / folder), args.seed)
        write_split(pairs, args.out / f'{split}.parquet')
        print(f'{split}: {len(pairs)} pairs in {args.out / f"{split}.parquet"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
