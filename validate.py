#!/usr/bin/env python3
"""Validate timm models and checkpoints: a drop-in replacement for timm's validate.py.

Same options and result fields as timm (``--model`` name / wildcard / ``all`` / file of names, a folder of
checkpoints, ``--use-ema``, ``--results-file`` as CSV or JSON, the ``--result`` JSON on stdout).

One addition: on a checkpoint written by our train.py, when ``--model`` is not given, the model, its kwargs,
classes and the input settings of the training run's evaluation come from the checkpoint, so
``validate.py --checkpoint model_best.pth.tar --data-dir DIR`` reproduces the run's own eval; anything given
on the command line wins. (timm's validate.py needs ``--model ... --model-kwargs ... --img-size ...
--use-train-size`` for the same numbers.)

Subnets (``subnet/evaluation.py``; the SPEC grammar is ``subnet/spec.py``): ``--subnets SPEC`` adds one row per
subnet after the full net's (without --bn-recal the plain validation's row), with its description and cost;
``--bn-recal N`` re-estimates the BatchNorm statistics of every net first, the full net's too, so that all rows
compare; ``--plot FILE.png`` draws top-1 against FLOPs, one colour per checkpoint (a folder, or a glob pattern
such as ``'output/train/*/model_best.pth.tar'`` to compare runs). ``--export DIR`` writes each subnet as a
checkpoint that plain timm loads and times it against the full net (``subnet/export.py``).

As a module it offers timm's API: ``parser``, ``validate(args)`` (one model, its result row) and ``main()``
(``sys.argv`` when given no argv; bad input raises UsageError, a ValueError); ``create_model`` is looked up here at
call time, so a caller may replace it. ``cli`` is the command line: bad input is one line and exit status 2.
"""
import argparse
import csv
import glob
import json
import logging
import os
import sys
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
from timm import utils
from timm.data import RealLabelsImagenet, create_dataset, resolve_data_config
from timm.layers import apply_test_time_pool, set_fast_norm
from timm.models import create_model, is_model, list_models, load_checkpoint, reparameterize_model
from timm.task.evaluator import MultiLabelClassificationEvaluator
from timm.utils import check_batch_size_retry, decay_batch_step, natural_key

from subnet import checks, downloads, evaluation, export, logs, option_ranges, plots
from subnet.criterion import check_target_format
from subnet.data import (FixedSample, check_dataset_root, check_first_target, check_multilabel_reader,
                         loader_images, target_options)
from subnet.device import (autocast_for, check_precision_args, limit_workers, model_dtype as dtype_of,
                           use_default_device, validation_device)
from subnet.errors import InputError, UsageError, report_bad_input
from subnet.spec import SubnetSpecError
from subnet.unreadable import readable
from subnet.models import check_state_dict_fits, load_checkpoint_file, naflex_patch_size, resolve_model_name
from subnet.timm_options import given_on_command_line, validate_parser

_logger = logging.getLogger('validate')

# timm's module-level parser (each parse here builds its own, so changing this one changes nothing)
parser = validate_parser()

_NON_IN1K_FILTERS = ['*_in21k', '*_in22k', '*in12k', '*_dino', '*fcmae', '*seer']

# validate.py options (dests) filled from a checkpoint's training args when not given on the command line
_FROM_TRAINING = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'gp', 'img_size', 'input_size', 'crop_pct',
                  'mean', 'std', 'interpolation', 'task', 'target_format', 'multilabel_threshold')


def adopt_training_args(args, argv) -> None:
    """Fill model options from the checkpoint's training ``args`` where the command line left them."""
    given = given_on_command_line(validate_parser(), argv)
    if not args.checkpoint or not os.path.isfile(args.checkpoint) or 'model' in given:
        return
    checkpoint = load_checkpoint_file(args.checkpoint, '--checkpoint')
    trained = checkpoint.get('args')
    if trained is None or not getattr(trained, 'model', None):
        return
    for key in _FROM_TRAINING:
        if key not in given and getattr(trained, key, None) not in (None, '', {}):
            setattr(args, key, getattr(trained, key))
    # evaluate as the training run did (its data config is the model's train-size one)
    args.use_train_size = True
    _logger.info(f'Model {args.model} and the input settings of its training run taken from the checkpoint.')


