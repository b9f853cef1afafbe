"""torch.compile while the methods train (``--torchcompile``), counted with ``benchmarks/compile_methods.py``.

Dynamo compiles one graph for the full net and one per distinct subnet (the depth engine reuses its slot objects,
so a subnet seen before reuses its graph), never one per step. train.py imports ``timm.optim``, whose kron module
raises dynamo's recompile limit to 1,000,000, so under train.py no subnet is left to run eagerly: every new one
is compiled. The counts are dynamo's decisions (eager backend: fast); one test runs inductor.
"""
import sys
from types import SimpleNamespace

import pytest
import torch

import train  # noqa: F401  train.py's imports, and so its dynamo settings
from train_helpers import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import compile_methods  # noqa: E402


def test_train_py_runs_with_timms_raised_recompile_limit():
    assert torch._dynamo.config.recompile_limit == 1_000_000  # set by timm.optim.kron when train.py imports it


@pytest.mark.parametrize('method', list(compile_methods.METHODS))
def test_dynamo_compiles_the_full_net_and_each_distinct_subnet_once(method, single_thread):
    counts = compile_methods.measure(method, SimpleNamespace(steps=4, backend='eager', img_size=64, batch_size=4))
    assert counts['breaks'] == 0 and counts['graphs'] == counts['frames'] and not counts['limit']
    if method in ('none', 'cosub'):
        # cosub under --torchcompile skips dropped rows, a fixed count per branch: the shapes never change, so one
        # graph serves every draw
        assert counts['frames'] == 1 and counts['subnets'] == (4 if method == 'cosub' else 0)
        assert (counts['impl'], counts['rows']) == (('skip', 'fixed') if method == 'cosub' else ('', ''))
    else:
        assert counts['frames'] == 1 + counts['subnets'] and counts['subnets'] > 1


def test_inductor_compiles_cosub_fixed_count_skip_once_forward_and_backward(single_thread):
    counts = compile_methods.measure('cosub', SimpleNamespace(steps=2, backend='inductor', img_size=64, batch_size=4))
    assert counts['frames'] == counts['graphs'] == 1 and counts['subnets'] == 2
