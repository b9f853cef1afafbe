"""The training task for a run: timm's own for ``--method none``, one ``TrainingTask`` subclass per method.

``train.py`` asks ``build_task`` for the task and never looks inside it; the loop calls
``task(input, target)``. A method reads as: sample subnets → forward → loss → backward; the depth engine
(``subnet/depth.py``), the samplers and the losses do the rest. The label loss is timm's choice
(``build_criterion``); methods use it for the full net's label term, cosub uses BCE as the paper does.

Methods back-propagate inside their forward (``StepBackward`` from the loop): ST and GKT free each pass's
graph right after it (peak memory of plain training), and every pass runs its backward while its subnet
is installed, which grad checkpointing needs. Subnet masks come from a generator seeded by (seed, step),
so they are the same on every DDP rank and a resumed run replays them; the step is the task's checkpoint
state (``task_state``).
"""
import contextlib
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.task import (ClassificationTask, FeatureDistillationTask, LogitDistillationTask,
                       TokenDistillationTask, TrainingTask)

from .batchnorm import frozen_running_stats, recalibrate
from .depth import DepthEngine
from .engine import StepBackward
from .errors import UsageError
from .losses import GroupKnowledge, cosub_loss, direction_kl, kl_distill, standardize_logits
from .sampling import bernoulli_keep, drop_rates, nested_keep, stage_prefix_keep, step_generator

_logger = logging.getLogger('train')


