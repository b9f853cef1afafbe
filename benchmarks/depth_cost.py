"""What depth masking costs: forward+backward time and autograd memory of subnets, relative to the full model.

For each model it measures, in one process and interleaved (so machine noise hits every row alike):
  * the full model;
  * per-batch subnets keeping 100% / 75% / 50% of the skippable blocks (a fixed random subset);
  * per-sample keep masks (a constant drop rate on every skippable block, a fresh mask each repeat) in skip mode
    at drop rates 0.05 / 0.2 / 0.45 (cosub's rates for DeiT III ViT-S / B / L), and at 0.2 in mask mode and with
    timm's own DropPath;
  * on models whose blocks have several residual branches (ViT), per-branch masks (attention and MLP drop apart,
    DeiT's stochastic depth) in skip mode at the same rates, with Bernoulli rows and with a fixed count of rows per
    branch, and at 0.2 in mask mode.
Each row prints the median time and the mean autograd-saved memory over the repeats, both as a ratio to the
full model, next to the FLOP-ideal ratio (BlockMap.flop_fraction of the masks actually used). Memory is the bytes
of the distinct tensors autograd saves for backward in that step (saved-tensor hooks; parameters excluded), i.e.
the activation memory held at the end of the forward, which is what dropping blocks can save.

    python benchmarks/depth_cost.py --threads 1          # full settings: ViT-S and ResNet-50, 224 px, batch 32
    python benchmarks/depth_cost.py --img-size 64 --batch-size 8 --repeats 2 --models resnet50   # quick look
    python benchmarks/depth_cost.py --compile-check --img-size 64 --batch-size 4                 # recompile counts
"""
import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import (  # noqa: E402
    CompileCounter, add_common_args, clock, parse_and_setup, print_table_head)
from subnet.depth import DepthEngine  # noqa: E402
from subnet.sampling import ROW_SAMPLINGS, draw_keep, stage_prefix_keep, unit_drop_rates  # noqa: E402

PER_BATCH_KEEP = (1.0, 0.75, 0.5)
PER_SAMPLE_DROP = (0.05, 0.2, 0.45)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_common_args(parser, repeats_help='timed steps per row (median reported)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--compile-check', action='store_true',
                        help='instead of timing, count torch.compile graphs per mode over --compile-steps steps')
    parser.add_argument('--compile-steps', type=int, default=12)
    parser.add_argument('--compile-backend', default='eager', help="'eager' counts dynamo recompiles quickly")
    return parse_and_setup(parser)


class Bench:
    def __init__(self, name, args):
        self.name = name
        torch.manual_seed(args.seed)
        self.model = timm.create_model(name, img_size=args.img_size) if 'vit' in name else timm.create_model(name)
        self.model.train()
        size = (3, args.img_size, args.img_size)
        self.engine = DepthEngine(self.model, input_size=size)
        self.block_map = self.engine.block_map
        generator = torch.Generator().manual_seed(args.seed)
        self.x = torch.randn((args.batch_size,) + size, generator=generator)
        self.target = torch.randint(0, 1000, (args.batch_size,), generator=generator)
        self.batch = args.batch_size
        self.generator = generator
        self.clock = clock(args)

    def step(self, context):
        """One forward+backward inside ``context``: (seconds, bytes of the distinct non-parameter storages autograd
        saved for backward). The counting hook costs the same in every row."""
        param_storages = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in param_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor
        self.model.zero_grad(set_to_none=True)
        start = self.clock()
        with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            torch.nn.functional.cross_entropy(self.model(self.x), self.target).backward()
        return self.clock() - start, sum(saved.values())

    def per_batch_keep(self, fraction):
        skippable = self.block_map.skippable.nonzero().flatten()
        n_drop = round((1 - fraction) * len(skippable))
        order = torch.randperm(len(skippable), generator=torch.Generator().manual_seed(1))
        keep = torch.ones(len(self.block_map), dtype=torch.bool)
        keep[skippable[order[:n_drop]]] = False
        return keep

    @property
    def has_branches(self):
        return any(b.separable for b in self.block_map.blocks)

    def per_sample(self, rate, unit='block', rows='bernoulli', mode='skip'):
        """A fresh mask at DeiT III's constant rate on every skippable block or branch: (context, FLOP ideal)."""
        mask, keep_prob = draw_keep(self.batch, unit_drop_rates(self.block_map, rate, 'constant', unit), rows,
                                    self.generator)
        ideal = self.block_map.flop_fraction(mask, unit) if mode == 'skip' else 1.0
        return self.engine.per_sample(mask, keep_prob, mode=mode, unit=unit), ideal

    def rows(self):
        """(label, make_context() -> (context, flop_fraction)) for every measured row."""
        rows = [('full model', lambda: (contextlib.nullcontext(), 1.0))]
        for fraction in PER_BATCH_KEEP:
            keep = self.per_batch_keep(fraction)
            rows.append((f'per-batch keep {fraction:.2f}',
                         lambda keep=keep: (self.engine.subnet(keep), self.block_map.flop_fraction(keep))))
        for rate in PER_SAMPLE_DROP:
            rows.append((f'per-sample skip, drop {rate:.2f}', lambda rate=rate: self.per_sample(rate)))
        if self.has_branches:
            for sampling in ROW_SAMPLINGS:
                for rate in PER_SAMPLE_DROP:
                    rows.append((f'per-branch skip ({sampling}), drop {rate:.2f}',
                                 lambda rate=rate, sampling=sampling: self.per_sample(rate, 'branch', sampling)))
        rows.append(('per-sample mask, drop 0.20', lambda: self.per_sample(0.2, mode='mask')))
        if self.has_branches:
            rows.append(('per-branch mask, drop 0.20', lambda: self.per_sample(0.2, 'branch', mode='mask')))
        rates = unit_drop_rates(self.block_map, 0.2, 'constant', 'block')
        rows.append(('timm DropPath, drop 0.20', lambda: (self.engine.timm_drop_path(rates), 1.0)))
        return rows


