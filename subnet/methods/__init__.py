"""The submodel methods, one module each, and the registry that maps ``--method`` names to them.

    none   plain.PlainTask              timm's training (and timm's distillation with --kd-model-name)
    cosub  cosub.CosubTask              co-training of two stochastic-depth submodels (CVPR 2023)
    st     stimulative.StimulativeTask  stimulative training (NeurIPS 2022)
    st++   stimulative.StimulativePlusPlusTask
    gkt    group_knowledge.GroupKnowledgeTask   group knowledge training (AAAI 2024, a reconstruction)

A method of your own: subclass ``SubnetTask`` (or ``DistillFromFullNet``), give it ``options``, ``check_args``,
``from_args`` and ``train_step``, and register it (``docs/extending.md`` walks through an example).
"""
from .base import DistillFromFullNet, Method, SubnetTask, check_distillation_args, distillation_options
from .cosub import CosubTask
from .group_knowledge import GroupKnowledgeTask
from .plain import PlainTask
from .registry import import_extra_methods, method_class, method_names, register_method
from .stimulative import StimulativePlusPlusTask, StimulativeTask

__all__ = ['Method', 'SubnetTask', 'DistillFromFullNet', 'distillation_options', 'check_distillation_args',
           'PlainTask', 'CosubTask', 'StimulativeTask', 'StimulativePlusPlusTask', 'GroupKnowledgeTask',
           'register_method', 'method_class', 'method_names', 'import_extra_methods', 'add_method_options']

register_method('none', PlainTask)
register_method('cosub', CosubTask)
register_method('st', StimulativeTask)
register_method('st++', StimulativePlusPlusTask)
register_method('gkt', GroupKnowledgeTask)


def add_method_options(parser) -> None:
    """Every registered method's option groups, each group once (st, st++ and gkt share one)."""
    added = []
    for name in method_names():
        for add_group in method_class(name).options:
            if add_group not in added:
                add_group(parser)
                added.append(add_group)
