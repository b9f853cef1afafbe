"""subnet/sample_memory.py: the sample indices of each batch, read at the sampler, and the per-sample logit memory
(GKT's knowledge across steps)."""
import pytest
import torch
import torch.utils.data

from subnet.sample_memory import LogitMemory, install_index_tap


class Indices(torch.utils.data.Dataset):
    """Each item is its own index: a batch says which samples it holds."""

    def __len__(self):
        return 22

    def __getitem__(self, index):
        return torch.tensor(index), 0


@pytest.mark.parametrize('workers', [0, 2])
def test_each_batch_takes_the_indices_the_loader_drew_for_it_even_when_workers_read_ahead(workers):
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(Indices(), batch_size=4, shuffle=True, drop_last=True,
                                         num_workers=workers, prefetch_factor=2 if workers else None)
    tap = install_index_tap(loader)
    assert install_index_tap(loader) is tap and tap.num_samples == 22
    for epoch in range(2):  # the 2 indices drop_last leaves out do not shift the next epoch
        batches = [(images, tap.take(len(images))) for images, _ in loader]
        assert len(batches) == 5 and all(torch.equal(images, taken) for images, taken in batches)


def test_a_loader_without_a_plain_batch_sampler_is_refused():
    sampler = torch.utils.data.BatchSampler(range(22), 4, False)
    loader = torch.utils.data.DataLoader(Indices(), batch_sampler=[list(b) for b in sampler])
    with pytest.raises(ValueError, match='plain batch sampler'):
        install_index_tap(loader)


def test_memory_keeps_rows_per_sample_skips_non_finite_rows_and_refuses_another_dataset():
    memory = LogitMemory(6, slots=2)
    assert memory.recall(torch.tensor([0]), 'cpu') == (None, None)
    values = torch.arange(24, dtype=torch.float32).view(3, 2, 4)
    values[2, 1, 0] = float('nan')
    memory.store(torch.tensor([4, 1, 2]), values)
    recalled, seen = memory.recall(torch.tensor([1, 4, 2, 0]), 'cpu')
    assert torch.equal(recalled[:2], values[[1, 0]]) and seen.tolist() == [True, True, False, False]
    copy = LogitMemory(6, slots=2)
    copy.load_state_dict(memory.state_dict())
    assert torch.equal(copy.values, memory.values) and torch.equal(copy.seen, memory.seen)
    with pytest.raises(ValueError, match='remembers 6 training samples'):
        LogitMemory(7, slots=2).load_state_dict(memory.state_dict())
    with pytest.raises(ValueError, match='remembers 2 knowledge groups'):
        LogitMemory(6, slots=3).load_state_dict(memory.state_dict())
