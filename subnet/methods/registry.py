"""The ``--method`` names and the classes behind them.

A method is a ``TrainingTask`` subclass that also carries its command line (``subnet/methods/base.py``,
``Method``). ``register_method('name', cls)`` (or ``@register_method('name')`` on the class) makes it selectable
with ``--method name``; the built-in ones register themselves when ``subnet.methods`` is imported, and a method
in a user's own module registers itself when ``train.py --extra-methods my_module`` imports it. An unknown name is
a ``UsageError`` naming the closest known ones; nothing falls back to another method.
"""
import difflib
import importlib
from typing import Dict, Iterable, Optional, Tuple, Type

from ..errors import UsageError
from ..results import register_parts

__all__ = ['register_method', 'method_class', 'method_names', 'import_extra_methods']

_METHODS: Dict[str, type] = {}


def register_method(name: str, cls: Optional[Type] = None):
    """Make ``cls`` the class behind ``--method name``; usable as a decorator (``@register_method('mine')``).

    The class's ``method`` attribute becomes ``name`` (it is written into checkpoints' ``task_state``), so one
    class serves one name: subclass it to register a variant.
    """
    def register(method_cls: Type) -> Type:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f'a method name must be a non-empty word, got {name!r}')
        if name in _METHODS and _METHODS[name] is not method_cls:
            raise ValueError(f"method '{name}' is already registered ({_METHODS[name].__qualname__})")
        if method_cls.__dict__.get('method') not in (None, '', name):
            raise ValueError(f"{method_cls.__qualname__} is already registered as '{method_cls.method}'")
        register_parts(method_cls.result_parts)
        method_cls.method = name
        _METHODS[name] = method_cls
        return method_cls
    return register if cls is None else register(cls)


def method_names() -> Tuple[str, ...]:
    """Registered names, in registration order (the built-in ones first)."""
    return tuple(_METHODS)


def method_class(name: str) -> type:
    """The class behind ``--method name``, or one line naming the closest registered names."""
    if name in _METHODS:
        return _METHODS[name]
    closest = difflib.get_close_matches(name, list(_METHODS), n=3, cutoff=0.5)
    hint = f' (closest: {", ".join(closest)})' if closest else ''
    raise UsageError(f"unknown method '{name}'{hint}; known methods: {', '.join(_METHODS)}; a method in your own "
                     f'module is registered with --extra-methods MODULE')


def import_extra_methods(modules: Iterable[str]) -> None:
    """Import the modules that register users' methods (``--extra-methods``), or one line saying why not."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UsageError(f'--extra-methods {module}: cannot import it ({e})') from None
