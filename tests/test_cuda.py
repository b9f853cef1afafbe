"""What only a GPU can check (``pytest -m cuda``; ``benchmarks/gpu_check.py`` runs them first): every method under
CUDA autocast, exact resume with deterministic algorithms, channels_last through the skip mode, compiled steps with
Triton, a one-process torchrun with NCCL. Without CUDA each test skips, saying so."""
import os
import subprocess
import sys

import pytest
import timm
import torch

from subnet.depth import DepthEngine
from train_helpers import (ROOT, TINY_RESNET, TINY_VIT, assert_same_weights, free_port, make_subset, run_train,
                           train_argv)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (torch.cuda.is_available() '
                                                                       'is False on this machine)')]

METHODS = {
    'none': [],
    'cosub': ['--method', 'cosub', '--mixup', '0.2', '--drop-path', '0.1'],
    'st': ['--method', 'st'],
    'st++': ['--method', 'st++', '--st-subnets', '2', '--st-min-keep', '1'],
    'gkt': ['--method', 'gkt', '--gkt-groups', '2', '--gkt-loops', '1'],
}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=8, val_per_class=4)


def cuda_argv(data, tmp_path, name, *extra, model=TINY_RESNET):
    argv = train_argv(data, tmp_path, name, *extra, model=model)
    argv[argv.index('--device') + 1] = 'cuda'
    return argv


def last_weights(folder):
    return torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']


@pytest.mark.parametrize('amp_dtype', ['bfloat16', 'float16'])
@pytest.mark.parametrize('method', list(METHODS))
def test_every_method_trains_under_cuda_autocast(method, amp_dtype, data, tmp_path):
    """float16 goes through timm's NativeScaler, bfloat16 without a scaler, as timm's train.py does."""
    run = run_train(cuda_argv(data, tmp_path, 'amp', *METHODS[method], '--amp', '--amp-dtype', amp_dtype,
                              '-b', '8', model=TINY_VIT))
    train = run.results[-1]['train']
    assert torch.isfinite(torch.tensor(train['loss'])), train
    weights = last_weights(tmp_path / 'amp')
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def deterministic_train(argv):
    """train.py in a fresh process with deterministic CUDA algorithms (cuBLAS needs its workspace setting before
    its first handle)."""
    # train.py turns on cudnn.benchmark (timm's speed setting), whose algorithm choice may differ between runs
    code = ('import sys, torch; torch.use_deterministic_algorithms(True); import train, subnet.device; '
            'subnet.device._fast_cuda_math = lambda: None; sys.exit(train.cli(sys.argv[1:]))')
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=':4096:8', PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, '-c', code, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize('method', ['cosub', 'st'])
def test_resume_on_cuda_with_deterministic_algorithms_is_bit_for_bit(method, data, tmp_path):
    # cosub: skip pinned; auto could choose differently in two runs that time the steps apart
    flags = METHODS[method] + (['--cosub-impl', 'skip'] if method == 'cosub' else [])
    extra = (*flags, '--epochs', '2', '-b', '8')
    deterministic_train(cuda_argv(data, tmp_path, 'straight', *extra))
    deterministic_train(cuda_argv(data, tmp_path, 'split', *extra, '--resume', 'auto', '--stop-epoch', '1'))
    deterministic_train(cuda_argv(data, tmp_path, 'split', *extra, '--resume', 'auto'))
    assert_same_weights(last_weights(tmp_path / 'straight'), last_weights(tmp_path / 'split'))


def test_channels_last_through_the_skip_mode_equals_the_mask_mode_and_keeps_the_layout():
    torch.manual_seed(0)
    model = timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                              drop_path_rate=0.1).cuda().to(memory_format=torch.channels_last).train()
    depth = DepthEngine(model, input_size=(3, 32, 32))
    x = torch.randn(8, 3, 32, 32, device='cuda').to(memory_format=torch.channels_last)
    keep = torch.rand(8, depth.num_blocks, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[:, [not b.skippable for b in depth.block_map.blocks]] = True
    layouts, outputs = [], {}
    hook = depth.block_map.blocks[-1].module.register_forward_hook(
        lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    for mode in ('skip', 'mask'):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), depth.per_sample(keep, 0.8, mode=mode):
            outputs[mode] = model(x)
    hook.remove()
    torch.testing.assert_close(outputs['skip'], outputs['mask'], rtol=1e-4, atol=1e-5)
    assert layouts == [True, True]


@pytest.mark.parametrize('method', ['cosub', 'st'])
def test_compiled_steps_with_triton(method, data, tmp_path):
    """cosub (skip, fixed count: the whole model, one graph) and st (each block) compiled by inductor for CUDA."""
    import torch._inductor.compile_fx as inductor
    compilations = []
    compile_fx = inductor.compile_fx

    def counting_compile_fx(graph_module, example_inputs, *args, **kwargs):
        compilations.append(len(graph_module.graph.nodes))
        return compile_fx(graph_module, example_inputs, *args, **kwargs)

    flags = METHODS[method] + (['--cosub-impl', 'skip'] if method == 'cosub' else [])
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inductor, 'compile_fx', counting_compile_fx)
        run = run_train(cuda_argv(data, tmp_path, 'compiled', *flags, '--torchcompile', '--val-split', '', '-b', '16',
                                  model=TINY_VIT))
    torch._dynamo.reset()
    assert run.task.step == 5 and torch.isfinite(torch.tensor(run.results[-1]['train']['loss']))
    if method == 'cosub':
        assert len(compilations) == 1
    else:
        assert 0 < len(compilations) <= 24  # per block class and variant, not per subnet


NCCL_PROBE = """
import os, torch, torch.distributed as dist
dist.init_process_group('nccl')
device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
torch.cuda.set_device(device)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2).to(device), device_ids=[device])
model(torch.ones(3, 4, device=device)).sum().backward()
total = torch.ones(1, device=device)
dist.all_reduce(total)
print('backend', dist.get_backend(), 'world', dist.get_world_size(), 'sum', int(total.item()),
      'grad', bool(model.module.weight.grad.abs().sum() > 0))
dist.destroy_process_group()
"""


def torchrun_one(*command):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port', free_port(),
           *command]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_one_process_torchrun_with_nccl(data, tmp_path):
    """timm trains one torchrun process without a process group (WORLD_SIZE 1), so NCCL is checked on its own:
    a process group, a DDP backward and an all-reduce; then train.py itself under torchrun on the GPU."""
    out = torchrun_one('--no-python', sys.executable, '-c', NCCL_PROBE)
    assert 'backend nccl world 1 sum 1 grad True' in out
    log = torchrun_one(str(ROOT / 'train.py'), *cuda_argv(data, tmp_path, 'torchrun', *METHODS['st'], '-b', '8'))
    assert 'Training with a single process on 1 device (cuda' in log
    assert (tmp_path / 'torchrun' / 'last.pth.tar').exists()
