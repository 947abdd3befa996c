"""Resumable sharded batch order."""

import torch

from guided_diffusion_vae.data.batching import BatchStream, ShardedBatchSampler


def test_ranks_get_disjoint_covering_slices_and_device_indices_match():
    a = ShardedBatchSampler(20, 5, shard=0, num_shards=2, seed=1)
    b = ShardedBatchSampler(20, 5, shard=1, num_shards=2, seed=1)
    epoch = a.batch_indices(0) + a.batch_indices(1) + b.batch_indices(0) + b.batch_indices(1)
    assert sorted(epoch) == list(range(20))
    assert a.batch_indices(2) != a.batch_indices(0)  # a new permutation each epoch
    on_device = ShardedBatchSampler(20, 5, shard=0, num_shards=2, seed=1, device="cpu")
    for k in range(5):
        idx = on_device.batch_indices(k)
        assert torch.is_tensor(idx) and idx.tolist() == a.batch_indices(k)


def test_stream_resumes_with_the_same_batches():
    def make():
        return BatchStream(ShardedBatchSampler(12, 3, seed=4), lambda sampler: iter(sampler))

    straight = make()
    expected = [next(straight) for _ in range(7)]
    first = make()
    got = [next(first) for _ in range(3)]
    second = make()
    second.load_state_dict(first.state_dict())
    got += [next(second) for _ in range(4)]
    assert got == expected
