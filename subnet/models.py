"""Model names and checkpoint files: what timm accepts, plus the short names people write in papers.

``--model vit_base`` (as in ``torchrun train.py --method cosub --model vit_base``) means timm's standard
ViT of that size at 224 px; a name that matches nothing stops with the closest timm names.
"""
import difflib
import inspect
import logging
import os

import timm
import torch
from timm.layers import DropPath, resample_abs_pos_embed
from timm.models import is_model, split_model_name_tag
from timm.utils import unwrap_model

from .blocks import drop_path_slots, slot_drop_rate
from .errors import UsageError, first_line
from .intact import read_checkpoint

_logger = logging.getLogger('train')

SHORT_NAMES = {
    'vit_tiny': 'vit_tiny_patch16_224',
    'vit_small': 'vit_small_patch16_224',
    'vit_base': 'vit_base_patch16_224',
    'vit_large': 'vit_large_patch16_224',
    'vit_huge': 'vit_huge_patch14_224',
}


def resolve_model_name(name: str) -> str:
    """A timm model name for ``name``: timm names (with or without a pretrained tag) pass unchanged."""
    if name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        return name
    arch, _ = split_model_name_tag(name)
    if is_model(arch):
        return name
    if name in SHORT_NAMES:
        _logger.info(f"Model '{name}' resolved to timm's {SHORT_NAMES[name]}.")
        return SHORT_NAMES[name]
    closest = difflib.get_close_matches(arch, timm.list_models() + list(SHORT_NAMES), n=5, cutoff=0.6)
    hint = f'; closest timm names: {", ".join(closest)}' if closest else '; see timm.list_models()'
    raise UsageError(f"unknown model '{name}'{hint}")


def load_checkpoint_file(path: str, what: str) -> dict:
    """Load a training checkpoint (weights_only, as timm does) whose checksums match (``subnet.intact``), or stop
    with one line saying what is wrong."""
    if not os.path.isfile(path):
        raise UsageError(f'{what} {path} does not exist')
    checkpoint, why = read_checkpoint(path)
    if checkpoint is None:
        raise UsageError(f'{what} {path} {why}')
    return checkpoint


def checkpoint_weights(checkpoint: dict, use_ema: bool = False) -> dict:
    """The model weights a checkpoint holds, chosen as timm's ``load_checkpoint`` chooses them."""
    for key in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model'):
        if checkpoint.get(key) is not None:
            return checkpoint[key]
    return checkpoint


def check_state_dict_fits(model: torch.nn.Module, checkpoint: dict, path: str, what: str,
                          use_ema: bool = False) -> None:
    """Stop with one line when a checkpoint's weights do not belong to this model (names or shapes)."""
    state_dict = checkpoint_weights(checkpoint, use_ema)
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise UsageError(f'{what} {path} holds no model weights (no state_dict)')
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = {k.removeprefix('module.').removeprefix('_orig_mod.'): v.shape for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        arch = checkpoint.get('arch', 'another model')
        detail = (f'{len(missing)} missing, {len(unexpected)} unexpected and {len(wrong)} mis-shaped weights'
                  + (f', e.g. {wrong[0]} {tuple(found[wrong[0]])} vs {tuple(expected[wrong[0]])}' if wrong else
                     f', e.g. {(missing or unexpected)[0]}'))
        raise UsageError(f'{what} {path} does not fit this model (checkpoint arch: {arch}): {detail}')


def load_initial_checkpoint(model: torch.nn.Module, path: str) -> None:
    """``--initial-checkpoint``: weights (EMA ones first, as timm's create_model loads them), checked first."""
    if os.path.splitext(path)[1].lower() in ('.safetensors', '.npz', '.npy'):
        if not os.path.isfile(path):
            raise UsageError(f'--initial-checkpoint {path} does not exist')
        try:
            timm.models.load_checkpoint(model, path)
        except (RuntimeError, ValueError, OSError, NotImplementedError) as e:
            raise UsageError(f'--initial-checkpoint {path} cannot be loaded: {first_line(e)[:160]}') from None
        return
    checkpoint = load_checkpoint_file(path, '--initial-checkpoint')
    resample_position_embedding(model, checkpoint_weights(checkpoint, use_ema=True))
    check_state_dict_fits(model, checkpoint, path, '--initial-checkpoint', use_ema=True)
    model.load_state_dict(timm.models.clean_state_dict(checkpoint_weights(checkpoint, use_ema=True)))
    _logger.info(f"Loaded initial weights from '{path}'")


def resample_position_embedding(model: torch.nn.Module, state_dict: dict) -> None:
    """Fit a ViT's absolute position embedding in ``state_dict`` to the model's patch grid, in place (bicubic).

    DeiT III pre-trains ViT-B/L/H at 192 or 160 px and fine-tunes them at 224 from that checkpoint; its
    ``--finetune`` resamples the embedding this way, as timm does when it loads pretrained weights.
    """
    target, source = getattr(model, 'pos_embed', None), state_dict.get('pos_embed')
    if not isinstance(target, torch.Tensor) or not isinstance(source, torch.Tensor) or source.shape == target.shape:
        return
    prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 0)
    state_dict['pos_embed'] = resample_abs_pos_embed(
        source, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix, interpolation='bicubic',
        antialias=False)
    _logger.info(f'Resampled the position embedding from {tuple(source.shape)} to {tuple(target.shape)}.')


def naflex_patch_size(model: torch.nn.Module) -> tuple:
    """The patch size a NaFlex loader must cut for ``model``: its ``get_patch_size()`` (what timm's train.py reads)
    or ``embeds.patch_size`` (what timm's validate.py reads); timm's 16 x 16, with a warning, when it has neither."""
    model = unwrap_model(model)
    if hasattr(model, 'get_patch_size'):
        return tuple(model.get_patch_size())
    patch_size = getattr(getattr(model, 'embeds', None), 'patch_size', None)
    if patch_size is not None:
        return tuple(patch_size)
    _logger.warning('Could not determine model patch size, using default: (16, 16)')
    return 16, 16


def accepted_kwargs(model_name: str, kwargs: dict, **create_kwargs) -> dict:
    """The entries of ``kwargs`` the model's class takes (its ``__init__`` names them, or takes ``**kwargs``).

    A method's model kwargs may fit only some families (ST++ asks ViTs for ``dynamic_img_size``); the class is
    found by building the model on the meta device (no memory, the RNGs left as they were).
    """
    if not kwargs:
        return {}
    with torch.random.fork_rng(devices=[]), torch.device('meta'):
        probe = timm.create_model(model_name, pretrained=False, **create_kwargs)
    parameters = inspect.signature(type(probe).__init__).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in parameters}


def model_drop_path_rate(model: torch.nn.Module) -> float:
    """The highest drop-path rate of any of the model's drop-path slots (0 when it has none)."""
    return max((slot_drop_rate(getattr(m, slot)) for m in model.modules() for slot in drop_path_slots(m)),
               default=0.0)


def constant_drop_path(model: torch.nn.Module, rate: float) -> None:
    """DeiT III's stochastic depth: every drop-path slot at ``rate`` (timm ramps it from 0 at the first block).

    timm's own DropPath in timm's own slots (parameter-free), so the state_dict and checkpoints are unchanged.
    """
    for module in list(model.modules()):
        for slot in drop_path_slots(module):
            setattr(module, slot, DropPath(rate) if rate > 0 else torch.nn.Identity())
