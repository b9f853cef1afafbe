"""Pictures of runs and subnets (matplotlib) and TensorBoard scalars; both packages are optional.

- ``plot_subnets``: top-1 against FLOPs, one colour per checkpoint (``validate.py --subnets SPEC --plot``);
- ``plot_summary``: loss, top-1 and learning rate of a run against epoch (``summary.png`` beside ``summary.csv``),
  one ``Panel`` per entry of ``SUMMARY_PANELS`` (a new picture of a run is one more entry);
- ``TensorBoardLog``: the summary row's scalars per epoch (``train.py --log-tensorboard``).

A missing package is one line saying what to install: ``MissingPackage`` (an InputError) where the picture was
the point of the command, a warning where it is a by-product of training. Figures are drawn on matplotlib's
object API (``Figure`` + Agg canvas), never pyplot, so no GUI backend or global figure state is involved.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .errors import InputError
from .results import LOSS, result_part
from .spec import FULL_STYLE, PlotStyle, kind_of, spec_kind, spec_kinds

__all__ = ['MissingPackage', 'require_matplotlib', 'check_figure_path', 'plot_subnets', 'run_labels',
           'Panel', 'SUMMARY_PANELS', 'plot_summary', 'summary_paths', 'summary_after_training', 'TensorBoardLog']

_logger = logging.getLogger('train')

class MissingPackage(InputError):
    """An optional package a picture or log needs is not installed."""


def require_matplotlib(what: str):
    """matplotlib's ``Figure`` class, or MissingPackage naming ``what`` needed it and how to install it."""
    try:
        import matplotlib  # noqa: F401  (the package first: its submodules may be cached while it is not)
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingPackage(f'{what} needs matplotlib, which is not installed: pip install matplotlib') from None
    return Figure


def check_figure_path(path: str, what: str) -> None:
    """Stop before any work when the picture could not be written: no matplotlib, no folder, unknown format."""
    require_matplotlib(what)
    from matplotlib.backend_bases import FigureCanvasBase
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f'{what} {path}: folder {folder} does not exist')
    suffix = os.path.splitext(path)[1].lstrip('.').lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise InputError(f'{what} {path}: the file name must end in one of '
                         + ', '.join(f'.{f}' for f in sorted(formats)) + ' (e.g. .png)')


def _save(figure, path: str) -> str:
    """Written under a temporary name (with the same suffix: matplotlib picks the format from it), then renamed."""
    root, suffix = os.path.splitext(path)
    tmp = f'{root}.tmp{suffix}'
    figure.savefig(tmp)
    os.replace(tmp, path)
    return path


def _colours(count: int) -> list:
    from matplotlib import colormaps
    palette = colormaps['tab10'].colors if count <= 10 else colormaps['tab20'].colors
    return [palette[i % len(palette)] for i in range(count)]


# ------------------------------------------------------------------------------------------------ subnets

def run_labels(checkpoints: Sequence[str]) -> List[str]:
    """Short unique curve labels: the run folder's name, the file's name where runs share a folder."""
    paths = [os.path.abspath(c) for c in checkpoints]
    folders = [os.path.basename(os.path.dirname(p)) for p in paths]
    stems = [os.path.basename(p).split('.')[0] for p in paths]
    if len(set(folders)) == len(paths):
        return folders
    if len(set(folders)) == 1:
        return stems
    return [f'{f}/{s}' for f, s in zip(folders, stems)]


def _kind_style(kind: str) -> PlotStyle:
    return FULL_STYLE if kind == 'full' else spec_kind(kind).style


def _draw_curve(ax, points: Dict[str, List[Tuple[float, float]]], colour) -> None:
    """One checkpoint's subnets: each line kind (``PlotStyle.line``) joined to the full net, the point kinds as
    points, the full net as a labelled star."""
    full = points.get('full', [])
    line_kinds = [k for k in points if k != 'full' and _kind_style(k).line is not None]
    for kind in line_kinds:
        style = _kind_style(kind)
        xy = sorted(points[kind] + full)
        ax.plot([x for x, _ in xy], [y for _, y in xy], linestyle=style.line, marker=style.marker, color=colour,
                markersize=5, linewidth=1.6)
    for kind in (k for k in points if k != 'full' and k not in line_kinds):
        ax.scatter([x for x, _ in points[kind]], [y for _, y in points[kind]], marker=_kind_style(kind).marker,
                   color=colour, s=30, linewidths=1.2, alpha=0.8)
    for x, y in full:
        ax.scatter([x], [y], marker=FULL_STYLE.marker, s=220, color=colour, edgecolors='black', linewidths=0.8,
                   zorder=5)
        ax.annotate(f'{y:.1f}', (x, y), textcoords='offset points', xytext=(-8, 9), ha='right', fontsize=9,
                    color=colour, fontweight='bold')


