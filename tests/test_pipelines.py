"""Our sampler and dataset driving a torchdata.nodes graph (sampler -> parallel map -> pin
memory -> Loader), with state_dict / load_state_dict resuming exactly."""

from __future__ import annotations

import torch
import torchdata.nodes as tn

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, CaptionTransform, collate


def make_loader(examples_dir) -> tuple[tn.Loader, TextToImageDataset, BucketBatchSampler]:
    """The graph docs/configs.md shows: the sampler yields one bucket's indices per batch, a
    thread pool loads and collates them, pinned when a GPU is there."""
    index = scan(examples_dir, workers=0)
    assignment = assign(index, BucketLadder.for_model("flux", max_area=128 * 128))
    dataset = TextToImageDataset(index, assignment,
                                 image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
                                 caption_transform=CaptionTransform(dropout=0.3), seed=1)
    sampler = BucketBatchSampler(assignment, batch_size=3, seed=2)

    def load_batch(indices: list[int]) -> dict:
        if dataset.epoch != sampler.epoch:  # the epoch the batch was planned in
            dataset.set_epoch(sampler.epoch)
        return collate([dataset[i] for i in indices])

    node = tn.SamplerWrapper(sampler)
    node = tn.ParallelMapper(node, map_fn=load_batch, num_workers=2, method="thread")
    if torch.cuda.is_available():
        node = tn.PinMemory(node)
    node = tn.Prefetcher(node, prefetch_factor=2)
    return tn.Loader(node), dataset, sampler


def summary(batch: dict) -> tuple:
    return (tuple(batch["index"].tolist()), tuple(batch["pixel_values"].shape),
            int(batch["pixel_values"].sum()), tuple(batch["captions"]))


def test_nodes_graph_epochs_and_exact_resume(examples_dir):
    loader, dataset, sampler = make_loader(examples_dir)
    epoch0 = [summary(b) for b in loader]
    epoch1 = [summary(b) for b in loader]  # the Loader restarts: the next epoch
    assert len(epoch0) == len(epoch1) == len(sampler)
    for batches in (epoch0, epoch1):
        assert len({shape for _, shape, _, _ in batches}) > 1  # several buckets ...
        seen = {i for indices, *_ in batches for i in indices}
        assert seen == {int(i) for i in torch.nonzero(torch.as_tensor(
            dataset.bucket_id) >= 0).flatten()}  # ... every accepted image
    assert epoch0 != epoch1  # a new plan and new draws

    # Stop mid-epoch 1, keep the state, resume in a fresh graph: the same remaining batches.
    loader, _, _ = make_loader(examples_dir)
    list(loader)
    it = iter(loader)
    head = [summary(next(it)) for _ in range(2)]
    state = loader.state_dict()
    assert head == epoch1[:2]
    resumed, _, _ = make_loader(examples_dir)
    resumed.load_state_dict(state)
    assert [summary(b) for b in resumed] == epoch1[2:]
    assert [summary(b) for b in resumed][:1] != epoch1[:1]  # then epoch 2 goes on
