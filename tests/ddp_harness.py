"""Run train.py under torchrun and save every rank's final weights, so tests can compare ranks.

    torchrun --nproc_per_node 2 tests/ddp_harness.py OUT_DIR -- <train.py arguments>

With SUBNET_COUNT_ALLREDUCE=1 it also counts the gradient all-reduces DDP issues (one call per bucket per
synchronised backward) and writes them to OUT_DIR/allreduce<rank>.json. With
SUBNET_SIGNAL_AT=RANK:BATCH[:SIG,...[:PAUSE]], that rank's training loader sends itself the signals (names such as
SIGINT, PAUSE seconds apart; default SIGTERM) as it hands out its BATCH-th batch (counted from 1, over epochs; 0:
never), and every rank's exit status goes to OUT_DIR/exit<rank>.txt; under torchrun's restarts
(TORCHELASTIC_RESTART_COUNT), only in the first attempt: a restarted one trains and saves its weights.
Without torchrun (no RANK in the environment) it is one process, rank 0. SIGUSR2 prints every thread's stack
(train_helpers.run_job asks for them when a job hangs).
"""
import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

import torch
from timm.task import ClassificationTask
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402
from train_helpers import run_train, signal_at_batch, state_dict_of  # noqa: E402

ALLREDUCE_CALLS = [0]


def count_allreduces() -> None:
    prepare = ClassificationTask.prepare_distributed

    def counting_prepare(self, *args, **kwargs):
        result = prepare(self, *args, **kwargs)

        def hook(state, bucket):
            ALLREDUCE_CALLS[0] += 1
            return default_hooks.allreduce_hook(state, bucket)
        self.trainable_module.register_comm_hook(None, hook)
        return result
    ClassificationTask.prepare_distributed = counting_prepare


if __name__ == '__main__':
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a test that times out asks for the stacks
    out = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index('--') + 1:]
    rank = int(os.environ.get('RANK', 0))
    if os.environ.get('SUBNET_COUNT_ALLREDUCE'):
        count_allreduces()
    if os.environ.get('SUBNET_SIGNAL_AT') and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0':
        signal_rank, batch, *rest = os.environ['SUBNET_SIGNAL_AT'].split(':')
        signums = [signal.Signals[name] for name in (rest[0].split(',') if rest else ['SIGTERM'])]
        with signal_at_batch(int(batch) if rank == int(signal_rank) else 0, *signums,
                             pause=float(rest[1]) if len(rest) > 1 else 0.):
            code = train.cli(argv)
        (out / f'exit{rank}.txt').write_text(str(code))
        sys.exit(code)
    run = run_train(argv)
    torch.save(state_dict_of(run), out / f'rank{rank}.pt')
    if os.environ.get('SUBNET_COUNT_ALLREDUCE'):
        (out / f'allreduce{rank}.json').write_text(json.dumps({'allreduce_calls': ALLREDUCE_CALLS[0]}))