def run_timing(args):
    print_table_head(args, f'batch {args.batch_size}, {args.img_size} px, median of {args.repeats} (+{args.warmup} '
                     f'warm-up) forward+backward steps, fp32, CPU',
                     ('model', 'mode', 'time ms', 'time ratio', 'memory ratio', 'FLOP-ideal ratio', 'time / ideal',
                      'memory / ideal'))
    for name in args.models.split(','):
        bench = Bench(name, args)
        rows = bench.rows()
        times = {label: [] for label, _ in rows}
        memory = {label: [] for label, _ in rows}
        ideals = {label: [] for label, _ in rows}
        for label, make in rows:
            for _ in range(args.warmup):
                bench.step(make()[0])
        for _ in range(args.repeats):
            for label, make in rows:  # interleaved: drift and neighbours' load hit every row alike
                context, ideal = make()
                seconds, saved = bench.step(context)
                times[label].append(seconds)
                memory[label].append(saved)
                ideals[label].append(ideal)
        full_time = statistics.median(times['full model'])
        full_memory = statistics.mean(memory['full model'])
        for label, _ in rows:
            t = statistics.median(times[label]) / full_time
            m = statistics.mean(memory[label]) / full_memory
            ideal = statistics.mean(ideals[label])
            print(f'| {name} | {label} | {1000 * statistics.median(times[label]):.0f} | {t:.3f} | {m:.3f} | '
                  f'{ideal:.3f} | {t / ideal:.3f} | {m / ideal:.3f} |')
        median = {label: statistics.median(values) for label, values in times.items()}
        print(f'| {name} | skip vs mask speed-up at drop 0.20 | | '
              f'{median["per-sample mask, drop 0.20"] / median["per-sample skip, drop 0.20"]:.3f}x | | | | |')
        for sampling in ROW_SAMPLINGS if bench.has_branches else ():
            print(f'| {name} | per-branch skip ({sampling}) vs timm DropPath speed-up at drop 0.20 | | '
                  f'{median["timm DropPath, drop 0.20"] / median[f"per-branch skip ({sampling}), drop 0.20"]:.3f}x '
                  f'| | | | |')
        sys.stdout.flush()


def run_compile_check(args):
    counter = CompileCounter(args.compile_backend)
    print_table_head(args, f'torch.compile (backend {args.compile_backend}) over {args.compile_steps} training steps '
                     f'per mode; graphs = distinct compiled graphs, recompile limit '
                     f'{torch._dynamo.config.recompile_limit}',
                     ('model', 'mode', 'distinct masks', 'graphs compiled', 'hit recompile limit'))
    for name in args.models.split(','):
        bench = Bench(name, args)
        rates = unit_drop_rates(bench.block_map, 0.2, 'constant', 'block')
        modes = {
            'full model only': lambda: (contextlib.nullcontext(), None),
            'per-sample mask (0.2)': lambda: _skip(bench, mode='mask'),
            'timm DropPath (0.2)': lambda: (bench.engine.timm_drop_path(rates), None),
            'per-batch ST prefix (min 1)': lambda: _prefix(bench),
            'per-sample skip (0.2)': lambda: _skip(bench),
            'per-sample skip, fixed rows (0.2)': lambda: _skip(bench, rows='fixed'),
        }
        if bench.has_branches:
            modes.update({f'per-branch skip, {sampling} rows (0.2)': lambda sampling=sampling: _skip(
                bench, unit='branch', rows=sampling) for sampling in ROW_SAMPLINGS})
        for label, make in modes.items():
            torch._dynamo.reset()
            counter.label, counter.hit_limit = label, False
            compiled = torch.compile(bench.model, backend=counter)
            patterns = set()
            for _ in range(args.compile_steps):
                context, pattern = make()
                patterns.add(pattern)
                bench.model.zero_grad(set_to_none=True)
                with context:
                    torch.nn.functional.cross_entropy(compiled(bench.x), bench.target).backward()
            print(f'| {name} | {label} | {len(patterns - {None}) or "-"} | {counter.counts.get(label, 0)} | '
                  f'{"yes" if counter.hit_limit else "no"} |')
            sys.stdout.flush()
        torch._dynamo.reset()


def _skip(bench, mode='skip', unit='block', rows='bernoulli'):
    mask, keep_prob = draw_keep(bench.batch, unit_drop_rates(bench.block_map, 0.2, 'constant', unit), rows,
                                bench.generator)
    return bench.engine.per_sample(mask, keep_prob, mode=mode, unit=unit), tuple(mask.flatten().tolist())


def _prefix(bench):
    keep = stage_prefix_keep(bench.block_map, 1, bench.generator)
    return bench.engine.subnet(keep), tuple(keep.tolist())


def main():
    args = parse_args()
    (run_compile_check if args.compile_check else run_timing)(args)


if __name__ == '__main__':
    main()