def _kind_legend(kinds_seen: set) -> list:
    """One legend entry per kind drawn: line kinds first, then point kinds, then the full net."""
    from matplotlib.lines import Line2D
    kinds = [k.name for k in spec_kinds()]
    ordered = [k for k in kinds if _kind_style(k).line is not None] + \
              [k for k in kinds if _kind_style(k).line is None] + ['full']
    return [Line2D([], [], color='0.35', marker=_kind_style(k).marker, linestyle=_kind_style(k).line or 'none',
                   markersize=12 if k == 'full' else 6, label=_kind_style(k).legend)
            for k in ordered if k in kinds_seen]


# --plot-x: what a row's cost is on the x-axis (a fraction of the full net's) and how the axis is labelled
_X_AXES = {
    'flops': (lambda row: float(row.get('flop_fraction', 1.0)), 'FLOPs (% of the full network)'),
    # validate.py --export's timing: time per image is the inverse of the speed-up
    'latency': (lambda row: 1.0 / float(row.get('speedup', 1.0)), 'measured time per image (% of the full network)'),
}


_METRIC_LABELS = {'top1': 'Top-1 accuracy (%)', 'map': 'mAP (%)'}


def _row_metric(row: dict) -> str:
    """A validate.py row's task metric: top1, or map for multi-label."""
    return 'map' if 'map' in row else 'top1'


def _column_metric(columns: Dict[str, List[float]]) -> str:
    """summary.csv's task metric: top1, or map for a multi-label run (eval_map)."""
    return 'map' if 'eval_map' in columns else 'top1'


def plot_subnets(curves: Sequence[Tuple[str, Sequence[dict]]], path: str, title: Optional[str] = None,
                 x: str = 'flops') -> str:
    """Top-1 (%) against cost (% of the full net), one colour per ``(label, result rows)``.

    Rows are validate.py's (``subnet``, ``top1`` and ``flop_fraction``, or ``speedup`` for ``x='latency'``;
    ``x`` is ``--plot-x``). Each SPEC kind is drawn as its
    ``PlotStyle`` says (``subnet/spec.py``): stage-prefix and first-k subnets are joined into curves ending at
    the full net (a star); random subsets are crosses.
    """
    if x not in _X_AXES:
        raise ValueError(f"plot_subnets: x must be one of {', '.join(_X_AXES)}, not {x!r}")
    cost, x_label = _X_AXES[x]
    Figure = require_matplotlib('--plot')
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(8.5, 5), dpi=150, layout='constrained')
    ax = figure.add_subplot()
    kinds_seen = set()
    curve_handles = []
    for (label, rows), colour in zip(curves, _colours(len(curves))):
        points: Dict[str, List[Tuple[float, float]]] = {}
        for row in rows:
            kind = kind_of(row.get('subnet', 'full'))
            points.setdefault(kind, []).append((100 * cost(row), float(row[_row_metric(row)])))
        _draw_curve(ax, points, colour)
        kinds_seen.update(points)
        curve_handles.append(Line2D([], [], color=colour, linewidth=3, label=label))

    ax.margins(y=0.1)  # room for the full-net labels above the stars
    ax.set_xlabel(x_label, fontsize=11)
    ax.set_ylabel(_METRIC_LABELS[_row_metric(curves[0][1][0])] if curves and curves[0][1] else 'Top-1 accuracy (%)',
                  fontsize=11)
    xs = [x for line in ax.get_lines() for x in line.get_xdata()] + \
         [x for points in ax.collections for x, _ in points.get_offsets()]
    # from 0 when subnets reach down there; zoomed (in steps of 10%) when they all cost nearly the full net
    ax.set_xlim(max(0, 10 * math.floor((min(xs, default=100) - 5) / 10)), max(105, max(xs, default=100) + 5))
    ax.grid(True, alpha=0.3)
    ax.set_title(title or 'Subnet accuracy against cost', fontsize=12)
    first = ax.legend(handles=curve_handles, title='checkpoint', loc='upper left', bbox_to_anchor=(1.01, 1.0),
                      fontsize=9, title_fontsize=9, frameon=False)
    ax.add_artist(first)
    ax.legend(handles=_kind_legend(kinds_seen), title='subnets', loc='lower left', bbox_to_anchor=(1.01, 0.0),
              fontsize=9, title_fontsize=9, frameon=False)
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------ summary.csv