def build_model(args, device, model_dtype):
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    with downloads.model_download(args.model, args.pretrained, '--checkpoint FILE'):
        model = create_model(resolve_model_name(args.model), pretrained=args.pretrained,
                             num_classes=args.num_classes, in_chans=in_chans, global_pool=args.gp,
                             scriptable=args.torchscript, **args.model_kwargs)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.checkpoint:
        if not args.checkpoint.endswith(('.safetensors', '.npz', '.npy')):
            checkpoint = load_checkpoint_file(args.checkpoint, '--checkpoint')
            check_state_dict_fits(model, checkpoint, args.checkpoint, '--checkpoint', use_ema=args.use_ema)
        load_checkpoint(model, args.checkpoint, args.use_ema)
    if args.reparam:
        model = reparameterize_model(model)
    param_count = sum(p.numel() for p in model.parameters())
    _logger.info(f'Model {args.model} created, param count: {param_count}')
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size, verbose=True)
    test_time_pool = False
    if args.test_pool:
        model, test_time_pool = apply_test_time_pool(model, data_config)
    model = model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchscript:
        model = torch.jit.script(model)
    elif args.torchcompile:
        torch._dynamo.reset()
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    elif args.aot_autograd:
        raise UsageError('--aot-autograd (functorch) is retired in this PyTorch; use --torchcompile')
    if args.num_gpu > 1:
        model = nn.DataParallel(model, device_ids=list(range(args.num_gpu)))
    return model, data_config, test_time_pool, param_count


def build_loader(args, data_config, test_time_pool, device, model_dtype, split=None, sample=0, patch_size=None):
    """The evaluation loader of ``split`` (default --split); ``sample`` > 0: a seeded random sample of it;
    ``patch_size``: the model's, for --naflex-loader."""
    root = args.data or args.data_dir
    split = split or args.split
    check_dataset_root(args.dataset, root, {'evaluation' if split == args.split else 'BN recalibration': split},
                       args.class_map, root_may_be_split=True)
    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    with downloads.dataset_download(args.dataset, root, args.dataset_download):
        dataset = create_dataset(
            root=root, name=args.dataset, split=split, download=args.dataset_download,
            load_bytes=args.tf_preprocessing, class_map=args.class_map, num_samples=args.num_samples,
            input_key=args.input_key, input_img_mode=input_img_mode, target_key=args.target_key,
            trust_remote_code=args.dataset_trust_remote_code, seed=args.seed, **target_options(args))
    check_first_target(dataset, args.dataset, split, args.target_key)
    dataset = readable(dataset, training=False)
    if sample and not isinstance(dataset, torch.utils.data.IterableDataset):
        dataset = FixedSample(dataset, sample, args.seed)
    crop_pct = 1.0 if test_time_pool else data_config['crop_pct']
    naflex = evaluation.NaFlexEval(patch_size, args.naflex_max_seq_len) if args.naflex_loader else None
    loader = evaluation.eval_loader(
        dataset, data_config, batch_size=args.batch_size, device=device, model_dtype=model_dtype,
        num_workers=args.workers, use_prefetcher=args.prefetcher, pin_memory=args.pin_mem, crop_pct=crop_pct,
        naflex=naflex, tf_preprocessing=args.tf_preprocessing, crop_mode=data_config['crop_mode'],
        crop_border_pixels=args.crop_border_pixels)
    return dataset, loader, crop_pct


def classification_scores(args, labels: evaluation.Labels) -> dict:
    """timm's --metrics-avg precision/recall/F1 (scikit-learn)."""
    from sklearn.metrics import f1_score, precision_score, recall_score
    y_pred, y_true = torch.cat(labels.predicted).numpy(), torch.cat(labels.true).numpy()
    avg = args.metrics_avg
    return {f'{avg}_precision': round(100 * precision_score(y_true, y_pred, average=avg, zero_division=0), 4),
            f'{avg}_recall': round(100 * recall_score(y_true, y_pred, average=avg, zero_division=0), 4),
            f'{avg}_f1_score': round(100 * f1_score(y_true, y_pred, average=avg, zero_division=0), 4)}


def prepare(args) -> tuple:
    """timm's validate.py set-up before the model: device, precision, seed, fuser; returns (device, model dtype,
    autocast)."""
    args.pretrained = args.pretrained or not args.checkpoint
    args.prefetcher = not args.no_prefetcher
    device = validation_device(args)
    if args.metrics_avg:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            _logger.warning("scikit-learn not installed, disabling --metrics-avg: pip install scikit-learn")
            args.metrics_avg = None
    check_precision_args(args)
    model_dtype = dtype_of(args)
    amp_autocast = autocast_for(args, device)
    if args.amp:
        _logger.info('Validating in mixed precision with native PyTorch AMP.')
    else:
        _logger.info(f'Validating in {model_dtype or torch.float32}. AMP not enabled.')
    utils.random_seed(args.seed)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    return device, model_dtype, amp_autocast


