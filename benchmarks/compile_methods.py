#!/usr/bin/env python3
"""How often torch.compile compiles while each method trains, per method over a few training steps.

Each method's task is built as train.py builds it and compiled with ``task.compile`` (what ``--torchcompile``
does), then trained for ``--steps`` steps through the real epoch loop on random batches. Columns: the distinct
subnets the depth engine was given; the frames dynamo compiled (``unique_graphs``: its decision to recompile,
guarded on the modules the engine swaps in and on BatchNorm's momentum, which frozen statistics set to 0); the
graphs the backend was handed (a counting wrapper around it); whether dynamo hit its recompile limit (that frame
would then run eagerly for new subnets; train.py imports ``timm.optim``, which raises the limit to 1,000,000, and
so does this script); the time of the first step and of the later ones.

    python benchmarks/compile_methods.py --steps 6 --threads 1                 # inductor (gcc), slow on a CPU
    python benchmarks/compile_methods.py --steps 12 --backend eager           # dynamo's decisions alone, fast
"""
import argparse
import logging
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import timm.optim  # noqa: E402,F401  as train.py does: timm.optim.kron raises dynamo's recompile limit to 1,000,000
from subnet.loop import LoopOptions, StepSetup, train_one_epoch  # noqa: E402
from train_helpers import method_training, random_batch  # noqa: E402  (tasks built as train.py builds them)
from _common import CompileCounter  # noqa: E402

METHODS = {
    'none': [],
    'cosub': ['--mixup', '0.2', '--torchcompile'],  # --torchcompile: cosub keeps a fixed count of rows per branch
    'st': [],
    'st++': ['--st-min-keep', '1', '--st-min-size', '0.75'],
    'gkt': [],
}


def record_subnets(task) -> set:
    """The distinct keep masks the task gives its depth engine (per batch or per sample)."""
    seen = set()
    depth = getattr(task, 'depth', None)
    if depth is None:
        return seen
    subnet, per_sample = depth.subnet, depth.per_sample

    def recording_subnet(keep, *a, **kw):
        seen.add(tuple(torch.as_tensor(keep).flatten().tolist()))
        return subnet(keep, *a, **kw)

    def recording_per_sample(keep_mask, *a, **kw):
        seen.add(tuple(torch.as_tensor(keep_mask).flatten().tolist()))
        return per_sample(keep_mask, *a, **kw)

    depth.subnet, depth.per_sample = recording_subnet, recording_per_sample
    return seen


def measure(method: str, cli) -> dict:
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    task, optimizer, args = method_training(method, METHODS[method], cli.img_size)
    backend = CompileCounter(cli.backend)
    backend.label = method
    task.compile(backend=backend)
    subnets = record_subnets(task)
    setup = StepSetup(device=torch.device('cpu'))
    times = []
    for step in range(cli.steps):
        batch = random_batch(method, cli.img_size, cli.batch_size, seed=step)
        start = time.perf_counter()
        train_one_epoch(0, task, [batch], optimizer, LoopOptions.from_args(args), setup)
        times.append(time.perf_counter() - start)
    return dict(graphs=backend.counts.get(method, 0), frames=counters['stats'].get('unique_graphs', 0),
                breaks=sum(counters['graph_break'].values()), subnets=len(subnets), times=times,
                impl=getattr(task, 'impl', ''), rows=getattr(task, 'row_sampling', ''), limit=any('recompile limit' in k for k in counters['unimplemented']))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--steps', type=int, default=6)
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--threads', type=int, default=0)
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    logging.getLogger('train').setLevel(logging.ERROR)
    print(f'torch {torch.__version__}, backend {cli.backend}, {cli.steps} steps per method, slim ResNet-18 at '
          f'{cli.img_size} px, batch {cli.batch_size}; recompile limit {torch._dynamo.config.recompile_limit}')
    print()
    print('| method | distinct subnets | frames compiled by dynamo | graphs compiled by the backend | graph breaks | '
          'hit recompile limit | first step | later steps (mean) |')
    print('|---|---:|---:|---:|---:|---|---:|---:|')
    for method in cli.methods.split(','):
        r = measure(method, cli)
        later = sum(r['times'][1:]) / max(len(r['times']) - 1, 1)
        label = f'{method} ({r["impl"]}, {r["rows"]} rows)' if r['impl'] else method
        print(f'| {label} | {r["subnets"] or "-"} | {r["frames"]} | {r["graphs"]} | {r["breaks"]} | '
              f'{"yes" if r["limit"] else "no"} | {r["times"][0]:.1f} s | {later:.2f} s |')
        sys.stdout.flush()


if __name__ == '__main__':
    main()
