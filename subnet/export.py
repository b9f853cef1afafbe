"""Export a subnet as a plain timm model: the kept blocks' weights, renumbered, and the ``create_model`` call.

A subnet (``subnet/evaluation.py``) keeps some blocks of a trained model and skips the rest. For the families
whose constructor takes the number of blocks per stage as a keyword, the same architecture with fewer blocks is
an ordinary timm model: ``timm.create_model('resnet50', layers=[2, 2, 3, 2], checkpoint_path=FILE)`` builds it
and loads the exported weights, without this project installed. Each kept block takes the place of its stage's
next block (``layer3.4`` becomes ``layer3.2`` when ``layer3.2`` and ``layer3.3`` are dropped); everything outside
the blocks is copied unchanged. What is written is what the evaluation measured: the model's weights and buffers
at the moment of the export, so BatchNorm statistics re-estimated for the subnet (``validate.py --bn-recal``)
travel with it.

Before anything is written, a plan is checked three ways: timm builds the architecture from the keywords and
takes the renumbered weights with ``strict=True``; every kept block has the same settings in both models (timm
sets some by a block's index: Swin shifts the windows of every odd block of a stage, so a kept block must keep
its index parity); and the built model's logits equal the depth engine's subnet on a probe batch.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.models import (Beit, Cait, ConvNeXt, Eva, Levit, PoolingVisionTransformer, ResNet, SwinTransformer,
                         VisionTransformer, Xcit)
from torch import nn

from .blocks import BlockMap, drop_path_slots, model_name as architecture
from .depth import DepthEngine
from .errors import InputError
from .evaluation import Subnet
from .models import resolve_model_name
from .speed import images_per_second, speed_fields

__all__ = ['ExportError', 'DepthKeyword', 'DEPTH_KEYWORDS', 'SUPPORTED', 'depth_keyword', 'ExportPlan',
           'SubnetExporter', 'ExportRun', 'EXPORT_FIELDS', 'load_call']

_logger = logging.getLogger(__name__)

# what validate.py --export adds to a subnet's result row
EXPORT_FIELDS = ('exported', 'load_call')


class ExportError(InputError):
    """A model or subnet that timm cannot build from ``create_model`` keywords (one line, says what is supported)."""


@dataclass(frozen=True)
class DepthKeyword:
    """How a family's timm constructor takes its number of blocks: one count per stage, or one for its only stage."""
    families: str                      # for messages
    classes: Tuple[type, ...]          # the timm model classes of the family (subclasses included)
    keyword: str                       # the create_model keyword
    stages: str                        # regex over block-map stage names: the stages the keyword counts, in order
    per_stage: bool                    # a list with one count per stage, or one int

    def value(self, counts: Sequence[int]):
        return list(counts) if self.per_stage else counts[0]


# Checked against timm 1.0.31's constructors (each model function merges the caller's keywords over its own:
# ``dict(model_args, **kwargs)``); tests/test_export.py builds and loads each family. RegNet derives its stage
# depths from (depth, w0, wa, wm), EfficientNet and MobileNet from block-string definitions: neither has a
# keyword that sets the blocks of each stage, so they are not listed.
DEPTH_KEYWORDS = (
    DepthKeyword('ResNet/ResNeXt', (ResNet,), 'layers', r'layer\d+', True),
    DepthKeyword('ViT/DeiT/DeiT III/EVA/BEiT/CaiT/XCiT', (VisionTransformer, Eva, Beit, Cait, Xcit), 'depth',
                 r'blocks', False),
    DepthKeyword('ConvNeXt', (ConvNeXt,), 'depths', r'stages\.\d+\.blocks', True),
    DepthKeyword('Swin', (SwinTransformer,), 'depths', r'layers\.\d+\.blocks', True),
    DepthKeyword('PiT', (PoolingVisionTransformer,), 'depth', r'transformers\.\d+\.blocks', True),
    DepthKeyword('LeViT', (Levit,), 'depth', r'stages\.\d+\.blocks', True),
)
SUPPORTED = '; '.join(f'{d.families} ({d.keyword}=)' for d in DEPTH_KEYWORDS)


def depth_keyword(model: nn.Module) -> DepthKeyword:
    """The family's depth keyword, or ExportError naming the families that export."""
    for family in DEPTH_KEYWORDS:
        if isinstance(model, family.classes):
            return family
    raise ExportError(f'{architecture(model)} ({type(model).__name__}) cannot be exported: timm has no '
                      f'create_model keyword for its blocks per stage; --export supports {SUPPORTED}')


def load_call(model_name: str, kwargs: dict, path: str) -> str:
    """The one line of Python that loads an exported subnet with plain timm."""
    arguments = [repr(model_name)] + [f'{k}={v!r}' for k, v in kwargs.items()] + [f'checkpoint_path={path!r}']
    return f'timm.create_model({", ".join(arguments)})'


