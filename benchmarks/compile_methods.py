#!/usr/bin/env python3
"""How often torch.compile compiles while each method trains, and how fast the compiled steps are, per method and
``--compile-scope`` (the whole model, or each block: ``subnet/compile.py``), in one process.

Each method's task is built as train.py builds it and compiled as ``--torchcompile --compile-scope S`` does, then
trained for ``--steps`` steps through the real epoch loop on random batches; the same steps also run uncompiled,
interleaved with the compiled ones (a step of each in turn), so a change in the machine's speed touches both.
Columns: the distinct subnets the depth engine was given; the frames dynamo compiled (``unique_graphs``); the graphs
the backend was handed (a counting wrapper around it); recompiles, the frames compiled after the first step (a new
subnet, input size or region variant that needed a graph); the graphs compiled in the second half of the steps (0:
the count has stopped growing); the first step (compilation included; the block scope compiles ahead then: every
region variant the later steps meet, ``subnet.compile.compile_ahead``), the mean of the later steps (the later
compilations included) and of the last half of the steps, the mean eager step (its first step left out too) and
the ratios. train.py imports ``timm.optim``, which raises dynamo's recompile limit to 1,000,000, and so does this
script. By default one thread and the process's CPU time (inductor then compiles in this process, so compilation
is counted): on a machine shared with other jobs, wall time mostly measures their load.

    python benchmarks/compile_methods.py --methods st,st++,gkt                  # both scopes, inductor
    python benchmarks/compile_methods.py --scopes model --steps 3 --methods st++,gkt   # the whole model: slow
    python benchmarks/compile_methods.py --backend eager                        # dynamo's decisions alone, fast
    python benchmarks/compile_methods.py --methods st++ --scopes blocks --options='--st-side-step 1'  # every side
    python benchmarks/compile_methods.py --methods st,st++,gkt --scopes blocks --regions-only  # no whole full net
"""
import argparse
import logging
import os
import shlex
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import timm.optim  # noqa: E402,F401  as train.py does: timm.optim.kron raises dynamo's recompile limit to 1,000,000
from subnet.compile import compile_task  # noqa: E402
from subnet.loop import LoopOptions, StepSetup, train_one_epoch  # noqa: E402
from train_helpers import method_training, random_batch  # noqa: E402  (tasks built as train.py builds them)
from _common import CompileCounter  # noqa: E402

# cosub's row: the skip implementation (what --cosub-impl auto keeps when skipping is faster; auto compiles the
# mask step too while it times both) with a fixed count of rows, its default under --torchcompile
METHODS = {
    'none': [],
    'cosub': ['--mixup', '0.2', '--torchcompile', '--cosub-impl', 'skip'],
    'st': [],
    # ResNet-18's stages hold 2 blocks: ST++'s 3 would keep them all; --torchcompile: its sides snapped to multiples
    # of 32 (--st-side-step), as train.py does with --torchcompile
    'st++': ['--st-min-keep', '1', '--torchcompile'],
    'gkt': [],
}
DEFAULT_SCOPES = {'none': 'model', 'cosub': 'model', 'st': 'blocks', 'st++': 'blocks', 'gkt': 'blocks'}


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


def steps_for(cli) -> int:
    """``--steps``, or ``--model-steps`` for the whole-model scope (each new subnet compiles there: slow)."""
    scope = getattr(cli, 'scope', 'model')
    return cli.model_steps if scope == 'model' and getattr(cli, 'model_steps', None) else cli.steps


def method_options(method: str, cli) -> list:
    """The method's train.py options, then ``--options``."""
    return METHODS[method] + shlex.split(getattr(cli, 'options', '') or '')


def train_steps(method: str, runs, cli, after_step=None, steps=None) -> list:
    """Step times of each of ``runs`` ((task, optimizer, args) each) over ``steps`` (``cli.steps``) steps on seeded
    random batches (the same batches every run), their steps interleaved: one step of each in turn, so that the
    machine's changing speed (other jobs, its clock) touches them alike."""
    setup, times = StepSetup(device=torch.device('cpu')), [[] for _ in runs]
    clock = time.process_time if getattr(cli, 'clock', 'wall') == 'cpu' else time.perf_counter
    for step in range(steps or cli.steps):
        for (task, optimizer, args), run_times in zip(runs, times):
            batch = random_batch(method, cli.img_size, cli.batch_size, seed=step)
            start = clock()
            train_one_epoch(0, task, [batch], optimizer, LoopOptions.from_args(args), setup)
            run_times.append(clock() - start)
        if after_step is not None:
            after_step()
    return times


