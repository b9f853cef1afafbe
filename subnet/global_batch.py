"""The global batch a run trains with, and whether its learning rate was meant for that batch.

timm derives the learning rate from ``--lr-base`` and the global batch only when ``--lr`` is unset; a recipe that
sets ``lr`` gives an absolute rate, tuned for the global batch of the paper's run. Such a recipe declares that
batch (``recipe_global_batch: 512``), and a run at another global batch, with the recipe's ``lr`` unchanged,
gets one warning that says the rate timm's scaling rule would give (ST++'s 0.2 at 512 trains 8 times too slowly
per image at 4096).
"""
from typing import Optional

__all__ = ['global_batch', 'scaled_lr', 'describe', 'mismatch_warning']


def global_batch(args, batch_size_reference: float) -> float:
    """Images per optimizer update over all processes: per-process batch x processes x accumulated batches."""
    return batch_size_reference * args.world_size * args.grad_accum_steps


def scaled_lr(lr: float, from_batch: float, to_batch: float, opt: str, lr_base_scale: str = '') -> float:
    """``lr`` moved from one global batch to another by timm's rule: linear, or square root for Ada*/LAMB."""
    scale = lr_base_scale or ('sqrt' if any(o in opt.lower() for o in ('ada', 'lamb')) else 'linear')
    ratio = to_batch / from_batch
    return lr * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def describe(args, batch_size_reference: float, lr_origin: str) -> str:
    """The start-of-run line: the global batch, how it is made, and the learning rate in use."""
    batch = global_batch(args, batch_size_reference)
    return (f'Global batch {batch:g} ({batch_size_reference:g} per process x {args.world_size} process'
            f'{"es" if args.world_size > 1 else ""} x {args.grad_accum_steps} accumulated); learning rate '
            f'{args.lr:g} ({lr_origin})')


def mismatch_warning(args, batch_size_reference: float, lr_from_config: bool) -> Optional[str]:
    """A warning when the config file's absolute ``lr`` was declared for another global batch, else None."""
    declared = args.recipe_global_batch
    batch = global_batch(args, batch_size_reference)
    if not declared or not lr_from_config or batch == declared:
        return None
    suggested = scaled_lr(args.lr, declared, batch, args.opt, args.lr_base_scale)
    per_process = declared / (args.world_size * args.grad_accum_steps)
    same_batch = f' or --batch-size {per_process:g} for the declared batch' if per_process.is_integer() else ''
    return (f"the config file's lr {args.lr:g} is for a global batch of {declared} (recipe_global_batch), this run's "
            f"is {batch:g}: give --lr {suggested:.4g} (timm's scaling rule){same_batch}, or the lr you mean")
