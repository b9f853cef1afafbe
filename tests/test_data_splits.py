"""Data splits, end to end through train.py and validate.py: a split that does not exist is one line and exit 2
(timm would read the whole data root), no validation split is an error unless ``--val-split none`` turns evaluation
off, and the validation classes must be the training classes under the same labels."""
import shutil

import pytest

import train
import validate
from subnet.run_folder import holds_run
from train_helpers import make_subset, run_train, train_argv

pytestmark = pytest.mark.usefixtures('single_thread')  # the 2 shared cores are not oversubscribed


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp('fmnist'), train_per_class=2, val_per_class=1)


def _copy(data, tmp_path):
    return shutil.copytree(data, tmp_path / 'data')


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith('train.py: error: ') and not any('Traceback' in line for line in err), err
    return err[-1]


def test_a_training_split_that_does_not_exist_is_an_error_not_the_data_root(data, tmp_path, capsys):
    assert train.cli(train_argv(data, tmp_path, 'x', '--train-split', 'nope')) == 2
    assert _one_line(capsys) == (f"train.py: error: train split 'nope' not found: {data} has no nope/ folder (timm "
                                 f"would read the whole of {data} instead); name the folder with --train-split, or "
                                 f"add it")
    assert not (tmp_path / 'x').exists()


def test_no_validation_folder_is_an_error_unless_val_split_none(data, tmp_path, capsys):
    root = _copy(data, tmp_path)
    shutil.rmtree(root / 'val')
    assert train.cli(train_argv(root, tmp_path, 'x')) == 2
    assert _one_line(capsys) == (
        f"train.py: error: validation split 'validation' not found: {root} has no val/, valid/, validation/, eval/, "
        f"evaluation/ folder (timm would read the whole of {root} instead); name the folder with --val-split, or "
        f"--val-split none to train without evaluation, or add it")
    assert not (tmp_path / 'x').exists()
    run = run_train(train_argv(root, tmp_path, 'x', '--val-split', 'none', '-b', '4'))
    assert [sorted(r) for r in run.results] == [['epoch', 'train']]  # trained, evaluated nothing
    header = (tmp_path / 'x' / 'summary.csv').read_text().splitlines()[0]
    assert header.startswith('epoch,train_loss,lr') and 'eval_' not in header


def _rename_class(root, split, old, new):
    (root / split / old).rename(root / split / new)


@pytest.mark.parametrize('change, expected', [
    (lambda root: _rename_class(root, 'val', '03_dress', 'x3'),
     "has classes the training split lacks: 'x3'; the class folders of the two splits must have the same names"),
    (lambda root: shutil.rmtree(root / 'val' / '03_dress'),
     "lacks 1 of the training classes ('03_dress'), so timm would number its classes differently: give both splits one "
     "numbering with --class-map FILE (the training class names, one a line)"),
], ids=['renamed', 'subset'])
def test_validation_classes_are_checked_against_training_classes_before_training(change, expected, data, tmp_path,
                                                                               capsys):
    root = _copy(data, tmp_path)
    change(root)
    assert train.cli(train_argv(root, tmp_path, 'x', '-b', '4')) == 2
    assert _one_line(capsys) == f'train.py: error: the validation split (validation) of {root} {expected}'
    assert not holds_run(str(tmp_path / 'x'))


def test_a_validation_subset_with_a_class_map_trains_with_the_training_labels(data, tmp_path):
    root = _copy(data, tmp_path)
    shutil.rmtree(root / 'val' / '03_dress')
    class_map = tmp_path / 'classes.txt'
    class_map.write_text('\n'.join(sorted(p.name for p in (root / 'train').iterdir())) + '\n')
    run = run_train(train_argv(root, tmp_path, 'x', '-b', '4', '--class-map', str(class_map)))
    assert 'validation' in run.results[0]


def test_validate_refuses_a_missing_split_and_reads_a_split_folder_given_itself(data, tmp_path, capsys):
    root = _copy(data, tmp_path)
    run_train(train_argv(root, tmp_path, 'x', '-b', '4'))
    shutil.rmtree(root / 'val')
    argv = ['--checkpoint', str(tmp_path / 'x' / 'last.pth.tar'), '--workers', '0', '--device', 'cpu', '-b', '4']
    assert validate.cli(argv + ['--data-dir', str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"validate.py: error: evaluation split 'validation' not found: {root} has no val/, valid/, validation/, "
        f"eval/, evaluation/ folder (timm would read the whole of {root} instead); name the folder with --split, or "
        f"add it")
    assert validate.main(argv + ['--data-dir', str(root / 'train')]) == 0


def test_validate_refuses_a_split_with_more_classes_than_the_model(data, tmp_path, capsys):
    root = _copy(data, tmp_path)
    run_train(train_argv(root, tmp_path, 'x', '-b', '4'))
    shutil.copytree(root / 'val' / '03_dress', root / 'val' / '10_extra')
    argv = ['--checkpoint', str(tmp_path / 'x' / 'last.pth.tar'), '--workers', '0', '--device', 'cpu', '-b', '4',
            '--data-dir', str(root)]
    assert validate.cli(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f'validate.py: error: the validation split of {root} has 11 classes but the model has 10: evaluate it on the '
        f'classes the model was trained on')
