"""train.py and validate.py accept timm's options with timm's names, types, defaults and YAML semantics.

The reference is timm 1.0.31's options (tests/data/timm_*_options.json): a dump of timm main aa4b5850's parsers
plus the 1.0.31 changes its tests, library and README show (tests/data/dump_timm_options.py says how).
"""
import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

import train
import validate
from subnet.timm_options import parse_train_args, train_parser, validate_parser

DATA = Path(__file__).parent / 'data'


def _reference(name):
    return json.loads((DATA / name).read_text())


def _described(parser):
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def _differences(timm_action, action) -> list:
    """The fields of one option where ours differs from the reference."""
    fields = dict(option_strings=action.option_strings, kind=type(action).__name__, default=action.default,
                  nargs=action.nargs, choices=list(action.choices) if action.choices else None, const=action.const)
    wrong = [f'{k} {v!r} (timm: {timm_action[k]!r})' for k, v in fields.items() if v != timm_action[k]]
    ours_type = action.type.__name__ if action.type else None
    if ours_type not in (timm_action['type'], 'str' if timm_action['type'] is None else None):
        wrong.append(f'type {ours_type} (timm: {timm_action["type"]})')
    return wrong


@pytest.mark.parametrize('reference, parser', [
    ('timm_train_options.json', train_parser()),
    ('timm_validate_options.json', validate_parser()),
])
def test_every_timm_option_is_accepted_with_timms_spelling_type_and_default(reference, parser):
    """timm 1.0.31's options, as the reference holds them (main's dump plus 1.0.31's changes, each saying where it
    is seen): every one listed with what differs, so a missing group shows whole."""
    ours = _described(parser)
    problems = []
    for timm_action in _reference(reference)['parser']:
        dest = timm_action['dest']
        if dest not in ours:
            problems.append(f'missing {timm_action["option_strings"] or dest}')
        elif wrong := _differences(timm_action, ours[dest]):
            problems.append(f'{dest}: {"; ".join(wrong)}')
    assert not problems, 'differences from timm 1.0.31:\n' + '\n'.join(problems)


def test_the_reference_says_where_each_timm_1_0_31_change_is_seen_and_what_we_do_not_take():
    train_reference = _reference('timm_train_options.json')
    added = [a for a in train_reference['parser'] if 'seen' in a]
    assert {'lr_decay_fn', 'lr_stable_timescale', 'pretrained_cfg_overlay', 'stop_epoch', 'task', 'loss'} <= \
        {a['dest'] for a in added}
    assert all('1.0.31' in a['seen'] for a in added)
    readme = (DATA.parents[1] / 'README.md').read_text()
    ours = {s for a in train_parser()._actions for s in a.option_strings}
    for option in train_reference['not_adopted']:
        assert not set(option['option_strings']) & ours
        assert all(f'`{flag}`' in readme for flag in option['option_strings']), option['dest']


def test_additions_do_not_make_a_timm_abbreviation_ambiguous():
    parser = train_parser()
    # abbreviations timm users type (timm's docs use --jsd; --model-ema-d and --dr work in timm)
    args = parser.parse_args(['--jsd', '--model-ema-d', '0.99', '--dr', '0.5', '--warmup-e', '3', '--std', '0.5'])
    assert args.jsd_loss and args.model_ema_decay == 0.99 and args.decay_rate == 0.5
    assert args.warmup_epochs == 3 and args.std == [0.5]
    timm_flags = {s for a in _reference('timm_train_options.json')['parser'] for s in a['option_strings']}
    for flag in (f for f in timm_flags if f.startswith('--')):
        # the shortest prefix that is unambiguous among timm's flags must still mean the same option
        prefix = next(flag[:n] for n in range(3, len(flag) + 1)
                      if flag[:n] == flag or sum(f.startswith(flag[:n]) for f in timm_flags) == 1)
        action = next((a for a in parser._actions if flag in a.option_strings), None)
        assert action is not None, f'{flag} is missing'
        matched = parser._parse_optional(prefix)
        assert matched is not None and matched[0] is action, f'{prefix} no longer means {flag}'
    assert parser.parse_args(['--me', '0.5']).mean == [0.5]  # --method did not make timm's --me ambiguous
    assert parser.parse_args(['--meth', 'cosub']).method == 'cosub'


def test_run_control_options_from_timm_1_0_31():
    args, _ = parse_train_args(['--resume', 'auto', '--experiment', 'x', '--stop-epoch', '2', '--save-epochs', '1', '2'])
    assert args.resume == 'auto' and args.stop_epoch == 2 and args.save_epochs == [1, 2]


def _write(tmp_path, text, name='hparams.yaml'):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def test_yaml_sets_defaults_and_the_command_line_wins(tmp_path):
    cfg = _write(tmp_path, yaml.safe_dump(dict(lr=0.5, epochs=7, model='vit_tiny_patch16_224', method='cosub')))
    args, text = parse_train_args(['-c', cfg, '--epochs', '3'])
    assert (args.lr, args.epochs, args.model, args.method) == (0.5, 3, 'vit_tiny_patch16_224', 'cosub')
    assert args.batch_size == 128  # untouched built-in default
    saved = yaml.safe_load(text)  # args.yaml: the namespace as parsed, replayable with -c
    assert saved['epochs'] == 3 and saved['lr'] == 0.5 and 'config' not in saved
    replay, _ = parse_train_args(['-c', _write(tmp_path, text, 'args.yaml')])
    assert vars(replay) == vars(args)


