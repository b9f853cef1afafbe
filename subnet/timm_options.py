"""timm's command-line options for train.py and validate.py, and its ``-c/--config`` YAML mechanism.

The option names, types, defaults, nargs and abbreviations are timm 1.0.31's, so any timm command line or hparams
file works unchanged; ``tests/test_options.py`` checks them against ``tests/data/timm_*_options.json`` (timm main
at aa4b5850 dumped, plus what 1.0.31's tests, library and README show of its additions: run control, the ``wsd``
schedule, ``--pretrained-cfg-overlay``, the task and loss options). Parsers are built fresh for every parse, so
parsing twice in one process (tests, sweeps) never leaks YAML defaults.

YAML follows timm 1.0.31: keys are the underscore names, command line > YAML > built-in default, and values
are converted the way the command line would convert them, except that ``--model-kwargs`` and ``--opt-kwargs``
add their keys to the YAML's mapping instead of replacing it (``merge_config_kwargs``). Keys of options timm
itself has retired (old files carry ``apex_amp``, ``native_amp``, ...) are ignored with a warning. Anything
else stops with one line: an unknown key (a misspelt ``methd: st`` would otherwise train plain timm; timm 1.0.31
only warns), naming the closest option; a value of the wrong type; a file that is not UTF-8 text or not a YAML
mapping.
"""
import argparse
import difflib
import logging
import sys
from typing import List, Optional, Set, Tuple

import yaml
from timm.data.readers.targets import TARGET_FORMATS
from timm.loss import LOSS_TYPES
from timm.utils import ParseKwargs

from .criterion import TASKS, resolve_loss_args
from .evaluation import task_metric
from .methods import import_extra_methods
from .option_ranges import check_ranges
from .subnet_options import add_train_options, add_validate_options
from .errors import InputError, UsageError, first_line

_logger = logging.getLogger('train')

# keys timm's own train.py once wrote that no longer are options: ignored with a warning, so old files still load
_RETIRED_KEYS = {'apex_amp', 'native_amp', 'aot_autograd', 'amp_impl', 'config'}


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors, where an abbreviation that was unambiguous in timm keeps its meaning.

    ``--me 0.5`` meant ``--mean`` in timm; our ``--method`` would make it ambiguous, so when a prefix matches
    several options and exactly one of them is timm's (``timm_flags``), that one wins.
    """
    timm_flags: frozenset = frozenset()

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')

    def _get_option_tuples(self, option_string):
        # argparse has no public hook for resolving abbreviations; this private method is the one place we
        # override (tests/test_timm_private.py fails if argparse stops calling it)
        matches = super()._get_option_tuples(option_string)
        if len(matches) > 1:
            timm_matches = [m for m in matches if m[1] in self.timm_flags]
            if len(timm_matches) == 1:
                return timm_matches
        return matches


# ---------------------------------------------------------------------------------------------- train.py

def _dataset_reading_options(parser) -> None:
    """How a dataset is read: the same options, with the same meaning, in timm's train.py and validate.py."""
    parser.add_argument('--dataset-download', action='store_true', default=False,
                        help='download torch/ and tfds/ datasets when missing')
    parser.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='class name to index map file')
    parser.add_argument('--input-img-mode', default=None, type=str, help='PIL mode images are converted to')
    parser.add_argument('--input-key', default=None, type=str, help='input field of dict-style datasets')
    parser.add_argument('--target-key', default=None, type=str, help='target field of dict-style datasets')
    parser.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                        help='let Hugging Face datasets run their own loading code')


def _dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='dataset root (deprecated positional form of --data-dir)')
    g = parser.add_argument_group('Dataset parameters')
    g.add_argument('--data-dir', metavar='DIR', help='dataset root: a folder with train/ and val/ sub-folders')
    g.add_argument('--dataset', metavar='NAME', default='',
                   help='dataset type + name ("<type>/<name>", e.g. torch/cifar10, hfds/...); empty: image folder')
    g.add_argument('--train-split', metavar='NAME', default='train', help='training split (default: train)')
    g.add_argument('--val-split', metavar='NAME', default='validation',
                   help="validation split (default: validation); '' or none: train without evaluation")
    g.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='samples in the train split, for iterable datasets')
    g.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                   help='samples in the validation split, for iterable datasets')
    _dataset_reading_options(g)


