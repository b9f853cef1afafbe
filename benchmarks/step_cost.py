"""What one training step of each method costs, relative to plain training (``--method none``).

For each model it times one step (forward and backward of every pass; no optimizer) of:
  none; none-2x (plain training on the batch concatenated with itself: what cosub's doubled rows cost before
  anything is dropped); cosub at each drop rate of --cosub-drops (DeiT III's 0.05 / 0.2 / 0.45 for ViT-S / B / L), as
  'cosub' (the default: per-branch skip, Bernoulli rows), 'cosub-fixed' (per-branch skip, a fixed count of rows),
  'cosub-timm' (DeiT's implementation: timm's per-branch DropPath, every branch computed and multiplied),
  and, if asked, 'cosub-mask' (our per-branch mask mode) and 'cosub-block' (block-level skip);
  st (1 subnet), st++ (6 subnets, smaller inputs, KL-), gkt (3 groups x 2 loops),
in one process, interleaved over the repeats so machine noise hits every row alike. Each row prints the total
time of its timed steps and the peak activation memory as ratios to `none`, next to the FLOP-ideal ratio: the
mean over the same steps of what the passes the steps actually ran would cost if only their kept work were
computed (torch's FLOP counter: each pass's BlockMap.flop_fraction at the input size it ran at, so ST++'s smaller
inputs count the tokens^2 of attention exactly; cosub: 2 x the rows' mean flop fraction; cosub-timm and
cosub-mask: the same masks' ideal, so their time / ideal shows what computing dropped branches costs). Memory is
the peak of the bytes autograd keeps alive for backward (distinct storages of saved tensors, parameters excluded):
what a GPU's activation memory would hold. ST and GKT back-propagate each pass right after its forward, so their
peak should stay near plain training's.

    python benchmarks/step_cost.py --threads 1                  # ViT-S and ResNet-50, 224 px, batch 32
    python benchmarks/step_cost.py --img-size 64 --batch-size 8 --repeats 2 --models resnet50   # quick look
    python benchmarks/step_cost.py --compile --threads 1 --models vit_small_patch16_224 --cosub-drops 0.2
        # inductor: a compiled cosub step (fixed count) against a compiled plain step, compilations over 20 steps
    python benchmarks/step_cost.py --device cuda --amp-dtype bfloat16     # on a GPU (benchmarks/gpu_check.py)
"""
import argparse
import contextlib
import statistics
import sys
import weakref
from pathlib import Path

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import (  # noqa: E402
    CompileCounter, add_common_args, clock, parse_and_setup, print_table_head)
from subnet.blocks import find_blocks  # noqa: E402
from subnet.depth import DepthEngine  # noqa: E402
from subnet.methods import CosubTask, GroupKnowledgeTask, StimulativePlusPlusTask, StimulativeTask  # noqa: E402
from subnet.sampling import drop_rates  # noqa: E402

# --method cosub variants: (--cosub-impl, --cosub-drop-unit, --cosub-rows, what the row is)
COSUB = {
    'cosub': ('skip', 'branch', 'bernoulli', 'branch skip, bernoulli'),
    'cosub-fixed': ('skip', 'branch', 'fixed', 'branch skip, fixed count'),
    'cosub-timm': ('timm', 'branch', 'bernoulli', "DeiT's: timm DropPath"),
    'cosub-mask': ('mask', 'branch', 'bernoulli', 'branch mask'),
    'cosub-block': ('skip', 'block', 'bernoulli', 'block skip, bernoulli'),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_common_args(parser, repeats_help='timed steps per row (total time compared)')
    parser.add_argument('--methods', default='none,none-2x,cosub,cosub-fixed,cosub-timm,st,st++,gkt',
                        help=f'comma-separated, from none, none-2x (plain training on the batch twice: what '
                             f'cosub\'s doubled rows cost without dropping), {", ".join(COSUB)}, st, st++, gkt')
    parser.add_argument('--cosub-drops', default='0.05,0.2,0.45', help='drop rates of the cosub rows')
    parser.add_argument('--compile', action='store_true',
                        help='instead: inductor-compiled cosub-fixed steps against compiled plain steps')
    parser.add_argument('--compile-steps', type=int, default=20)
    parser.add_argument('--compile-backend', default='inductor',
                        help="torch.compile backend for --compile (default: inductor; 'eager' checks the path fast)")
    parser.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda' (timed with synchronisation)")
    parser.add_argument('--amp-dtype', default='', choices=('', 'bfloat16', 'float16'),
                        help='run each step under autocast in this dtype (default: none, float32)')
    return parse_and_setup(parser)


def precision(args) -> str:
    return args.amp_dtype or 'fp32'


def device_name(args) -> str:
    return torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'CPU'


def synced(timer, args):
    """``timer`` that first waits for the GPU's queued work (CUDA kernels run asynchronously)."""
    if not args.device.startswith('cuda'):
        return timer

    def read():
        torch.cuda.synchronize(args.device)
        return timer()
    return read


def autocast(args):
    if not args.amp_dtype:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.amp_dtype))