def summary_paths(path: str) -> Tuple[str, str]:
    """(summary.csv, summary.png) for a run folder or a summary.csv file."""
    csv_path = os.path.join(path, 'summary.csv') if os.path.isdir(path) else path
    if not os.path.isfile(csv_path):
        raise InputError(f'--plot-summary {path}: no summary.csv there (give a run folder or its summary.csv)')
    return csv_path, os.path.join(os.path.dirname(os.path.abspath(csv_path)), 'summary.png')


def _read_summary(csv_path: str) -> Dict[str, List[float]]:
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or 'epoch' not in rows[0]:
        raise InputError(f'{csv_path} is not a train.py summary.csv (no epoch column or no rows)')

    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan
    return {column: [number(row.get(column)) for row in rows] for column in rows[0]}


def _line(ax, epochs, values, label, **style) -> bool:
    if values is None or all(math.isnan(v) for v in values):
        return False
    ax.plot(epochs, values, label=label, marker='o', markersize=3, **style)
    return True


def _ema(columns: Dict[str, List[float]]) -> bool:
    """With --model-ema the eval_* columns are the EMA's and model_* the live model's."""
    return 'model_top1' in columns or 'model_map' in columns


def _loss_panel(ax, epochs, columns: Dict[str, List[float]]) -> None:
    """Train loss, the method's declared loss parts (dashed; ``subnet/results.py``), eval loss."""
    _line(ax, epochs, columns.get('train_loss'), 'train loss', color='tab:blue', linewidth=2)
    part_columns = [c for c in columns if c != 'train_loss' and getattr(result_part(c), 'kind', None) == LOSS]
    # blue, orange and red are the train / EMA / live-model lines; the parts take the other tab10 colours
    part_colours = ['tab:green', 'tab:purple', 'tab:brown', 'tab:pink', 'tab:olive', 'tab:cyan', 'tab:gray']
    for column, colour in zip(part_columns, part_colours * len(part_columns)):
        _line(ax, epochs, columns[column], column[len('train_'):].replace('_', ' '), color=colour, linestyle='--')
    _line(ax, epochs, columns.get('eval_loss'), 'eval loss (EMA)' if _ema(columns) else 'eval loss',
          color='tab:orange', linewidth=2)
    _line(ax, epochs, columns.get('model_loss'), 'eval loss', color='tab:red', linewidth=1.5)
    ax.set_ylabel('loss')


def _top1_panel(ax, epochs, columns: Dict[str, List[float]]) -> None:
    """The task's metric (top-1, or mAP for a multi-label run) of the live model and the EMA."""
    metric = _column_metric(columns)
    name = 'top-1' if metric == 'top1' else 'mAP'
    drawn = _line(ax, epochs, columns.get(f'model_{metric}'), f'{name} (live model)', color='tab:red', linewidth=1.5)
    drawn |= _line(ax, epochs, columns.get(f'eval_{metric}'), f'{name} (EMA)' if _ema(columns) else name,
                   color='tab:orange', linewidth=2)
    if not drawn:
        ax.text(0.5, 0.5, 'no evaluation in this run', ha='center', va='center', transform=ax.transAxes)
    ax.set_ylabel(_METRIC_LABELS[metric].lower() if metric == 'top1' else _METRIC_LABELS[metric])
    if metric == 'map':
        ax.set_title('mAP', fontsize=11)


