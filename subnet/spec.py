"""The SPEC grammar that names fixed subnets (``validate.py --subnets``, ``train.py --subnet-eval``), and its kinds.

A SPEC is ``;``-separated terms, each ``kind:values``. The kinds are classes registered here, one per kind; each
one parses its values, names its subnets, draws their keep masks and says how a plot draws them:

    prefix:F[,F...]      ST's shape: every stage i keeps its first max(ceil(F * d_i), m_i) blocks, F in (0, 1]
                         (m_i: the stage's non-skippable minimum, e.g. a ResNet stage's downsampling block)
    random:N@R[,R...]    stochastic depth's shape: N fixed subsets per rate R in [0, 1]; each skippable block is
                         dropped with probability R. Draw j at rate R depends on (--seed, j, R) only, so
                         random:4@0.2 gives the first four subsets of random:8@0.2 in any SPEC
    first:K[,K...]       the first K blocks of the model (isotropic models: ViT, DeiT), plus every block that
                         cannot be skipped (CaiT's class-attention blocks), K in [1, number of blocks]

e.g. ``prefix:0.25,0.5,0.75;random:8@0.2;first:4,8``. Subnets are named ``prefix0.5``, ``random0.2_3`` (draw 3,
counting from 1) and ``first4``; ``full`` is the full net. A new kind is a ``SpecKind`` subclass passed to
``register_kind`` (``docs/extending.md``).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .sampling import bernoulli_keep, step_generator

__all__ = ['PlotStyle', 'Recipe', 'SpecKind', 'register_kind', 'spec_kind', 'spec_kinds', 'grammar', 'spec_help',
           'SubnetSpecError', 'parse_spec', 'subnet_spec', 'kind_of', 'FULL_STYLE']


class SubnetSpecError(ValueError, argparse.ArgumentTypeError):
    """A bad SPEC, or one the model cannot have: argparse reports it as ``argument --subnets: ...``; the command
    line turns the others into its one-line error."""


@dataclass(frozen=True)
class Recipe:
    """One subnet a SPEC asks for, before there is a model: its kind, its name and the kind's parameters."""
    kind: str
    name: str
    params: Tuple[float, ...]


class PlotStyle(NamedTuple):
    """How ``validate.py --plot`` draws a kind's subnets: a line (joined to the full net) or points."""
    marker: str
    line: Optional[str]  # matplotlib line style; None: points only
    legend: str


FULL_STYLE = PlotStyle('*', None, 'full net')


class SpecKind:
    """One kind of SPEC term. Subclasses set ``name``, ``grammar``, ``help`` and ``style`` and implement
    ``parse`` (values → recipes) and ``keep_mask`` (recipe → one bool per block of the model)."""
    name: str = ''          # the term's keyword; its subnets' names are it plus a number
    grammar: str = ''       # how a term is written, e.g. 'prefix:F[,F...]'
    help: str = ''          # what its subnets are, for --help
    style: PlotStyle = PlotStyle('o', '-', '')

    def parse(self, values: str, term: str) -> List[Recipe]:
        """The subnets of one term (``values``: the text after ``kind:``); raise ``self.error(term, why)``."""
        raise NotImplementedError

    def keep_mask(self, recipe: Recipe, block_map, seed: int) -> torch.Tensor:
        """One bool per entry of ``block_map.blocks`` (non-skippable blocks are kept whatever it says)."""
        raise NotImplementedError

    # helpers for parse
    def error(self, term: str, why: str) -> SubnetSpecError:
        return SubnetSpecError(f'subnet spec term {term!r}: {why}')

    def numbers(self, values: str, term: str, convert: Callable = float, check: Callable = lambda v: True,
                why: str = '') -> list:
        """The ``,``-separated numbers of ``values``; each must pass ``check`` (else ``why``, formatted with it)."""
        result = []
        for text in values.split(','):
            value = self.number(text, term, convert)
            if not check(value):
                raise self.error(term, why.format(value))
            result.append(value)
        return result

    def number(self, text: str, term: str, convert: Callable = float):
        try:
            return convert(text.strip())
        except ValueError:
            raise self.error(term, f'{text.strip()!r} is not a number; expected {grammar()}') from None


_KINDS: Dict[str, SpecKind] = {}


def register_kind(kind: SpecKind) -> SpecKind:
    """Make ``kind`` a SPEC term kind (its name must be lower-case letters, not yet taken); returns it."""
    if not re.fullmatch(r'[a-z]+', kind.name or '') or kind.name == 'full':
        raise ValueError(f'a SPEC kind name is lower-case letters other than full, got {kind.name!r}')
    known = _KINDS.get(kind.name)
    if known is not None and _class_name(known) != _class_name(kind):  # the same class again: a module re-imported
        raise ValueError(f'SPEC kind {kind.name!r} is registered already ({_class_name(known)})')
    _KINDS[kind.name] = kind
    return kind


def _class_name(kind: SpecKind) -> str:
    return f'{type(kind).__module__}.{type(kind).__qualname__}'


def spec_kind(name: str) -> SpecKind:
    return _KINDS[name]


