"""torchrun's elastic restarts (``torchrun --max-restarts N ... train.py --resume auto``): what a restarted attempt
of the same job needs.

- **Its own rendezvous keys.** torchrun restarts every worker of the job after one fails, and its workers share the
  agent's store for every attempt: a restarted attempt's process group read the previous attempt's keys (gloo then
  connects to a dead peer's address and fails). ``dist_url`` gives timm's ``init_distributed_device`` a rendezvous
  (``torch.distributed.rendezvous.register_rendezvous_handler``, torch's public hook) that is ``env://`` with its
  store prefixed by the attempt.
- **Its run folder's lock.** The previous attempt's processes (and the loader workers they forked) may still be on
  their way out when the next attempt starts; ``job_identity`` tells the folder lock that the holder is this job, so
  the lock is waited for instead of refused (``run_folder.RunLock``).
"""
import os
from typing import Optional
from urllib.parse import urlparse

import torch.distributed as dist
from torch.distributed import PrefixStore

__all__ = ['restart_count', 'job_identity', 'dist_url']

_SCHEME = 'subnet-elastic'


def restart_count() -> Optional[int]:
    """This attempt's number under torchrun (0 for the first), None outside torchrun."""
    count = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    return int(count) if count is not None else None


def job_identity() -> Optional[str]:
    """What names this torchrun job across its attempts (its run id, on this host's agent), None outside torchrun.
    torchrun's default run id is 'none', so the agent's store address is part of it."""
    if restart_count() is None:
        return None
    return (f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}@{os.environ.get('MASTER_ADDR', '')}:"
            f"{os.environ.get('MASTER_PORT', '')}")


def _attempt_rendezvous(url: str, **kwargs):
    """``env://`` (with the URL's query: rank, world size), the store's keys under this attempt's prefix."""
    query = urlparse(url).query
    for store, rank, world_size in dist.rendezvous('env://' + (f'?{query}' if query else ''), **kwargs):
        yield PrefixStore(f'attempt_{restart_count() or 0}', store), rank, world_size


def dist_url(current: Optional[str]) -> Optional[str]:
    """The rendezvous URL for timm's ``init_distributed_device``: per-attempt keys under torchrun, unless the user
    gave a URL of their own (``current`` other than ``env://``)."""
    if restart_count() is None or (current and current != 'env://'):
        return current
    try:
        dist.register_rendezvous_handler(_SCHEME, _attempt_rendezvous)
    except RuntimeError:  # registered already (a second run in this process)
        pass
    return f'{_SCHEME}://'
