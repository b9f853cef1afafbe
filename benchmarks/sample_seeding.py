#!/usr/bin/env python3
"""What seeding every training sample's RNGs from (seed, epoch, rank, position) costs, against reading the sample.

train.py reads each training image under ``subnet.sample_seeds.seeded_rngs``: a hash of the key, then Python's
``random``, numpy's and torch's CPU generator seeded from it; in the main process (``--workers 0``) the three states
are also saved before and put back after. This script times that per image, and timm's own per-image work: decoding
a JPEG of ImageNet's typical size (500x375) and timm's training transform (random-resized crop to 224, flip,
RandAugment, normalisation), in one process, single-threaded.

    python benchmarks/sample_seeding.py --images 300    (2-core machine: run it with OMP_NUM_THREADS=1)
"""
import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from subnet.sample_seeds import SampleKey, key_seed, seeded_rngs  # noqa: E402


def per_image(fn, count: int) -> float:
    """Microseconds per call, best of 3 rounds of ``count`` calls."""
    best = float('inf')
    for _ in range(3):
        begin = time.perf_counter()
        for i in range(count):
            fn(i)
        best = min(best, (time.perf_counter() - begin) / count)
    return best * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    pixels = np.clip(pixels // 4 + np.linspace(0, 190, 500, dtype=np.uint8)[None, :, None], 0, 255).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format='JPEG', quality=90)
    data = jpeg.getvalue()
    transform = create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1')

    def decode(_):
        return Image.open(io.BytesIO(data)).convert('RGB')

    image = decode(0)

    def seed_in_worker(i):  # what a loader worker does per image: no states to keep
        with seeded_rngs(key_seed(0, 0, SampleKey(i, 3, i)), keep=False):
            pass

    def seed_in_process(i):
        with seeded_rngs(key_seed(0, 0, SampleKey(i, 3, i)), keep=True):
            pass

    figures = {
        'decode a 500x375 JPEG': per_image(decode, args.images),
        "timm's training transform (crop 224, flip, RandAugment)": per_image(lambda _: transform(image), args.images),
        'seeding, in a loader worker': per_image(seed_in_worker, args.images * 10),
        'seeding, in the main process (--workers 0: states kept and put back)': per_image(seed_in_process,
                                                                                          args.images * 10),
    }
    read = figures['decode a 500x375 JPEG'] + figures["timm's training transform (crop 224, flip, RandAugment)"]
    print('| per image | µs | of decoding + transform |')
    print('|---|---:|---:|')
    for name, micros in figures.items():
        print(f'| {name} | {micros:.0f} | {100 * micros / read:.1f} % |')


if __name__ == '__main__':
    main()
