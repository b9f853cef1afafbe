"""What the benchmark scripts share: their common options, markdown table heads, and counting compilations."""
import logging
import time

import timm
import torch

__all__ = ['add_common_args', 'parse_and_setup', 'clock', 'print_table_head', 'CompileCounter']


def add_common_args(parser, repeats_help: str) -> None:
    """The options every timing script has: models, input, batch, repeats, threads."""
    parser.add_argument('--models', default='vit_small_patch16_224,resnet50')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=5, help=repeats_help)
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    parser.add_argument('--clock', default='wall', choices=('wall', 'cpu'),
                        help="'wall' time, or the process's 'cpu' time: with --threads 1 on a machine shared with "
                             "other jobs, the time our one thread actually ran (their load does not count)")


def parse_and_setup(parser):
    """The parsed options, with ``--threads`` applied. One intra-op thread is what the README's figures use: on a
    shared machine, OpenMP threads spin-wait for a busy core."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def clock(args):
    """The timer ``--clock`` asks for: ``time.perf_counter`` or ``time.process_time`` (user + system CPU time of
    this process, all its threads: the step's wall time on a quiet machine when there is one thread)."""
    return time.process_time if args.clock == 'cpu' else time.perf_counter


def print_table_head(args, title: str, columns, numeric_from: int = 2) -> None:
    """The title line (with the library versions, thread count and clock), then a markdown table head; columns
    from ``numeric_from`` on are right-aligned."""
    print(f'{title}; torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, '
          f'{args.clock} time')
    print()
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '|'.join('---' if i < numeric_from else '---:' for i in range(len(columns))) + '|', flush=True)


class CompileCounter(logging.Handler):
    """A ``torch.compile`` backend that counts its compilations per label (``counter.label = ...`` before each
    step), and notices dynamo's recompile-limit warning (from then on that frame runs eagerly)."""

    def __init__(self, backend: str = 'inductor', config_patches: dict = None):
        super().__init__()
        self.backend = backend
        self.config_patches = config_patches or {}  # inductor options (what torch.compile's ``options`` would set)
        self.label = None
        self.counts = {}
        self.hit_limit = False
        logging.getLogger('torch._dynamo.convert_frame').addHandler(self)

    def emit(self, record) -> None:
        message = record.getMessage()
        self.hit_limit |= 'recompile_limit' in message or 'cache_size_limit' in message

    def __call__(self, graph_module, example_inputs):
        self.counts[self.label] = self.counts.get(self.label, 0) + 1
        if self.backend == 'inductor':
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(graph_module, example_inputs, config_patches=self.config_patches)
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.backend)(graph_module, example_inputs)
