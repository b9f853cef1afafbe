"""Test-only reference: the whole GKT step loss in one function, which the training task computes one pass at a
time (``GroupKnowledgeTask.forward``, backward after each pass)."""
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from subnet.losses import GroupKnowledge, _at_least_fp32, kl_distill  # the same fp32 promotion as the task's


class GroupKnowledgeTerms(NamedTuple):
    """The GKT step loss, its label part and its distillation terms in loop/group order."""
    total: Tensor
    label: Tensor
    distill_terms: list[Tensor]


def group_knowledge_loss(
        main_logits: Tensor,
        target: Tensor,
        subnet_logits: Sequence[Tensor],
        knowledge: GroupKnowledge,
        temperature: float = 1.0,
        distill_weight: float = 1.0,
) -> GroupKnowledgeTerms:
    """Whole-step GKT loss: CE(main, y) + λ·Σ_{r,g} T²·KL(softmax(K_{g−1}/T) ‖ softmax(z_{r,g}/T)).

    ``subnet_logits`` come in sampling order, loop 1 groups 1..G, then loop 2, ...; each term sees its teacher's
    knowledge as it stands at that moment, which already includes this loop's parent. Terms are summed, not averaged
    (ST's ``kl_coef`` per subnet). ``knowledge`` is reset first and holds the final group knowledge afterwards. The
    training task runs the same sequence one pass at a time (backward after each); this is its reference.
    ``target``: class indices or dense probabilities (mixup), as ``F.cross_entropy`` takes both.
    """
    if len(subnet_logits) % knowledge.num_groups != 0:
        raise ValueError(f'{len(subnet_logits)} subnet outputs do not fill whole loops of '
                         f'{knowledge.num_groups} groups')
    main_logits = _at_least_fp32(main_logits)
    label = F.cross_entropy(main_logits, target if target.ndim == 1 else target.to(main_logits.dtype))
    knowledge.reset()
    knowledge.update(0, main_logits)
    distill_terms = []
    for index, logits in enumerate(subnet_logits):
        group = index % knowledge.num_groups + 1
        distill_terms.append(kl_distill(logits, knowledge.teacher(group - 1), temperature))
        knowledge.update(group, logits)
    total = label + distill_weight * sum(distill_terms, torch.zeros_like(label))
    return GroupKnowledgeTerms(total, label, distill_terms)