def build_criterion(args, num_aug_splits: int, mixup_active: bool) -> nn.Module:
    """timm's loss choice: JSD → BCE/soft-target CE under mixup → BCE/label-smoothing CE → CE."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:
        if num_aug_splits <= 1:
            raise UsageError('--jsd-loss needs --aug-splits 2 or more')
        return JsdCrossEntropy(num_splits=num_aug_splits, smoothing=args.smoothing)
    if mixup_active:
        # mixup already smooths its dense targets
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        if args.bce_loss:
            return BinaryCrossEntropy(smoothing=args.smoothing, **bce)
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def _distillation_task(args, model, criterion, device, dtype, verbose) -> TrainingTask:
    """timm's knowledge-distillation tasks (``--kd-model-name``), built as timm's train.py builds them."""
    common = dict(criterion=criterion, distill_loss_weight=args.distill_loss_weight,
                  task_loss_weight=args.task_loss_weight, device=device, dtype=dtype, verbose=verbose)
    if args.kd_distill_type == 'logit':
        return LogitDistillationTask(student_model=model, teacher_model=args.kd_model_name,
                                     loss_type=args.kd_loss_type, temperature=args.kd_temperature, **common)
    if args.kd_distill_type == 'feature':
        return FeatureDistillationTask(student_model=model, teacher_model=args.kd_model_name,
                                       student_feature_dim=args.kd_student_feature_dim,
                                       teacher_feature_dim=args.kd_teacher_feature_dim, **common)
    return TokenDistillationTask(student_model=model, teacher_model=args.kd_model_name,
                                 distill_type=args.kd_token_distill_type, temperature=args.kd_temperature,
                                 **common)


class SubnetTask(ClassificationTask):
    """What every method shares: the depth engine, the step counter (checkpointed), the loop's backward."""

    method = ''

    def __init__(self, model: nn.Module, criterion: nn.Module, depth: DepthEngine, seed: int = 42,
                 device=None, dtype=None, verbose: bool = True):
        super().__init__(model=model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
        self.depth = depth
        self.seed = seed
        self.step = 0
        self.backward = StepBackward()  # the loop binds its own; this one just back-propagates (tests)

    def bind_backward(self, step_backward: StepBackward) -> None:
        self.backward = step_backward

    def next_generator(self, rank: int = 0) -> torch.Generator:
        """A generator for this step's masks: rank 0's seed on every rank unless a method asks per rank."""
        self.step += 1
        return step_generator(self.seed, self.step, rank)

    def get_task_state(self, module=None, ema: bool = False) -> dict:
        return {} if ema else {'method': self.method, 'step': self.step}

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        if state and not ema:
            self.step = int(state.get('step', 0))

    def forward_pass(self, input: torch.Tensor) -> torch.Tensor:
        logits = self.trainable_module(input)
        return logits[0] if isinstance(logits, (tuple, list)) else logits


class CosubTask(SubnetTask):
    """cosub (Touvron et al., CVPR 2023): the batch runs twice through independent stochastic-depth submodels.

    Each submodel learns from the labels (weight λ) and from the other's sigmoid (1 − λ), all BCE (cosub.md §1).
    The duplication happens here, after mixup, so ``--batch-size`` keeps meaning images per device (DeiT).
    ``impl='skip'`` runs each block only on the rows that keep it (the paper's "efficient stochastic depth",
    at block granularity); 'mask' multiplies branches by the same per-row masks at full cost; 'timm' is
    timm's per-branch DropPath, DeiT's own implementation (masks from the global RNG, per branch).
    """

    method = 'cosub'

    def __init__(self, model, depth: DepthEngine, drop_rate: torch.Tensor, impl: str = 'skip',
                 label_weight: float = 0.5, target_threshold: Optional[float] = None, rank: int = 0, **kwargs):
        super().__init__(model, nn.Identity(), depth, **kwargs)
        self.drop_rate = drop_rate
        self.impl = impl
        self.label_weight = label_weight
        self.target_threshold = target_threshold
        self.rank = rank

    def submodels(self, rows: int):
        """Stochastic depth for ``rows`` rows, each row its own submodel."""
        if self.impl == 'timm':
            return self.depth.timm_drop_path(self.drop_rate)
        keep_mask = bernoulli_keep(rows, self.drop_rate, self.next_generator(self.rank))
        return self.depth.per_sample(keep_mask, 1.0 - self.drop_rate, mode=self.impl)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict:
        if target.ndim != 2:
            raise UsageError('cosub needs dense (mixup/cutmix) targets, got class indices')
        batch = input.shape[0]
        with self.submodels(2 * batch):
            logits = self.forward_pass(torch.cat([input, input]))
            terms = cosub_loss(logits[:batch], logits[batch:], target, self.label_weight, self.target_threshold)
            self.backward.final(terms.total)
        return {'loss': terms.total.detach(), 'output': logits[:batch].detach(),
                'cosub_label': terms.label.detach(), 'cosub_peer': terms.peer.detach()}


class _DistillFromFullNet(SubnetTask):
    """Shared by ST and GKT: the full net's label pass first, then subnet passes that distil from teachers."""

    def __init__(self, model, criterion, depth: DepthEngine, bn_mode: str = 'freeze', recal_images: int = 2048,
                 **kwargs):
        super().__init__(model, criterion, depth, **kwargs)
        self.bn_mode = bn_mode
        self.recal_images = recal_images

    def label_pass(self, input: torch.Tensor, target: torch.Tensor, normalize=None):
        """Full net on the batch: label loss back-propagated at once (its graph freed), logits returned."""
        with self.no_sync():
            logits = self.forward_pass(input)
            label_loss = self.criterion(logits if normalize is None else normalize(logits), target)
            self.backward.early(label_loss)
        return logits.detach(), label_loss.detach()

    @contextlib.contextmanager
    def subnet_pass(self, keep: torch.Tensor, last: bool):
        """A subnet installed (and BN running statistics frozen) for one pass; DDP syncs only the last one."""
        sync = contextlib.nullcontext() if last else self.no_sync()
        bn = frozen_running_stats(self.depth.model) if self.bn_mode == 'freeze' else contextlib.nullcontext()
        with sync, bn, self.depth.subnet(keep):
            yield

    def before_eval(self, batches) -> None:
        """``--*-bn recal``: the official code re-estimates BN statistics with the full net before evaluating."""
        if self.bn_mode == 'recal':
            model = self.depth.model
            was_training = model.training
            model.eval()
            seen = recalibrate(model, batches, self.recal_images)
            model.train(was_training)
            _logger.info(f'Re-estimated BatchNorm statistics of the full net on {seen} training images.')


class StimulativeTask(_DistillFromFullNet):
    """ST (NeurIPS 2022) and ST++ (arXiv 2305.02507): sampled subnets distil from the full net of the same step.

    Per step: the full net's label loss; then K subnets, each keeping the first k_i blocks of every stage
    (k_i uniform in [min(d_i, M), d_i]) and each taught by the detached full-net logits with T²·KL, or
    ST++'s direction-only KL- (``loss='kl-'``, with the full net's label loss on standardised logits as the
    official code does). ST++ also feeds each subnet the batch resized to a random side in
    [⌊min_size·crop⌋, crop], from the original batch every time and without re-normalising (the official
    code resizes cumulatively and normalises again: an accident, st.md §5).
    """

    def __init__(self, model, criterion, depth: DepthEngine, method: str = 'st', subnets: int = 1,
                 min_keep: int = 1, loss: str = 'kl', norm_ce: bool = False, min_size: float = 1.0,
                 temperature: float = 1.0, amplitude: float = 1.0, kl_weight: float = 1.0, **kwargs):
        super().__init__(model, criterion, depth, **kwargs)
        self.method = method
        self.subnets = subnets
        self.min_keep = min_keep
        self.loss = loss
        self.norm_ce = norm_ce
        self.min_size = min_size
        self.temperature = temperature
        self.amplitude = amplitude
        self.kl_weight = kl_weight
        patch = getattr(getattr(depth.model, 'patch_embed', None), 'patch_size', None)
        self.size_multiple = int(patch[0] if isinstance(patch, (tuple, list)) else patch or 1)

    def standardized(self, logits: torch.Tensor) -> torch.Tensor:
        return self.amplitude * standardize_logits(logits)

    def distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.loss == 'kl-':
            return direction_kl(student, teacher, self.temperature, self.amplitude)
        return kl_distill(student, teacher, self.temperature)

    def subnet_input(self, input: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch resized to a random side (rounded to the patch size of ViT-like models)."""
        crop = input.shape[-1]
        if self.min_size >= 1.0:
            return input
        side = int(torch.randint(int(crop * self.min_size), crop + 1, (1,), generator=generator))
        side = max(self.size_multiple, round(side / self.size_multiple) * self.size_multiple)
        if side == crop:
            return input
        return F.interpolate(input, size=(side, side), mode='bilinear', align_corners=False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict:
        generator = self.next_generator()
        teacher, label_loss = self.label_pass(input, target, self.standardized if self.norm_ce else None)
        kl_sum, flops = torch.zeros((), device=teacher.device), 0.0
        for k in range(self.subnets):
            keep = stage_prefix_keep(self.depth.block_map, self.min_keep, generator)
            last = k == self.subnets - 1
            with self.subnet_pass(keep, last):
                kl = self.kl_weight * self.distill(self.forward_pass(self.subnet_input(input, generator)), teacher)
                if last:
                    self.backward.final(kl)
                else:
                    self.backward.early(kl)
            kl_sum += kl.detach()
            flops += self.depth.block_map.flop_fraction(keep) / self.subnets
        return {'loss': label_loss + kl_sum, 'output': teacher, 'st_label': label_loss, 'st_kl': kl_sum,
                'st_subnet_flops': torch.tensor(flops)}


class GroupKnowledgeTask(_DistillFromFullNet):
    """GKT (Tang et al., AAAI 2024), our reconstruction (gkt.md §3.1; the official code was never released).

    Per step: the full net's label loss (its logits are group 0's knowledge); then R loops of G nested subnets,
    each a random subset of its parent's blocks (every kept block dropped with probability q). Subnet g is
    taught by the group knowledge of group g − 1 with T²·KL and then folded into group g's knowledge, an EMA
    (β) of that group's detached logits. With G = 1 every subnet is taught by the full net: ST with R subnets.
    """

    method = 'gkt'

    def __init__(self, model, criterion, depth: DepthEngine, groups: int = 3, loops: int = 2, drop: float = 0.2,
                 ema: float = 0.5, temperature: float = 1.0, weight: float = 1.0, sampler=None, **kwargs):
        super().__init__(model, criterion, depth, **kwargs)
        self.knowledge = GroupKnowledge(groups, ema)
        self.groups, self.loops, self.drop = groups, loops, drop
        self.temperature, self.weight = temperature, weight
        self.sample_child = sampler or self.nested_child

    def nested_child(self, parent: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return nested_keep(parent, self.drop, generator, droppable=self.depth.block_map.skippable)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict:
        generator = self.next_generator()
        main_logits, label_loss = self.label_pass(input, target)
        self.knowledge.reset()
        self.knowledge.update(0, main_logits)
        full = torch.ones(len(self.depth.block_map.blocks), dtype=torch.bool)
        kd_sum, flops, passes = torch.zeros((), device=main_logits.device), 0.0, self.loops * self.groups
        for loop in range(self.loops):
            parent = full
            for group in range(1, self.groups + 1):
                keep = self.sample_child(parent, generator)
                last = loop == self.loops - 1 and group == self.groups
                with self.subnet_pass(keep, last):
                    logits = self.forward_pass(input)
                    kd = self.weight * kl_distill(logits, self.knowledge.teacher(group - 1), self.temperature)
                    if last:
                        self.backward.final(kd)
                    else:
                        self.backward.early(kd)
                self.knowledge.update(group, logits)
                kd_sum += kd.detach()
                flops += self.depth.block_map.flop_fraction(keep) / passes
                parent = keep
        return {'loss': label_loss + kd_sum, 'output': main_logits, 'gkt_label': label_loss, 'gkt_kd': kd_sum,
                'gkt_subnet_flops': torch.tensor(flops)}


# ------------------------------------------------------------------------------------------------- building

def resolve_method_defaults(args) -> None:
    """Fill the ST options left unset with the method's published values (st: NeurIPS 2022, st++: ST++)."""
    plus = args.method == 'st++'
    defaults = dict(st_subnets=6 if plus else 1, st_min_keep=3 if plus else 1, st_loss='kl-' if plus else 'kl',
                    st_min_size=0.43 if plus else 1.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.st_norm_ce is None:
        args.st_norm_ce = args.st_loss == 'kl-'


def method_model_kwargs(args) -> dict:
    """Extra ``create_model`` kwargs a method needs: ViTs must accept ST++'s smaller subnet inputs."""
    if args.method in ('st', 'st++'):
        resolve_method_defaults(args)
        if args.st_min_size < 1.0:
            return {'dynamic_img_size': True}
    return {}


def check_method_args(args) -> None:
    """Configurations a method cannot run with: one line each, before anything is built."""
    if args.method == 'none':
        return
    if args.kd_model_name is not None:
        raise UsageError(f'--method {args.method} cannot be combined with --kd-model-name (timm distillation)')
    if args.naflex_loader:
        raise UsageError(f'--method {args.method} does not support --naflex-loader (dict inputs)')
    if args.aug_splits or args.jsd_loss or args.split_bn:
        raise UsageError(f'--method {args.method} does not support --aug-splits/--jsd-loss/--split-bn')
    if args.method == 'cosub':
        if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
            raise UsageError('cosub needs dense targets: turn on --mixup and/or --cutmix (as DeiT III does)')
        if args.drop_path is not None and args.drop_path <= 0:
            raise UsageError('cosub needs stochastic depth: set --drop-path > 0 (with 0 both submodels are '
                             'the same network)')
        if not 0 <= args.cosub_label_weight <= 1:
            raise UsageError(f'--cosub-label-weight must be in [0, 1], got {args.cosub_label_weight}')
        if args.bce_target_thresh is not None and args.smoothing > 0 and args.bce_target_thresh < args.smoothing:
            raise UsageError(f'--bce-target-thresh {args.bce_target_thresh} with --smoothing {args.smoothing} '
                             f'turns every smoothed target into 1 and erases the labels; use --smoothing 0 '
                             f'(DeiT III) or a higher threshold')
    if args.method in ('st', 'st++'):
        resolve_method_defaults(args)
        if args.st_subnets < 1 or args.st_min_keep < 1:
            raise UsageError('--st-subnets and --st-min-keep must be >= 1')
        if not 0 < args.st_min_size <= 1:
            raise UsageError(f'--st-min-size must be in (0, 1], got {args.st_min_size}')
        if args.st_temperature <= 0:
            raise UsageError(f'--st-temperature must be > 0, got {args.st_temperature}')
    if args.method == 'gkt':
        if args.gkt_groups < 1 or args.gkt_loops < 1:
            raise UsageError('--gkt-groups and --gkt-loops must be >= 1')
        if not 0 <= args.gkt_drop <= 1 or not 0 < args.gkt_ema <= 1:
            raise UsageError('--gkt-drop must be in [0, 1] and --gkt-ema in (0, 1]')
        if args.gkt_temperature <= 0:
            raise UsageError(f'--gkt-temperature must be > 0, got {args.gkt_temperature}')


def _cosub_drop_rate(args, depth: DepthEngine) -> torch.Tensor:
    """Per-block drop-path rates for cosub: the model's own (timm's linear ramp) or DeiT III's constant."""
    if args.cosub_drop_schedule == 'constant':
        rate = args.drop_path if args.drop_path is not None else float(depth.model_drop_path_rates().max())
        rates = drop_rates(depth.num_blocks, rate, 'constant')
    else:
        rates = depth.model_drop_path_rates()
    if float(rates.max()) <= 0:
        raise UsageError(f'cosub needs stochastic depth but {depth.name} was built without it: set --drop-path > 0')
    return rates


def build_task(args, model: nn.Module, criterion: nn.Module, device: torch.device, dtype=None,
               verbose: bool = True, input_size=None) -> TrainingTask:
    """The task ``--method`` asks for, wrapping ``model`` (on its device, not yet compiled or in DDP).

    ``input_size`` (C, H, W) is the training input, at which the blocks' FLOP shares are measured.
    """
    if args.method == 'none':
        if args.kd_model_name is not None:
            return _distillation_task(args, model, criterion, device, dtype, verbose)
        return ClassificationTask(model=model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)

    depth = DepthEngine(model, input_size=input_size)
    if verbose:
        _logger.info(depth.block_map.describe())
    common = dict(seed=args.seed, device=device, dtype=dtype, verbose=verbose)
    if args.method == 'cosub':
        impl = args.cosub_impl
        if impl == 'skip' and args.torchcompile:
            _logger.warning("--cosub-impl skip changes shapes every step, which torch.compile would recompile; "
                            "using --cosub-impl mask (same masks, static graph).")
            impl = 'mask'
        return CosubTask(model, depth, _cosub_drop_rate(args, depth), impl=impl,
                         label_weight=args.cosub_label_weight, target_threshold=args.bce_target_thresh,
                         rank=args.rank, **common)
    if args.method in ('st', 'st++'):
        return StimulativeTask(
            model, criterion, depth, method=args.method, subnets=args.st_subnets, min_keep=args.st_min_keep,
            loss=args.st_loss, norm_ce=args.st_norm_ce, min_size=args.st_min_size,
            temperature=args.st_temperature, amplitude=args.st_amplitude, kl_weight=args.st_kl_weight,
            bn_mode=args.st_bn, recal_images=args.st_recal_images, **common)
    return GroupKnowledgeTask(
        model, criterion, depth, groups=args.gkt_groups, loops=args.gkt_loops, drop=args.gkt_drop,
        ema=args.gkt_ema, temperature=args.gkt_temperature, weight=args.gkt_weight, bn_mode=args.gkt_bn,
        recal_images=args.gkt_recal_images, **common)