def measure(method: str, cli) -> dict:
    """Compiled at ``cli.scope`` (default 'model'): counts and step times; with ``cli.eager``, also the step times
    of the same task uncompiled, its steps interleaved with the compiled ones (``eager_times``)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    task, optimizer, args = method_training(method, method_options(method, cli), cli.img_size)
    scope = getattr(cli, 'scope', 'model')
    # the block scope's inductor options (subnet/compile.py), which torch.compile cannot pass to a backend callable
    backend = CompileCounter(cli.backend, {'layout_optimization': False} if scope == 'blocks' else None)
    backend.label = method
    task.runs_full_net &= not getattr(cli, 'regions_only', False)
    compile_task(task, scope, backend=backend, verbose=False)
    subnets = record_subnets(task)
    runs = [(task, optimizer, args)]
    if getattr(cli, 'eager', False):
        runs.append(method_training(method, method_options(method, cli), cli.img_size))
    frames, graphs = [], []
    times = train_steps(method, runs, cli, steps=steps_for(cli), after_step=lambda: (
        frames.append(counters['stats'].get('unique_graphs', 0)), graphs.append(backend.counts.get(method, 0))))
    breaks = sum(counters['graph_break'].values())
    torch._dynamo.reset()  # the next measurement starts from nothing compiled
    return dict(graphs=graphs[-1], frames=frames[-1], recompiles=frames[-1] - frames[0], graphs_per_step=graphs,
                late_graphs=graphs[-1] - graphs[len(graphs) // 2 - 1] if len(graphs) > 1 else 0,
                breaks=breaks, subnets=len(subnets), times=times[0], eager_times=times[1] if len(times) > 1 else [],
                impl=getattr(task, 'impl', ''), rows=getattr(task, 'row_sampling', ''), limit=backend.hit_limit,
                sides=len(task.sides(cli.img_size)) if getattr(task, 'varies_input_size', False) else 0)


def mean_later(times: list) -> float:
    return sum(times[1:]) / max(len(times) - 1, 1)


def mean_last_half(times: list) -> float:
    half = times[len(times) // 2:]
    return sum(half) / max(len(half), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--scopes', default='model,blocks', help="'model', 'blocks', or both (default: both)")
    parser.add_argument('--steps', type=int, default=24)
    parser.add_argument('--model-steps', type=int, default=None,
                        help='steps of the whole-model scope rows (default: --steps)')
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--regions-only', action='store_true',
                        help="the block scope without the full net's pass as one graph: its regions run it too")
    parser.add_argument('--options', default='',
                        help="train.py options added to every method's, e.g. '--st-side-step 1' (ST++ at every side)")
    # 224 px: the crop timm trains ResNets at (its default input size, ImageNet's); batch 8 keeps a step about a
    # second on one CPU thread. At 64 px, batch 4 (a 30 ms step) each compiled region's fixed call cost shows
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads, and inductor compiles in this process when 1 (default: 1)')
    parser.add_argument('--clock', default='cpu', choices=('wall', 'cpu'),
                        help="'cpu': this process's CPU time (default; with one thread on a shared machine, what our "
                             "thread ran, other jobs' load not counted), or 'wall' time")
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    if cli.threads == 1:
        from torch._inductor import config as inductor_config
        inductor_config.compile_threads = 1  # compile in this process: the cpu clock counts compilation
    logging.getLogger('train').setLevel(logging.ERROR)
    print(f'torch {torch.__version__}, backend {cli.backend}, {cli.steps} steps per method, slim ResNet-18 at '
          f'{cli.img_size} px, batch {cli.batch_size}, {torch.get_num_threads()} threads, {cli.clock} time; recompile '
          f'limit {torch._dynamo.config.recompile_limit}; * the method\'s default scope')
    print()
    print('| method | scope | steps | distinct subnets | frames | graphs | recompiles | graphs in the last half | '
          'first step | later steps (mean) | last half (mean) | eager step (mean) | later / eager | '
          'last half / eager |')
    print('|---|---|' + '---:|' * 12)
    cli.eager = True
    for method in cli.methods.split(','):
        for scope in cli.scopes.split(','):
            cli.scope = scope
            r = measure(method, cli)
            later, last, eager = mean_later(r['times']), mean_last_half(r['times']), mean_later(r['eager_times'])
            label = f'{method} ({r["impl"]}, {r["rows"]} rows)' if r['impl'] else method
            label += f' ({r["sides"]} input sides)' if r['sides'] else ''
            label += ' (regions only)' if cli.regions_only and scope == 'blocks' else ''
            star = '*' if DEFAULT_SCOPES[method] == scope else ''
            print(f'| {label} | {scope}{star} | {len(r["times"])} | {r["subnets"] or "-"} | {r["frames"]} | '
                  f'{r["graphs"]} | {r["recompiles"]} | {r["late_graphs"]} | {r["times"][0]:.1f} s | '
                  f'{later:.3f} s | {last:.3f} s | {eager:.3f} s | {later / eager:.2f}x | {last / eager:.2f}x |')
            sys.stdout.flush()


if __name__ == '__main__':
    main()
