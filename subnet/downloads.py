"""What train.py and validate.py may fetch over the network, and one line when they cannot.

Pretrained weights and ``hf-hub:`` models come from the Hugging Face Hub (or a URL) through timm; ``torch/``
datasets are downloaded by torchvision with ``--dataset-download``. Offline, both end in tracebacks of 40-100
lines (the hub first retries for about 45 s unless ``HF_HUB_OFFLINE=1`` is set); these context managers turn
them into one ``InputError`` that names the option and the cause (the scripts print it as one line).
"""
import contextlib
import urllib.error
from typing import Iterator

from .errors import InputError

__all__ = ['model_download', 'dataset_download']


def _hub_offline_errors() -> tuple:
    """The hub's 'not reachable and not cached' errors (huggingface_hub comes with timm)."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:
        return ()
    return LocalEntryNotFoundError, OfflineModeIsEnabled


def _hub_state() -> tuple:
    """(the hub's cache folder, whether HF_HUB_OFFLINE is set)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return '~/.cache/huggingface/hub', False
    return constants.HF_HUB_CACHE, constants.is_offline_mode()


@contextlib.contextmanager
def model_download(model_name: str, pretrained: bool, weights_file_option: str) -> Iterator[None]:
    """Inside, timm's ``create_model``: weights or a hub model config it cannot fetch become one line that names
    the option, the cache, and ``weights_file_option`` (the script's way to give weights as a file)."""
    try:
        yield
    except _hub_offline_errors() + (urllib.error.URLError,):
        hub_model = model_name.startswith(('hf-hub:', 'hf_hub:'))
        option = f'--model {model_name}' if hub_model or not pretrained else '--pretrained'
        cache, offline = _hub_state()
        cause, hint = ('HF_HUB_OFFLINE is set', '') if offline else (
            'no network?', "; set HF_HUB_OFFLINE=1 to fail at once instead of after the hub's retries")
        alternative = 'a timm architecture name with' if hub_model else 'the weights as a file with'
        raise InputError(f'{option}: cannot fetch {model_name} from the Hugging Face Hub ({cause}) and it is not '
                         f'in the cache {cache}; run once with a network to fill the cache, or give {alternative} '
                         f'{weights_file_option}{hint}') from None


@contextlib.contextmanager
def dataset_download(dataset: str, root: str, download: bool) -> Iterator[None]:
    """Inside, timm's ``create_dataset``: a torch/ dataset that is missing, or cannot be downloaded, becomes
    one line naming ``--dataset-download`` or the network."""
    try:
        yield
    except RuntimeError as e:
        if 'download=True' in str(e) and not download:  # torchvision's "You can use download=True ..."
            raise InputError(f'--dataset {dataset}: not found in --data-dir {root}; add --dataset-download to '
                             f'download it there') from None
        if 'Error downloading' in str(e):  # torchvision's MNIST family, after every mirror failed
            raise InputError(_cannot_download(dataset, root, str(e))) from None
        raise
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise InputError(_cannot_download(dataset, root, str(getattr(e, 'reason', e)))) from None


def _cannot_download(dataset: str, root: str, reason: str) -> str:
    return (f'--dataset-download: cannot download {dataset} ({reason}: no network?); download it where there is '
            f'one and copy it into --data-dir {root or "DIR"}')
