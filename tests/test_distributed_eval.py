"""Evaluation under ``torchrun``: two gloo processes give the results of one, for every task.

The shared tiny world (``tests/conftest.py``) with an odd number of evaluation samples per
task, spread over shards of unequal length, so the split between the two ranks is uneven. The
module is also the worker script: ``python -m torch.distributed.run --nproc-per-node=2
tests/test_distributed_eval.py PATHS OUT`` runs :func:`evaluate_all` on both ranks and rank 0
saves the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from codis.data.loaders import ve_loader
from codis.data.shards import write_shards
from codis.tasks import nlvr, retrieval, ve, vqa
from codis.tasks.evaluation import combine_rows, gather_by_id, rank_block
from codis.train import OptimConfig, Runtime, TrainConfig, init_runtime

TASK_NAMES = ("retrieval", "vqa", "nlvr", "ve")
SHARD_SIZE = 4  # odd sample counts over shards of 4: an uneven split that also crosses shards


# ---- what both runs compute ----------------------------------------------------------------------
def retrieval_config() -> retrieval.RetrievalConfig:
    # 2 queries per re-ranking pass: both directions take several passes, split between the ranks
    return retrieval.config("demo", k_test=3, rerank_batch_size=6, image_batch_size=4)


def evaluate_all(paths: dict[str, str]) -> dict[str, Any]:
    """Every task's metrics, VQA's predictions, retrieval's score matrices and, per rank, the
    sample keys its SNLI-VE loader reads; the same on every rank."""
    runtime = init_runtime("cpu")
    config = retrieval_config()
    model = retrieval.load_retrieval_model(paths["pretrained"])
    encoded = retrieval.encode_eval_set(model, paths["retrieval"], config)
    scores = retrieval.rerank(model, encoded, encoded.similarity(), k_test=config.k_test,
                              batch_size=config.rerank_batch_size, runtime=runtime)
    keys = [batch["key"] for batch in ve_loader(paths["ve"], image_size=32, batch_size=2,
                                                 rank=runtime.rank, world_size=runtime.world_size)]
    common = dict(progress=False, device="cpu")
    return {
        "retrieval": retrieval.evaluate(paths["pretrained"], paths["retrieval"], config, **common),
        "retrieval_scores": scores,
        "vqa": vqa.evaluate(paths["vqa_model"], paths["vqa"], batch_size=2, **common),
        "vqa_predictions": vqa.predict(paths["vqa_model"], paths["vqa"], batch_size=2, **common),
        "nlvr": nlvr.evaluate(paths["nlvr_model"], paths["nlvr"], batch_size=2, **common),
        "ve": ve.evaluate(paths["ve_model"], paths["ve"], batch_size=2, **common),
        "ve_keys": gather_by_id({runtime.rank: [k for batch in keys for k in batch]}, runtime),
        "duplicate_error": _duplicate_error(runtime),
    }


def _duplicate_error(runtime: Runtime) -> str | None:
    try:
        gather_by_id({"same id": runtime.rank}, runtime)
    except ValueError as error:
        return str(error)
    return None


def main(paths_file: str, output: str) -> None:
    results = evaluate_all(json.loads(Path(paths_file).read_text()))
    if dist.get_rank() == 0:
        torch.save(results, output)
    dist.destroy_process_group()


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paths(tiny_world: Path, shards: Callable[[str, str], Path], tiny_checkpoint: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Evaluation shards of the four tasks with an odd number of samples each, the shared tiny
    pretrained model (retrieval evaluates it zero-shot) and a VQA, NLVR² and SNLI-VE model
    finetuned from it for one step."""
    root = tmp_path_factory.mktemp("distributed_eval")

    def first_records(kind: str, annotations: str, count: int) -> str:
        records = json.loads((tiny_world / annotations).read_text())[:count]
        assert len(records) == count
        source = ({"answer_list": str(tiny_world / "vqa" / "answer_list.json")}
                  if kind == "vqa" else None)
        write_shards(records, tiny_world, root / kind, kind=kind, samples_per_shard=SHARD_SIZE,
                     source=source, progress=False)
        return str(root / kind)

    found = {
        "retrieval": str(shards("retrieval_eval", "test")),  # 7 images
        "vqa": first_records("vqa", "vqa/val.json", 5),
        "nlvr": first_records("nlvr", "nlvr/dev.json", 7),
        "ve": first_records("ve", "ve/dev.json", 9),
        "pretrained": str(tiny_checkpoint),
    }
    train = TrainConfig(steps=1, batch_size=2, checkpoint_every=1, log_every=1)
    optim = OptimConfig(lr=1e-4, warmup_lr=1e-5, warmup_steps=0, min_lr=1e-5)
    for task, config in ((vqa, vqa.config("demo", k_test=4)), (nlvr, nlvr.config("demo")),
                         (ve, ve.config("demo"))):
        found[f"{task.TASK}_model"] = str(task.finetune(
            tiny_checkpoint, shards(task.TASK, "train"), root / f"{task.TASK}_run", config,
            train=train, optim=optim, progress=False))
    return found


