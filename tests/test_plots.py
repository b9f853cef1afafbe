"""subnet.plots: summary.png, the subnet plot, TensorBoard scalars, and runs without matplotlib / tensorboard."""
import csv
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
import validate
from subnet import plots
from train_helpers import make_subset, run_train, train_argv

EPOCHS = 5


def _write_summary(folder: Path, ema=True, evaluation=True) -> Path:
    """A summary.csv as train.py writes it for an ST run (loss parts, subnet FLOPs, --subnet-eval, EMA)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for epoch in range(EPOCHS):
        row = {'epoch': epoch, 'train_loss': 2.3 - 0.3 * epoch}
        if evaluation:
            row.update(eval_loss=2.2 - 0.25 * epoch, eval_top1=20 + 10 * epoch, eval_top5=60 + 5 * epoch)
        row.update(lr=0.1 * (1 - epoch / EPOCHS), train_st_label=1.5 - 0.2 * epoch, train_st_kl=0.8 - 0.1 * epoch,
                   train_st_subnet_flops=0.6)
        if evaluation and ema:
            row.update(model_loss=2.25 - 0.25 * epoch, model_top1=18 + 10 * epoch, model_top5=58 + 5 * epoch)
        if evaluation:
            row.update({'subnet_prefix0.5_top1': 10 + 9 * epoch, 'subnet_first3_top1': 12 + 8 * epoch})
        rows.append(row)
    with open(folder / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _check_png(path, min_width=600, min_height=300):
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.width >= min_width and image.height >= min_height
        assert len(image.convert('RGB').getcolors(maxcolors=1 << 20)) > 20  # something is drawn


def test_summary_png_has_a_panel_per_quantity(tmp_path):
    folder = _write_summary(tmp_path / 'run')
    path = plots.plot_summary(str(folder / 'summary.csv'))
    assert path == str(folder / 'summary.png')
    _check_png(path, min_width=4 * 500)  # losses, top-1, subnet top-1, learning rate
    plain = _write_summary(tmp_path / 'plain', ema=False, evaluation=False)
    _check_png(plots.plot_summary(str(plain)), min_width=3 * 500)


def test_plot_summary_option_draws_and_exits_without_training(tmp_path, capsys):
    folder = _write_summary(tmp_path / 'run')
    assert train.main(['--plot-summary', str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ['summary.csv', 'summary.png']
    _check_png(folder / 'summary.png')
    assert capsys.readouterr().err.strip() == f'Wrote {folder / "summary.png"}'
    assert train.cli(['--plot-summary', str(tmp_path / 'nowhere')]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f'train.py: error: --plot-summary {tmp_path / "nowhere"}: no summary.csv there '
                     f'(give a run folder or its summary.csv)']


def test_subnet_plot_of_two_checkpoints(tmp_path):
    def rows(shift):
        return ([{'subnet': 'full', 'flop_fraction': 1.0, 'top1': 80 + shift}]
                + [{'subnet': f'prefix{f}', 'flop_fraction': f, 'top1': 40 + 40 * f + shift} for f in (0.3, 0.6)]
                + [{'subnet': f'random0.2_{i}', 'flop_fraction': 0.8, 'top1': 60 + i + shift} for i in (1, 2)]
                + [{'subnet': 'first4', 'flop_fraction': 0.4, 'top1': 30 + shift}])
    path = plots.plot_subnets([('baseline', rows(0)), ('st', rows(5))], str(tmp_path / 'subnets.png'))
    _check_png(path, min_height=400)


def test_curve_labels_are_run_folders_or_checkpoint_names():
    assert plots.run_labels(['out/a/model_best.pth.tar', 'out/b/model_best.pth.tar']) == ['a', 'b']
    assert plots.run_labels(['out/a/checkpoint-1.pth.tar', 'out/a/last.pth.tar']) == ['checkpoint-1', 'last']
    assert plots.run_labels(['x/a/last.pth.tar', 'x/a/best.pth', 'y/b/last.pth.tar']) == \
        ['a/last', 'a/best', 'b/last']


def test_tensorboard_log_writes_the_rows_numbers(monkeypatch, tmp_path):
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(('dir', log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append('closed')

    fake = types.ModuleType('torch.utils.tensorboard')
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', fake)
    log = plots.TensorBoardLog.open(str(tmp_path / 'tb'))
    log.log(3, {'epoch': 3, 'train_loss': 1.5, 'eval_top1': 40.0, 'lr': 0.1, 'subnet_first2_top1': 30.0})
    log.close()
    assert calls == [('dir', str(tmp_path / 'tb')), ('train_loss', 1.5, 3), ('eval_top1', 40.0, 3),
                     ('lr', 0.1, 3), ('subnet_first2_top1', 30.0, 3), 'closed']


# ---------------------------------------------------------------------------------------------- missing packages

@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` now raises ImportError


@pytest.fixture
def no_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorboard', None)
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)


def test_pictures_asked_for_without_matplotlib_are_one_line_and_exit_2(no_matplotlib, tmp_path, capsys):
    folder = _write_summary(tmp_path / 'run')
    assert train.cli(['--plot-summary', str(folder)]) == 2
    assert validate.cli(['--checkpoint', str(tmp_path / 'no.pth.tar'), '--subnets', 'prefix:0.5',
                          '--plot', str(tmp_path / 'x.png')]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'train.py: error: --plot-summary needs matplotlib, which is not installed: pip install matplotlib',
        'validate.py: error: --plot needs matplotlib, which is not installed: pip install matplotlib']
    assert not (folder / 'summary.png').exists()


def test_tensorboard_missing_is_one_warning(no_tensorboard, tmp_path, caplog):
    assert plots.TensorBoardLog.open(str(tmp_path)) is None
    assert caplog.messages == ['--log-tensorboard: tensorboard is not installed, metrics are not logged to it '
                               '(pip install tensorboard)']


def test_training_runs_without_matplotlib_and_tensorboard(no_matplotlib, no_tensorboard, tmp_path, caplog):
    data = make_subset(tmp_path / 'data', train_per_class=16, val_per_class=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.WARNING):
            result = run_train(train_argv(data, tmp_path, 'bare', '--log-tensorboard'))
    finally:
        torch.set_num_threads(threads)
    folder = Path(result.output_dir)
    assert (folder / 'summary.csv').is_file() and (folder / 'last.pth.tar').is_file()
    assert not (folder / 'summary.png').exists() and not (folder / 'tensorboard').exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 'summary.png not written: matplotlib is not installed (pip install matplotlib)' in warnings
    assert any('pip install tensorboard' in w for w in warnings)


def test_the_loss_panel_draws_the_declared_loss_parts_and_no_cost_or_counter(tmp_path):
    """summary.png knows each column from the methods' declarations (subnet/results.py), not from its name."""
    from matplotlib.figure import Figure
    import subnet.methods  # noqa: F401  (registers the built-in methods and their result parts)
    columns = {'epoch': [0, 1], 'train_loss': [2.0, 1.5], 'train_st_label': [1.2, 1.0], 'train_st_kl': [0.8, 0.5],
               'train_st_subnet_flops': [0.6, 0.6], 'train_nonfinite_steps': [1, 0], 'train_overflow_steps': [0, 2],
               'train_made_up_part': [0.3, 0.2], 'eval_loss': [2.1, 1.6]}
    losses = plots.SUMMARY_PANELS[0]
    assert losses.title == 'Losses'
    ax = Figure().add_subplot()
    losses.draw(ax, columns['epoch'], columns)
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ['train loss', 'st label', 'st kl', 'eval loss']