def _model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Model parameters')
    g.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                   help='timm model name, or a short name such as vit_base (default: resnet50)')
    g.add_argument('--pretrained', action='store_true', default=False, help='start from pretrained weights')
    g.add_argument('--pretrained-path', default=None, type=str,
                   help='pretrained weights file to load in place of the hub ones (head adapted)')
    g.add_argument('--pretrained-cfg-overlay', nargs='*', default={}, action=ParseKwargs,
                   help="pretrained_cfg keys to override, k=v ... (e.g. hf_hub_id=..., file=...; timm 1.0.31)")
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='load these weights into the model before training')
    g.add_argument('--resume', default='', type=str, metavar='PATH',
                   help="continue training from this checkpoint, or 'auto': <output>/<experiment>/last.pth.tar")
    g.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='do not restore the optimizer (and AMP scaler) state on resume')
    g.add_argument('--num-classes', type=int, default=None, metavar='N', help='number of classes (default: model)')
    g.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (default: model)')
    g.add_argument('--img-size', type=int, default=None, metavar='N', help='image side (default: model)')
    g.add_argument('--in-chans', type=int, default=None, metavar='N', help='input channels (default: 3)')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                   help='input shape C H W, e.g. 3 224 224 (default: model)')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N', help='validation centre-crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='pixel mean override')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='pixel std override')
    g.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation override')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                   help='images per device and step (default: 128)')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                   help='validation batch size (default: --batch-size)')
    g.add_argument('--channels-last', action='store_true', default=False, help='channels_last memory layout')
    g.add_argument('--fuser', default='', type=str, help="TorchScript fuser ('te', 'old' or 'nvfuser')")
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                   help='batches whose gradients are accumulated per optimizer step')
    g.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help='recompute activations in backward to save memory')
    g.add_argument('--fast-norm', default=False, action='store_true', help='low-precision fused norm layers')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra create_model keyword arguments, k=v ...')
    g.add_argument('--head-init-scale', default=None, type=float, help='multiply the head weights by this')
    g.add_argument('--head-init-bias', default=None, type=float, help='set the head bias to this')
    g.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None)')
    scripting = g.add_mutually_exclusive_group()
    scripting.add_argument('--torchscript', dest='torchscript', action='store_true', help='torch.jit.script')
    scripting.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                           help='torch.compile with this backend (bare flag: inductor)')


def _precision_options(parser) -> None:
    """Device and precision: the same options in timm's train.py and validate.py."""
    parser.add_argument('--device', default='cuda', type=str,
                        help='device; cuda falls back to the CPU with a warning when no GPU is present')
    parser.add_argument('--amp', action='store_true', default=False, help='mixed precision (torch.autocast)')
    parser.add_argument('--amp-dtype', default='float16', type=str, help='AMP dtype: float16 or bfloat16')
    parser.add_argument('--model-dtype', default=None, type=str, help='model dtype without AMP (default: float32)')


def _device_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Device parameters')
    _precision_options(g)
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='DDP without broadcast_buffers')
    g.add_argument('--synchronize-step', action='store_true', default=False,
                   help='synchronize the device at the end of each step (timing)')
    g.add_argument('--local_rank', default=0, type=int, help='set by torch.distributed.launch; ignored')
    g.add_argument('--device-modules', default=None, type=str, nargs='+',
                   help='python modules to import that register extra devices')


def _optimizer_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Optimizer parameters')
    g.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (default: sgd)')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum (default: 0.9)')
    g.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradients at this value')
    g.add_argument('--clip-mode', type=str, default='norm', help="clipping mode: 'norm', 'value' or 'agc'")
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning-rate decay')
    g.add_argument('--layer-decay-min-scale', type=float, default=0, help='lower bound of the layer-decay scale')
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                   help='layers scaled below this are frozen')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra optimizer keyword arguments, k=v ...')