def spec_kinds() -> Tuple[SpecKind, ...]:
    """The registered kinds, in registration order."""
    return tuple(_KINDS.values())


def grammar() -> str:
    return '; '.join(k.grammar for k in _KINDS.values()) + ' (e.g. prefix:0.25,0.5;random:8@0.2;first:4)'


def spec_help() -> str:
    return ("';'-separated terms: " + ', '.join(f'{k.grammar} ({k.help})' for k in _KINDS.values())
            + "; e.g. 'prefix:0.25,0.5,0.75;random:8@0.2;first:4,8'")


def parse_spec(spec: str) -> List[Recipe]:
    """The subnets a SPEC names, in its order, duplicates dropped; raises SubnetSpecError (one line)."""
    if not spec or not spec.strip():
        raise SubnetSpecError(f'empty subnet spec; expected {grammar()}')
    recipes = []
    for term in (t.strip() for t in spec.split(';')):
        if not term:
            continue
        name, colon, values = term.partition(':')
        kind = _KINDS.get(name.strip().lower())
        if kind is None or not colon or not values.strip():
            raise SubnetSpecError(f'subnet spec term {term!r} is not one of {grammar()}')
        recipes += kind.parse(values, term)
    if not recipes:
        raise SubnetSpecError(f'empty subnet spec; expected {grammar()}')
    unique = {}
    for recipe in recipes:
        unique.setdefault(recipe.name, recipe)
    return list(unique.values())


def subnet_spec(text: str) -> str:
    """argparse type for SPEC options: checks the grammar at parse time, keeps the text (args.yaml stays plain)."""
    parse_spec(text)
    return text


def kind_of(name: str) -> str:
    """A registered kind's name, or 'full', from a subnet name (result rows carry only the name)."""
    match = re.match(r'[a-z]+', name or '')
    return match.group(0) if match and match.group(0) in _KINDS else 'full'


# ------------------------------------------------------------------------------------------------ the kinds

class StagePrefix(SpecKind):
    name, grammar = 'prefix', 'prefix:F[,F...]'
    help = "every stage keeps its first ceil(F x depth) blocks: ST's subnets"
    style = PlotStyle('o', '-', 'stage prefixes (ST)')

    def parse(self, values: str, term: str) -> List[Recipe]:
        fractions = self.numbers(values, term, float, lambda f: 0.0 < f <= 1.0, 'fraction {:g} must lie in (0, 1]')
        return [Recipe(self.name, f'prefix{f:g}', (f,)) for f in fractions]

    def keep_mask(self, recipe: Recipe, block_map, seed: int) -> torch.Tensor:
        fraction, = recipe.params
        # the epsilon keeps 0.5 * 4 at 2 where floating point would make it 2.0000000001
        return block_map.prefix_keep([max(math.ceil(fraction * len(stage.blocks) - 1e-9), stage.min_keep)
                                      for stage in block_map.stages])


class RandomSubsets(SpecKind):
    name, grammar = 'random', 'random:N@R[,R...]'
    help = 'N fixed subsets per drop rate R, each skippable block dropped with probability R'
    style = PlotStyle('x', None, 'random subsets')

    def parse(self, values: str, term: str) -> List[Recipe]:
        count, at, rates = values.partition('@')
        if not at:
            raise self.error(term, 'write random:N@R (N subsets at drop rate R)')
        count = self.number(count, term, int)
        if count < 1:
            raise self.error(term, 'the number of subsets must be at least 1')
        rates = self.numbers(rates, term, float, lambda r: 0.0 <= r <= 1.0, 'drop rate {:g} must lie in [0, 1]')
        return [Recipe(self.name, f'random{rate:g}_{draw}', (rate, draw))
                for rate in rates for draw in range(1, count + 1)]

    def keep_mask(self, recipe: Recipe, block_map, seed: int) -> torch.Tensor:
        rate, draw = recipe.params
        rates = torch.full((len(block_map.blocks),), rate, dtype=torch.float64).masked_fill(~block_map.skippable, 0.0)
        # step_generator mixes three integers; here they are (seed, draw, rate in parts per million)
        generator = step_generator(seed, int(draw), rank=round(rate * 1_000_000))
        return bernoulli_keep(1, rates, generator)[0]


class FirstBlocks(SpecKind):
    name, grammar = 'first', 'first:K[,K...]'
    help = 'the first K blocks: ViT-like models'
    style = PlotStyle('s', '--', 'first k blocks')

    def parse(self, values: str, term: str) -> List[Recipe]:
        counts = self.numbers(values, term, int, lambda k: k >= 1, 'K must be at least 1')
        return [Recipe(self.name, f'first{k}', (k,)) for k in counts]

    def keep_mask(self, recipe: Recipe, block_map, seed: int) -> torch.Tensor:
        count = int(recipe.params[0])
        if count > len(block_map.blocks):
            raise SubnetSpecError(f'subnet first{count}: {block_map.model_name} has only {len(block_map.blocks)} '
                                  f'blocks')
        return torch.arange(len(block_map.blocks)) < count


for _kind in (StagePrefix(), RandomSubsets(), FirstBlocks()):
    register_kind(_kind)