def _metric_fields(metrics: dict) -> tuple:
    """The task's result fields and their `` * `` log line: timm's top-1/top-5 (and their errors), or for
    multi-label the evaluator's mAP and F1 scores under its own names."""
    if 'map' in metrics:
        names = MultiLabelClassificationEvaluator.metric_names[1:]
        fields = OrderedDict((name, round(metrics[name], 4)) for name in names)
        return fields, ' * ' + ' '.join(f'{name} {fields[name]:.3f}' for name in names)
    top1, top5 = metrics['top1'], metrics['top5']
    fields = OrderedDict(top1=round(top1, 4), top1_err=round(100 - top1, 4), top5=round(top5, 4),
                         top5_err=round(100 - top5, 4))
    return fields, (f' * Acc@1 {fields["top1"]:.3f} ({fields["top1_err"]:.3f}) '
                    f'Acc@5 {fields["top5"]:.3f} ({fields["top5_err"]:.3f})')


def result_row(args, metrics: dict, scores: dict, param_count: int, data_config: dict, crop_pct) -> OrderedDict:
    """timm's result row of one evaluation, logged as timm's `` * Acc@1`` line."""
    fields, line = _metric_fields(metrics)
    result = OrderedDict(model=args.model, **fields, **scores,
                         param_count=round(param_count / 1e6, 2), img_size=data_config['input_size'][-1],
                         crop_pct=crop_pct, interpolation=data_config['interpolation'])
    if metrics.get('unreadable_images'):  # a column only then: timm's result fields otherwise
        result['unreadable_images'] = metrics['unreadable_images']
        line += f' | {metrics["unreadable_images"]} unreadable images left out'
    if scores:
        avg = args.metrics_avg
        line += (f' | Precision({avg}) {scores[f"{avg}_precision"]:.3f} | Recall({avg}) '
                 f'{scores[f"{avg}_recall"]:.3f} | F1-score({avg}) {scores[f"{avg}_f1_score"]:.3f}')
    _logger.info(line)
    return result


def validate(args):
    """Validate one model (and checkpoint); returns timm's result row, or with --subnets a list of rows (the
    full net's first, then one per subnet with the SUBNET_FIELDS appended)."""
    check_task_options(args)  # after a checkpoint's training args were adopted: its --task among them
    device, model_dtype, amp_autocast = prepare(args)
    model, data_config, test_time_pool, param_count = build_model(args, device, model_dtype)
    patch_size = naflex_patch_size(model) if args.naflex_loader else None
    dataset, loader, crop_pct = build_loader(args, data_config, test_time_pool, device, model_dtype,
                                             patch_size=patch_size)
    checks.check_model_covers_classes(args.num_classes, dataset,
                                      f'the {args.split} split of {args.data or args.data_dir}')
    try:
        subnets = evaluation.SubnetEvaluation(model, args.subnets, seed=args.seed,
                                              input_size=data_config['input_size']) if args.subnets else None
    except SubnetSpecError as e:  # a term this model cannot have (first:K past its last block)
        raise UsageError(str(e)) from None
    valid_labels = None
    if args.valid_labels:
        with open(args.valid_labels) as f:
            valid_labels = [int(line.rstrip()) for line in f]

    def measure(subnet=None) -> OrderedDict:
        if subnet is not None:
            _logger.info(f'Subnet {subnet.describe()}')
        real_labels = None
        if args.real_labels:
            real_labels = RealLabelsImagenet(dataset.filenames(basename=True), real_json=args.real_labels)
        labels = evaluation.Labels(valid_labels, real_labels, keep_predictions=bool(args.metrics_avg))
        metrics = evaluation.evaluate(model, loader, args, device, amp_autocast, model_dtype,
                                      report=evaluation.ValidateReport(args.log_freq, _logger), labels=labels)
        scores = classification_scores(args, labels) if args.metrics_avg else {}
        return result_row(args, metrics, scores, param_count, data_config, crop_pct)

    if subnets is None:
        return measure()
    recal_batches = None
    if args.bn_recal > 0 and subnets.has_batchnorm:
        recal_loader = build_loader(args, data_config, test_time_pool, device, model_dtype, split=args.bn_recal_split,
                                    sample=args.bn_recal)[1]
        recal_batches = partial(loader_images, recal_loader, device, model_dtype, args.channels_last)
    # every export planned and checked before anything is evaluated or written
    exports = export.ExportRun(args, subnets.engine, subnets.subnets, data_config) if args.export else None
    if exports is not None:
        measure = exports.measuring(measure, bn_recal=args.bn_recal if recal_batches else 0)
    rows = []
    for subnet, row, recal_images in subnets.run(measure, recal_batches, args.bn_recal):
        row.update(evaluation.subnet_fields(subnet, subnets.block_map, recal_images))
        rows.append(row)
    if exports is not None:
        exports.finish(rows, device, model_dtype, amp_autocast)
    return rows


