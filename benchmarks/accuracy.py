#!/usr/bin/env python3
"""An accuracy study anyone can rerun: plain training against every submodel method, same budget, several seeds.

Every arm (plain training, plain training with cosub's stochastic depth, cosub, ST, ST++, GKT, GKT with knowledge
across steps) trains with one shared recipe (hparams/study_fashion_mnist.yaml: model, epochs, images,
augmentation, optimizer) for every seed; the second study (``--study vit``) trains plain, stochastic depth and
cosub with hparams/study_vit_fashion_mnist.yaml, a small DeiT III-style ViT;
only ``--method`` and the method's own options differ. Each run's last checkpoint is then evaluated with
validate.py: the full net and the same subnets for every run (stage prefixes, ST's shape, and random block
subsets, stochastic depth's shape; BatchNorm statistics re-estimated for every net). The report
(docs/results.md and docs/results.png) gives mean ± std over seeds, the wall time of every run, and the exact
command behind every number (benchmarks/accuracy_report.py writes it).

train.py and validate.py are used through their command lines only. A rerun skips what is done: a run is
trained once its folder holds ``study-train.json`` (written when train.py exits 0 with the same command and
recipe; a run that was interrupted is continued with ``--resume auto``), and evaluated once it holds
``study-eval.json`` (validate.py's rows for the run, with the same command, since it was last trained).
Nothing already written is overwritten but the report, which is written under a temporary name and renamed.

    python benchmarks/accuracy.py --jobs 2    # the study, 7 arms x 3 seeds -> docs/results.*: 1 h 48 min on a
                                              # 2-core CPU (2026-12-07; another job shared it for 40 min)
    python benchmarks/accuracy.py --study vit --jobs 2  # the second study, plain, stochastic depth and cosub on
                                              # a small ViT -> docs/results-vit.*: 55 min of training and 1 of
                                              # evaluation on a 2-core CPU (2026-12-07; other jobs shared it
                                              # for about 20 min)
    python benchmarks/accuracy.py --quick     # 2 epochs, 2 seeds, a few minutes -> output/accuracy-quick/
    python benchmarks/accuracy.py --list      # print every command, run nothing

On a machine busy with other work, run it with OMP_NUM_THREADS=1: OpenMP threads that wait for a busy core spin,
which made small models many times slower.
"""
import argparse
import hashlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_report  # noqa: E402

RECIPE = 'hparams/study_fashion_mnist.yaml'
VIT_RECIPE = 'hparams/study_vit_fashion_mnist.yaml'
# cosub's stochastic depth, DeiT III's constant rate in every block (cosub's default schedule, said explicitly),
# also given to the plain-sd arm, so that cosub is also compared with the same stochastic depth alone (DeiT III,
# cosub's baseline, trains with stochastic depth)
STOCHASTIC_DEPTH = ('--drop-path', '0.2', '--drop-schedule', 'constant')
# the ViT study's rate: the cosub/DeiT III ViT-S recipe's (hparams/cosub_deit3_vit_small.yaml); a one-seed pilot
# of 0.1 and 0.2 found no better rate for both arms (docs/results-vit.md)
VIT_STOCHASTIC_DEPTH = ('--drop-path', '0.05', '--drop-schedule', 'constant')
# stage prefixes (ST's subnets) and random block subsets (stochastic depth's), drawn from EVAL_SEED: the same
# subnets for every run, so every arm is compared at equal FLOPs
SUBNETS = 'prefix:0.25,0.5,0.75;random:4@0.2,0.4'
EVAL_SEED = 0
BN_RECAL = 512
TRAIN_RECORD, EVAL_RECORD, CHECKPOINT = 'study-train.json', 'study-eval.json', 'last.pth.tar'


@dataclass(frozen=True)
class Arm:
    """One line of the study: a method and its options on top of the shared recipe."""
    key: str                  # run folder prefix and --arms name
    label: str                # tables and picture
    options: Tuple[str, ...]  # train.py options
    cost: float               # run time / plain's from the study's last full run: the ETA until it has its own


