"""A run that diverges stops with exit 3 and saves nothing of it, even when its numbers stay finite, end to end
through train.py: weights beyond ``--divergence-limit`` x their starting scale (at the end of an epoch and before any
checkpoint, recovery files included), a training or evaluation loss that is not finite or beyond the limit x the loss
of a uniform guess; the limit is a checked option a user can loosen."""
import math

import pytest

import train
from train_helpers import last_error_line, make_subset, run_train, train_argv

pytestmark = pytest.mark.usefixtures('single_thread')  # the 2 shared cores are not oversubscribed

PLAIN = ('--epochs', '2', '-b', '8')
DIVERGING = ('--lr', '1e6', '--clip-grad', '1')  # stays finite for an epoch: loss ~1e13, weights ~1e11


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=4, val_per_class=1)


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(('.pth.tar', '.csv'))}


def test_finite_weights_that_blow_up_stop_with_exit_3_and_the_last_good_checkpoint_stays(data, tmp_path, capsys):
    argv = train_argv(data, tmp_path, 'x', *PLAIN)
    run_train(argv + ['--stop-epoch', '1'])
    before = _files(tmp_path / 'x')
    assert train.main(argv + ['--resume', 'auto', '--no-resume-opt', *DIVERGING]) == 3
    line = last_error_line(capsys)
    assert line.startswith('train.py: error: the run diverged: weight ') and ', beyond --divergence-limit 1000 x ' \
        'the largest starting weight (' in line and line.endswith(
            ', at the end of epoch 1: stopped without saving, the run folder keeps its last good checkpoint; lower '
            '--lr (or add --clip-grad), or loosen --divergence-limit')
    assert _files(tmp_path / 'x') == before


def test_no_recovery_file_holds_diverged_weights(data, tmp_path, capsys):
    assert train.main(train_argv(data, tmp_path, 'x', *PLAIN, *DIVERGING, '--recovery-interval', '2')) == 3
    assert ' when saving a checkpoint: stopped without saving' in last_error_line(capsys)
    assert not list((tmp_path / 'x').glob('*.pth.tar'))


def _evaluation_loss(monkeypatch, loss: float):
    evaluate = train.evaluate

    def with_loss(*args, **kwargs):
        metrics = evaluate(*args, **kwargs)
        metrics['loss'] = loss
        return metrics
    monkeypatch.setattr(train, 'evaluate', with_loss)


@pytest.mark.parametrize('loss, said', [(math.nan, 'the evaluation loss is nan after epoch 0'),
                                        (1e5, 'the evaluation loss is 1e+05 after epoch 0, beyond --divergence-limit '
                                              '1000 x 2.3 (the loss of a uniform guess)')], ids=['nan', 'absurd'])
def test_a_non_finite_or_absurd_evaluation_loss_stops_before_the_checkpoint(loss, said, data, tmp_path, capsys,
                                                                            monkeypatch):
    _evaluation_loss(monkeypatch, loss)
    assert train.main(train_argv(data, tmp_path, 'x', *PLAIN)) == 3
    assert last_error_line(capsys).startswith(f'train.py: error: the run diverged: {said}: stopped without saving')
    assert not list((tmp_path / 'x').glob('*.pth.tar'))


def test_a_user_can_loosen_the_limit_and_it_is_checked(data, tmp_path, capsys, monkeypatch):
    _evaluation_loss(monkeypatch, 1e5)
    run = run_train(train_argv(data, tmp_path, 'x', '--divergence-limit', '1e6'))
    assert run.results[0]['validation']['loss'] == 1e5
    assert train.cli(train_argv(data, tmp_path, 'y', '--divergence-limit', '1')) == 2
    assert last_error_line(capsys) == 'train.py: error: --divergence-limit must be > 1, got 1.0'


def test_a_checkpoint_with_diverged_ema_weights_is_refused_and_buffers_are_not_weights():
    import torch
    from subnet.divergence import DivergenceLimit
    from subnet.errors import RunStopped
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    limit = DivergenceLimit.start(1000., model, num_classes=10)
    state = {'state_dict': model.state_dict(), 'state_dict_ema': {k: v.clone() for k, v in model.state_dict().items()}}
    state['state_dict']['1.running_var'] = torch.full((4,), 1e6)  # statistics may be large: not checked
    limit.check_state(state)
    state['state_dict_ema']['0.weight'] = torch.full((4, 4), 2e3)
    with pytest.raises(RunStopped, match=r'the run diverged: the EMA weight 0.weight reaches 2e\+03, beyond '
                                         r'--divergence-limit 1000 x the largest starting weight \(1\), when saving'):
        limit.check_state(state)
