"""Endless, resumable streams of batches, sharded across ranks.

The order of batch ``k`` is a pure function of ``(seed, k)``: every rank draws
the same permutation of the whole data set per epoch and keeps its own slice,
so ranks see disjoint items, and a resumed run continues with exactly the
batches an uninterrupted run would have seen.
"""

import torch


class ShardedBatchSampler:
    """An endless sampler of index batches for one rank.

    Args:
        num_items: size of the data set.
        batch_size: items per batch on this rank.
        shard, num_shards: this rank and the number of ranks.
        shuffle: a fresh permutation per epoch (else the natural order).
        seed: seed of the permutations.
    """

    def __init__(self, num_items, batch_size, *, shard=0, num_shards=1, shuffle=True, seed=0, device=None):
        per_rank = num_items // num_shards
        if per_rank < batch_size:
            raise ValueError(
                f"{num_items} items over {num_shards} rank(s) give {per_rank} per rank, "
                f"fewer than one batch of {batch_size}"
            )
        self.num_items, self.batch_size = num_items, batch_size
        self.shard, self.num_shards = shard, num_shards
        self.shuffle, self.seed = shuffle, seed
        # With a device, indices come back as tensors on it: the epoch's order
        # is copied once per epoch, not once per batch (a copy from pageable
        # host memory would stall the GPU queue every step).
        self.device = device
        self.batches_per_epoch = per_rank // batch_size
        self.start = 0
        self._cached_epoch, self._cached_order = None, None

    def _rank_order(self, epoch):
        if self._cached_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.num_items, generator=gen)
            else:
                order = torch.arange(self.num_items)
            order = order[self.shard :: self.num_shards]
            if self.device is not None:
                order = order.to(self.device)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def batch_indices(self, k):
        """Indices of batch number ``k`` on this rank: a list of ints, or a
        tensor on ``device`` when one was given."""
        epoch, j = divmod(k, self.batches_per_epoch)
        batch = self._rank_order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return batch if self.device is not None else batch.tolist()

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch_indices(k)
            k += 1


class BatchStream:
    """An endless iterator of batches with ``state_dict``/``load_state_dict``.

    ``make_iterator(sampler)`` turns the sampler into an iterator of batches
    (a DataLoader with ``batch_sampler=sampler``, or a plain generator that
    fetches whole batches from an array). Only consumed batches count, so
    workers that prefetch ahead do not shift a resumed run.
    """

    def __init__(self, sampler, make_iterator, *, label_map=None):
        self.sampler, self._make_iterator = sampler, make_iterator
        self.label_map = label_map
        self.consumed = 0
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self.sampler.start = self.consumed
            self._iterator = iter(self._make_iterator(self.sampler))
        batch = next(self._iterator)
        self.consumed += 1
        return batch

    def state_dict(self):
        return {"consumed": self.consumed, "seed": self.sampler.seed}

    def load_state_dict(self, state):
        self.consumed = int(state["consumed"])
        self.sampler.seed = int(state["seed"])
        self._iterator = None