ARMS = (
    Arm('plain', 'plain', ('--method', 'none'), 1.0),
    Arm('plain-sd', f'plain + stochastic depth {STOCHASTIC_DEPTH[1]}', ('--method', 'none', *STOCHASTIC_DEPTH),
        1.02),
    Arm('cosub', 'cosub', ('--method', 'cosub', *STOCHASTIC_DEPTH), 1.81),
    Arm('st', 'ST', ('--method', 'st'), 1.77),
    # the floor (twice the ResNet's output stride, the default) said explicitly, so that a folder trained before
    # the floor existed (same command without it: the official ratio alone, 13-px inputs) is not taken for this arm
    # (with the floor every subnet sees the full 32-px crop)
    Arm('stpp', 'ST++', ('--method', 'st++', '--st-min-side', '64'), 4.84),
    Arm('gkt', 'GKT', ('--method', 'gkt'), 4.43),
    Arm('gkt-sample', 'GKT, knowledge across steps', ('--method', 'gkt', '--gkt-knowledge', 'sample'), 4.31),
)
# the second study: where cosub claims its gains, a small DeiT III-style ViT trained long with mixup and cutmix
VIT_ARMS = (
    Arm('plain', 'plain', ('--method', 'none'), 1.0),
    Arm('plain-sd', f'plain + stochastic depth {VIT_STOCHASTIC_DEPTH[1]}',
        ('--method', 'none', *VIT_STOCHASTIC_DEPTH), 0.91),
    Arm('cosub', 'cosub', ('--method', 'cosub', *VIT_STOCHASTIC_DEPTH), 1.38),
)


@dataclass(frozen=True)
class Study:
    """A recipe, its arms, its images and where its runs and report go by default."""
    name: str     # --study, and which text the report gives (accuracy_report.TEXTS)
    recipe: str
    arms: Tuple[Arm, ...]
    data: str     # relative to the repository (the recipe's data_dir; the commands say it again)
    output: str   # under output/
    report: str   # relative to the repository
    fit: bool     # also evaluate each full net on its training images: does plain training over-fit?


STUDIES = {
    'resnet': Study('resnet', RECIPE, ARMS, 'data/fashion-mnist', 'accuracy', 'docs/results.md', False),
    # 100 of the shipped training images (the first 10 of each class): plain training of the ViT over-fits them
    # within the CPU's budget, which is the regime the ViT study is for (docs/results-vit.md gives the pilots)
    'vit': Study('vit', VIT_RECIPE, VIT_ARMS, 'data/fashion-mnist-100', 'accuracy-vit', 'docs/results-vit.md',
                 True),
}
ARM_BY_KEY = {arm.key: arm for arm in ARMS}


class Terminated(Exception):
    """SIGTERM (a scheduler's or ``kill``'s): stops the running train.py processes, as Ctrl-C does."""


def _terminated(signum, frame):
    raise Terminated()


class StudyError(Exception):
    """A problem the user can fix (a folder holding another study's run, a failed run): one line, exit 2."""


