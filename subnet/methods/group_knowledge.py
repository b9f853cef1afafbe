"""``--method gkt``: group knowledge training (Tang et al., AAAI 2024), as we reconstruct it.

The authors never released their code and the paper's method section could not be read; what the abstract and the
figure caption say is: subnets are sampled subnet-in-subnet, so they fall into hierarchical groups; each group's
knowledge is an exponential moving average of its subnets' logits; the knowledge of a group supervises the group
below; several sampling loops restart from the main network. This module commits to one reading of that
(``docs/methods.md`` says which, and what it cannot express); the defaults without a source in the paper follow the
same group's ST code (T = 1, weight 1 per term, EMA weight 0.5 from its ``--direct_KD_ema``).
"""
from __future__ import annotations

import torch

from ..depth import DepthEngine
from ..errors import InputError
from ..losses import GroupKnowledge, kl_distill
from ..results import cost_part, loss_part
from ..sample_memory import LogitMemory, install_index_tap
from ..sampling import nested_keep
from ..step import Step
from .base import DistillFromFullNet, distillation_options

__all__ = ['GroupKnowledgeTask', 'group_knowledge_options']


KNOWLEDGE_SPANS = ('step', 'sample')


def group_knowledge_options(parser) -> None:
    g = parser.add_argument_group('gkt: group knowledge training (Tang et al. 2024; a reconstruction)')
    g.add_argument('--gkt-groups', type=int, default=3, metavar='G',
                   help="nested subnets per loop (default: 3, the paper's figure)")
    g.add_argument('--gkt-loops', type=int, default=2, metavar='R',
                   help="sampling loops per step (default: 2, the paper's figure)")
    g.add_argument('--gkt-drop', type=float, default=0.2, metavar='Q',
                   help="a child subnet drops each of its parent's blocks with probability Q (default: 0.2, ours)")
    g.add_argument('--gkt-ema', type=float, default=0.5, metavar='BETA',
                   help="group knowledge: weight of the newest subnet logits in the EMA (default: 0.5, the ST "
                        "code's --direct_KD_ema)")
    g.add_argument('--gkt-knowledge', default='step', choices=KNOWLEDGE_SPANS,
                   help="what a group's knowledge aggregates: 'step', the subnets of the R loops of one step "
                        "(default); or 'sample', kept per training sample across steps, the EMA updated each time "
                        'the sample is seen (a memory of samples x G x classes fp32 values, on every rank, in the '
                        'checkpoint); docs/methods.md has both readings of the paper')


