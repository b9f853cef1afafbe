"""The options subnet adds to timm's train.py: the submodel method group and reporting.

They live in new namespaces (``--method``, ``--cosub-*``, ``--st-*``, ``--gkt-*``, ``--plot-summary``,
``--subnet-eval``, ``--log-tensorboard``), so none of them makes an abbreviation of a timm option
ambiguous. As with every option, the YAML key is the underscore name (``method: cosub``).
"""
import argparse

METHODS = ('none', 'cosub', 'st', 'st++', 'gkt')


def add_method_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Submodel method (subnet)')
    g.add_argument('--method', default='none', choices=METHODS,
                   help="submodel training method; 'none' is plain timm training (default: none)")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Everything train.py accepts beyond timm's options."""
    add_method_options(parser)


def add_validate_options(parser: argparse.ArgumentParser) -> None:
    """Everything validate.py accepts beyond timm's options."""
    del parser  # subnet evaluation options come with the subnet evaluation
