import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codis.queue import FeatureQueue


def test_queue_fills_then_wraps_around_a_size_that_is_not_a_batch_multiple():
    queue = FeatureQueue(size=5, dim=2)
    assert queue.contents()[0].shape == (0, 2)
    rows = torch.arange(16, dtype=torch.float32).view(8, 2)
    queue.enqueue(rows[:3], -rows[:3], torch.tensor([0, 1, 2]))
    image, text, ids = queue.contents()
    assert image.shape == (3, 2) and torch.equal(image, rows[:3]) and torch.equal(text, -rows[:3])
    queue.enqueue(rows[3:6], -rows[3:6], torch.tensor([3, 4, 5]))  # 6 > 5: wraps to slot 0
    image, _, ids = queue.contents()
    assert image.shape == (5, 2)
    assert sorted(ids.tolist()) == [1, 2, 3, 4, 5]  # the oldest (0) was overwritten
    assert torch.equal(image[0], rows[5]) and int(queue.pointer) == 1


def test_queue_keeps_only_the_newest_when_a_step_is_larger_than_the_queue():
    queue = FeatureQueue(size=3, dim=1)
    queue.enqueue(torch.arange(7.0).view(7, 1), torch.zeros(7, 1))
    assert sorted(queue.contents()[0].view(-1).tolist()) == [4.0, 5.0, 6.0]
    assert (queue.contents()[2] == -1).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    queue = FeatureQueue(size=7, dim=1)
    for step in range(3):  # 3 steps x 2 ranks x 2 samples = 12 > 7: wraps
        values = torch.tensor([[100.0 * step + 10 * rank], [100.0 * step + 10 * rank + 1]])
        queue.enqueue(values, values, torch.tensor([rank, rank]))
    results[rank] = (queue.image.clone(), int(queue.pointer), int(queue.filled))
    dist.destroy_process_group()


def test_queue_gathers_all_ranks_identically_under_torch_distributed():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    (image0, pointer0, filled0), (image1, pointer1, filled1) = results[0], results[1]
    assert torch.equal(image0, image1)
    assert (pointer0, filled0) == (12 % 7, 7)
    # The newest 7 of the 12 gathered rows in rank order: step 1 (rank 1) and step 2 (both ranks).
    single = FeatureQueue(size=7, dim=1)
    for step in range(3):
        rows = torch.tensor([[100.0 * step], [100.0 * step + 1], [100.0 * step + 10],
                             [100.0 * step + 11]])
        single.enqueue(rows, rows)
    assert torch.equal(image0, single.image)