class ActivationPeak:
    """Peak bytes of the distinct non-parameter storages that autograd keeps alive for backward."""

    def __init__(self, parameters):
        self.param_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.refs, self.live, self.peak = {}, 0, 0

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.param_storages and storage.nbytes():
            if key not in self.refs:
                self.refs[key] = 0
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(tensor, self._release, key, storage.nbytes())
        return tensor

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def row_names(methods, drops):
    """One row per method, one per (cosub variant, drop rate): 'cosub-fixed@0.2'."""
    return [f'{m}@{d:g}' if m in COSUB else m for m in methods for d in (drops if m in COSUB else [None])]


def build(row: str, model: nn.Module, depth: DepthEngine):
    common = dict(depth=depth, seed=0)
    method, _, drop = row.partition('@')
    if method in ('none', 'none-2x'):
        return timm.task.ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    if method in COSUB:
        impl, unit, rows, _ = COSUB[method]
        # DeiT III's constant rate, on the blocks the engine can skip (the rows stay comparable across impls)
        rates = drop_rates(depth.num_blocks, float(drop), 'constant') * depth.block_map.skippable
        return CosubTask(model, drop_rate=rates, impl=impl, unit=unit, row_sampling=rows, **common)
    if method == 'st':
        return StimulativeTask(model, nn.CrossEntropyLoss(), **common)
    if method == 'st++':
        return StimulativePlusPlusTask(model, nn.CrossEntropyLoss(), **common)  # ST++'s published defaults
    if method == 'gkt':
        return GroupKnowledgeTask(model, nn.CrossEntropyLoss(), groups=3, loops=2, drop=0.2, **common)
    raise SystemExit(f'unknown method {method!r}')


class FlopIdeal:
    """What a pass costs if only its kept work is computed, as a fraction of one full pass at the crop size.

    FLOPs are counted by torch's counter at each input size a pass runs at (a BlockMap per size), so a ViT's
    attention, which grows with tokens^2, is counted as it is rather than scaled by (side / crop)^2."""

    def __init__(self, model: nn.Module, depth: DepthEngine, crop: int):
        self.model, self.maps, self.crop = model, {crop: depth.block_map}, crop

    def fraction(self, keep, unit: str, side: int) -> float:
        if side not in self.maps:  # never inside a depth context: discovery must see the plain model
            self.maps[side] = find_blocks(self.model, (3, side, side))
        block_map = self.maps[side]
        if keep is None:
            keep = torch.ones(len(block_map.units(unit)))
        return block_map.flop_fraction(keep, unit) * block_map.total_flops / self.maps[self.crop].total_flops