class GroupKnowledgeTask(DistillFromFullNet):
    """Per step: the full net's label loss (its logits are group 0's knowledge); then R loops of G nested subnets,
    each a random subset of its parent's blocks (every kept block dropped with probability q). Subnet g is taught
    by the knowledge of group g − 1 with T²·KL and then folded into group g's knowledge, an EMA (β) of that group's
    detached logits within the step. With G = 1 every subnet is taught by the full net: ST with R subnets.

    ``knowledge='sample'``: groups 1..G keep their knowledge per training sample across steps (``LogitMemory``): a
    group's first update in a step folds into what earlier steps left for the same samples, and the step's final
    knowledge is stored back. Group 0 stays the full net of this step. The training loader must be attached
    (``attach_train_loader``) so the task knows which samples a batch holds.
    """

    result_parts = (loss_part('gkt_label', "the full net's label loss"),
                    loss_part('gkt_kd', "the subnets' distillation loss, summed"),
                    cost_part('gkt_subnet_flops', "the subnets' mean FLOPs, a fraction of the full net's"))

    options = (distillation_options, group_knowledge_options)

    def __init__(self, model, criterion, depth: DepthEngine, groups: int = 3, loops: int = 2, drop: float = 0.2,
                 ema: float = 0.5, temperature: float = 1.0, weight: float = 1.0, sampler=None,
                 knowledge: str = 'step', **kwargs):
        super().__init__(model, criterion, depth, **kwargs)
        if knowledge not in KNOWLEDGE_SPANS:
            raise ValueError(f'knowledge must be one of {KNOWLEDGE_SPANS}, got {knowledge!r}')
        self.knowledge = GroupKnowledge(groups, ema)
        self.groups, self.loops, self.drop = groups, loops, drop
        self.temperature, self.weight = temperature, weight
        self.sample_child = sampler or self.nested_child
        self.knowledge_span = knowledge
        self.sample_indices = None  # knowledge='sample': .take(B) gives the dataset indices of the next batch
        self.memory: LogitMemory = None  # knowledge='sample': sized when the training set is known
        self._pending_memory = None  # a checkpoint's memory, loaded before the training set was attached

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if args.gkt_groups < 1 or args.gkt_loops < 1:
            raise InputError('--gkt-groups and --gkt-loops must be >= 1')
        if not 0 < args.gkt_drop <= 1:
            raise InputError(f'--gkt-drop must be in (0, 1] (0 makes every subnet the full net), got {args.gkt_drop}')
        if not 0 < args.gkt_ema <= 1:
            raise InputError(f'--gkt-ema must be in (0, 1], got {args.gkt_ema}')
        if args.gkt_knowledge == 'sample' and (args.train_img_sizes or args.use_multi_epochs_loader):
            raise InputError('--gkt-knowledge sample needs the plain training loader (not --train-img-sizes or '
                             '--use-multi-epochs-loader): it reads the sample indices at its sampler')

    @classmethod
    def from_args(cls, args, model, criterion, *, device=None, dtype=None, input_size=None, verbose=True):
        return cls(model, criterion, cls.depth_engine(model, input_size, verbose), groups=args.gkt_groups,
                   loops=args.gkt_loops, drop=args.gkt_drop, ema=args.gkt_ema, temperature=args.subnet_temperature,
                   weight=args.subnet_kd_weight, knowledge=args.gkt_knowledge, seed=args.seed, device=device,
                   dtype=dtype, verbose=verbose, **cls.distillation_kwargs(args))

    def nested_child(self, parent: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return nested_keep(parent, self.drop, generator, droppable=self.depth.block_map.skippable)

    # ---- knowledge across steps (knowledge='sample')
    def attach_train_loader(self, loader) -> None:
        """Read the sample indices of the training loader's batches and size the memory for its dataset."""
        if self.knowledge_span != 'sample':
            return
        self.sample_indices = install_index_tap(loader)
        self.attach_memory(self.sample_indices.num_samples)

    def attach_memory(self, num_samples: int) -> None:
        self.memory = LogitMemory(num_samples, self.groups)
        if self._pending_memory is not None:
            self.memory.load_state_dict(self._pending_memory)
            self._pending_memory = None

    def get_task_state(self, module=None, ema: bool = False) -> dict:
        state = super().get_task_state(module, ema)
        if state and self.memory is not None:
            state['sample_knowledge'] = self.memory.state_dict()
        return state

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        super().load_task_state(state, strict, module, ema)
        memory = (state or {}).get('sample_knowledge') if not ema else None
        if memory is not None and self.memory is None:
            self._pending_memory = memory
        elif memory is not None:
            self.memory.load_state_dict(memory)

    def _batch_samples(self, count: int):
        """The dataset indices of this batch (knowledge='sample'), None otherwise."""
        if self.knowledge_span != 'sample':
            return None
        if self.sample_indices is None or self.memory is None:
            raise RuntimeError("knowledge='sample' needs attach_train_loader(loader) (or sample_indices and "
                               'attach_memory) before the first step')
        return self.sample_indices.take(count)

    def _recall(self, samples, device) -> None:
        if samples is None:
            return
        earlier, seen = self.memory.recall(samples, device)
        if earlier is not None:
            for group in range(1, self.groups + 1):
                self.knowledge.remember(group, earlier[:, group - 1], seen)

    def _store(self, samples) -> None:
        if samples is not None:
            groups = range(1, self.groups + 1)
            self.memory.store(samples, torch.stack([self.knowledge.teacher(g) for g in groups], dim=1))

    # ---- the step
    def train_step(self, input: torch.Tensor, target: torch.Tensor, step: Step) -> dict:
        generator = self.next_generator()
        main_logits, label_loss = self.label_pass(input, target, step)
        samples = self._batch_samples(input.shape[0])
        self.knowledge.reset()
        self.knowledge.update(0, main_logits)
        self._recall(samples, main_logits.device)
        full = torch.ones(len(self.depth.block_map.blocks), dtype=torch.bool)
        kd_sum, flops, passes = torch.zeros((), device=main_logits.device), 0.0, self.loops * self.groups
        for loop in range(self.loops):
            parent = full
            for group in range(1, self.groups + 1):
                keep = self.sample_child(parent, generator)
                last = loop == self.loops - 1 and group == self.groups
                with self.subnet_pass(keep, last):
                    with step.autocast():
                        logits = self.forward_pass(input)
                        kd = self.weight * kl_distill(logits, self.knowledge.teacher(group - 1), self.temperature)
                    step.backward(kd)
                self.knowledge.update(group, logits)
                kd_sum += kd.detach()
                flops += self.depth.block_map.flop_fraction(keep) / passes
                parent = keep
        self._store(samples)
        return {'loss': label_loss + kd_sum, 'output': main_logits, 'gkt_label': label_loss, 'gkt_kd': kd_sum,
                'gkt_subnet_flops': torch.tensor(flops)}
