#!/usr/bin/env python3
"""One command that checks a GPU: the CUDA tests, then what a training step of each method costs there.

1. ``pytest -m cuda`` (``tests/test_cuda.py``): every method under CUDA autocast (bf16, and fp16 with timm's
   scaler), exact resume with deterministic algorithms, channels_last through the skip mode, compiled steps with
   Triton, a one-process torchrun with NCCL.
2. ``benchmarks/step_cost.py`` at 224 px in bf16 for ViT-S, ViT-B and ResNet-50: every method eagerly, then the
   compiled plain step against the compiled cosub step (fixed count of rows).
3. A README-ready section with the GPU's name and both tables.

    python benchmarks/gpu_check.py                        # on one GPU, in under 8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny    # without one: the same path at tiny sizes (CI runs it)

Exit status: 0 when the tests passed (or skipped without a GPU) and both tables were measured, 1 otherwise.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_COST = os.path.join(ROOT, 'benchmarks', 'step_cost.py')

FULL = dict(models='vit_small_patch16_224,vit_base_patch16_224,resnet50', img_size=224, batch_size=64, repeats=5,
            compile_models='vit_small_patch16_224,vit_base_patch16_224,resnet50', compile_steps=8,
            compile_backend='inductor')
# tiny: the same code path in seconds on a CPU (the compiled table through dynamo's eager backend)
TINY = dict(models='resnet18', img_size=32, batch_size=2, repeats=1, compile_models='resnet18',
            compile_steps=2, compile_backend='eager')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', help="'cuda' (default) or 'cpu'")
    parser.add_argument('--tiny', action='store_true', help='tiny models and inputs, few steps (CI, no GPU)')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    parser.add_argument('--methods', default='none,cosub,cosub-fixed,cosub-mask,cosub-timm,st,st++,gkt')
    parser.add_argument('--cosub-drops', default='0.1')
    args = parser.parse_args()
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.exit(2, 'gpu_check.py: error: no CUDA device here; use --device cpu --tiny\n')
    return args


def run(cmd, timeout: float) -> tuple:
    """(exit status, stdout) of a command, its stderr passed through; 124 when it ran past ``timeout``."""
    print('$ ' + ' '.join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
    try:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    except subprocess.TimeoutExpired as e:
        return 124, e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
    return done.returncode, done.stdout


def cuda_tests() -> tuple:
    code, out = run([sys.executable, '-m', 'pytest', '-q', '-rs', '-m', 'cuda', 'tests'], timeout=300)
    summary = [line for line in out.splitlines() if line.strip()][-1:] or ['(no output)']
    print(out if code else '\n'.join(summary), flush=True)
    return code in (0, 5), summary[0].strip('= ')  # 5: nothing collected


def step_cost(args, sizes: dict, compiled: bool) -> tuple:
    cmd = [sys.executable, STEP_COST, '--device', args.device, '--amp-dtype', args.amp_dtype,
           '--img-size', str(sizes['img_size']), '--batch-size', str(sizes['batch_size']),
           '--cosub-drops', args.cosub_drops]
    if args.device == 'cpu':
        cmd += ['--threads', '1']
    if compiled:
        cmd += ['--compile', '--models', sizes['compile_models'], '--compile-steps', str(sizes['compile_steps']),
                '--compile-backend', sizes['compile_backend']]
    else:
        cmd += ['--models', sizes['models'], '--methods', args.methods, '--repeats', str(sizes['repeats'])]
    code, out = run(cmd, timeout=240)
    table = [line for line in out.splitlines() if line.startswith('|') or ' torch ' in line]
    print('\n'.join(table), flush=True)
    return code == 0 and len(table) > 2, table


def main() -> int:
    args = parse_args()
    sizes = TINY if args.tiny else FULL
    started = time.perf_counter()
    name = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'CPU (no GPU)'
    print(f'gpu_check on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}', flush=True)
    tests_ok, tests_line = cuda_tests()
    eager_ok, eager = step_cost(args, sizes, compiled=False)
    compiled_ok, compiled = step_cost(args, sizes, compiled=True)
    minutes = (time.perf_counter() - started) / 60
    command = 'python benchmarks/gpu_check.py' + (f' --device {args.device} --tiny' if args.tiny else '')
    print()
    print(f'### gpu_check on {name}{", tiny sizes" if args.tiny else ""}')
    print()
    print(f'`{command}` ({minutes:.1f} min): `pytest -m cuda`: {tests_line}.')
    for table in (eager, compiled):
        print()
        print('\n'.join(table))
    return 0 if tests_ok and eager_ok and compiled_ok else 1


if __name__ == '__main__':
    sys.exit(main())