class PassLog:
    """Records every pass the tasks run (keep mask, unit, rows, input side): the depth engine's contexts are
    wrapped once, and each watched task's ``forward_pass``; ``cost()`` sums the FLOP-ideal of a step's passes."""

    def __init__(self, depth: DepthEngine, ideal: FlopIdeal, batch: int):
        self.pending, self.passes, self.ideal, self.batch = None, [], ideal, batch
        subnet, per_sample = depth.subnet, depth.per_sample

        def recording_subnet(keep, **kwargs):
            self.pending = (torch.as_tensor(keep), 'block')
            return subnet(keep, **kwargs)

        def recording_per_sample(mask, *args, **kwargs):
            self.pending = (torch.as_tensor(mask), kwargs.get('unit', 'block'))
            return per_sample(mask, *args, **kwargs)
        depth.subnet, depth.per_sample = recording_subnet, recording_per_sample

    def watch(self, task) -> None:
        forward = task.forward_pass
        expected = None
        if isinstance(task, CosubTask) and task.impl == 'timm':  # masks drawn inside timm's DropPath: expected cost
            expected = (1 - task.unit_rates, task.unit)

        def recording_forward(x):
            keep, unit = self.pending or expected or (None, 'block')
            self.passes.append((keep, unit, x.shape[0] / self.batch, x.shape[-1]))  # rows: cosub's are doubled
            self.pending = None
            return forward(x)
        task.forward_pass = recording_forward

    def cost(self) -> float:
        cost = sum(rows * self.ideal.fraction(keep, unit, side) for keep, unit, rows, side in self.passes)
        self.passes = []
        return cost


class Inputs:
    def __init__(self, args):
        generator = torch.Generator().manual_seed(0)
        size = (3, args.img_size, args.img_size)
        self.images = torch.randn((args.batch_size,) + size, generator=generator).to(args.device)
        self.labels = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(args.device)
        self.dense = torch.nn.functional.one_hot(self.labels, 1000).float() * 0.9 + 0.1 / 1000

    def __call__(self, row: str):
        """The step's (input, target): dense targets for cosub; the batch twice for none-2x."""
        if row == 'none-2x':
            return torch.cat([self.images, self.images]), torch.cat([self.labels, self.labels])
        return self.images, self.dense if row.startswith('cosub') else self.labels


def make_model(name: str, args) -> nn.Module:
    torch.manual_seed(0)
    # ViTs as train.py builds them for st++ (dynamic_img_size accepts the subnets' smaller inputs)
    kwargs = dict(img_size=args.img_size, dynamic_img_size=True) if 'vit' in name else {}
    return timm.create_model(name, **kwargs).to(args.device).train()


def watched_tasks(rows, model: nn.Module, depth: DepthEngine, ideal: FlopIdeal, batch: int):
    """The task of every row, all on one model and engine, their passes logged (plain training's is one full pass)."""
    built = {row: build(row, model, depth) for row in rows}
    log = PassLog(depth, ideal, batch)
    for row, task in built.items():
        if not row.startswith('none'):
            log.watch(task)
    return built, log


def step(task, row: str, inputs: Inputs, model: nn.Module, args) -> None:
    model.zero_grad(set_to_none=True)
    with autocast(args):
        result = task(*inputs(row))
    if row.startswith('none'):  # timm's ClassificationTask leaves the backward to the loop
        result['loss'].backward()


def bench_model(name: str, args) -> list:
    model = make_model(name, args)
    depth = DepthEngine(model, input_size=(3, args.img_size, args.img_size))
    ideal = FlopIdeal(model, depth, args.img_size)
    inputs = Inputs(args)
    rows = row_names(args.methods.split(','), [float(d) for d in args.cosub_drops.split(',')])
    built, log = watched_tasks(rows, model, depth, ideal, args.batch_size)
    times, ideals, peaks, timer = {r: [] for r in rows}, {r: [] for r in rows}, {}, synced(clock(args), args)
    for repeat in range(args.repeats + 1):
        for row in rows:  # interleaved: drift and neighbours' load hit every row alike
            meter = ActivationPeak(model.parameters())
            start = timer()
            with meter():
                step(built[row], row, inputs, model, args)
            elapsed = timer() - start
            cost = log.cost() if not row.startswith('none') else (2.0 if row == 'none-2x' else 1.0)
            if repeat:  # the first round warms up
                times[row].append(elapsed)
                ideals[row].append(cost)
                peaks[row] = max(peaks.get(row, 0), meter.peak)
    # total time over the same timed steps as the mean ideal: ST's subnets vary a lot from step to step
    base_time, base_peak = sum(times['none']), peaks['none']
    return [(name, row, sum(times[row]) / base_time, statistics.mean(ideals[row]), peaks[row] / base_peak,
             statistics.mean(times[row])) for row in rows]