def _schedule_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Learning rate schedule parameters')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                   help="LR schedule (default: cosine); wsd: warmup-stable-decay; none: the optimizer's lr as it is; "
                        "plateau is deprecated in timm 1.0.31")
    g.add_argument('--sched-on-updates', action='store_true', default=False,
                   help='step the schedule every optimizer update instead of every epoch')
    g.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate (default: --lr-base scaled by the global batch size)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='learning rate per --lr-base-size')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='batch size of --lr-base')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                   help="'linear' or 'sqrt' batch scaling (default: by optimizer)")
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                   help='LR noise on/off epoch percentages')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='LR noise limit')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='LR noise std')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='cycle length multiplier')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='LR decay per cycle')
    g.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='number of cycles')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay of cosine/poly schedules')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup start LR')
    g.add_argument('--min-lr', type=float, default=0, metavar='LR', help='schedule floor')
    g.add_argument('--epochs', type=int, default=300, metavar='N', help='epochs to train (default: 300)')
    g.add_argument('--epoch-repeats', type=float, default=0., metavar='N', help='epoch repeat multiplier')
    g.add_argument('--start-epoch', default=None, type=int, metavar='N', help='first epoch (overrides resume)')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='multistep milestones')
    # timm 1.0.31's create_scheduler_v2 resolves None per schedule: 90 for step, 0.2 of the schedule for wsd/rsqrt
    g.add_argument('--decay-epochs', type=float, default=None, metavar='N',
                   help='step: epochs between decays (default 90); wsd/rsqrt: length of the decay phase, < 1 a '
                        'fraction of the schedule (default 0.2)')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='warmup epochs')
    g.add_argument('--warmup-prefix', action='store_true', default=False, help='warmup before, not inside, epochs')
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs at min LR after the cycle')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau patience')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')
    g.add_argument('--lr-decay-fn', type=str, default=None, metavar='FN',
                   help="wsd/rsqrt decay shape: linear, 1-sqrt, cosine, power or exp (default: 1-sqrt for wsd, "
                        "linear for rsqrt; timm 1.0.31)")
    g.add_argument('--lr-stable-timescale', type=float, default=None, metavar='N',
                   help='rsqrt: timescale of the stable phase in epochs (default: --warmup-epochs; timm 1.0.31)')


def _augment_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Augmentation and regularization parameters')
    g.add_argument('--no-aug', action='store_true', default=False, help='no training augmentation')
    g.add_argument('--train-crop-mode', type=str, default=None, help='training crop mode')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='RRC scale range')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='RRC aspect-ratio range')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='colour jitter strength')
    g.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT', help='colour jitter probability')
    g.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT', help='grayscale probability')
    g.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT', help='blur probability')
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='auto-augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--aug-repeats', type=float, default=0, help='repeated-augmentation count (0: off)')
    g.add_argument('--aug-splits', type=int, default=0, help='augmentation splits (AugMix/JSD)')
    g.add_argument('--jsd-loss', action='store_true', default=False, help='Jensen-Shannon consistency loss')
    g.add_argument('--bce-loss', action='store_true', default=False, help='binary cross-entropy loss')
    g.add_argument('--bce-sum', action='store_true', default=False, help='sum BCE over classes')
    g.add_argument('--bce-target-thresh', type=float, default=None, help='binarize BCE targets at this threshold')
    g.add_argument('--bce-pos-weight', type=float, default=None, help='BCE positive weight')
    g.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erasing probability')
    g.add_argument('--remode', type=str, default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--resplit', action='store_true', default=False, help='no random erasing on the first split')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0: off)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max box ratio')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix when both are on')
    g.add_argument('--mixup-mode', type=str, default='batch', help="mixup mode: 'batch', 'pair' or 'elem'")
    g.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='turn mixup off at this epoch')
    g.add_argument('--smoothing', type=float, default=None,
                   help='label smoothing (default: 0.1; 0 for --task multilabel, where it pulls labels towards 0.5)')
    g.add_argument('--train-interpolation', type=str, default='random', help='training resize interpolation')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    g.add_argument('--drop-connect', type=float, default=None, metavar='PCT', help='drop connect (deprecated)')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='stochastic depth rate')
    g.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate')


