"""What one training step of each method costs, relative to plain training (``--method none``).

For each model it times one step (forward and backward of every pass; no optimizer) of:
  none, cosub (skip, and DeiT's own per-branch mask-multiply drop-path: --cosub-impl timm, and our block-level
  mask mode), st (1 subnet), st++ (6 subnets, smaller inputs, KL-), gkt (3 groups x 2 loops),
in one process, interleaved over the repeats so machine noise hits every row alike. Each row prints the total
time of its timed steps and the peak activation memory as ratios to `none`, next to the FLOP-ideal ratio: the
mean over the same steps (ST's subnets vary a lot from step to step) of what the subnets the steps actually ran
cost (each pass BlockMap.flop_fraction(keep) x (side / crop)^2 of a full pass; cosub: 2 x the rows' mean flop
fraction). Memory is the peak of the bytes autograd keeps alive for backward (distinct storages of saved
tensors, parameters excluded): what a GPU's activation memory would hold. ST and GKT
back-propagate each pass right after its forward, so their peak should stay near plain training's.

    python benchmarks/step_cost.py --threads 1                  # ViT-S and ResNet-50, 224 px, batch 32
    python benchmarks/step_cost.py --img-size 64 --batch-size 8 --repeats 2 --models resnet50   # quick look
"""
import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from subnet.methods import CosubTask, GroupKnowledgeTask, StimulativePlusPlusTask, StimulativeTask  # noqa: E402
from subnet.depth import DepthEngine  # noqa: E402
from subnet.sampling import drop_rates  # noqa: E402

COSUB_DROP = 0.2


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='vit_small_patch16_224,resnet50')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=5, help='timed steps per row (total time compared)')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    parser.add_argument('--methods', default='none,cosub,cosub-timm,cosub-mask,st,st++,gkt')
    return parser.parse_args()


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


def build(method: str, model: nn.Module, depth: DepthEngine):
    common = dict(depth=depth, seed=0)
    if method == 'none':
        return timm.task.ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    if method.startswith('cosub'):
        impl = {'cosub': 'skip', 'cosub-timm': 'timm', 'cosub-mask': 'mask'}[method]
        rates = drop_rates(depth.num_blocks, COSUB_DROP, 'constant') * depth.block_map.skippable
        return CosubTask(model, drop_rate=rates, impl=impl, **common)
    if method == 'st':
        return StimulativeTask(model, nn.CrossEntropyLoss(), **common)
    if method == 'st++':
        return StimulativePlusPlusTask(model, nn.CrossEntropyLoss(), **common)  # ST++'s published defaults
    return GroupKnowledgeTask(model, nn.CrossEntropyLoss(), groups=3, loops=2, drop=0.2, **common)


class Recorder:
    """Records the FLOP-ideal cost of the passes a task runs (wraps the depth engine and the forward)."""

    def __init__(self, task, depth: DepthEngine, crop: int, batch: int):
        self.cost, self.keep, self.depth, self.crop, self.batch = 0.0, None, depth, crop, batch
        subnet, per_sample, forward = depth.subnet, depth.per_sample, task.forward_pass if hasattr(
            task, 'forward_pass') else None

        def recording_subnet(keep, **kwargs):
            self.keep = torch.as_tensor(keep)
            return subnet(keep, **kwargs)

        def recording_per_sample(mask, *args, **kwargs):
            if kwargs.get('mode', 'skip') == 'skip':  # mask mode computes every row of every block
                self.keep = torch.as_tensor(mask)
            return per_sample(mask, *args, **kwargs)

        def recording_forward(x):
            keep = self.keep if self.keep is not None else torch.ones(depth.num_blocks)
            rows = x.shape[0] / self.batch  # 2 for cosub's doubled batch
            self.cost += rows * depth.block_map.flop_fraction(keep) * (x.shape[-1] / self.crop) ** 2
            self.keep = None
            return forward(x)

        depth.subnet, depth.per_sample = recording_subnet, recording_per_sample
        if forward is not None:
            task.forward_pass = recording_forward


def bench_model(name: str, args) -> list:
    torch.manual_seed(0)
    # ViTs as train.py builds them for st++ (dynamic_img_size accepts the subnets' smaller inputs)
    kwargs = dict(img_size=args.img_size, dynamic_img_size=True) if 'vit' in name else {}
    model = timm.create_model(name, **kwargs).train()
    size = (3, args.img_size, args.img_size)
    depth = DepthEngine(model, input_size=size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((args.batch_size,) + size, generator=generator)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    dense = torch.nn.functional.one_hot(labels, 1000).float() * 0.9 + 0.1 / 1000
    methods = args.methods.split(',')
    built = {m: build(m, model, depth) for m in methods}
    recorders = {m: Recorder(t, depth, args.img_size, args.batch_size) for m, t in built.items() if m != 'none'}
    times = {m: [] for m in methods}
    peaks, ideals = {}, {m: [] for m in methods}
    for repeat in range(args.repeats + 1):
        for method in methods:
            task = built[method]
            model.zero_grad(set_to_none=True)
            target = dense if method.startswith('cosub') else labels
            recorder = recorders.get(method)
            if recorder:
                recorder.cost = 0.0
            meter = ActivationPeak(model.parameters())
            start = time.perf_counter()
            with meter():
                result = task(images, target)
                if method == 'none':
                    result['loss'].backward()
            elapsed = time.perf_counter() - start
            if repeat:  # the first round warms up
                times[method].append(elapsed)
                ideals[method].append(recorder.cost if recorder else 1.0)
                peaks[method] = max(peaks.get(method, 0), meter.peak)
    # total time over the same timed steps as the mean ideal: ST's subnets vary a lot from step to step
    base_time, base_peak = sum(times['none']), peaks['none']
    rows = []
    for method in methods:
        ratio = sum(times[method]) / base_time
        ideal = statistics.mean(ideals[method])
        rows.append((name, method, ratio, ideal, peaks[method] / base_peak, statistics.mean(times[method])))
    return rows


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'batch {args.batch_size}, {args.img_size} px, {args.repeats} timed steps (+1 warm-up), '
          f'{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}\n')
    print('| model | method | step time / none | FLOP-ideal | time / ideal | peak activations / none | s/step |')
    print('|---|---|---|---|---|---|---|')
    all_rows = []
    for name in args.models.split(','):
        for model, method, ratio, ideal, memory, seconds in bench_model(name, args):
            all_rows.append((model, method, ratio))
            print(f'| {model} | {method} | {ratio:.2f} | {ideal:.2f} | {ratio / ideal:.2f} | {memory:.2f} | '
                  f'{seconds:.2f} |', flush=True)
    print()
    for model in dict.fromkeys(r[0] for r in all_rows):
        by_method = {m: r for n, m, r in all_rows if n == model}
        if 'cosub' in by_method and 'cosub-timm' in by_method:
            print(f'{model}: cosub skip is {by_method["cosub-timm"] / by_method["cosub"]:.2f}x faster than DeiT\'s '
                  f'per-branch mask-multiply (--cosub-impl timm) at drop rate {COSUB_DROP}')


if __name__ == '__main__':
    main()