def label(row: str) -> str:
    method, _, drop = row.partition('@')
    return f'{method} ({COSUB[method][3]}), drop {drop}' if method in COSUB else method


def run_timing(args) -> None:
    print_table_head(args, f'batch {args.batch_size}, {args.img_size} px, {args.repeats} timed steps (+1 warm-up), '
                     f'{precision(args)}, {device_name(args)}',
                     ('model', 'method', 'step time / none', 'FLOP-ideal', 'time / ideal', 'peak activations / none',
                      's/step'))
    results = []
    for name in args.models.split(','):
        for model, row, ratio, ideal, memory, seconds in bench_model(name, args):
            results.append((model, row, ratio, ideal))
            print(f'| {model} | {label(row)} | {ratio:.2f} | {ideal:.2f} | {ratio / ideal:.2f} | {memory:.2f} | '
                  f'{seconds:.2f} |', flush=True)
    print()
    for model in dict.fromkeys(r[0] for r in results):
        by_row = {row: (ratio, ideal) for name, row, ratio, ideal in results if name == model}
        if 'none-2x' in by_row:
            print(f'{model}: a plain step on the batch twice costs {by_row["none-2x"][0]:.2f}x a plain step '
                  f'(FLOP ideal 2.00)')
        for drop in args.cosub_drops.split(','):
            deit = by_row.get(f'cosub-timm@{float(drop):g}')
            for method in ('cosub', 'cosub-fixed'):
                ratio, ideal = by_row.get(f'{method}@{float(drop):g}', (None, None))
                if ratio is None:
                    continue
                versus = f'; {deit[0] / ratio:.2f}x faster than DeiT\'s (--cosub-impl timm)' if deit else ''
                print(f'{model}: {label(f"{method}@{float(drop):g}")}: {ratio / ideal:.2f}x its FLOP ideal{versus}')


def run_compile(args) -> None:
    """Inductor-compiled steps: plain training against cosub with a fixed count of rows, interleaved; the first
    step of each (its compilation) is not timed."""
    drops = [float(d) for d in args.cosub_drops.split(',')]
    counter = CompileCounter(args.compile_backend)
    print_table_head(args, f'torch.compile ({args.compile_backend}), batch {args.batch_size}, {args.img_size} px, '
                     f'{args.compile_steps} training steps per row (the first, which compiles, not timed), '
                     f'{precision(args)}, {device_name(args)}',
                     ('model', 'method', 'compiled step time / compiled none', 'FLOP-ideal', 'time / ideal',
                      'compilations', 's/step'))
    for name in args.models.split(','):
        torch._dynamo.reset()
        model = make_model(name, args)
        depth = DepthEngine(model, input_size=(3, args.img_size, args.img_size))
        ideal = FlopIdeal(model, depth, args.img_size)
        inputs = Inputs(args)
        rows = ['none'] + [f'cosub-fixed@{d:g}' for d in drops]
        built, log = watched_tasks(rows, model, depth, ideal, args.batch_size)
        for task in built.values():
            task.compile(backend=counter)
        times, ideals, timer = {r: [] for r in rows}, {r: [] for r in rows}, synced(clock(args), args)
        for index in range(args.compile_steps):
            for row in rows:
                counter.label = row
                start = timer()
                step(built[row], row, inputs, model, args)
                if index:
                    times[row].append(timer() - start)
                ideals[row].append(log.cost() if row != 'none' else 1.0)
        for row in rows:
            ratio, cost = sum(times[row]) / sum(times['none']), statistics.mean(ideals[row])
            print(f'| {name} | {label(row)} | {ratio:.2f} | {cost:.2f} | {ratio / cost:.2f} | '
                  f'{counter.counts.get(row, 0)} | {statistics.mean(times[row]):.2f} |', flush=True)
        print(f'recompile limit hit: {"yes" if counter.hit_limit else "no"}')
        torch._dynamo.reset()


def main():
    args = parse_args()
    (run_compile if args.compile else run_timing)(args)


if __name__ == '__main__':
    main()
