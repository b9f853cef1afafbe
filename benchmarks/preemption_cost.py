"""What a preemption costs on the quickstart: the stop (finish the step, write the mid-epoch checkpoint) and the
resume (restore the checkpoint, skip the done batches), each in a real train.py process.

Per repeat: a fresh ``train.py -c CONFIG`` run gets SIGTERM after its update ``--at``. Recorded: the time from the
signal to the checkpoint being on disk (the step in progress finished, the file written: what a scheduler's grace
period must cover), to the process's exit (Python's teardown of torch adds seconds that matter to nobody), the
checkpoint write the run logs, and the file's size. Then ``--resume auto`` continues it; what it adds to a fresh
start is restoring the checkpoint (logged by the run) and skipping the done batches at the sampler (no image of
them is read). The time from each process's start to its first training step is printed too (imports and
set-up dominate it). Medians over the repeats.

    python benchmarks/preemption_cost.py                           # the quickstart (hparams/quickstart.yaml)
    python benchmarks/preemption_cost.py --at 80 --repeats 5 --workers 0
"""
import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=str(ROOT / 'hparams' / 'quickstart.yaml'))
    parser.add_argument('--at', type=int, default=40, help='the update of epoch 0 after which SIGTERM is sent')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--workers', type=int, default=None, help="loader workers (default: the config's)")
    return parser.parse_args()


def start(argv, output: str):
    command = [sys.executable, str(ROOT / 'train.py'), *argv, '--output', output, '--log-interval', '1']
    return time.perf_counter(), subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)


def first_step(process, update: int = None):
    """Read the log until the first ``Train:`` line (or the one of ``update``); (its time, the lines read)."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        match = re.match(r'Train: \d+ \[\s*(\d+)/', line)
        if match and (update is None or int(match.group(1)) == update):
            return time.perf_counter(), lines
    raise RuntimeError('train.py ended before its first step:\n' + ''.join(lines[-20:]))


def one_repeat(args, output: str, name: str) -> dict:
    argv = ['-c', args.config, '--experiment', name, '--epochs', '1']
    if args.workers is not None:
        argv += ['--workers', str(args.workers)]
    began, run = start(argv, output)
    first, _ = first_step(run)
    first_step(run, args.at)
    signalled = time.perf_counter()
    run.send_signal(signal.SIGTERM)
    rest = ''
    for line in run.stderr:
        rest += line
        if line.startswith('train.py: stopped'):
            break
    on_disk = time.perf_counter()
    rest += run.stderr.read()
    code = run.wait()
    stopped = time.perf_counter()
    saved = re.search(r'Saved (\S+) \(epoch \d+ after (\d+) batches\) in ([\d.]+) s', rest)
    if code != 143 or saved is None:
        raise RuntimeError(f'expected a saved stop (exit 143), got {code}:\n{rest[-2000:]}')
    began_again, resumed = start(argv + ['--resume', 'auto'], output)
    resumed_first, lines = first_step(resumed)
    resumed.kill()
    resumed.wait()
    resumed.stderr.close()
    restored = re.search(r'Continuing epoch 0 .* checkpoint restored in ([\d.]+) s', ''.join(lines))
    if restored is None:
        raise RuntimeError('the resumed run did not continue mid-epoch:\n' + ''.join(lines[-20:]))
    return {'signal to checkpoint on disk (s)': on_disk - signalled, 'signal to exit (s)': stopped - signalled,
            'checkpoint write (s)': float(saved.group(3)),
            'checkpoint size (MB)': os.path.getsize(saved.group(1)) / 1e6,
            'checkpoint restore on resume (s)': float(restored.group(1)),
            'batches skipped on resume': int(saved.group(2)),
            'fresh start to first step (s)': first - began,
            'resumed start to first step (s)': resumed_first - began_again}


def main():
    args = parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as output:
        for repeat in range(args.repeats):
            rows.append(one_repeat(args, output, f'preempt{repeat}'))
            print(f'repeat {repeat}: ' + ', '.join(f'{k} {v:.3g}' for k, v in rows[-1].items()), flush=True)
    print(f'\nmedians over {len(rows)} repeats ({Path(args.config).name}, SIGTERM after update {args.at}):')
    for key in rows[0]:
        print(f'  {key:<34} {statistics.median(row[key] for row in rows):.3g}')


if __name__ == '__main__':
    main()
