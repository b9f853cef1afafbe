"""The SPEC grammar that names fixed subnets (``validate.py --subnets``, ``train.py --subnet-eval``).

It imports no torch, so the option parser and the plots can use it without loading a model stack.
A SPEC is ``;``-separated terms:

    prefix:F[,F...]      ST's shape: every stage i keeps its first max(ceil(F * d_i), m_i) blocks, F in (0, 1]
                         (m_i: the stage's non-skippable minimum, e.g. a ResNet stage's downsampling block)
    random:N@R[,R...]    stochastic depth's shape: N fixed subsets per rate R in [0, 1]; each skippable block is
                         dropped with probability R. Draw j at rate R depends on (--seed, j, R) only, so
                         random:4@0.2 gives the first four subsets of random:8@0.2 in any SPEC
    first:K[,K...]       the first K blocks of the model (isotropic models: ViT, DeiT), plus every block that
                         cannot be skipped (CaiT's class-attention blocks), K in [1, number of blocks]

e.g. ``prefix:0.25,0.5,0.75;random:8@0.2;first:4,8``. Subnets are named ``prefix0.5``, ``random0.2_3`` (draw 3,
counting from 1) and ``first4``; ``full`` is the full net. ``subnet/evaluation.py`` turns recipes into masks.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import List

from .errors import UsageError

__all__ = ['KINDS', 'GRAMMAR', 'SPEC_HELP', 'Recipe', 'SubnetSpecError', 'parse_spec', 'subnet_spec', 'kind_of']

KINDS = ('prefix', 'random', 'first')
GRAMMAR = 'prefix:F[,F...]; random:N@R[,R...]; first:K[,K...] (e.g. prefix:0.25,0.5;random:8@0.2;first:4)'
SPEC_HELP = ("';'-separated terms: prefix:F[,F...] (every stage keeps its first ceil(F x depth) blocks: ST's "
             'subnets), random:N@R[,R...] (N fixed subsets per drop rate R, each skippable block dropped with '
             'probability R), first:K[,K...] (the first K blocks: ViT-like models); '
             "e.g. 'prefix:0.25,0.5,0.75;random:8@0.2;first:4,8'")


class SubnetSpecError(UsageError, argparse.ArgumentTypeError):
    """A bad SPEC: argparse reports it as ``argument --subnets: ...``, a YAML key as the UsageError line."""


@dataclass(frozen=True)
class Recipe:
    """One subnet a SPEC asks for, before there is a model: kind, its number (F, K or R) and the draw."""
    kind: str
    value: float
    draw: int = 0

    @property
    def name(self) -> str:
        if self.kind == 'random':
            return f'random{self.value:g}_{self.draw}'
        return f'{self.kind}{self.value:g}'


def _number(text: str, term: str, convert):
    try:
        return convert(text.strip())
    except ValueError:
        raise SubnetSpecError(f'subnet spec term {term!r}: {text.strip()!r} is not a number; expected {GRAMMAR}')


def parse_spec(spec: str) -> List[Recipe]:
    """The subnets a SPEC names, in its order, duplicates dropped; raises SubnetSpecError (one line)."""
    if not spec or not spec.strip():
        raise SubnetSpecError(f'empty subnet spec; expected {GRAMMAR}')
    recipes = []
    for term in (t.strip() for t in spec.split(';')):
        if not term:
            continue
        kind, colon, values = term.partition(':')
        kind = kind.strip().lower()
        if kind not in KINDS or not colon or not values.strip():
            raise SubnetSpecError(f'subnet spec term {term!r} is not one of {GRAMMAR}')
        if kind == 'random':
            count, at, rates = values.partition('@')
            if not at:
                raise SubnetSpecError(f'subnet spec term {term!r}: write random:N@R (N subsets at drop rate R)')
            count = _number(count, term, int)
            if count < 1:
                raise SubnetSpecError(f'subnet spec term {term!r}: the number of subsets must be at least 1')
            for rate in (_number(r, term, float) for r in rates.split(',')):
                if not 0.0 <= rate <= 1.0:
                    raise SubnetSpecError(f'subnet spec term {term!r}: drop rate {rate:g} must lie in [0, 1]')
                recipes += [Recipe('random', rate, draw) for draw in range(1, count + 1)]
        elif kind == 'prefix':
            for fraction in (_number(f, term, float) for f in values.split(',')):
                if not 0.0 < fraction <= 1.0:
                    raise SubnetSpecError(f'subnet spec term {term!r}: fraction {fraction:g} must lie in (0, 1]')
                recipes.append(Recipe('prefix', fraction))
        else:
            for count in (_number(k, term, int) for k in values.split(',')):
                if count < 1:
                    raise SubnetSpecError(f'subnet spec term {term!r}: K must be at least 1')
                recipes.append(Recipe('first', count))
    if not recipes:
        raise SubnetSpecError(f'empty subnet spec; expected {GRAMMAR}')
    unique = {}
    for recipe in recipes:
        unique.setdefault(recipe.name, recipe)
    return list(unique.values())


def subnet_spec(text: str) -> str:
    """argparse type for SPEC options: checks the grammar at parse time, keeps the text (args.yaml stays plain)."""
    parse_spec(text)
    return text


def kind_of(name: str) -> str:
    """'prefix', 'random', 'first' or 'full' from a subnet name (result rows carry only the name)."""
    match = re.match(r'[a-z]+', name or '')
    return match.group(0) if match and match.group(0) in KINDS + ('full',) else 'full'