def _norm_ema_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Batch norm parameters')
    g.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override')
    g.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override')
    g.add_argument('--sync-bn', action='store_true', help='synchronized BatchNorm')
    g.add_argument('--dist-bn', type=str, default='reduce',
                   help="share BatchNorm statistics after each epoch: 'broadcast', 'reduce' or ''")
    g.add_argument('--split-bn', action='store_true', help='one BatchNorm per augmentation split')
    g = parser.add_argument_group('Model exponential moving average parameters')
    g.add_argument('--model-ema', action='store_true', default=False, help='keep an EMA of the weights')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='keep the EMA on the CPU')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay (default: 0.9998)')
    g.add_argument('--model-ema-warmup', action='store_true', help='warm the EMA decay up')


def _misc_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('Miscellaneous parameters')
    g.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    g.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
    g.add_argument('--log-interval', type=int, default=50, metavar='N', help='updates between log lines')
    g.add_argument('--val-interval', type=int, default=1, metavar='N', help='epochs between evaluations')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                   help='updates between recovery checkpoints (0: off)')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='best checkpoints kept')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading processes')
    g.add_argument('--save-images', action='store_true', default=False, help='save training batches as images')
    g.add_argument('--pin-mem', action='store_true', default=False, help='pin loader memory')
    g.add_argument('--no-prefetcher', action='store_true', default=False, help='no fast prefetcher')
    g.add_argument('--output', default='', type=str, metavar='PATH', help='output root (default: ./output/train)')
    g.add_argument('--experiment', default='', type=str, metavar='NAME',
                   help='output folder name (default: <date>-<model>-<img size>)')
    g.add_argument('--eval-metric', default=None, type=str, metavar='EVAL_METRIC',
                   help="metric that ranks checkpoints (default: the task's, top1 or map; 'loss' ranks lower first)")
    g.add_argument('--tta', type=int, default=0, metavar='N', help='test-time augmentation factor')
    g.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                   help='keep loader workers across epochs')
    g.add_argument('--log-wandb', action='store_true', default=False, help='log to Weights & Biases')
    g.add_argument('--wandb-project', default=None, type=str, help='wandb project')
    g.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    g.add_argument('--wandb-resume-id', default='', type=str, metavar='ID', help='wandb run id to resume')
    # timm's scheduled-resolution loader
    g.add_argument('--train-img-sizes', type=int, nargs='+', default=None, help='training image sizes to mix')
    g.add_argument('--train-batch-sizes', type=int, nargs='+', default=None, help='batch size per image size')
    g.add_argument('--train-size-probs', type=float, nargs='+', default=None, help='weights of the image sizes')
    g.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'),
                   help='image size schedule')
    g.add_argument('--train-size-schedule-spread', type=float, default=0.65, help='progressive schedule spread')
    g.add_argument('--train-size-random-mix', type=float, default=0.1, help='random share of the schedule')
    g.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                   help='loader batches per epoch')
    g.add_argument('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'),
                   help='loss scaling for variable batch sizes')
    # timm's NaFlex loader
    g.add_argument('--naflex-loader', action='store_true', default=False, help='NaFlex variable-resolution loader')
    g.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                   help='NaFlex training sequence lengths')
    g.add_argument('--naflex-max-seq-len', type=int, default=576, help='NaFlex validation sequence length')
    g.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None, help='NaFlex patch sizes')
    g.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None, help='patch size weights')
    g.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'),
                   help='NaFlex loss scaling')
    g.add_argument('--naflex-patchify-channels-first', action='store_true', default=False,
                   help='NaFlex patches in C-P-P layout')


def _distillation_options(parser: argparse.ArgumentParser) -> None:
    # timm adds these to the parser itself, with no group
    parser.add_argument('--kd-model-name', default=None, type=str, help='teacher for knowledge distillation')
    parser.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'],
                        help='distillation type')
    parser.add_argument('--kd-loss-type', default='kl', type=str, help='logit distillation loss')
    parser.add_argument('--distill-loss-weight', default=None, type=float, help='distillation loss weight')
    parser.add_argument('--task-loss-weight', default=None, type=float, help='label loss weight')
    parser.add_argument('--kd-temperature', default=4.0, type=float, help='distillation temperature')
    parser.add_argument('--kd-student-feature-dim', default=None, type=int, help='student feature dim')
    parser.add_argument('--kd-teacher-feature-dim', default=None, type=int, help='teacher feature dim')
    parser.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'],
                        help='token distillation type')