def try_validate(args, initial_batch_size: int) -> OrderedDict:
    """Validate, halving the batch on out-of-memory errors (timm's ``_try_run``)."""
    batch_size, error = initial_batch_size, 'Unknown'
    while batch_size:
        args.batch_size = batch_size * args.num_gpu
        try:
            if 'cuda' in args.device and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return validate(args)
        except RuntimeError as e:
            error = str(e)
            _logger.error(f'"{error}" while running validation.')
            if not check_batch_size_retry(error):
                break
        batch_size = decay_batch_step(batch_size)
        _logger.warning(f'Reducing batch size to {batch_size} for retry.')
    _logger.error(f'{args.model} failed to validate ({error}).')
    return OrderedDict(model=args.model, error=error)


def model_configs(args) -> list:
    """The (model, checkpoint) pairs of a bulk run; empty for a single model (timm's rules, plus a glob pattern
    in --checkpoint, e.g. 'output/train/*/model_best.pth.tar', for one curve per run in --plot)."""
    if any(c in args.checkpoint for c in '*?[') and not os.path.exists(args.checkpoint):
        checkpoints = sorted(glob.glob(args.checkpoint), key=natural_key)
        if not checkpoints:
            raise UsageError(f'--checkpoint {args.checkpoint} matches no file')
        return [(args.model, c) for c in checkpoints]
    if os.path.isdir(args.checkpoint):
        checkpoints = glob.glob(os.path.join(args.checkpoint, '*.pth.tar'))
        checkpoints += glob.glob(os.path.join(args.checkpoint, '*.pth'))
        return [(args.model, c) for c in sorted(checkpoints, key=natural_key)]
    if args.model == 'all':
        args.pretrained = True
        return [(n, '') for n in list_models(pretrained=True, exclude_filters=_NON_IN1K_FILTERS)]
    if os.path.isfile(args.model):
        with open(args.model) as f:
            return [(line.strip(), args.checkpoint) for line in f if line.strip()]
    name = args.model.split('.')[0]
    if not is_model(name) and any(c in args.model for c in '*?['):
        return [(n, '') for n in list_models(args.model, pretrained=True)]
    return []


def write_results(path: str, results, format: str = 'csv') -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        if format == 'json':
            json.dump(results, f, indent=4)
        else:
            rows = results if isinstance(results, (list, tuple)) else [results]
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()), extrasaction='ignore')
                writer.writeheader()
                writer.writerows(rows)
    os.replace(tmp, path)


def check_task_options(args) -> None:
    """The task's targets can be read, and options of single-label evaluation are not given to a multi-label one."""
    check_target_format(args)
    check_multilabel_reader(args)
    if args.task != 'multilabel':
        return
    for option, given in (('--metrics-avg', args.metrics_avg), ('--real-labels', args.real_labels),
                          ('--valid-labels', args.valid_labels)):
        if given:
            raise UsageError(f'{option} scores single-label predictions: it does not apply to --task multilabel '
                             f'(which reports mAP and micro, macro and sample F1)')


def check_subnet_options(args) -> None:
    """Mistakes in the subnet options, caught before any model is built."""
    if args.bn_recal < 0:
        raise UsageError(f'--bn-recal must be >= 0 (images), got {args.bn_recal}')
    for option, value in (('--bn-recal', args.bn_recal), ('--plot', args.plot)):
        if value and not args.subnets:
            raise UsageError(f'{option} works on the --subnets rows: add --subnets SPEC (e.g. --subnets prefix:0.5)')
    if args.subnets and args.torchscript:
        raise UsageError('--subnets cannot install subnets in a TorchScript model: drop --torchscript')
    if args.bn_recal and args.naflex_loader:
        raise UsageError('--bn-recal does not support --naflex-loader (NaFlex models have no BatchNorm)')
    if args.plot:
        plots.check_figure_path(args.plot, '--plot')
    if args.export and not args.subnets:
        raise UsageError('--export writes the --subnets subnets: add --subnets SPEC (e.g. --subnets prefix:0.5)')
    for option, given in (('--test-pool', args.test_pool), ('--reparam', args.reparam)):
        if args.export and given:
            raise UsageError(f'--export writes the model as timm builds it: drop {option}')
    if args.plot_x == 'latency' and not (args.export and args.speed_batch > 0):
        raise UsageError('--plot-x latency draws the times --export measures: add --export DIR (and --speed-batch '
                         '> 0)')


