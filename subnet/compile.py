"""``--torchcompile`` per method: the whole model, or each residual block (``--compile-scope model|blocks``).

Compiling the whole model traces the subnet the depth engine installed: a new subnet is a new graph, so methods
whose subnet changes every step (ST, ST++, GKT) keep compiling. The block scope is PyTorch's regional compilation:
each block's forward is compiled and installed as that block's instance-level ``forward``; the modules outside the
blocks that hold parameters (the stem, the head) are compiled the same way. The depth engine puts its own
instance-level forward in front of a block it skips or runs on some rows and calls the compiled one underneath
(``InstanceForward.previous``), so which blocks run is plain Python around compiled code and a new subnet compiles
nothing. Each region is its own dynamo frame (``_own_forward``), so the graphs are bounded by the regions and
their variants (full net, inside a subnet, BatchNorm statistics frozen or not, training or eval), not by the
subnets. Sizes that vary from step to step (per-row skipping, ST++'s subnet inputs drawn at every side) are made
symbolic by dynamo's automatic dynamic shapes after the second size a region sees; inductor specialises them
again, a graph per side (README, Speed), so ST++ under ``--torchcompile`` snaps its sides to a few
(``--st-side-step``, its ``compile_dynamic`` is False) and each region compiles a static graph per side. A
method whose steps run the full net unchanged (``runs_full_net``: the label pass of ST, ST++ and GKT) runs that
pass as one graph of the whole model, built over the regions (``FullNetGraph``). Before
the first step the loop runs ``compile_ahead``: one pass of each variant the method lists (``compile_variants``:
a subnet that keeps every block, at each side), so that no graph compiles after the first step. Each
compiled region costs a fixed amount per call (dynamo's guard check, AOTAutograd's forward and backward
wrappers): tiny steps are slower compiled (README, Speed).

The compiled forward is a bound method in the module's ``__dict__``: ``deepcopy`` (EMA) binds it to the copy,
and ``state_dict`` does not see it.
"""
from __future__ import annotations

import contextlib
import logging
import time
import types
import weakref
from typing import List, Optional, Sequence

import torch
from torch import nn

from .blocks import find_blocks, unwrap_model

__all__ = ['SCOPES', 'FullNetGraph', 'compile_ahead', 'compile_scope', 'compile_regions', 'compile_task',
           'compiled_regions']

_logger = logging.getLogger('train')

SCOPES = ('model', 'blocks')
_COMPILED = weakref.WeakSet()  # the compiled region forwards compile_regions made (a deepcopy shares them)


def compile_scope(args, method_cls) -> str:
    """``--compile-scope``, or the method's default (``Method.compile_scope``)."""
    return getattr(args, 'compile_scope', None) or method_cls.compile_scope


def _regions(module: nn.Module, blocks: set, out: List[nn.Module]) -> List[nn.Module]:
    """The blocks, and each largest module outside them that holds parameters and contains no block (stem, head,
    a downsampling layer between stages); containers of blocks are walked, not compiled."""
    for child in module.children():
        if child in blocks:
            out.append(child)
        elif any(m in blocks for m in child.modules()):
            _regions(child, blocks, out)
        elif next(child.parameters(), None) is not None:
            out.append(child)
    return out


def compile_regions(model: nn.Module, block_modules: Sequence[nn.Module], *, backend='inductor',
                    mode: Optional[str] = None, dynamic: Optional[bool] = None) -> List[nn.Module]:
    """Compile each block of ``model`` and each parameter-holding module outside them, in place; return them.

    Each region gets its own compiled copy of its class's ``forward`` (``_own_forward``), bound as its
    instance-level ``forward``.
    """
    model = unwrap_model(model)
    regions = _regions(model, set(block_modules), [])
    options, mode = _options(backend, mode)
    names = {m: n for n, m in model.named_modules()}
    for region in regions:
        if 'forward' in region.__dict__:
            raise ValueError(f'{type(region).__name__} already has an instance-level forward: compile the regions '
                             f'outside any depth context, once')
        compiled = torch.compile(_own_forward(type(region), names[region]), backend=backend, mode=mode,
                                 dynamic=dynamic, options=options)
        _COMPILED.add(compiled)
        region.__dict__['forward'] = types.MethodType(compiled, region)
    return regions