@pytest.fixture(scope="module")
def one_process(paths: dict[str, str]) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two workers
    try:
        return evaluate_all(paths)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_processes(paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                  ) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("two_processes")
    (folder / "paths.json").write_text(json.dumps(paths))
    repository = str(Path(__file__).resolve().parents[1])  # the workers import this checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               __file__, str(folder / "paths.json"), str(folder / "results.pt")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return torch.load(folder / "results.pt", weights_only=False)


# ---- the tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_NAMES)
def test_two_processes_give_the_metrics_of_one(task: str, one_process: dict, two_processes: dict,
                                               ) -> None:
    assert one_process[task], task
    assert two_processes[task] == one_process[task]


def test_vqa_predictions_of_two_processes_are_those_of_one(one_process: dict,
                                                           two_processes: dict) -> None:
    assert len(one_process["vqa_predictions"]) == 5
    assert two_processes["vqa_predictions"] == one_process["vqa_predictions"]


def test_retrieval_scores_of_two_processes_are_those_of_one(one_process: dict,
                                                            two_processes: dict) -> None:
    # Every pass runs the same pairs on any number of ranks, so the scores agree bit for bit.
    for one, two in zip(one_process["retrieval_scores"], two_processes["retrieval_scores"],
                        strict=True):
        assert torch.equal(one, two)
        assert bool((one > retrieval.NOT_A_CANDIDATE).any(dim=1).all())  # each row scored


def test_each_sample_is_read_by_exactly_one_rank(one_process: dict, two_processes: dict) -> None:
    everything = one_process["ve_keys"][0]
    assert len(everything) == 9 and len(set(everything)) == 9
    first, second = two_processes["ve_keys"][0], two_processes["ve_keys"][1]
    assert sorted(first + second) == sorted(everything)
    assert {len(first), len(second)} == {4, 5}  # 9 samples in shards of 4, 4 and 1


def test_an_id_on_two_ranks_is_an_error(one_process: dict, two_processes: dict) -> None:
    assert one_process["duplicate_error"] is None
    assert "'same id' occurs twice" in two_processes["duplicate_error"]


@pytest.mark.parametrize("count, world_size", [(0, 2), (1, 2), (7, 2), (7, 3), (9, 4), (3, 5)])
def test_rank_blocks_partition_the_range_evenly(count: int, world_size: int) -> None:
    blocks = [rank_block(count, Runtime(torch.device("cpu"), rank, world_size))
              for rank in range(world_size)]
    assert [i for block in blocks for i in block] == list(range(count))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_combine_rows_is_a_no_op_in_one_process() -> None:
    matrix = torch.arange(6.0).view(3, 2)
    assert combine_rows(matrix, range(1, 2), Runtime(torch.device("cpu"))) is matrix
    assert torch.equal(matrix, torch.arange(6.0).view(3, 2))


if __name__ == "__main__":
    main(*sys.argv[1:])
