"""``benchmarks/gpu_check.py --device cpu --tiny``: the GPU check's whole path without a GPU (its CUDA tests skip)."""
import re
import subprocess
import sys

from train_helpers import ROOT


def test_gpu_check_runs_through_on_the_cpu_at_tiny_sizes():
    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_check.py'), '--device', 'cpu', '--tiny'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = done.stdout.split('### gpu_check on CPU (no GPU), tiny sizes', 1)[1]
    skipped = re.search(r'`pytest -m cuda`: (\d+) skipped, \d+ deselected', report)  # collected, none ran here
    assert skipped and int(skipped.group(1)) >= 10
    for row in ('none', 'cosub (branch skip, bernoulli), drop 0.1', 'cosub-mask (branch mask), drop 0.1', 'st',
                'st++', 'gkt'):
        assert f'| resnet18 | {row} |' in report
    assert 'torch.compile (eager)' in report and '| resnet18 | cosub-fixed (branch skip, fixed count), drop 0.1 |' \
        in report
