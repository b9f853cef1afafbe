#!/usr/bin/env python3
"""Record the options of timm's own train.py / validate.py as JSON, the reference our parsers are tested against.

timm's wheel ships no scripts, so point this at a checkout of huggingface/pytorch-image-models:

    python tests/data/dump_timm_options.py /path/to/pytorch-image-models/train.py > tests/data/timm_train_options.json
    python tests/data/dump_timm_options.py /path/to/pytorch-image-models/validate.py > tests/data/timm_validate_options.json

The files here were made from main at aa4b5850 (1.0.29.dev0) with the timm 1.0.31 library installed.
"""
import argparse
import importlib.util
import json
import sys


def describe(parser: argparse.ArgumentParser) -> list:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        default = action.default
        rows.append(dict(
            dest=action.dest,
            option_strings=list(action.option_strings),
            kind=type(action).__name__,
            type=getattr(action.type, '__name__', None) if action.type else None,
            nargs=action.nargs,
            choices=list(action.choices) if action.choices else None,
            const=action.const,
            default=default if isinstance(default, (type(None), bool, int, float, str, list, dict)) else repr(default),
        ))
    return rows


def main(path: str) -> None:
    spec = importlib.util.spec_from_file_location('timm_script', path)
    module = importlib.util.module_from_spec(spec)
    sys.argv = [path]
    spec.loader.exec_module(module)
    out = {'parser': describe(module.parser)}
    if hasattr(module, 'config_parser'):
        out['config_parser'] = describe(module.config_parser)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == '__main__':
    main(sys.argv[1])