def shown(path: Path) -> str:
    """A path as the printed commands write it: relative to the repository (their working folder) when inside."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Run:
    """One training run of the study (an arm and a seed) and the two commands behind its numbers."""
    arm: Arm
    seed: int
    folder: Path
    train_command: Tuple[str, ...]  # as printed: 'python' first, run from the repository root
    eval_command: Tuple[str, ...]
    recipe_digest: str              # of the recipe file's text: an edited recipe is another command
    fit_command: Optional[Tuple[str, ...]] = None  # the full net on the training images (a study with fit)

    @property
    def name(self) -> str:
        return self.folder.name

    def record(self, name: str) -> Optional[dict]:
        try:
            with open(self.folder / name) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def trained(self) -> bool:
        record = self.record(TRAIN_RECORD)
        if record is None:
            return False
        if record.get('command') != list(self.train_command) or record.get('recipe') != self.recipe_digest:
            raise StudyError(f'{shown(self.folder)} holds a run trained by another command or recipe '
                             f'({shlex.join(record.get("command") or [])}); use another --output')
        return (self.folder / CHECKPOINT).is_file()

    def evaluated(self) -> bool:
        """Evaluated with the current command since the run was last trained."""
        record, trained = self.record(EVAL_RECORD), self.record(TRAIN_RECORD)
        fitted = self.fit_command is None or (record and record.get('fit_command') == list(self.fit_command)
                                              and record.get('fit_rows'))
        return bool(record and trained and record.get('command') == list(self.eval_command)
                    and record.get('trained') == trained['finished'] and record.get('rows') and fitted)


def plan(args) -> List[Run]:
    """Every run of the study, seed by seed (a study stopped half-way has every arm of its first seeds)."""
    data, output = shown(args.data_dir), shown(args.output)
    digest = hashlib.sha256(args.recipe.read_bytes()).hexdigest()
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            folder = args.output / f'{arm.key}-seed{seed}'
            train = ['python', 'train.py', '-c', shown(args.recipe), '--data-dir', data, '--output', output,
                     '--experiment', folder.name, '--seed', str(seed), '--resume', 'auto']
            if args.epochs:
                train += ['--epochs', str(args.epochs)]
            train += [*arm.options, *args.train_args]
            evaluate = ['python', 'validate.py', '--checkpoint', shown(folder / CHECKPOINT), '--data-dir', data,
                        '--subnets', args.subnets, '--bn-recal', str(args.bn_recal), '--seed', str(EVAL_SEED),
                        *args.eval_args]
            fit = None
            if args.study.fit:  # the full net on the images it was trained on (validate.py re-estimates BN
                # statistics only for --subnets rows: the ViT study's model has none)
                fit = ('python', 'validate.py', '--checkpoint', shown(folder / CHECKPOINT), '--data-dir', data,
                       '--split', 'train', '--seed', str(EVAL_SEED), *args.eval_args)
            runs.append(Run(arm, seed, folder, tuple(train), tuple(evaluate), digest, fit))
    return runs


def write_json(path: Path, value) -> None:
    """Under a temporary name, then renamed: a killed study never leaves a truncated record."""
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
    """One line per run started and finished, with the study's elapsed time and an ETA.

    The ETA prices each remaining run at the mean time of its arm's finished runs, or, before any has finished,
    at the mean plain-equivalent time of all finished runs times the arm's pilot cost ratio."""

    def __init__(self, total: int, jobs: int):
        self.total, self.jobs, self.count = total, jobs, 0
        self.start = time.monotonic()
        self.seconds: Dict[str, List[float]] = {}
        self.costs: Dict[str, float] = {}  # arm key -> its pilot cost ratio
        self.lock = threading.Lock()

    def estimate(self, arm: Arm) -> Optional[float]:
        if self.seconds.get(arm.key):
            return statistics.mean(self.seconds[arm.key])
        plain_equivalent = [s / self.costs[key] for key, times in self.seconds.items() for s in times]
        return statistics.mean(plain_equivalent) * arm.cost if plain_equivalent else None

    def eta(self, pending: Sequence[Arm]) -> str:
        estimates = [self.estimate(arm) for arm in pending]
        if None in estimates:
            return 'ETA after the first run'
        return f'ETA {clock(sum(estimates) / self.jobs)}'

    def say(self, text: str, pending: Optional[Sequence[Arm]] = None) -> None:
        with self.lock:
            eta = '' if pending is None else f', {self.eta(pending)}'
            print(f'{text}  (elapsed {clock(time.monotonic() - self.start)}{eta})', flush=True)

    def started(self, run: Run, pending: Sequence[Arm]) -> None:
        with self.lock:
            self.count += 1
            number = self.count
        self.say(f'[{number:>2}/{self.total}] start  {run.name}', pending)

    def finished(self, run: Run, seconds: float, pending: Sequence[Arm]) -> None:
        with self.lock:
            self.seconds.setdefault(run.arm.key, []).append(seconds)
            self.costs[run.arm.key] = run.arm.cost
        self.say(f'        done   {run.name} in {clock(seconds)}', pending)


def child_env(jobs: int) -> dict:
    """Parallel runs share the cores: one OpenMP pool each, sized so they do not spin-wait on each other."""
    env = dict(os.environ)
    if jobs > 1:
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def failure(what: str, returncode: int, output: str) -> StudyError:
    tail = '\n'.join(output.rstrip().splitlines()[-15:])
    return StudyError(f'{what} failed (exit {returncode}); its last lines:\n{tail}')