def _timm_1031_options(parser: argparse.ArgumentParser) -> None:
    """1.0.31's run control; its other additions sit in the groups timm's README names them with."""
    g = parser.add_argument_group('Run control (timm 1.0.31)')
    g.add_argument('--stop-epoch', type=int, default=None, metavar='N',
                   help='stop after N epochs without changing the schedule (then --resume auto continues)')
    g.add_argument('--save-epochs', type=int, nargs='+', default=None, metavar='N',
                   help='also keep milestone-<N>.pth.tar after N completed epochs (forces an eval)')


def _task_options(parser: argparse.ArgumentParser) -> None:
    """timm 1.0.31's task and loss options (its README's "What's New", its tests/test_multilabel.py)."""
    g = parser.add_argument_group('Task and loss (timm 1.0.31)')
    _task_reading_options(g)
    g.add_argument('--loss', default=None, choices=LOSS_TYPES,
                   help='training loss (default: ce, or bce for --task multilabel); --bce-loss / --jsd-loss are its '
                        'legacy spellings')
    g.add_argument('--loss-pos-weight', default=None, type=str, metavar='WEIGHTS',
                   help="positive-term weights (bce, multi-label asl): a number, a comma list, a file, or 'neg_pos' "
                        '(computed from --class-stats)')
    g.add_argument('--loss-class-weight', default=None, type=str, metavar='WEIGHTS',
                   help="per-class weights (bce, multi-label asl): a number, a comma list, a file, or 'inv_freq' / "
                        "'effective_num' (computed from --class-stats)")
    g.add_argument('--loss-weight-power', default=1.0, type=float, metavar='P',
                   help='exponent of the weights computed from class stats (0.5: square root; default: 1)')
    g.add_argument('--class-stats', default=None, type=str, metavar='FILE',
                   help='JSON file of per-class positive counts and the sample count (pos_counts, num_samples), '
                        'for the computed weights and the db loss')
    g.add_argument('--poly-gamma', default=0.0, type=float, help='focusing parameter of the multi-label poly loss')
    g.add_argument('--poly-epsilon', default=2.0, type=float,
                   help="Poly-1 coefficient (default: 2, timm's create_classification_loss)")


def _task_reading_options(parser) -> None:
    """What a dataset's targets are: the same options in train.py and validate.py."""
    parser.add_argument('--task', default='classification', choices=TASKS,
                        help="'classification' (one class per image, softmax) or 'multilabel' (any number of "
                             'classes per image, a sigmoid per class; evaluated by mAP and F1)')
    parser.add_argument('--target-format', default=None, choices=TARGET_FORMATS,
                        help="'indices' (a list of class indices, the default) or 'multihot' (a 0/1 vector per image)")
    parser.add_argument('--multilabel-threshold', default=0.5, type=float, metavar='P',
                        help='sigmoid probability at which a label counts as predicted, for the F1 metrics')


def resolve_task_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """After parsing: the task's defaults for what the user left unset (``--eval-metric`` top1, or map for
    multi-label; ``--smoothing`` 0.1, or 0 for multi-label), the legacy loss flags mapped onto ``--loss``, and the
    loss refusals, each one parser error."""
    if args.eval_metric is None:
        args.eval_metric = task_metric(args)
    try:
        check_ranges(args, _LOSS_VALUES)  # before the loss is built on paper, which would assert on them
        resolve_loss_args(args)
    except (UsageError, InputError) as e:
        parser.error(str(e))


# the numbers resolve_loss_args gives timm's loss factory
_LOSS_VALUES = ('--smoothing', '--bce-target-thresh', '--bce-pos-weight', '--loss-weight-power', '--poly-gamma')


