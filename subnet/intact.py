"""Intact checkpoints: a checksum written into every checkpoint, checked when one is read, and the walk back to the
furthest checkpoint of a run folder that is intact.

A file cut short, overwritten or empty fails to load; a file whose bytes changed inside a tensor loads, and only a
checksum notices. Every checkpoint we write carries one extra key, ``payload_crc32``: for each part
(``CHECKED_PARTS``: the weights, the EMA weights, the method's state and its EMA twin, the optimizer state, the fp16
grad scaler, the mid-epoch position) a CRC-32 of its tensors' bytes, names, dtypes and shapes and of its other
values. timm ignores the key (``load_checkpoint``, ``create_model(checkpoint_path=...)``,
``resume_checkpoint`` read only the keys they know), and a checkpoint without it (timm's own) is read as before.
CRC-32 detects damage, not tampering: it is a check against disks and copies, at zlib's speed.

``--resume auto`` continues from the furthest position among the folder's recovery files, ``last.pth.tar`` and
``checkpoint-*.pth.tar`` that is intact, naming each one it passes over and why; when a folder holds a run but none
of its checkpoints is intact, the run stops rather than starting afresh over it.
"""
import argparse
import glob
import logging
import os
import pickle
import zipfile
import zlib
from typing import List, Optional, Tuple

import torch

__all__ = ['CHECKSUM_KEY', 'part_checksum', 'checksums', 'damaged_part', 'read_checkpoint', 'intact_candidates']

_logger = logging.getLogger('train')

CHECKSUM_KEY = 'payload_crc32'
# the parts of a checkpoint a checksum covers, when present: weights, the method's state (its RNG streams, GKT's
# sample memory), optimizer, fp16 grad scaler, mid-epoch position
CHECKED_PARTS = ('state_dict', 'state_dict_ema', 'task_state', 'task_state_ema', 'optimizer', 'amp_scaler',
                 'epoch_position')
# what torch.load raises for a file that is not a whole checkpoint (cut short, random bytes, empty)
LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError,
               IndexError, TypeError, AttributeError)


def _update(crc: int, value, name: str) -> int:
    """Fold ``value`` (tensors, dicts, lists, tuples and plain values, nested) into ``crc``, names included."""
    crc = zlib.crc32(name.encode(), crc)
    if torch.is_tensor(value):
        tensor = value.detach().to('cpu').contiguous()
        crc = zlib.crc32(f'{tensor.dtype}{tuple(tensor.shape)}'.encode(), crc)
        if tensor.numel():
            crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy(), crc)
        return crc
    if isinstance(value, dict):
        for key in sorted(value, key=repr):
            crc = _update(crc, value[key], f'{name}.{key}')
        return crc
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            crc = _update(crc, item, f'{name}[{i}]')
        return crc
    return zlib.crc32(repr(value).encode(), crc)


def part_checksum(value) -> int:
    """The CRC-32 of one checkpoint part."""
    return _update(0, value, '')


def checksums(state: dict) -> dict:
    """{part: CRC-32} for the parts of ``state`` a checksum covers."""
    return {part: part_checksum(state[part]) for part in CHECKED_PARTS if state.get(part) is not None}


def damaged_part(checkpoint: dict) -> Optional[str]:
    """The first part whose checksum does not match (None: intact, or a checkpoint written without checksums)."""
    expected = checkpoint.get(CHECKSUM_KEY)
    if not isinstance(expected, dict):
        return None
    for part, crc in expected.items():
        if part not in checkpoint or part_checksum(checkpoint[part]) != crc:
            return part
    return None


def read_checkpoint(path: str, verify: bool = True) -> Tuple[Optional[dict], str]:
    """(the checkpoint, '') when ``path`` loads (``weights_only``, as timm) and, with ``verify``, its checksums
    match; else (None, why not, said as 'is empty', 'is damaged: ...'). Tensors are mapped lazily: only a
    checksum reads them whole."""
    if not os.path.isfile(path):
        return None, 'does not exist'
    if os.path.getsize(path) == 0:
        return None, 'is empty'
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except LOAD_ERRORS as e:
        reason = str(e).strip().splitlines()[0].split('. ')[0] if str(e).strip() else type(e).__name__
        return None, f'is not a readable checkpoint ({reason[:160]})'
    if not isinstance(checkpoint, dict):
        return None, f'holds a {type(checkpoint).__name__}, not a checkpoint dict'
    part = damaged_part(checkpoint) if verify else None
    if part is not None:
        return None, f'is damaged: the checksum of its {part} does not match'
    return checkpoint, ''


def _resume_order(checkpoint: dict) -> tuple:
    """(epoch, batches done in it) a checkpoint continues from (``subnet.resume`` writes the position)."""
    from .resume import resume_order
    return resume_order(checkpoint)


def candidate_files(folder: str) -> List[str]:
    """The folder's checkpoints ``--resume auto`` may continue from, in order of preference at equal positions."""
    recovery = sorted(glob.glob(os.path.join(folder, 'recovery-*.pth.tar')))
    history = sorted(glob.glob(os.path.join(folder, 'checkpoint-*.pth.tar')))
    last = os.path.join(folder, 'last.pth.tar')
    return recovery + ([last] if os.path.isfile(last) else []) + history


def intact_candidates(folder: str) -> Tuple[str, List[str]]:
    """(the furthest intact checkpoint of ``folder`` or '', ['<file>: it <why it was passed over>', ...]).

    Positions are read from every file (lazily mapped, cheap); checksums are verified furthest first, so only the
    files passed over and the chosen one are read whole.
    """
    ordered, skipped = [], []
    for index, path in enumerate(candidate_files(folder)):
        checkpoint, why = read_checkpoint(path, verify=False)
        if checkpoint is None:
            skipped.append(f'{os.path.basename(path)}: it {why}')
            continue
        try:
            order = _resume_order(checkpoint)
        except (KeyError, TypeError, IndexError):
            skipped.append(f'{os.path.basename(path)}: it holds no epoch or position')
            continue
        ordered.append((order, -index, path))
    for _, _, path in sorted(ordered, reverse=True):
        checkpoint, why = read_checkpoint(path)
        if checkpoint is not None:
            return path, skipped
        skipped.append(f'{os.path.basename(path)}: it {why}')
    return '', skipped

