"""``--cosub-impl auto``: skip or mask, whichever the first steps measure faster; the choice survives a resume."""
import pytest
import timm
import torch
import torch.nn.functional as F

from subnet import fastest
from subnet.sampling import drop_rates
from subnet.depth import DepthEngine
from subnet.methods.cosub import CosubTask
from train_helpers import assert_same_weights, make_subset, run_train, state_dict_of, train_argv

COSUB = ('--method', 'cosub', '--mixup', '0.2', '--drop-path', '0.1')


class StepCost:
    """A clock that advances only when a cosub step enters its depth context, by what that implementation is
    said to cost (``DepthEngine.per_sample``'s mode): the measured times are known in advance."""

    def __init__(self, skip: float, mask: float):
        self.cost = {'skip': skip, 'mask': mask}
        self.now = 0.0
        self.modes = []

    def __call__(self) -> float:
        return self.now

    def install(self, monkeypatch) -> None:
        per_sample = DepthEngine.per_sample

        def timed_per_sample(engine, keep_mask, keep_prob=None, *, mode='skip', **kwargs):
            self.now += self.cost[mode]
            self.modes.append(mode)
            return per_sample(engine, keep_mask, keep_prob, mode=mode, **kwargs)
        monkeypatch.setattr(DepthEngine, 'per_sample', timed_per_sample)


def tiny_cosub(clock):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=28, patch_size=7, embed_dim=32, depth=4, num_heads=2,
                              num_classes=10, drop_path_rate=0.1)
    depth = DepthEngine(model, input_size=(3, 28, 28))
    rates = drop_rates(depth.num_blocks, 0.3, 'constant') * depth.block_map.skippable
    return CosubTask(model, depth, rates, impl='auto', impl_clock=clock).train()


def steps(task, count):
    g = torch.Generator().manual_seed(1)
    for _ in range(count):
        images, labels = torch.randn(4, 3, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
        task(images, 0.8 * F.one_hot(labels, 10) + 0.02)


@pytest.mark.parametrize('skip,mask,faster', [(2.0, 3.0, 'skip'), (3.0, 2.0, 'mask')])
def test_auto_keeps_the_implementation_measured_faster_and_logs_both_times_once(skip, mask, faster, monkeypatch,
                                                                               caplog):
    clock = StepCost(skip, mask)
    clock.install(monkeypatch)
    task = tiny_cosub(clock)
    trial = task.impl_choice.trial_steps
    assert trial == 8  # 1 warm-up and 3 timed steps of each, alternating
    with caplog.at_level('INFO', logger='train'):
        steps(task, trial + 3)
    assert clock.modes == ['skip', 'mask'] * 4 + [faster] * 3
    assert task.impl_choice.choice == faster
    assert task.impl_choice.times == {'skip': [skip] * 3, 'mask': [mask] * 3}  # the warm-up steps are not timed
    lines = [r.getMessage() for r in caplog.records if '--cosub-impl auto' in r.getMessage()]
    assert lines == [f'--cosub-impl auto: median step time after 1 warm-up step(s) each, over 3 step(s) each: '
                     f'skip {skip * 1000:.1f} ms, mask {mask * 1000:.1f} ms; using {faster}']


def test_a_restored_choice_is_kept_without_measuring_again(monkeypatch):
    clock = StepCost(skip=3.0, mask=2.0)
    clock.install(monkeypatch)
    task = tiny_cosub(clock)
    steps(task, 8)
    state = task.get_task_state()
    assert state['cosub_impl']['choice'] == 'mask'
    clock.cost = {'skip': 1.0, 'mask': 9.0}  # another machine, where skipping would win
    restored = tiny_cosub(clock)
    restored.load_task_state(state)
    clock.modes.clear()
    steps(restored, 3)
    assert clock.modes == ['mask'] * 3 and restored.impl_choice.times == task.impl_choice.times
    mid_trial = tiny_cosub(clock)
    mid_trial.load_task_state({'step': 3, 'cosub_impl': {'choice': None, 'steps': 3, 'times': {'skip': [],
                                                                                              'mask': []}}})
    assert mid_trial.impl_choice.current() == 'mask'  # the trial goes on where it stopped: step 4 times mask
    with pytest.raises(ValueError, match='chose'):
        tiny_cosub(clock).load_task_state({'step': 8, 'cosub_impl': {'choice': 'timm'}})


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=8, val_per_class=2)


def test_train_py_auto_chooses_in_the_first_epoch_and_a_resumed_run_keeps_it_bit_for_bit(data, tmp_path,
                                                                                        monkeypatch, caplog):
    """10 steps an epoch: the trial's 8 steps end in epoch 0; epoch 1 runs the choice, also after --resume."""
    clock = StepCost(skip=3.0, mask=2.0)
    clock.install(monkeypatch)
    monkeypatch.setattr(fastest, 'default_clock', clock)
    extra = (*COSUB, '--epochs', '2', '-b', '8')
    straight = run_train(train_argv(data, tmp_path, 'straight', *extra))
    assert straight.task.impl_choice.choice == 'mask' and straight.task.step == 20
    run_train(train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto', '--stop-epoch', '1'))
    clock.cost = {'skip': 1.0, 'mask': 9.0}  # a new trial would choose skip
    clock.modes.clear()
    with caplog.at_level('INFO', logger='train'):
        resumed = run_train(train_argv(data, tmp_path, 'split', *extra, '--resume', 'auto'))
    assert clock.modes == ['mask'] * 10
    assert any(r.getMessage() == '--cosub-impl auto: mask, as the checkpoint chose' for r in caplog.records)
    assert_same_weights(state_dict_of(straight), state_dict_of(resumed))


def _decide_on_rank(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    choice = fastest.FastestChoice(('skip', 'mask'), warmup=0, trials=1, verbose=False)
    # rank 0 measured mask faster, rank 1 skip: every rank must run rank 0's choice
    choice.times = {'skip': [2.0], 'mask': [1.0]} if rank == 0 else {'skip': [1.0], 'mask': [2.0]}
    decided = choice.decide()
    with open(f'{results}.{rank}', 'w') as f:
        f.write(decided)
    dist.destroy_process_group()


def test_rank_zeros_choice_is_broadcast_to_every_rank(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_decide_on_rank, args=(str(tmp_path / 'init'), str(tmp_path / 'choice')), nprocs=2)
    assert [(tmp_path / f'choice.{rank}').read_text() for rank in (0, 1)] == ['mask', 'mask']