def _own_forward(cls: type, name: str):
    """A function calling ``cls.forward``, with a code object of its own named after the region
    (``BasicBlock.forward[layer1.0]``): the frame dynamo compiles for that region alone.

    Dynamo keeps compiled graphs per code object, and its automatic-dynamic decisions per code name and line. Sharing
    one frame across regions (one compiled ``cls.forward`` per class; torch.nn's own forwards, which dynamo enters
    through one shared wrapper) made the blocks of different widths and spatial sizes one frame: dynamo saw its
    sizes change from block to block and made them symbolic (guards evaluated in Python, slower kernels), and each
    call walked the cache entries of every block (timm's drop-path rates differ per block, so each block had its
    own graphs anyway). Per region, a fixed input size keeps static shapes and a call checks only its own entries
    (full net, subnet with BN frozen, eval); ST++'s inputs at every side of its draw (``--st-side-step 1``) still make
    them symbolic.
    """
    forward = cls.forward

    def region_forward(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    label = f'{forward.__qualname__}[{name}]'
    code = region_forward.__code__.replace(co_name=label, co_qualname=label)
    own = types.FunctionType(code, region_forward.__globals__, label, None, region_forward.__closure__)
    own.__qualname__ = label
    return own


def _options(backend, mode: Optional[str]) -> tuple:
    """(options, mode) for torch.compile: inductor's come as options, which torch.compile takes instead of a mode."""
    return (_inductor_options(mode), None) if backend == 'inductor' else (None, mode)


def _inductor_options(mode: Optional[str]) -> dict:
    """Inductor's options for ``mode``, with its layout optimisation off: with dynamic shapes it breaks the backward
    of a convolution whose input size changed (torch 2.14 on the CPU, a stride assertion; a bare ``nn.Conv2d``
    shows it); ``--channels-last`` still gives convolution nets their layout."""
    from torch._inductor import list_mode_options  # the options behind torch.compile's ``mode`` names
    return dict(list_mode_options(mode or 'default'), layout_optimization=False)


class FullNetGraph:
    """The full net's training pass as one graph of the whole model, over the region graphs (dynamo inlines them).

    ST, ST++ and GKT run the full net unchanged in every step (their label pass): a graph that never changes, which
    the whole model compiles best. One graph lets inductor fuse across the blocks and compile what lies between
    them (a ResNet's stem ReLU and max-pool, the pooling before the head), which the regions leave eager: at the
    benchmark's defaults ST's steps ran at 0.80x to 0.91x eager with it, 1.02x to 1.09x without (README, Speed).
    Only calls made inside ``running()`` take it; the subnets, evaluation and an EMA copy run the
    model's class forward around the compiled regions, so no new subnet reaches this graph. The switch sits in the
    model's instance-level ``forward``, under DDP's, so DDP still runs the pass.
    """

    def __init__(self, model: nn.Module, *, backend='inductor', options: Optional[dict] = None,
                 mode: Optional[str] = None):
        cls = type(model)
        if 'forward' in model.__dict__:
            raise ValueError(f'{cls.__name__} already has an instance-level forward: compile the full net once')
        compiled = torch.compile(_own_forward(cls, 'full net'), backend=backend, mode=mode, options=options)
        self.on = False
        graph = self

        def forward(module, *args, **kwargs):
            if graph.on:
                return compiled(module, *args, **kwargs)
            return cls.forward(module, *args, **kwargs)
        model.__dict__['forward'] = types.MethodType(forward, model)

    @contextlib.contextmanager
    def running(self):
        """The model's calls inside run the whole-model graph."""
        self.on = True
        try:
            yield
        finally:
            self.on = False


def compiled_regions(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` that ``compile_regions`` compiled (their forward is a bound compiled function)."""
    return [m for m in unwrap_model(model).modules()
            if isinstance(m.__dict__.get('forward'), types.MethodType) and m.__dict__['forward'].__func__ in _COMPILED]


def compile_task(task, scope: str, *, backend='inductor', mode: Optional[str] = None,
                 input_size: Optional[Sequence[int]] = None, verbose: bool = True) -> None:
    """``--torchcompile`` for a task: timm's ``task.compile`` (the whole model) or its blocks and the rest.

    The block scope uses the task's depth engine's blocks, or finds them (``--method none``)."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    dynamic = getattr(task, 'compile_dynamic', None)
    if verbose and backend == 'inductor' and getattr(task, 'varies_input_size', False) and dynamic is not False:
        _logger.warning('--torchcompile with inputs resized per subnet at every side (ST++ with --st-side-step 1): '
                        'inductor compiles again for new input sides (measured on the CPU: 160 graphs in 24 steps, '
                        'the last half 4x eager at 224 px); leave --st-side-step to its default (README, Speed)')
    if scope == 'model':
        if verbose:
            _logger.info(f'Compiling the whole model (--compile-scope model) with backend={backend}, mode={mode}')
        task.compile(backend=backend, mode=mode)
        return
    task.compile_ahead_pending = True  # the loop calls compile_ahead before its first step
    model = task.get_trainable_module()
    depth = getattr(task, 'depth', None)
    block_map = depth.block_map if depth is not None else find_blocks(model, input_size)
    regions = compile_regions(model, [b.module for b in block_map.blocks], backend=backend, mode=mode,
                              dynamic=dynamic)
    if getattr(task, 'runs_full_net', False):
        options, graph_mode = _options(backend, mode)
        task.full_net_graph = FullNetGraph(unwrap_model(model), backend=backend, options=options, mode=graph_mode)
    if verbose:
        kinds = sorted({type(r).__name__ for r in regions})
        full = "; the full net's pass as one graph of the whole model" if getattr(task, 'full_net_graph', None) else ''
        _logger.info(f'Compiling each block (--compile-scope blocks) with backend={backend}, mode={mode}: '
                     f'{len(block_map.blocks)} blocks and {len(regions) - len(block_map.blocks)} other modules, '
                     f'{len(kinds)} classes ({", ".join(kinds)}); a new subnet compiles nothing{full}')


def compile_ahead(task, input: torch.Tensor, step) -> None:
    """One forward and backward of each of ``task.compile_variants(input)``, before the block scope's first step:
    every region graph the later steps meet compiles now, not in the middle of the run, where it stalls that step
    (and every DDP rank waiting for it). Nothing the run keeps changes: the random states and BN buffers are
    restored, the gradients are taken with ``torch.autograd.grad`` (``.grad`` is left alone), and the passes run
    on the model itself, outside DDP."""
    variants = task.compile_variants(input)
    if not variants:
        return
    model = unwrap_model(task.get_trainable_module())
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b.clone() for b in model.buffers()]
    devices = [input.device.index if input.device.index is not None else torch.cuda.current_device()] \
        if input.device.type == 'cuda' else []
    start = time.time()
    with torch.random.fork_rng(devices=devices):
        for context, variant_input in variants:
            with context():
                with step.autocast():
                    logits = task.logits(model(variant_input))
                torch.autograd.grad(logits.float().sum(), params, allow_unused=True)
    with torch.no_grad():
        for saved, buffer in zip(buffers, model.buffers()):
            buffer.copy_(saved)
    passes = f'{len(variants)} subnet pass' + ('es' if len(variants) > 1 else '')
    _logger.info(f'Compiled ahead of the first step (--compile-scope blocks): {passes} in {time.time() - start:.1f} s')