@dataclass(frozen=True)
class ExportPlan:
    """How one subnet becomes a timm model: its create_model keywords and the new name of each kept block."""
    subnet: Subnet
    model_name: str
    kwargs: dict                       # every create_model keyword but checkpoint_path
    renames: Dict[str, str]            # kept block -> its name in the exported model
    dropped: Tuple[str, ...]           # names of the dropped blocks
    file_name: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, 'file_name', f'{self.subnet.name}.pth.tar')

    def state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The model's weights and buffers as they are now, dropped blocks left out and kept ones renumbered."""
        exported = {}
        for key, value in model.state_dict().items():
            block = _owner(key, self.dropped)
            if block is not None:
                continue
            block = _owner(key, self.renames)
            if block is not None:
                key = self.renames[block] + key[len(block):]
            exported[key] = value.detach().to('cpu', copy=True)
        return exported

    def load_call(self, path: str) -> str:
        return load_call(self.model_name, self.kwargs, path)

    def load(self, path: str) -> nn.Module:
        """The exported model loaded back as a user would: ``timm.create_model(..., checkpoint_path=path)``."""
        return timm.create_model(self.model_name, **self.kwargs, checkpoint_path=path).eval()


def _owner(key: str, blocks) -> Optional[str]:
    """The block (a module name) a state_dict key belongs to, if it is one of ``blocks``."""
    parts = key.split('.')
    for end in range(len(parts) - 1, 0, -1):
        prefix = '.'.join(parts[:end])
        if prefix in blocks:
            return prefix
    return None


def _settings(module: nn.Module) -> Dict[str, object]:
    """The plain-valued settings of a block and its submodules (ints, floats, strings, tuples of them), drop-path
    slots left out: their rates differ by index and do nothing at inference."""
    plain = (bool, int, float, str, type(None))
    slots = {f'{name}.{slot}' if name else slot for name, m in module.named_modules() for slot in drop_path_slots(m)}
    found = {}
    for name, sub in module.named_modules():
        if any(name == s or name.startswith(s + '.') for s in slots):
            continue
        for attr, value in vars(sub).items():
            if attr.startswith('_') or attr == 'training' or f'{name}.{attr}'.lstrip('.') in slots:
                continue
            if isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value)):
                found[f'{name}.{attr}'.lstrip('.')] = value
    return found


