"""Offline and missing-dataset failures are one line naming the option or the cause, with exit status 2.

Nothing here reaches a network: the offline hub is ``HF_HUB_OFFLINE=1`` with an empty cache, a missing dataset is
an empty folder, and an offline download is torchvision's real download code with ``urlopen`` raising URLError.
"""
import urllib.error
import urllib.request

import pytest
import timm
import torch

import train
import validate
from subnet import downloads
from subnet.errors import InputError
from train_helpers import SHIPPED, TINY_RESNET

CIFAR = ['--dataset', 'torch/cifar10', '--device', 'cpu', '--workers', '0', '-b', '8', '--epochs', '1']


@pytest.fixture(autouse=True)
def hub_cache(monkeypatch, tmp_path):
    """The hub as HF_HUB_OFFLINE=1 makes it, with an empty cache: no test here reaches for the network."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    return tmp_path / 'hub'


def _error_lines(capsys) -> list:
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return [line for line in err.splitlines() if ': error: ' in line]


def test_a_torch_dataset_that_is_not_there_names_dataset_download(tmp_path, capsys):
    assert train.cli(['--data-dir', str(tmp_path), *CIFAR, *TINY_RESNET]) == 2
    assert _error_lines(capsys) == [f'train.py: error: --dataset torch/cifar10: not found in --data-dir {tmp_path}; '
                                    f'add --dataset-download to download it there']
    checkpoint = tmp_path / 'tiny.pth'  # validate.py without a checkpoint would fetch pretrained weights
    torch.save(timm.create_model('resnet18', num_classes=10, channels=(8, 16, 32, 64), stem_width=8).state_dict(),
               checkpoint)
    assert validate.cli(['--data-dir', str(tmp_path), '--dataset', 'torch/cifar10', '--checkpoint', str(checkpoint),
                          '--model', 'resnet18', '--num-classes', '10', '--model-kwargs', 'channels=(8,16,32,64)',
                          'stem_width=8', '--device', 'cpu', '--workers', '0']) == 2
    assert _error_lines(capsys)[0].startswith('validate.py: error: --dataset torch/cifar10: not found in --data-dir')


def test_a_dataset_download_without_network_says_so(tmp_path, capsys, monkeypatch):
    opened = []

    def offline(request, *args, **kwargs):
        opened.append(getattr(request, 'full_url', request))
        raise urllib.error.URLError(OSError(-2, 'Name or service not known'))

    monkeypatch.setattr(urllib.request, 'urlopen', offline)  # torchvision's download_url calls it
    assert train.cli(['--data-dir', str(tmp_path), *CIFAR, '--dataset-download', *TINY_RESNET]) == 2
    assert opened and 'cifar-10' in opened[0]  # torchvision's real download code ran up to the network
    [line] = _error_lines(capsys)
    assert line.startswith('train.py: error: --dataset-download: cannot download torch/cifar10 (')
    assert 'Name or service not known' in line and f'copy it into --data-dir {tmp_path}' in line


@pytest.mark.parametrize('script, argv, option', [
    (train, ['--data-dir', str(SHIPPED), '--pretrained', '--model', 'resnet18', '--device', 'cpu'], '--pretrained'),
    (validate, ['--data-dir', str(SHIPPED / 'val'), '--model', 'hf-hub:timm/resnet18.a1_in1k', '--device', 'cpu'],
     '--model hf-hub:timm/resnet18.a1_in1k'),
])
def test_hub_weights_offline_are_one_line(capsys, hub_cache, script, argv, option):
    assert script.cli(argv) == 2
    [line] = _error_lines(capsys)
    assert line.startswith(f'{script.__name__}.py: error: {option}: cannot fetch ')
    assert f'(HF_HUB_OFFLINE is set) and it is not in the cache {hub_cache}' in line


def test_hub_retries_that_end_offline_suggest_hf_hub_offline(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    with pytest.raises(InputError, match=r"\(no network\?\).*set HF_HUB_OFFLINE=1 to fail at once"):
        with downloads.model_download('resnet18', True, '--pretrained-path FILE'):
            raise LocalEntryNotFoundError('cannot find the requested files in the local cache')
    with pytest.raises(ValueError, match='not a download'):  # anything else passes through
        with downloads.model_download('resnet18', True, '--pretrained-path FILE'):
            raise ValueError('not a download')


def test_a_torch_dataset_without_data_dir_and_an_unprefixed_name_are_one_line(tmp_path, capsys):
    """timm reads a --dataset without a reader prefix as an image folder, and torchvision needs a root: both
    used to end in a TypeError traceback without --data-dir."""
    assert train.cli([*CIFAR, *TINY_RESNET]) == 2
    assert _error_lines(capsys) == ['train.py: error: --dataset torch/cifar10 needs --data-dir DIR: the folder it is '
                                    'read from (or downloaded into, with --dataset-download)']
    assert train.cli(['--dataset', 'fashion', '--device', 'cpu', *TINY_RESNET]) == 2
    assert _error_lines(capsys) == ['train.py: error: no dataset given: pass --data-dir DIR (a folder with train/ '
                                    'and val/ sub-folders)']
    assert train.cli(['--dataset', 'fashion', '--data-dir', str(tmp_path), '--device', 'cpu', *TINY_RESNET]) == 2
    assert _error_lines(capsys)[0].startswith("train.py: error: train split 'train' not found")
    checkpoint = tmp_path / 'tiny.pth'
    torch.save(timm.create_model('resnet18', num_classes=10, channels=(8, 16, 32, 64), stem_width=8).state_dict(),
               checkpoint)
    model = ['--checkpoint', str(checkpoint), '--model', 'resnet18', '--num-classes', '10', '--model-kwargs',
             'channels=(8,16,32,64)', 'stem_width=8', '--device', 'cpu', '--workers', '0']
    assert validate.cli(['--dataset', 'torch/cifar10', *model]) == 2
    assert _error_lines(capsys)[0].startswith('validate.py: error: --dataset torch/cifar10 needs --data-dir DIR')
    assert validate.cli(['--dataset', 'fashion', *model]) == 2
    assert _error_lines(capsys)[0].startswith('validate.py: error: no dataset given')


def test_a_failed_download_without_data_dir_names_the_option_not_none():
    assert downloads._cannot_download('hfds/x', None, 'offline').endswith('copy it into --data-dir DIR')