def _subnet_columns(columns: Dict[str, List[float]]) -> List[str]:
    suffix = f'_{_column_metric(columns)}'
    return [c for c in columns if c.startswith('subnet_') and c.endswith(suffix)]


def _subnet_panel(ax, epochs, columns: Dict[str, List[float]]) -> None:
    metric = _column_metric(columns)
    _line(ax, epochs, columns.get(f'model_{metric}', columns.get(f'eval_{metric}')), 'full net', color='black',
          linewidth=2)
    subnet_columns = _subnet_columns(columns)
    for column, colour in zip(subnet_columns, _colours(len(subnet_columns))):
        _line(ax, epochs, columns[column], column[len('subnet_'):-len(f'_{metric}')], color=colour)
    ax.set_ylabel(_METRIC_LABELS[metric].lower() if metric == 'top1' else _METRIC_LABELS[metric])
    if metric == 'map':
        ax.set_title('Subnet mAP (--subnet-eval)', fontsize=11)


def _lr_panel(ax, epochs, columns: Dict[str, List[float]]) -> None:
    _line(ax, epochs, columns.get('lr'), 'learning rate', color='tab:green', linewidth=2)
    ax.set_ylabel('learning rate')
    ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 3))


class Panel(NamedTuple):
    """One panel of summary.png: ``draw(ax, epochs, columns)`` draws summary.csv's ``columns`` (name → one
    number per epoch, NaN where empty) on ``ax``; ``shown(columns)`` says whether this run has anything for it."""
    title: str
    draw: Callable
    shown: Callable = lambda columns: True
    legend: bool = True


# summary.png's panels, left to right: a new picture of a run is one more entry here
SUMMARY_PANELS: List[Panel] = [
    Panel('Losses', _loss_panel),
    Panel('Top-1', _top1_panel),
    Panel('Subnet top-1 (--subnet-eval)', _subnet_panel, shown=lambda columns: bool(_subnet_columns(columns))),
    Panel('Learning rate', _lr_panel, legend=False),
]


def plot_summary(path: str, title: Optional[str] = None) -> str:
    """Write summary.png beside a run's summary.csv (``path``: the run folder or the file); returns its path.

    One panel per entry of ``SUMMARY_PANELS`` this run has columns for: losses, top-1, subnet top-1 when
    --subnet-eval columns exist, learning rate.
    """
    Figure = require_matplotlib('--plot-summary')
    from matplotlib.ticker import MaxNLocator

    csv_path, png_path = summary_paths(path)
    columns = _read_summary(csv_path)
    epochs = columns['epoch']
    panels = [panel for panel in SUMMARY_PANELS if panel.shown(columns)]
    figure = Figure(figsize=(4.6 * len(panels), 4.2), dpi=120, layout='constrained')
    for panel, ax in zip(panels, figure.subplots(1, len(panels), squeeze=False)[0]):
        ax.set_title(panel.title, fontsize=11)  # before drawing: a panel may retitle itself (mAP for multi-label)
        panel.draw(ax, epochs, columns)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if panel.legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    figure.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(csv_path))), fontsize=12)
    return _save(figure, png_path)


def summary_after_training(output_dir: str) -> Optional[str]:
    """train.py's end of run: summary.png, or one warning line (the run itself succeeded)."""
    if not os.path.isfile(os.path.join(output_dir, 'summary.csv')):
        return None
    try:
        path = plot_summary(output_dir)
    except MissingPackage:
        _logger.warning('summary.png not written: matplotlib is not installed (pip install matplotlib)')
        return None
    _logger.info(f'Wrote {path}')
    return path


# ------------------------------------------------------------------------------------------------ TensorBoard

class TensorBoardLog:
    """The summary row's numbers as TensorBoard scalars, one step per epoch (event files in ``folder``)."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, folder: str) -> Optional['TensorBoardLog']:
        """A log writing to ``folder``, or None after one warning line when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _logger.warning('--log-tensorboard: tensorboard is not installed, metrics are not logged to it '
                            '(pip install tensorboard)')
            return None
        return cls(SummaryWriter(log_dir=folder))

    def log(self, epoch: int, row: dict) -> None:
        for name, value in row.items():
            if name != 'epoch' and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