def train_all(runs: List[Run], jobs: int, progress: Progress) -> None:
    """Train every run that is not trained yet, ``jobs`` at a time. The first failure stops new starts; Ctrl-C (or
    SIGTERM) also stops the running train.py processes (their files are written atomically: a rerun continues them)."""
    todo = [run for run in runs if not run.trained()]
    pending = [run.arm for run in todo]
    errors: List[StudyError] = []
    running = set()
    stop = threading.Event()
    env = child_env(jobs)

    def train(run: Run) -> None:
        if stop.is_set():
            return
        resumed = run.folder.exists()
        progress.started(run, pending)
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, *run.train_command[1:]], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        running.add(process)
        output, _ = process.communicate()
        running.discard(process)
        seconds = time.monotonic() - start
        if process.returncode:
            stop.set()
            errors.append(failure(f'training {run.name} ({shlex.join(run.train_command)})', process.returncode,
                                  output))
            return
        finished = datetime.now().isoformat(timespec='microseconds')  # its evaluation record names it
        write_json(run.folder / TRAIN_RECORD, dict(command=list(run.train_command), recipe=run.recipe_digest,
                                                   seconds=round(seconds, 1), resumed=resumed, finished=finished))
        with progress.lock:
            pending.remove(run.arm)
        progress.finished(run, seconds, pending)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(train, run) for run in todo]:
            future.result()
    except BaseException:
        stop.set()
        for process in list(running):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise errors[0]