class SubnetExporter:
    """Plans and writes the exports of one model's subnets (``validate.py --export DIR``).

    ``model_name`` and ``model_kwargs`` are what ``timm.create_model`` built the model from (num_classes,
    in_chans and the like included); each export adds the family's depth keyword to them.
    """

    def __init__(self, engine: DepthEngine, model_name: str, model_kwargs: dict):
        self.engine = engine
        self.model = engine.model
        self.block_map: BlockMap = engine.block_map
        self.family = depth_keyword(self.model)
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        self.written: Dict[str, str] = {}  # subnet name -> the file written for it
        pattern = re.compile(self.family.stages)
        self.counted = [s for s in self.block_map.stages if pattern.fullmatch(s.name)]
        if not self.counted or (not self.family.per_stage and len(self.counted) != 1):
            raise ExportError(f'{self.block_map.model_name}: its blocks are not laid out as timm builds '
                              f'{self.family.families} models (stages {[s.name for s in self.block_map.stages]})')

    # ---- planning ----------------------------------------------------------------------------------------------
    def plan(self, subnet: Subnet) -> ExportPlan:
        """The checked plan of one subnet; ExportError (one line) when timm cannot build it from keywords."""
        keep = subnet.keep
        if bool(keep.all()):
            raise ExportError(f'subnet {subnet.name} keeps every block: it is the full net, whose checkpoint '
                              f'timm already loads; export a subnet that drops blocks')
        blocks = self.block_map.blocks
        counted = {b for stage in self.counted for b in stage.blocks}
        for block in blocks:
            if not keep[block.index] and block.index not in counted:
                raise ExportError(f'subnet {subnet.name} drops {block.name}, which timm builds with every '
                                  f'{self.family.families} model; only blocks of {self._stage_names()} can go')
        renames, counts = {}, []
        for stage in self.counted:
            kept = [blocks[b] for b in stage.blocks if keep[b]]
            if not kept:
                raise ExportError(f'subnet {subnet.name} keeps no block of {stage.name}: nothing of that stage '
                                  f'is left to export (a stage needs at least one block)')
            for position, block in enumerate(blocks[b] for b in stage.blocks):
                if block.name != f'{stage.name}.{position}':
                    raise ExportError(f'{self.block_map.model_name}: block {block.name} is not numbered by its '
                                      f'place in {stage.name}, as timm numbers {self.family.families} blocks')
            renames.update({block.name: f'{stage.name}.{new}' for new, block in enumerate(kept)})
            counts.append(len(kept))
        kwargs = {**self.model_kwargs, self.family.keyword: self.family.value(counts)}
        plan = ExportPlan(subnet, self.model_name, kwargs, renames,
                          tuple(b.name for b in blocks if not keep[b.index]))
        self._check(plan)
        return plan

    def _stage_names(self) -> str:
        return ', '.join(s.name for s in self.counted)

    def build(self, plan: ExportPlan) -> nn.Module:
        """The plain timm model of a plan, with the model's current weights (eval mode, the model's device)."""
        try:
            exported = timm.create_model(plan.model_name, **plan.kwargs)
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise ExportError(f'subnet {plan.subnet.name}: timm.create_model({plan.model_name!r}, '
                              f'{self.family.keyword}={plan.kwargs[self.family.keyword]}) fails: '
                              f'{str(e).splitlines()[0][:160]}') from None
        missing, unexpected = exported.load_state_dict(plan.state_dict(self.model), strict=False)
        if missing or unexpected:
            raise ExportError(f'subnet {plan.subnet.name}: the renumbered weights do not fit the model timm builds '
                              f'({len(missing)} missing, {len(unexpected)} unexpected, e.g. '
                              f'{(list(missing) + list(unexpected))[0]})')
        parameter = next(self.model.parameters())
        return exported.to(device=parameter.device, dtype=parameter.dtype).eval()

    def _check(self, plan: ExportPlan) -> None:
        exported = self.build(plan)
        modules = dict(exported.named_modules())
        for old, new in plan.renames.items():
            trained, built = _settings(self.model.get_submodule(old)), _settings(modules[new])
            for key in sorted(trained.keys() & built.keys()):
                if trained[key] != built[key]:
                    raise ExportError(
                        f'subnet {plan.subnet.name}: {old} would become {new}, which timm builds with {key}='
                        f'{built[key]!r}, not {trained[key]!r} (timm sets it by the block\'s index); export subnets '
                        f'whose kept blocks keep that setting (e.g. Swin: keep each block\'s index parity)')
        self._check_logits(plan, exported)

    @torch.no_grad()
    def _check_logits(self, plan: ExportPlan, exported: nn.Module) -> None:
        parameter = next(self.model.parameters())
        probe = torch.randn((2,) + tuple(self.block_map.input_size), generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=parameter.device, dtype=parameter.dtype)
        training = self.model.training
        self.model.eval()
        try:
            with self.engine.subnet(plan.subnet.keep):
                expected = self.model(probe)
        finally:
            self.model.train(training)
        got = exported(probe)
        tolerance = (1e-4 if parameter.dtype == torch.float32 else 2e-2) * max(1.0, float(expected.abs().max()))
        if got.shape != expected.shape or not bool(((got - expected).abs() <= tolerance).all()):
            difference = float((got - expected).abs().max()) if got.shape == expected.shape else float('nan')
            raise ExportError(f'subnet {plan.subnet.name}: the model timm builds computes other logits than the '
                              f'subnet (max difference {difference:.3g}); it cannot be exported as a plain model')

    def plan_all(self, subnets: Sequence[Subnet], folder: str) -> List[ExportPlan]:
        """Plans for every subnet but the full net's row, checked before anything is evaluated or written; no
        existing file is overwritten."""
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ExportError(f'--export {folder} is a file, not a folder')
        plans = [self.plan(s) for s in subnets if s.kind != 'full']
        if not plans:
            raise ExportError('--export needs a subnet to export: add one to --subnets (e.g. prefix:0.5)')
        for plan in plans:
            path = os.path.join(folder, plan.file_name)
            if os.path.exists(path):
                raise ExportError(f'--export {folder}: {path} exists already; choose another folder or move it')
        return plans

    # ---- writing -----------------------------------------------------------------------------------------------
    def write(self, plan: ExportPlan, folder: str, args: Optional[dict] = None,
              provenance: Optional[dict] = None) -> str:
        """Write the plan's checkpoint into ``folder`` (under a temporary name, then renamed); returns its path.

        The file holds what our checkpoints hold: ``arch``, ``state_dict``, and ``args`` (a Namespace whose
        ``model`` and ``model_kwargs`` rebuild it; ``args`` adds the input settings the evaluation used), plus
        ``model_kwargs`` (every create_model keyword) and ``subnet`` (where it came from).
        """
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, plan.file_name)
        model_kwargs = {k: v for k, v in plan.kwargs.items() if k not in ('num_classes', 'in_chans', 'global_pool')}
        checkpoint = {
            'arch': plan.model_name,
            'state_dict': plan.state_dict(self.model),
            'args': argparse.Namespace(**{**(args or {}), 'model': plan.model_name, 'model_kwargs': model_kwargs}),
            'model_kwargs': dict(plan.kwargs),
            'subnet': {'name': plan.subnet.name, 'depths': list(plan.subnet.depths),
                       'blocks': plan.subnet.blocks_text(self.block_map),
                       'kept_blocks': list(plan.renames), **(provenance or {})},
        }
        handle, temporary = tempfile.mkstemp(prefix=f'.{plan.file_name}.', suffix='.tmp', dir=folder)
        os.close(handle)
        try:
            torch.save(checkpoint, temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        self.written[plan.subnet.name] = path
        return path


def _row_metric(row: dict) -> str:
    """A validate.py row's task metric: top1, or map for multi-label (``--task multilabel``)."""
    return 'map' if 'map' in row else 'top1'


class ExportRun:
    """``validate.py --export DIR``: plans every subnet before the evaluation, writes each one while it is installed
    (with the BN statistics it was measured with), then loads them back with plain timm and times them.

    ``args`` is validate.py's namespace after the model is built (model, model_kwargs, num_classes, in_chans, gp,
    checkpoint, bn_recal, export, speed_batch, channels_last); ``data_config`` the evaluation's input settings.
    """

    def __init__(self, args, engine: DepthEngine, subnets: Sequence[Subnet], data_config: dict):
        self.args, self.folder = args, args.export
        name = resolve_model_name(args.model)
        if name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
            name = architecture(engine.model)  # the registered architecture: rebuilding it needs no download
        in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
        # the keywords validate.py built the model with, besides its name
        kwargs = {'num_classes': args.num_classes, **({'in_chans': in_chans} if in_chans != 3 else {}),
                  **({'global_pool': args.gp} if args.gp else {}), **args.model_kwargs}
        self.exporter = SubnetExporter(engine, name, kwargs)
        self.plans = {plan.subnet.name: plan for plan in self.exporter.plan_all(subnets, self.folder)}
        # what the files' ``args`` carry besides the model: validate.py --checkpoint FILE evaluates them the same way
        self.stored_args = dict(num_classes=args.num_classes, in_chans=in_chans, gp=args.gp,
                                input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'],
                                mean=list(data_config['mean']), std=list(data_config['std']),
                                interpolation=data_config['interpolation'])

    def measuring(self, measure: Callable[[Subnet], dict], bn_recal: int) -> Callable[[Subnet], dict]:
        """``measure``, then the subnet's export, still inside the subnet's context (its BN statistics)."""
        def measure_and_export(subnet: Subnet) -> dict:
            row = measure(subnet)
            if subnet.name in self.plans:
                metric = _row_metric(row)
                provenance = {'checkpoint': self.args.checkpoint, metric: row[metric], 'bn_recal': bn_recal}
                self.exporter.write(self.plans[subnet.name], self.folder, self.stored_args, provenance)
            return row
        return measure_and_export

    def finish(self, rows: Sequence[dict], device: torch.device, dtype: Optional[torch.dtype],
               autocast: Callable[[], ContextManager]) -> None:
        """Add EXPORT_FIELDS to the rows (and log the load calls), then time the exported models, loaded back with
        plain timm as a user would, against the full net and add SPEED_FIELDS (unless --speed-batch is 0)."""
        written = self.exporter.written
        for row in rows:
            path = written.get(row['subnet'])
            row.update(exported=path or '', load_call=self.plans[row['subnet']].load_call(path) if path else '')
            if path:
                metric = _row_metric(row)
                _logger.info(f'Exported {row["subnet"]} ({metric} {row[metric]:.3f}): {row["load_call"]}')
        batch, channels_last = self.args.speed_batch, self.args.channels_last
        if batch <= 0:
            return
        dtype = dtype or torch.float32
        models = {'full': self.exporter.model}
        for name, path in written.items():
            loaded = self.plans[name].load(path).to(device=device, dtype=dtype)
            models[name] = loaded.to(memory_format=torch.channels_last) if channels_last else loaded
        batches = sorted({1, batch})
        _logger.info(f'Timing {len(models)} models at batch {" and ".join(map(str, batches))} on {device}, '
                     f'{torch.get_num_threads()} threads, eval mode, warm-up excluded.')
        speeds = images_per_second(models, self.exporter.block_map.input_size, batches, device=device, dtype=dtype,
                                   channels_last=channels_last, autocast=autocast)
        for row in rows:
            row.update(speed_fields(speeds, row['subnet'], 'full', batch))
            _logger.info(f'{row["subnet"]:>14s}: {row["img_per_s"]:9.1f} img/s at batch {batch} '
                         f'({row["speedup"]:.2f}x), {row["img_per_s_batch1"]:8.1f} img/s at batch 1 '
                         f'({row["speedup_batch1"]:.2f}x)')
