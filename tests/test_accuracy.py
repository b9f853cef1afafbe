"""benchmarks/accuracy.py: the study's machinery (not its numbers) on a tiny slice of the shipped data."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from train_helpers import ROOT, make_subset

sys.path.insert(0, str(ROOT / 'benchmarks'))
import accuracy  # noqa: E402
import accuracy_report  # noqa: E402

ARM_KEYS = [arm.key for arm in accuracy.ARMS]
SEEDS = [0, 1]
# the study's recipe (a ResNet-34) made tiny: a few seconds per run
TINY = '--model-kwargs channels=(8,8,16,16) stem_width=8 --img-size 28 -b 20 --workers 0 --warmup-epochs 0'


def study_argv(data, output, *extra):
    return ['--epochs', '1', '--seeds', *map(str, SEEDS), '--data-dir', str(data), '--output', str(output),
            '--report', str(output / 'report.md'), '--bn-recal', '20', '--jobs', '2', '--train-args', TINY,
            '--eval-args', '--workers 0', *extra]


def snapshot(output):
    """(path, size, mtime) of every file in the run folders: what a rerun must leave alone."""
    return {(str(path.relative_to(output)), path.stat().st_size, path.stat().st_mtime_ns)
            for folder in output.iterdir() if folder.is_dir() for path in folder.rglob('*') if path.is_file()}


def main(argv, capsys):
    code = accuracy.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    """One tiny study: every arm, two seeds, one epoch; the runs two at a time, one OpenMP thread each."""
    data = make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=10, val_per_class=5)
    output = tmp_path_factory.mktemp('study')
    threads = os.environ.get('OMP_NUM_THREADS')
    os.environ['OMP_NUM_THREADS'] = '1'  # the evaluation process too (on a shared machine 2 threads spin-wait)
    try:
        assert accuracy.main(study_argv(data, output)) == 0
        yield data, output
    finally:
        if threads is None:
            del os.environ['OMP_NUM_THREADS']
        else:
            os.environ['OMP_NUM_THREADS'] = threads


def table(report: str, title: str) -> list:
    """The body rows of the first markdown table after ``title``, as lists of cells."""
    lines = report[report.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('|'))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([c.strip() for c in line.strip('|').split('|')])
    return rows


def test_every_arm_trains_the_same_recipe_and_differs_only_in_its_method_options():
    args = accuracy.parse_args(['--seeds', '0', '1'])
    runs = accuracy.plan(args)
    assert [(r.arm.key, r.seed) for r in runs] == [(k, s) for s in (0, 1) for k in ARM_KEYS]  # seed by seed
    for seed in (0, 1):
        stripped = set()
        for run in (r for r in runs if r.seed == seed):
            command = list(run.train_command)
            assert command[:3] == ['python', 'train.py', '-c'] and command[command.index('--seed') + 1] == str(seed)
            assert command[-len(run.arm.options):] == list(run.arm.options)
            del command[-len(run.arm.options):]
            command[command.index('--experiment') + 1] = 'NAME'
            stripped.add(tuple(command))
        assert len(stripped) == 1
    # every checkpoint is evaluated on the same subnets (the same random draws)
    assert len({r.eval_command[r.eval_command.index('--subnets'):] for r in runs}) == 1


def test_verdicts_call_a_difference_only_beyond_two_standard_errors():
    plain, st = accuracy.ARM_BY_KEY['plain'], accuracy.ARM_BY_KEY['st']

    def study(plain_top1, st_top1):
        return accuracy_report.Study([
            accuracy_report.Result(arm, seed, {'full': top1}, {'full': 1.0}, {'full': 1}, 59.7, False)
            for arm, values in ((plain, plain_top1), (st, st_top1)) for seed, top1 in enumerate(values)])

    # the standard error of the difference is sqrt(1/3 + 1/3) = 0.82 for two arms with std 1 over 3 seeds
    assert study([80, 81, 82], [82, 83, 84]).verdict(st, plain) == '+2.0 ± 0.8: better than'
    assert study([80, 81, 82], [81, 82, 83]).verdict(st, plain) == '+1.0 ± 0.8: no clear difference from'
    assert study([80, 81, 82], [78, 79, 80]).verdict(st, plain) == '-2.0 ± 0.8: worse than'
    assert 'no verdict' in study([80], [85]).verdict(st, plain)
    assert study([80, 81, 82], [82, 83, 84]).summary_table().splitlines()[2:] == [
        '| plain | 81.0 ± 1.0 | 1:00 | 1.00 |', '| ST | 83.0 ± 1.0 | 1:00 | 1.00 |']


def test_report_has_a_row_per_arm_and_seed_and_the_picture(study):
    data, output = study
    report = (output / 'report.md').read_text()
    labels = [arm.label for arm in accuracy.ARMS]
    assert [row[0] for row in table(report, '## Results')] == labels
    assert [(row[0], int(row[1])) for row in table(report, '## Every run')] == [(l, s) for l in labels for s in SEEDS]
    header = report[report.index('## Results'):].split('\n| arm |', 1)[1].splitlines()[0]
    for column in ('full net', 'prefix 0.25', 'prefix 0.5', 'prefix 0.75', 'random drop 0.2', 'random drop 0.4'):
        assert column in header
    assert all('±' in c for row in table(report, '## Results') for c in row[1:7])  # mean ± std over 2 seeds
    picture = output / 'report.png'
    assert picture.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and '](report.png)' in report
    for run in accuracy.plan(accuracy.parse_args(study_argv(data, output))):
        assert shlex.join(run.train_command) in report and shlex.join(run.eval_command) in report
    assert not list(output.glob('*.tmp*')) and not list(output.glob('.evaluating-*'))


def test_each_run_keeps_its_records_and_its_printed_command_gives_its_numbers(study):
    data, output = study
    runs = accuracy.plan(accuracy.parse_args(study_argv(data, output)))
    for run in runs:
        trained = json.loads((run.folder / 'study-train.json').read_text())
        evaluated = json.loads((run.folder / 'study-eval.json').read_text())
        assert trained['command'] == list(run.train_command) and not trained['resumed'] and trained['seconds'] > 0
        assert evaluated['command'] == list(run.eval_command) and evaluated['trained'] == trained['finished']
        names = [row['subnet'] for row in evaluated['rows']]
        assert names[0] == 'full' and len(names) == 1 + 3 + 2 * 4
    # the rows the study took from its one validate.py process are exactly what the run's own command gives
    run = runs[3]
    results = output / 'single.json'
    command = [sys.executable, *run.eval_command[1:], '--results-file', str(results), '--results-format', 'json']
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert json.loads(results.read_text()) == json.loads((run.folder / 'study-eval.json').read_text())['rows']
    results.unlink()


def test_rerun_skips_finished_runs_and_redoes_only_what_is_missing(study, capsys):
    data, output = study
    before = snapshot(output)
    code, out, _ = main(study_argv(data, output), capsys)
    assert code == 0 and snapshot(output) == before
    assert out.count('skip') == len(ARM_KEYS) * len(SEEDS) and 'start' not in out and 'evaluating' not in out

    # a run whose training record is missing (as after an interruption) is continued in place; a run whose
    # evaluation is missing is evaluated again, with the same numbers; nothing else is touched
    runs = accuracy.plan(accuracy.parse_args(study_argv(data, output)))
    interrupted, unevaluated = runs[2], runs[7]
    rows = {run.name: run.record('study-eval.json')['rows'] for run in (interrupted, unevaluated)}
    (interrupted.folder / 'study-train.json').unlink()
    (unevaluated.folder / 'study-eval.json').unlink()
    code, out, _ = main(study_argv(data, output), capsys)
    assert code == 0
    assert out.count('start') == 1 and f'start  {interrupted.name}' in out and 'evaluating 2 runs' in out
    assert interrupted.record('study-train.json')['resumed']
    for run in (interrupted, unevaluated):
        assert run.record('study-eval.json')['rows'] == rows[run.name]
    changed = {path.split(os.sep)[0] for path, *_ in snapshot(output) ^ before}
    assert changed == {interrupted.name, unevaluated.name}
    rows = table((output / 'report.md').read_text(), '## Every run')
    marked = [(row[0], int(row[1])) for row in rows if row[-2].endswith('†')]
    assert marked == [(interrupted.arm.label, interrupted.seed)]  # its time is that of the last part only


def test_a_folder_trained_by_another_command_stops_the_study_with_one_line(study, capsys):
    data, output = study
    before = snapshot(output)
    code, out, err = main(study_argv(data, output, '--epochs', '2'), capsys)
    assert code == 2 and err.startswith('accuracy.py: error: ') and 'trained by another command' in err
    assert len(err.strip().splitlines()) == 1 and snapshot(output) == before


# the ViT study's recipe made tiny (its model kwargs all given: the command line's replace the recipe's)
VIT_TINY = ('--model-kwargs img_size=28 patch_size=7 embed_dim=32 depth=4 num_heads=2 init_values=1e-4 '
            '--img-size 28 -b 20 --workers 0 --warmup-epochs 0')


def test_the_vit_study_trains_its_own_recipe_and_arms_end_to_end(tmp_path, capsys):
    args = accuracy.parse_args(['--study', 'vit'])
    assert args.recipe == ROOT / 'hparams' / 'study_vit_fashion_mnist.yaml'
    assert [arm.key for arm in args.arms] == ['plain', 'plain-sd', 'cosub']
    assert args.output == ROOT / 'output' / 'accuracy-vit' and args.report != ROOT / 'docs' / 'results.md'
    sd, cosub = (arm.options for arm in args.arms[1:])
    assert sd[2:] == cosub[2:] == accuracy.VIT_STOCHASTIC_DEPTH  # cosub against the same stochastic depth alone
    data = make_subset(tmp_path / 'fmnist', train_per_class=4, val_per_class=2)
    output = tmp_path / 'vit'
    argv = ['--study', 'vit', '--epochs', '1', '--seeds', '0', '--arms', 'plain,cosub', '--data-dir', str(data),
            '--output', str(output), '--report', str(output / 'report.md'), '--bn-recal', '20',
            '--train-args', VIT_TINY, '--eval-args', '--workers 0']
    code, out, err = main(argv, capsys)
    assert code == 0, err[-2000:]
    report = (output / 'report.md').read_text()
    assert [row[0] for row in table(report, '## Results')] == ['plain', 'cosub']
    assert 'study_vit_fashion_mnist.yaml' in report and 'second part: cosub on a small Vision Transformer' in report
    # over-fitting is measured: each full net is also evaluated on its training images, with its own command
    for run in accuracy.plan(accuracy.parse_args(argv)):
        record = run.record('study-eval.json')
        assert record['fit_command'] == list(run.fit_command) and run.fit_command[6:8] == ('--split', 'train')
        assert len(record['fit_rows']) == 1 and shlex.join(run.fit_command) in report
        train_top1 = record['fit_rows'][0]['top1']
        assert [row[-3] for row in table(report, '## Every run') if row[0] == run.arm.label] == [f'{train_top1:.1f}']


def test_sigterm_stops_the_running_train_py_processes_too(tmp_path):
    """A scheduler's (or ``kill``'s) SIGTERM reaches only accuracy.py: it stops its train.py children, as Ctrl-C
    does, and says the same command continues."""
    data = make_subset(tmp_path / 'data', train_per_class=10, val_per_class=5)
    argv = study_argv(data, tmp_path / 'out', '--arms', 'plain', '--seeds', '0', '--jobs', '1', '--epochs', '50')
    study = subprocess.Popen([sys.executable, str(ROOT / 'benchmarks' / 'accuracy.py'), *argv], cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS='1'), stderr=subprocess.PIPE, text=True)
    try:
        children = []
        for _ in range(600):  # until train.py has started
            children = subprocess.run(['pgrep', '-P', str(study.pid)], capture_output=True, text=True).stdout.split()
            if children:
                break
            time.sleep(0.1)
        assert children, 'accuracy.py started no train.py'
        study.send_signal(signal.SIGTERM)
        assert study.wait(timeout=120) == 143
        assert 'the same command continues the study' in study.stderr.read()
        assert not any(os.path.exists(f'/proc/{pid}') and 'Z' not in open(f'/proc/{pid}/stat').read().split()[2]
                       for pid in children), 'a train.py outlived accuracy.py'
    finally:
        if study.poll() is None:
            study.kill()
        study.stderr.close()