def validate_together(todo: List[Run], command: Sequence[str]) -> Dict[str, List[dict]]:
    """One validate.py process for every run of ``todo`` (it takes a folder of checkpoints, here links to each
    run's), with ``command`` (a run's own, its checkpoint replaced by the folder): each run's rows, by name."""
    with tempfile.TemporaryDirectory(prefix='.evaluating-', dir=todo[0].folder.parent) as staging:
        for run in todo:
            os.symlink(run.folder.resolve() / CHECKPOINT, Path(staging) / f'{run.name}.pth.tar')
        command = list(command)
        command[command.index('--checkpoint') + 1] = staging
        results = Path(staging) / 'results.json'
        result = subprocess.run([sys.executable, *command[1:], '--results-file', str(results), '--results-format',
                                 'json'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode:
            raise failure(f'evaluation ({shlex.join(command)})', result.returncode, result.stdout)
        with open(results) as f:
            rows = json.load(f)
    by_run = {}
    for run in todo:
        own = [row for row in rows if Path(row.get('checkpoint', '')).name == f'{run.name}.pth.tar']
        if not own:
            raise StudyError(f'validate.py gave no result for {run.name}; its log: {result.stdout[-2000:]}')
        for row in own:
            del row['checkpoint']  # the link's path: the record keeps the run's own command instead
        by_run[run.name] = own
    return by_run


def evaluate_all(runs: List[Run], progress: Progress) -> None:
    """Evaluate every run not evaluated since it was trained (and, in a study with ``fit``, its full net on its
    training images), in one validate.py process per command. Each run's rows are what its own printed command
    gives."""
    todo = [run for run in runs if not run.evaluated()]
    if not todo:
        return
    progress.say(f'evaluating {len(todo)} run{"s" * (len(todo) > 1)}: full net and subnets')
    start = time.monotonic()
    rows = validate_together(todo, todo[0].eval_command)
    fit_rows = validate_together(todo, todo[0].fit_command) if todo[0].fit_command else {}
    for run in todo:
        record = dict(command=list(run.eval_command), trained=run.record(TRAIN_RECORD)['finished'],
                      rows=rows[run.name])
        if run.fit_command:
            record.update(fit_command=list(run.fit_command), fit_rows=fit_rows[run.name])
        write_json(run.folder / EVAL_RECORD, record)
    progress.say(f'        evaluated in {clock(time.monotonic() - start)}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--study', choices=tuple(STUDIES), default='resnet',
                        help="'resnet': every method on a slim ResNet-34; 'vit': plain, stochastic depth and cosub on "
                             'a small DeiT III-style ViT (its recipe, arms, output and report)')
    parser.add_argument('--quick', action='store_true',
                        help='2 epochs, seeds 0 1, output and report in output/accuracy-quick (a few minutes)')
    parser.add_argument('--epochs', type=int, default=None, help="epochs per run (default: the recipe's)")
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='training seeds (default: 0 1 2)')
    parser.add_argument('--arms', default=None, help="comma-separated arms to run (default: all of the study's)")
    parser.add_argument('--recipe', type=Path, default=None, help="the shared train.py YAML (default: the study's)")
    parser.add_argument('--data-dir', type=Path, default=None,
                        help="the images (default: the study's, data/fashion-mnist, --study vit: "
                             'data/fashion-mnist-100)')
    parser.add_argument('--output', type=Path, default=None,
                        help='folder of the run folders (default: output/accuracy, output/accuracy-vit; --quick: '
                             'output/accuracy-quick)')
    parser.add_argument('--report', type=Path, default=None,
                        help='the report; the picture is written beside it as .png '
                             '(default: docs/results.md, --study vit: docs/results-vit.md, --quick: '
                             '<output>/results.md)')
    parser.add_argument('--subnets', default=SUBNETS, help="validate.py's --subnets")
    parser.add_argument('--bn-recal', type=int, default=BN_RECAL, help="validate.py's --bn-recal")
    parser.add_argument('--jobs', type=int, default=1, help='training runs at a time (timings then share cores)')
    parser.add_argument('--train-args', type=shlex.split, default=[], metavar='"ARGS"',
                        help='more train.py options for every run, e.g. "--workers 0" (they go in the commands)')
    parser.add_argument('--eval-args', type=shlex.split, default=[], metavar='"ARGS"',
                        help='more validate.py options for every evaluation')
    parser.add_argument('--list', action='store_true', help='print the commands and exit')
    args = parser.parse_args(argv)
    study = STUDIES[args.study]
    arms = {arm.key: arm for arm in study.arms}
    args.arms = args.arms or ','.join(arms)
    unknown = [key for key in args.arms.split(',') if key not in arms]
    if unknown:
        parser.error(f'--arms: unknown {", ".join(unknown)}; choose from {", ".join(arms)}')
    if args.jobs < 1:
        parser.error('--jobs must be >= 1')
    args.recipe = args.recipe or ROOT / study.recipe
    if not args.recipe.is_file():
        parser.error(f'--recipe {args.recipe}: no such file')
    args.arms = [arms[key] for key in args.arms.split(',')]
    args.epochs = args.epochs or (2 if args.quick else None)
    args.seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    args.output = (args.output or ROOT / 'output' / ('accuracy-quick' if args.quick else study.output)).resolve()
    args.report = (args.report or (args.output / 'results.md' if args.quick else ROOT / study.report))
    args.data_dir, args.recipe = (args.data_dir or ROOT / study.data).resolve(), args.recipe.resolve()
    args.study = study
    return args


def study_command(argv: Sequence[str]) -> str:
    return shlex.join(['python', 'benchmarks/accuracy.py', *argv])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    runs = plan(args)
    if args.list:
        for run in runs:
            print(shlex.join(run.train_command))
            print(shlex.join(run.eval_command))
            if run.fit_command:
                print(shlex.join(run.fit_command))
        return 0
    signal.signal(signal.SIGTERM, _terminated)
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        accuracy_report.check_can_write(args.report)
        progress = Progress(sum(not run.trained() for run in runs), args.jobs)
        for run in runs:
            if run.trained():
                progress.say(f'        skip   {run.name}: trained')
        train_all(runs, args.jobs, progress)
        evaluate_all(runs, progress)
        written = accuracy_report.write(runs, args.report, command=study_command(argv), data_dir=args.data_dir,
                                        output=shown(args.output), subnets=args.subnets, bn_recal=args.bn_recal,
                                        study=args.study.name, recipe=shown(args.recipe))
    except (StudyError, accuracy_report.ReportError) as e:
        print(f'accuracy.py: error: {e}', file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        print('accuracy.py: interrupted; the same command continues the study', file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    print(f'wrote {", ".join(shown(p) for p in written)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
