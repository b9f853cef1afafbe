"""Run train.py under torchrun and save every rank's final weights, so tests can compare ranks.

    torchrun --nproc_per_node 2 tests/ddp_harness.py OUT_DIR -- <train.py arguments>
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_helpers import run_train, state_dict_of  # noqa: E402

if __name__ == '__main__':
    out = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index('--') + 1:]
    rank = int(os.environ['RANK'])
    run = run_train(argv)
    torch.save(state_dict_of(run), out / f'rank{rank}.pt')
