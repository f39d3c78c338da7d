"""The training sampler: accelerate's random order, without the Python list of every index.

torch's `RandomSampler` (which accelerate replaces by its `SeedableRandomSampler`, the same order) turns each epoch's
permutation into a Python list at once: 36 bytes an index, 560 MB for the 15.6M blocks of 1 GB of text, held for the
whole epoch. `LeanRandomSampler` draws the same permutation (`torch.randperm` with a generator seeded with the data
seed plus the epoch, as `SeedableRandomSampler` does) and hands it out a slice at a time: 8 bytes an index.
"""

import torch
from torch.utils.data import Sampler


class LeanRandomSampler(Sampler[int]):
    """Each epoch, a random permutation of `range(num_samples)`: the one accelerate's `SeedableRandomSampler` gives
    for `data_seed` (default: torch's initial seed, which `set_seed` set) and the epoch, yielded slice by slice.
    Not a `RandomSampler`, so accelerate keeps it as it is (and shards its batches over the processes)."""

    def __init__(self, num_samples: int, data_seed: int | None = None, slice_size: int = 1 << 16):
        self.num_samples, self.slice_size = num_samples, slice_size
        self.initial_seed = data_seed if data_seed is not None else torch.random.initial_seed()
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.initial_seed + self.epoch)
        permutation = torch.randperm(self.num_samples, generator=generator)
        for start in range(0, self.num_samples, self.slice_size):
            yield from permutation[start : start + self.slice_size].tolist()
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