def train_parser() -> argparse.ArgumentParser:
    """timm's train.py parser, then subnet's own groups (``subnet/subnet_options.py``, the method registry)."""
    parser = OneLineParser(prog='train.py', description='Train a timm model, optionally with a submodel method.')
    for add in (_dataset_options, _model_options, _device_options, _optimizer_options, _schedule_options,
                _augment_options, _norm_ema_options, _misc_options, _distillation_options, _timm_1031_options,
                _task_options):
        add(parser)
    # an abbreviation that several options share resolves to timm's one: ours never make timm's ambiguous
    parser.timm_flags = frozenset(s for a in parser._actions for s in a.option_strings)
    add_train_options(parser)
    return parser


def config_parser() -> argparse.ArgumentParser:
    """timm's pre-parser: the YAML file, read before the full parser is built."""
    parser = OneLineParser(prog='train.py', add_help=False)
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML file of defaults (underscore keys); the command line wins')
    return parser


def extra_methods_parser() -> argparse.ArgumentParser:
    """``--extra-methods`` must be imported before the full parser exists (its methods add options); only the
    exact spelling is taken here, so no abbreviation of another option is swallowed."""
    parser = OneLineParser(prog='train.py', add_help=False, allow_abbrev=False)
    parser.add_argument('--extra-methods', default=None, nargs='+', metavar='MODULE')
    return parser


# ------------------------------------------------------------------------------------------------- YAML

def _convert(action: argparse.Action, value, key: str):
    """Convert one YAML value as the command line would, or raise UsageError naming the key."""
    def fail(expected):
        raise UsageError(f"config key '{key}': expected {expected}, got {value!r}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            fail('true or false')
        return value
    if isinstance(action, ParseKwargs):
        if value is None:
            return {}
        if not isinstance(value, dict):
            fail('a mapping of keyword arguments')
        return value
    if value is None:
        return None

    def one(item):
        if isinstance(item, bool) and action.type in (int, float):
            fail('a number')
        if isinstance(item, (list, dict)):
            fail('a single value')
        if action.type is int and isinstance(item, float) and not item.is_integer():
            fail('an integer')
        try:
            converted = (action.type or str)(item)
        except argparse.ArgumentTypeError as e:  # a type with its own message (a SPEC's grammar)
            raise UsageError(str(e)) from None
        except (TypeError, ValueError):
            fail(f'a {getattr(action.type, "__name__", "value")}')
        if action.choices is not None and converted not in action.choices:
            fail(f'one of {", ".join(map(str, action.choices))}')
        return converted

    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if not isinstance(value, (list, tuple)):
            fail('a list')
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            fail(f'a list of {action.nargs}')
        return [one(v) for v in value]
    return one(value)


def read_config(path: str) -> dict:
    """The mapping in a timm hparams YAML file, or one line saying why it cannot be read."""
    try:
        with open(path, 'r', encoding='utf-8') as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f'cannot read config file {path}: {e.strerror}')
    except UnicodeDecodeError as e:
        raise UsageError(f'config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset '
                         f'{e.start}); save it as UTF-8')
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1})' if mark is not None else ''
        problem = getattr(e, 'problem', None) or first_line(e)
        raise UsageError(f'config file {path} is not valid YAML{where}: {problem}')
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UsageError(f'config file {path} must hold a mapping of option names to values')
    return cfg


def _actions_by_key(parser: argparse.ArgumentParser) -> dict:
    """YAML key -> option: every dest, and every other long spelling with underscores (``dr`` is timm's other
    name of ``--decay-rate``)."""
    actions = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            if option.startswith('--'):
                actions.setdefault(option[2:].replace('-', '_'), action)
    actions.update((a.dest, a) for a in parser._actions if not isinstance(a, argparse._HelpAction))
    return actions


def config_defaults(cfg: dict, path: str, parser: argparse.ArgumentParser) -> dict:
    """A config mapping as parser defaults: validated and converted; retired timm keys dropped with a warning."""
    actions = _actions_by_key(parser)
    defaults, retired = {}, []
    for key, value in cfg.items():
        action = actions.get(key)
        if action is not None:
            defaults[action.dest] = _convert(action, value, key)
        elif key in _RETIRED_KEYS:
            retired.append(str(key))
        else:
            raise UsageError(_unknown_key(key, path, actions))
    if retired:
        _logger.warning(f'Ignoring {", ".join(retired)} in config file {path}: timm no longer has '
                        f'{"this option" if len(retired) == 1 else "these options"}.')
    return defaults