def _rows(result) -> list:
    return result if isinstance(result, list) else [result]


def _with_checkpoint(row: OrderedDict, checkpoint: str) -> OrderedDict:
    """timm's bulk rows end with 'checkpoint'; our subnet fields come after it."""
    ours = [(k, row.pop(k)) for k in evaluation.SUBNET_FIELDS if k in row]
    row['checkpoint'] = checkpoint
    row.update(ours)
    return row


def recalibration_note(rows: list) -> str:
    """What the plot's title says about BN statistics: which points were re-estimated (``bn_recal`` > 0)."""
    counts = {row.get('bn_recal', 0) for row in rows}
    if counts == {0}:
        return ''
    if 0 not in counts:
        return f', BN statistics of every net (full nets too) re-estimated on {max(counts)} images'
    return f', BN statistics re-estimated on {max(counts)} images for the BatchNorm models only'


def run(argv) -> int:
    args = validate_parser().parse_args(argv)
    if args.results_format not in ('csv', 'json'):
        raise UsageError(f"--results-format must be 'csv' or 'json', got {args.results_format!r}")
    option_ranges.check_ranges(args)
    option_ranges.check_together(args)
    check_subnet_options(args)
    configs = model_configs(args)
    use_default_device(args, device_given='device' in given_on_command_line(validate_parser(), argv))
    limit_workers(args)
    if configs and args.export:
        raise UsageError('--export works on one checkpoint (its files are named by subnet): give one file')
    if configs:
        _logger.info('Running bulk validation on these models: ' + ', '.join(sorted({m for m, _ in configs})))
        groups = []  # (checkpoint or model, its rows): a model's subnet rows stay together
        try:
            initial_batch_size = args.batch_size
            for model_name, checkpoint in configs:
                # a fresh copy each time: settings adopted from one run's checkpoint must not leak into the next
                config_args = argparse.Namespace(**vars(args))
                config_args.model, config_args.checkpoint = model_name, checkpoint
                adopt_training_args(config_args, argv)
                rows = _rows(try_validate(config_args, initial_batch_size))
                if 'error' in rows[0]:
                    continue
                if checkpoint:
                    rows = [_with_checkpoint(row, checkpoint) for row in rows]
                groups.append((checkpoint or config_args.model, rows))
        except KeyboardInterrupt:
            pass
        groups.sort(key=lambda group: group[1][0]['map' if 'map' in group[1][0] else 'top1'], reverse=True)
        results = [row for _, rows in groups for row in rows]
    else:
        adopt_training_args(args, argv)
        results = try_validate(args, args.batch_size) if args.retry else validate(args)
        groups = [(args.checkpoint or args.model, _rows(results))] if 'error' not in _rows(results)[0] else []
    if args.results_file:
        write_results(args.results_file, results, format=args.results_format)
    if args.plot and groups:
        labels = plots.run_labels([g for g, _ in groups]) if all(os.path.isfile(g) for g, _ in groups) \
            else [g for g, _ in groups]
        models = sorted({rows[0]['model'] for _, rows in groups})
        against = 'FLOPs' if args.plot_x == 'flops' else f'measured time per image (batch {args.speed_batch})'
        metric = 'mAP' if 'map' in _rows(results)[0] else 'top-1'
        title = f'{", ".join(models)}: subnet {metric} against {against}{recalibration_note(_rows(results))}'
        curves = list(zip(labels, (rows for _, rows in groups)))
        _logger.info(f'Wrote {plots.plot_subnets(curves, args.plot, title, x=args.plot_x)}')
    print(f'--result\n{json.dumps(results, indent=4)}')
    return 0


def main(argv=None) -> int:
    """timm's ``main``: validate as the command line (``sys.argv`` by default) says; raises UsageError or the
    library's InputError (both ValueError) on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logs.setup_logging(primary=True)
    try:
        return run(argv)
    finally:
        logs.close_log_file()


def cli(argv=None) -> int:
    """The command line: ``main``, with bad input as one ``validate.py: error:`` line and exit status 2."""
    try:
        return main(argv)
    except (UsageError, InputError) as e:
        return report_bad_input('validate.py', e)
    except SystemExit as e:  # argparse's own exit (its line already printed), or --help
        return e.code


if __name__ == '__main__':
    sys.exit(cli())
