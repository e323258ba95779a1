"""A pretraining step issues no host-device sync between the batch and the optimiser step.

Counted on the CPU with :func:`codis.train.syncs.count_syncs`: the calls that would make the host
wait for a GPU (reading a tensor's value, data-dependent shapes, boolean-mask indexing) are made
on the CPU too, so a sync added back to the model, the losses, OT or the queue fails here.
"""

from __future__ import annotations

import pytest
import torch

from codis.config import preset
from codis.model import CodisModel
from codis.text import mask_tokens, mlm_positions, tokenize
from codis.train.engine import build_optimizer
from codis.train.schedules import OptimConfig
from codis.train.syncs import count_syncs

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star above a cross",
            "a small purple hexagon", "a large white diamond", "three black circles"]


def _training(mode: str, hard_negatives: bool = True, extra=None):
    """The tiny model, its trainer's optimiser and one step(): forward with the MLM inputs as the
    pretraining loader gives them (masked on the CPU beforehand), backward, AdamW."""
    torch.manual_seed(0)
    model = CodisModel(preset("tiny", mode=mode)).train()
    optimizer = build_optimizer(model, OptimConfig())
    ids, mask = tokenize(model.tokenizer, CAPTIONS, model.config.text.max_length)
    images = torch.randn(len(CAPTIONS), 3, model.config.vision.image_size, model.config.vision.image_size)
    masked, labels = mask_tokens(ids, model.tokenizer, model.config.mlm_probability,
                                 generator=torch.Generator().manual_seed(0))
    mlm_inputs = (masked, labels, mlm_positions(labels))

    def step() -> torch.Tensor:
        output = model(images, ids, mask, hard_negatives=hard_negatives, mlm_inputs=mlm_inputs)
        if extra is not None:
            extra(output)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        return output.loss.detach()

    return step


@pytest.mark.parametrize("mode,hard_negatives", [("codis", True), ("albef", True), ("codis", False)])
def test_a_training_step_issues_no_sync(mode, hard_negatives):
    step = _training(mode, hard_negatives)
    # The first step starts from an empty queue, the second contrasts with a filled part of it.
    for _ in range(2):
        with count_syncs() as report:
            loss = step()
        assert report.count == 0, dict(report.sites)
        assert report.ops > 1000  # the step ran inside the counter
    assert torch.isfinite(loss)


def test_a_value_read_inside_the_step_is_counted():
    step = _training("codis", extra=lambda output: output.parts["mlm"].item())
    with count_syncs() as report:
        step()
    assert report.count == 1
    (site,) = report.sites
    assert "test_step_syncs.py:" in site and site.endswith("_local_scalar_dense"), site