def _unknown_key(key, path: str, actions: dict) -> str:
    closest = difflib.get_close_matches(str(key), list(actions), n=1, cutoff=0.6)
    hint = f"did you mean '{closest[0]}'?" if closest else 'not an option of train.py (see --help)'
    return f"config file {path}: unknown key '{key}' ({hint})"


def _train_config(argv: List[str]) -> Tuple[dict, str, List[str], argparse.ArgumentParser]:
    """The ``-c`` YAML mapping, its path, the rest of the command line, and train.py's full parser.

    Modules named by ``--extra-methods`` (command line or YAML) are imported before the full parser is built, so
    the methods they register, and their options, are known to it.
    """
    config_args, remaining = config_parser().parse_known_args(argv)
    cfg = read_config(config_args.config) if config_args.config else {}
    early = extra_methods_parser()
    modules = early.parse_known_args(remaining)[0].extra_methods
    if modules is None and cfg.get('extra_methods') is not None:
        modules = _convert(_actions_by_key(early)['extra_methods'], cfg['extra_methods'], 'extra_methods')
    import_extra_methods(modules or ())
    return cfg, config_args.config, remaining, train_parser()


def parse_train_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse a train.py command line (with an optional ``-c`` YAML) into args and the args.yaml text."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, path, remaining, parser = _train_config(argv)
    defaults = config_defaults(cfg, path, parser)
    parser.set_defaults(**defaults)
    args = parser.parse_args(remaining)
    merge_config_kwargs(args, defaults, parser)
    resolve_task_args(args, parser)
    # the namespace as given (lr: null when it will be derived), replayable with -c, as timm writes it
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


def merge_config_kwargs(args: argparse.Namespace, defaults: dict, parser: argparse.ArgumentParser) -> None:
    """``--model-kwargs`` / ``--opt-kwargs`` on the command line add to the YAML's mapping, key by key (the
    command line wins per key), where timm's action replaces it whole: a recipe's ``init_values`` or
    ``zero_init_last`` would otherwise vanish without a word when the command line adds ``img_size``."""
    for action in parser._actions:
        if isinstance(action, ParseKwargs) and isinstance(defaults.get(action.dest), dict):
            given = getattr(args, action.dest)
            if given is not defaults[action.dest]:  # the command line set it (the action builds a new dict)
                setattr(args, action.dest, {**defaults[action.dest], **given})


def given_on_command_line(parser: argparse.ArgumentParser, argv: List[str]) -> Set[str]:
    """The options (dests) ``argv`` sets, abbreviations included: ``argv`` parsed again with every default
    suppressed (this changes ``parser``: pass a fresh one)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def train_option_sources(argv: Optional[List[str]] = None) -> Tuple[Set[str], Set[str]]:
    """The train.py options (dests) set on the command line, and those set in the ``-c`` YAML."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, _, remaining, parser = _train_config(argv)
    actions = _actions_by_key(parser)
    return given_on_command_line(parser, remaining), {actions[k].dest for k in cfg if k in actions}


def train_options_given(argv: Optional[List[str]] = None) -> Set[str]:
    """The train.py options the user set, on the command line or in the ``-c`` YAML, rather than left at their
    defaults (``--device``: timm's default 'cuda' falls back to the CPU quietly, a 'cuda' asked for warns)."""
    on_command_line, in_config = train_option_sources(argv)
    return on_command_line | in_config


# ---------------------------------------------------------------------------------------------- validate.py

def _validate_dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument('data', nargs='?', metavar='DIR', const=None, help='dataset root (deprecated, use --data-dir)')
    p.add_argument('--data-dir', metavar='DIR', help='dataset root')
    p.add_argument('--dataset', metavar='NAME', default='', help='dataset type + name; empty: image folder')
    p.add_argument('--split', metavar='NAME', default='validation', help='split to evaluate (default: validation)')
    p.add_argument('--num-samples', default=None, type=int, metavar='N', help='samples, for iterable datasets')
    _dataset_reading_options(p)