def test_parsing_twice_does_not_leak_yaml_defaults(tmp_path):
    parse_train_args(['-c', _write(tmp_path, 'epochs: 9\n')])
    args, _ = parse_train_args([])
    assert args.epochs == 300


def test_yaml_values_are_converted_like_the_command_line(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; lists are converted element-wise
    cfg = _write(tmp_path, "lr: 3e-4\nepochs: '10'\nmean: ['0.5', 0.4, 0.3]\ninput_size: [3, 32, 32]\n"
                           "model_kwargs: {embed_dim: 32}\namp: true\n")
    args, _ = parse_train_args(['-c', cfg])
    assert args.lr == 3e-4 and args.epochs == 10 and args.mean == [0.5, 0.4, 0.3]
    assert args.input_size == [3, 32, 32] and args.model_kwargs == {'embed_dim': 32} and args.amp is True


def test_command_line_model_kwargs_add_to_the_recipes_key_by_key():
    # the DeiT III recipe's layer scale (init_values) survives a command line that shrinks the model
    recipe = str(Path(__file__).parents[1] / 'hparams' / 'cosub_deit3_vit_base.yaml')
    args, text = parse_train_args(['-c', recipe, '--model', 'vit_tiny_patch16_224',
                                   '--model-kwargs', 'patch_size=8', 'img_size=64'])
    assert args.model_kwargs == {'img_size': 64, 'init_values': 1e-4, 'patch_size': 8}
    assert yaml.safe_load(text)['model_kwargs'] == args.model_kwargs  # args.yaml replays the merged mapping
    args, _ = parse_train_args(['-c', recipe, '--model-kwargs', 'init_values=0.1'])  # the command line wins
    assert args.model_kwargs == {'img_size': 192, 'init_values': 0.1}
    args, _ = parse_train_args(['-c', recipe])
    assert args.model_kwargs == {'img_size': 192, 'init_values': 1e-4}
    stpp = str(Path(__file__).parents[1] / 'hparams' / 'stpp_resnet50_200ep.yaml')
    args, _ = parse_train_args(['-c', stpp, '--opt-kwargs', 'nesterov=False', '--model-kwargs', 'drop_rate=0.1'])
    assert args.opt_kwargs == {'filter_bias_and_bn': False, 'nesterov': False}
    assert args.model_kwargs == {'zero_init_last': False, 'drop_rate': 0.1}


def test_the_merged_model_kwargs_build_the_model_and_are_logged_once(caplog):
    recipe = str(Path(__file__).parents[1] / 'hparams' / 'cosub_deit3_vit_base.yaml')
    args, _ = parse_train_args(['-c', recipe, '--model', 'vit_tiny_patch16_224', '--device', 'cpu',
                                '--model-kwargs', 'patch_size=8', 'img_size=64', 'depth=2'])
    args.rank, args.world_size, args.distributed = 0, 1, False
    with caplog.at_level('INFO', logger='train'):
        model = train.build_model(args)
    gammas = [p for n, p in model.named_parameters() if n.endswith(('ls1.gamma', 'ls2.gamma'))]
    assert len(gammas) == 4 and all(torch.all(g == 1e-4) for g in gammas)
    assert model.patch_embed.patch_size == (8, 8) and model.patch_embed.img_size == (64, 64)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Model kwargs')]
    assert len(logged) == 1 and "'init_values': 0.0001" in logged[0] and "'patch_size': 8" in logged[0]


def test_keys_timm_retired_are_ignored_with_one_warning(tmp_path, caplog):
    cfg = _write(tmp_path, 'lr: 0.5\napex_amp: false\nnative_amp: true\n')
    args, _ = parse_train_args(['-c', cfg])
    assert args.lr == 0.5 and not hasattr(args, 'apex_amp') and not hasattr(args, 'native_amp')
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert warnings == [f'Ignoring apex_amp, native_amp in config file {cfg}: timm no longer has these options.']


def test_timms_other_option_spellings_are_accepted_as_yaml_keys(tmp_path, caplog):
    cfg = _write(tmp_path, 'subnet_bn: recal\nsubnet_temperature: 2.0\ndrop_schedule: constant\ndr: 0.5\n')
    args, _ = parse_train_args(['-c', cfg])
    assert (args.subnet_bn, args.subnet_temperature, args.drop_schedule, args.decay_rate) == \
        ('recal', 2.0, 'constant', 0.5)
    assert not caplog.records


@pytest.mark.parametrize('text, message', [
    ('lr: fast\n', "config key 'lr': expected a float"),
    ('input_size: 224\n', "config key 'input_size': expected a list"),
    ('input_size: [3, 224]\n', "config key 'input_size': expected a list of 3"),
    ('decay_milestones: [1, x]\n', "config key 'decay_milestones'"),
    ('train_size_schedule: nope\n', 'expected one of constant, progressive'),
    ('amp: 1\n', "config key 'amp': expected true or false"),
    ('epochs: 1.5\n', "config key 'epochs': expected an integer"),
    ('method: sgd\n', "config key 'method': expected one of none, cosub"),
    ('lr: [0.1\n', 'is not valid YAML (line 2)'),
    ('- lr\n- 0.1\n', 'must hold a mapping'),
    ('methd: st\n', "config file {cfg}: unknown key 'methd' (did you mean 'method'?)"),
    ('lr: 0.1\nnot_an_option: 1\n', "unknown key 'not_an_option' (not an option of train.py (see --help))"),
    (b'model: r\xe9snet50\n', 'config file {cfg} is not UTF-8 text (byte 0xe9 at offset 8); save it as UTF-8'),
    (b'model: \x00\n', 'is not valid YAML: unacceptable character #x0000'),
])
def test_bad_yaml_stops_with_one_line(tmp_path, capsys, text, message):
    cfg = _write(tmp_path, text)
    assert train.cli(['-c', cfg, '--data-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('train.py: error: ') and message.format(cfg=cfg) in err[0]


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert train.cli(['-c', str(tmp_path / 'nope.yaml')]) == 2
    assert 'cannot read config file' in capsys.readouterr().err


def test_bad_command_line_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(['--method', 'bogus'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'bogus'" in err[0]


def test_validate_has_timms_parser_defaults():
    args = validate_parser().parse_args([])
    assert (args.model, args.batch_size, args.log_freq, args.split) == ('dpn92', 256, 10, 'validation')
    with pytest.raises(SystemExit):
        validate_parser().parse_args(['--torchscript', '--torchcompile'])  # mutually exclusive, as in timm


@pytest.mark.parametrize('recipe', sorted(p.name for p in (DATA.parents[1] / 'hparams').glob('*.yaml')))
def test_every_shipped_recipe_parses_cleanly_and_passes_the_method_checks(recipe, caplog):
    root = Path(__file__).parents[1]
    path = root / 'hparams' / recipe
    args, _ = parse_train_args(['-c', str(path)])
    assert not [r for r in caplog.records if 'unknown key' in r.getMessage()]
    keys = set(yaml.safe_load(path.read_text()))
    assert keys <= set(vars(args)), f'{recipe}: keys train.py does not know: {keys - set(vars(args))}'
    train.check_method_args(args)
    assert train.resolve_model_name(args.model)
    if 'quickstart' in recipe:  # its shipped data: an image folder, or a local Parquet dataset for hfds/
        data = root / (args.data_dir or args.dataset.partition('/')[2])
        assert data.is_dir() and args.experiment == recipe[:-len('.yaml')]
    # plain timm training: the quickstarts (the multi-label one also runs cosub, with --method cosub), DeiT III's
    # fine-tuning stage (no source runs cosub there), and the accuracy studies' recipes, which every arm of a study
    # shares (each adds its own --method)
    assert args.method != 'none' or recipe in ('quickstart.yaml', 'multilabel_quickstart.yaml',
                                               'study_fashion_mnist.yaml', 'study_vit_fashion_mnist.yaml') \
        or recipe.endswith('_ft224.yaml')


# The command-line layer: the only modules under subnet/ that may raise UsageError (see subnet/errors.py).
OPTION_PARSING = {'timm_options.py', 'subnet_options.py', 'option_ranges.py', 'checks.py'}


def _usage_error_uses(path):
    """Line numbers where a module builds or raises a UsageError (by name or as ``errors.UsageError``)."""
    import ast
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Raise, ast.Call)):
            target = node.exc if isinstance(node, ast.Raise) else node.func
            if isinstance(target, ast.Call):
                target = target.func
            name = getattr(target, 'id', None) or getattr(target, 'attr', None)
            if name == 'UsageError':
                lines.append(node.lineno)
    return lines


def test_library_modules_raise_input_error_never_usage_error():
    package = Path(__file__).parent.parent / 'subnet'
    checked = [p for p in sorted(package.rglob('*.py')) if p.relative_to(package).as_posix() not in OPTION_PARSING]
    assert len(checked) > 20 and package / 'data.py' in checked
    offenders = {p.relative_to(package).as_posix(): lines for p in checked if (lines := _usage_error_uses(p))}
    assert offenders == {}, f'library modules build UsageError (raise InputError/ValueError instead): {offenders}'
    assert _usage_error_uses(package / 'checks.py'), 'the check itself must see a raise in the parsing layer'


def test_each_deliberate_difference_the_peer_suite_expects_is_in_the_readme():
    """tests/peer/timm_peer.py marks timm's tests of our differences strict-xfail; the README says each, and why."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('timm_peer', DATA.parent / 'peer' / 'timm_peer.py')
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    readme = (DATA.parents[1] / 'README.md').read_text()
    assert peer.DIFFERENCES and all(f'`{key.split("::")[1]}`' in readme for key in peer.DIFFERENCES)
