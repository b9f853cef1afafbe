"""Helpers for tests that run train.py / validate.py on (a slice of) the shipped Fashion-MNIST subset."""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / 'data' / 'fashion-mnist'

# a slim ResNet-18 (5 skippable blocks) and a 4-block ViT, both fast on the CPU at Fashion-MNIST's 28 px
TINY_RESNET = ['--model', 'resnet18', '--model-kwargs', 'channels=(8,16,32,64)', 'stem_width=8',
               '--img-size', '28', '--num-classes', '10']
TINY_VIT = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'embed_dim=32', 'depth=4', 'num_heads=2',
            'patch_size=7', 'img_size=28', '--img-size', '28', '--num-classes', '10']


def make_subset(dest: Path, train_per_class: int, val_per_class: int) -> Path:
    """Copy the first N images of each class of the shipped data into ``dest`` (same layout)."""
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        for class_dir in sorted((SHIPPED / split).iterdir()):
            target = dest / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(image, target / image.name)
    return dest


def train_argv(data: Path, output: Path, experiment: str, *extra: str, model=TINY_RESNET) -> list:
    """A short CPU run: 1 epoch, no workers (deterministic, fast), small batches."""
    return ['--data-dir', str(data), '--output', str(output), '--experiment', experiment, '--device', 'cpu',
            '--workers', '0', '-b', '16', '--epochs', '1', '--lr', '0.05', '--warmup-epochs', '0',
            '--log-interval', '5', *model, *extra]


def free_port() -> str:
    """A TCP port nobody listens on now (fixed ports collide when two test runs share a machine)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return str(sock.getsockname()[1])


def torchrun(*args: str) -> list:
    """The command line of a 2-process CPU torchrun on a free port."""
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', free_port(),
            *args]


def run_job(cmd: list, env: dict, timeout: float, cwd=ROOT) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``, for jobs that start processes of their own (torchrun
    workers in their own sessions, their loader workers). It waits for ``cmd`` itself, not for whatever still holds
    its output, and a job that outlives ``timeout`` fails the test with what it was doing: every process the job
    started (found by a marker in their environment) prints its Python stacks (tests/ddp_harness.py registers
    faulthandler on SIGUSR2), and the failure shows the process tree and the end of the output."""
    marker = uuid.uuid4().hex
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        job = subprocess.Popen(cmd, env=dict(env, SUBNET_TEST_JOB=marker), cwd=cwd, stdout=out, stderr=err,
                               text=True)
        try:
            job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pids = _marked_processes(marker)
            for pid in pids:  # one at a time, so the stacks come in the process list's order; not torchrun (dies)
                if pid != job.pid:
                    _signal_all([pid], signal.SIGUSR2)
                    time.sleep(0.5)
            tree = subprocess.run(['ps', '-o', 'pid,ppid,stat,etime,args', '-p', ','.join(map(str, pids)) or '0'],
                                  capture_output=True, text=True).stdout
            _signal_all(_marked_processes(marker), signal.SIGKILL)
            job.wait()
            err.seek(0)
            raise AssertionError(f'{" ".join(cmd[:6])} ... still ran after {timeout} s; its processes:\n{tree}\n'
                                 f'the end of its stderr (with their stacks):\n{err.read()[-12000:]}') from None
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, job.returncode, out.read(), err.read())


def _marked_processes(marker: str) -> list:
    found = []
    for entry in Path('/proc').iterdir():
        try:
            if entry.name.isdigit() and f'SUBNET_TEST_JOB={marker}'.encode() in (entry / 'environ').read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def _signal_all(pids: list, signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def method_training(method: str, extra=(), size: int = 64, amp: bool = False):
    """(task, optimizer, args) for ``--method method`` on a slim ResNet-18 (drop-path 0.1) at ``size`` px, built the
    way train.py builds them, for driving ``subnet.loop.train_one_epoch`` directly with a list of batches."""
    import timm
    from subnet.criterion import build_criterion
    from subnet.methods import method_class
    from subnet.timm_options import parse_train_args
    args, _ = parse_train_args(['--method', method, *extra, '--device', 'cpu', '--drop-path', '0.1', '--lr', '0.1',
                                '--img-size', str(size)] + (['--amp'] if amp else []))
    args.prefetcher, args.distributed, args.world_size, args.rank = False, False, 1, 0
    method_class(method).check_args(args)
    torch.manual_seed(0)
    model = timm.create_model('resnet18', channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                              zero_init_last=False, drop_path_rate=args.drop_path)
    criterion = build_criterion(args, 10)
    task = method_class(method).from_args(args, model, criterion, input_size=(3, size, size), verbose=False)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=args.lr, momentum=0.9)
    return task, optimizer, args


def random_batch(method: str, size: int = 64, batch: int = 4, seed: int = 1):
    """Random images and labels (dense, mixup-like targets for cosub)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return images, (0.8 * F.one_hot(labels, 10) + 0.02 if method == 'cosub' else labels)


def run_train(argv):
    import train
    return train.run(argv)


class SignalAt:
    """A training loader that sends real signals to this process as it hands out its ``at``-th batch (counted over
    epochs, from 1): the loop receives them during that batch's step, as from a scheduler. Each signal is sent
    ``pause`` seconds after the previous one was handled (Python runs a handler before the next line)."""

    def __init__(self, loader, at: int, signums, pause: float = 0.):
        self.loader, self.at, self.signums, self.pause, self.handed = loader, at, tuple(signums), pause, 0

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        if name == 'loader':
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            self.handed += 1
            if self.handed == self.at:
                for i, signum in enumerate(self.signums):
                    time.sleep(self.pause if i else 0)
                    os.kill(os.getpid(), signum)
            yield batch


@contextlib.contextmanager
def signal_at_batch(at: int, *signums: int, pause: float = 0.):
    """While in this block, train.py's training loader sends ``signums`` (default SIGTERM; ``pause`` seconds apart)
    at its ``at``-th batch."""
    import train
    build_loaders = train.build_loaders

    def wrapped(*args, **kwargs):
        loaders = build_loaders(*args, **kwargs)
        loaders.train = SignalAt(loaders.train, at, signums or (signal.SIGTERM,), pause)
        return loaders
    train.build_loaders = wrapped
    try:
        yield
    finally:
        train.build_loaders = build_loaders


def state_dict_of(run) -> dict:
    from timm.utils import unwrap_model
    return {k: v.detach().clone() for k, v in unwrap_model(run.task.get_eval_model()).state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


if __name__ == '__main__':  # python tests/train_helpers.py DEST TRAIN_PER_CLASS VAL_PER_CLASS
    make_subset(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))


def broadcast_from_rank0(mask: torch.Tensor) -> torch.Tensor:
    """Rank 0's mask on every rank (a no-op without torch.distributed); NCCL gets a CUDA copy."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mask
    on_cuda = dist.get_backend() == 'nccl'
    buffer = mask.to(torch.uint8)
    buffer = buffer.cuda() if on_cuda else buffer.clone()
    dist.broadcast(buffer, src=0)
    return buffer.to(mask.device).to(mask.dtype)


def last_error_line(capsys) -> str:
    """The last line a script wrote to stderr, after checking that it printed no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and not any('Traceback' in line for line in err), err[-20:]
    return err[-1]