def validate_parser() -> argparse.ArgumentParser:
    """timm's validate.py parser (no YAML: timm's validate has none), then subnet's own options."""
    p = OneLineParser(prog='validate.py', description='Validate timm models and checkpoints, and their subnets.')
    _validate_dataset_options(p)
    p.add_argument('--model', '-m', metavar='NAME', default='dpn92',
                   help="model name, wildcard, 'all' or a file of names (default: dpn92)")
    p.add_argument('--pretrained', dest='pretrained', action='store_true', help='use pretrained weights')
    p.add_argument('-j', '--workers', default=4, type=int, metavar='N', help='data loading processes')
    p.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='batch size (default: 256)')
    p.add_argument('--img-size', default=None, type=int, metavar='N', help='image side (default: model)')
    p.add_argument('--in-chans', type=int, default=None, metavar='N', help='input channels (default: 3)')
    p.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='input shape C H W')
    p.add_argument('--use-train-size', action='store_true', default=False,
                   help="use the model's training size, not its test size")
    p.add_argument('--crop-pct', default=None, type=float, metavar='N', help='centre-crop fraction')
    p.add_argument('--crop-mode', default=None, type=str, metavar='N', help="crop mode: 'center', 'squash', ...")
    p.add_argument('--crop-border-pixels', type=int, default=None, help='pixels cropped from each border')
    p.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='pixel mean override')
    p.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='pixel std override')
    p.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
    p.add_argument('--num-classes', type=int, default=None, help='number of classes')
    p.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type')
    p.add_argument('--log-freq', default=10, type=int, metavar='N', help='batches between log lines')
    p.add_argument('--checkpoint', default='', type=str, metavar='PATH',
                   help='checkpoint file, or a folder of them (each is validated)')
    p.add_argument('--num-gpu', type=int, default=1, help='GPUs for DataParallel')
    p.add_argument('--test-pool', dest='test_pool', action='store_true', help='test-time pooling')
    p.add_argument('--no-prefetcher', action='store_true', default=False, help='no fast prefetcher')
    p.add_argument('--pin-mem', action='store_true', default=False, help='pin loader memory')
    p.add_argument('--channels-last', action='store_true', default=False, help='channels_last memory layout')
    _precision_options(p)
    p.add_argument('--tf-preprocessing', action='store_true', default=False, help='TensorFlow preprocessing')
    p.add_argument('--use-ema', dest='use_ema', action='store_true', help="use the checkpoint's EMA weights")
    p.add_argument('--fuser', default='', type=str, help='TorchScript fuser')
    p.add_argument('--fast-norm', default=False, action='store_true', help='low-precision fused norm layers')
    p.add_argument('--reparam', default=False, action='store_true', help='reparameterize the model')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra model kwargs k=v ...')
    p.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode')
    scripting = p.add_mutually_exclusive_group()
    scripting.add_argument('--torchscript', default=False, action='store_true', help='torch.jit.script')
    scripting.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                           help='torch.compile with this backend')
    scripting.add_argument('--aot-autograd', default=False, action='store_true', help='AOT autograd (retired)')
    p.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='write results here')
    p.add_argument('--results-format', default='csv', type=str, help="'csv' or 'json'")
    p.add_argument('--real-labels', default='', type=str, metavar='FILENAME', help='ImageNet ReaL labels file')
    p.add_argument('--valid-labels', default='', type=str, metavar='FILENAME', help='valid label indices file')
    p.add_argument('--retry', default=False, action='store_true', help='retry with smaller batches on OOM')
    p.add_argument('--seed', type=int, default=42, metavar='S', help='random seed')
    p.add_argument('--metrics-avg', type=str, default=None, choices=['micro', 'macro', 'weighted'],
                   help='also report precision/recall/F1 with this averaging (needs scikit-learn)')
    p.add_argument('--naflex-loader', action='store_true', default=False, help='NaFlex loader')
    p.add_argument('--naflex-max-seq-len', type=int, default=576, help='NaFlex sequence length')
    p.timm_flags = frozenset(s for a in p._actions for s in a.option_strings)
    _task_reading_options(p.add_argument_group('Task (timm 1.0.31)'))
    add_validate_options(p)
    return p
