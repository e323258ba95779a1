"""Known-answer tests of the ALBEF / CODIS losses on small hand-built tensors."""

from __future__ import annotations

import math

import codis  # noqa: F401  - sets up the torch compatibility shims first
import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from codis.losses import (code_loss, codeword_distance, distillation_targets, hard_negative_indices,
                          ica_loss, itm_loss, mlm_loss, ot_loss, positive_targets, soft_cross_entropy)
from codis.text import mlm_positions


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- soft targets -------------------------------------------------------------------------------
def test_soft_cross_entropy_with_one_hot_targets_is_cross_entropy():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 6, 2, 2])
    one_hot = F.one_hot(labels, 7).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))


def test_soft_cross_entropy_of_uniform_logits_is_log_classes():
    targets = F.softmax(torch.randn(3, 4), dim=-1)
    torch.testing.assert_close(soft_cross_entropy(torch.zeros(3, 4), targets), torch.tensor(math.log(4)))


def test_distillation_targets_mix_teacher_softmax_and_hard():
    hard = torch.tensor([[1.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(2.0), math.log(5.0)]])  # softmax = [1, 2, 5] / 8
    mixed = distillation_targets(hard, teacher, alpha=0.4)
    expected = torch.tensor([[0.4 / 8 + 0.6, 0.4 * 2 / 8, 0.4 * 5 / 8]])
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(mixed.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="alpha"):
        distillation_targets(hard, teacher, alpha=1.5)


# ---- positive targets ---------------------------------------------------------------------------
def test_positive_targets_without_ids_is_identity_on_the_batch_columns():
    targets = positive_targets(3, 5)
    expected = torch.zeros(3, 5)
    expected[:, :3] = torch.eye(3)
    assert torch.equal(targets, expected)


def test_positive_targets_with_ids_marks_every_caption_of_the_image_including_queue():
    # batch: images 7, 7, 9; queue: 9, 7, 4 -> row 0 (id 7) has positives at 0, 1 and queue slot 1 (col 4)
    sample_ids = torch.tensor([7, 7, 9])
    bank_ids = torch.tensor([7, 7, 9, 9, 7, 4])
    targets = positive_targets(3, 6, sample_ids, bank_ids)
    expected = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.float)
    expected = expected / expected.sum(dim=1, keepdim=True)
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(3))


def test_positive_targets_validates_sizes():
    with pytest.raises(ValueError, match="bank_size"):
        positive_targets(4, 3)
    with pytest.raises(ValueError, match="bank_ids"):
        positive_targets(2, 4, sample_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bank_ids"):
        positive_targets(2, 4, sample_ids=torch.tensor([0, 1]), bank_ids=torch.tensor([0, 1, 2]))


# ---- L_ica --------------------------------------------------------------------------------------
def test_ica_alpha_zero_is_hard_cross_entropy_by_hand():
    batch, queue, dim, temp = 4, 3, 8, 0.1
    image, text = unit(batch, dim, seed=1), unit(batch, dim, seed=2)
    image_m, text_m = unit(batch, dim, seed=3), unit(batch, dim, seed=4)
    image_q, text_q = unit(queue, dim, seed=5), unit(queue, dim, seed=6)
    total, parts = ica_loss(image, text, image_m, text_m, image_q, text_q,
                            temperature=temp, alpha=0.0, intra_modal=True)
    image_bank, text_bank = torch.cat([image_m, image_q]), torch.cat([text_m, text_q])
    labels = torch.arange(batch)
    by_hand = {
        "i2t": F.cross_entropy(image @ text_bank.T / temp, labels),
        "t2i": F.cross_entropy(text @ image_bank.T / temp, labels),
        "i2i": F.cross_entropy(image @ image_bank.T / temp, labels),
        "t2t": F.cross_entropy(text @ text_bank.T / temp, labels),
    }
    assert set(parts) == set(by_hand)
    for name, value in by_hand.items():
        torch.testing.assert_close(parts[name], value)
    torch.testing.assert_close(total, (by_hand["i2t"] + by_hand["t2i"]) / 2 + (by_hand["i2i"] + by_hand["t2t"]) / 2)


def test_ica_distillation_matches_by_hand_soft_targets():
    batch, queue, dim, temp, alpha = 3, 2, 6, 0.2, 0.4
    image, text = unit(batch, dim, seed=11), unit(batch, dim, seed=12)
    image_m, text_m = unit(batch, dim, seed=13), unit(batch, dim, seed=14)
    image_q, text_q = unit(queue, dim, seed=15), unit(queue, dim, seed=16)
    _, parts = ica_loss(image, text, image_m, text_m, image_q, text_q,
                        temperature=torch.tensor(temp), alpha=alpha, intra_modal=False)
    text_bank = torch.cat([text_m, text_q])
    hard = torch.zeros(batch, batch + queue)
    hard[:, :batch] = torch.eye(batch)
    targets = alpha * F.softmax(image_m @ text_bank.T / temp, dim=1) + (1 - alpha) * hard
    expected = -(targets * F.log_softmax(image @ text_bank.T / temp, dim=1)).sum(1).mean()
    torch.testing.assert_close(parts["i2t"], expected)


def test_ica_aligned_features_beat_shuffled_texts():
    batch, dim = 6, 16
    feats = unit(batch, dim, seed=21)
    queue = unit(10, dim, seed=22)
    kwargs = dict(temperature=0.07, alpha=0.4, intra_modal=True)
    aligned, _ = ica_loss(feats, feats, feats, feats, queue, queue, **kwargs)
    shuffled_text = feats[torch.roll(torch.arange(batch), 1)]
    shuffled, _ = ica_loss(feats, shuffled_text, feats, shuffled_text, queue, queue, **kwargs)
    assert aligned < shuffled


def test_ica_without_intra_modal_has_only_cross_modal_parts():
    image, text = unit(4, 8, seed=31), unit(4, 8, seed=32)
    total, parts = ica_loss(image, text, image, text, torch.zeros(0, 8), torch.zeros(0, 8),
                            temperature=0.1, alpha=0.3, intra_modal=False)
    assert set(parts) == {"i2t", "t2i"}
    torch.testing.assert_close(total, (parts["i2t"] + parts["t2i"]) / 2)


def test_ica_sample_ids_make_other_captions_positive():
    # two captions of image 0 in the batch (rows 0, 1) plus one in the queue.
    dim, temp = 8, 0.1
    image, text = unit(3, dim, seed=41), unit(3, dim, seed=42)
    image_q, text_q = unit(2, dim, seed=43), unit(2, dim, seed=44)
    ids, id_queue = torch.tensor([0, 0, 5]), torch.tensor([0, 3])
    _, parts = ica_loss(image, text, image, text, image_q, text_q, temperature=temp, alpha=0.0,
                        intra_modal=False, sample_ids=ids, id_queue=id_queue)
    targets = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float)
    targets = targets / targets.sum(1, keepdim=True)
    logits = image @ torch.cat([text, text_q]).T / temp
    torch.testing.assert_close(parts["i2t"], -(targets * F.log_softmax(logits, 1)).sum(1).mean())
    with pytest.raises(ValueError, match="id_queue"):
        ica_loss(image, text, image, text, image_q, text_q, temperature=temp, alpha=0.0,
                 intra_modal=False, sample_ids=ids)


def test_ica_no_gradient_to_teacher_or_queues():
    batch, queue, dim = 4, 5, 8
    image = unit(batch, dim, seed=51).requires_grad_()
    text = unit(batch, dim, seed=52).requires_grad_()
    teacher = [unit(batch, dim, seed=53).requires_grad_(), unit(batch, dim, seed=54).requires_grad_()]
    queues = [unit(queue, dim, seed=55).requires_grad_(), unit(queue, dim, seed=56).requires_grad_()]
    temp = torch.tensor(0.07, requires_grad=True)
    total, _ = ica_loss(image, text, *teacher, *queues, temperature=temp, alpha=0.4, intra_modal=True)
    total.backward()
    for tensor in teacher + queues:
        assert tensor.grad is None
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert text.grad is not None and text.grad.abs().sum() > 0
    assert temp.grad is not None  # a learnable temperature still learns from the student logits


def test_ica_validates_shapes():
    image, text = unit(4, 8), unit(4, 8)
    with pytest.raises(ValueError, match="text_feat"):
        ica_loss(image, unit(4, 6), image, text, torch.zeros(0, 8), torch.zeros(0, 8),
                 temperature=0.1, alpha=0.0, intra_modal=False)
    with pytest.raises(ValueError, match="text_queue"):
        ica_loss(image, text, image, text, torch.zeros(3, 8), torch.zeros(2, 8),
                 temperature=0.1, alpha=0.0, intra_modal=False)
    with pytest.raises(ValueError, match="image_feat_m"):
        ica_loss(image, text, unit(3, 8), text, torch.zeros(0, 8), torch.zeros(0, 8),
                 temperature=0.1, alpha=0.0, intra_modal=False)


# ---- L_code -------------------------------------------------------------------------------------
def test_codeword_distance_is_zero_for_equal_and_two_for_opposite():
    codewords = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # not unit length: normalised inside
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    expected = torch.tensor([[0.0, 1.0], [1.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(codeword_distance(features, codewords), expected)
    # Leading batch dims: one cost per problem.
    stacked = codeword_distance(torch.stack([features, -features]), codewords)
    torch.testing.assert_close(stacked, torch.stack([expected, 2 - expected]))
    with pytest.raises(ValueError, match="codewords"):
        codeword_distance(features, torch.zeros(2, 4))


def test_ot_loss_by_hand_and_against_pot():
    plan = torch.tensor([[0.25, 0.25], [0.5, 0.0]])
    cost = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(ot_loss(plan, cost), torch.tensor(0.25 + 0.5 + 1.5))
    # With POT's exact plan, <T, D> is POT's optimal transport cost.
    rng = np.random.default_rng(0)
    cost_np = rng.random((5, 3))
    a, b = np.full(5, 1 / 5), np.full(3, 1 / 3)
    plan_np = ot.emd(a, b, cost_np)
    torch.testing.assert_close(ot_loss(torch.from_numpy(plan_np), torch.from_numpy(cost_np)),
                               torch.tensor(ot.emd2(a, b, cost_np), dtype=torch.float64))
    with pytest.raises(ValueError, match="plan"):
        ot_loss(torch.zeros(2, 3), torch.zeros(3, 2))


def _code_inputs(batch: int = 4, codes: int = 3, dim: int = 5):
    image, text = unit(batch, dim, seed=61).requires_grad_(), unit(batch, dim, seed=62).requires_grad_()
    image_t, text_t = unit(batch, dim, seed=63).requires_grad_(), unit(batch, dim, seed=64).requires_grad_()
    codewords = torch.randn(codes, dim, generator=torch.Generator().manual_seed(65)).requires_grad_()
    image_plan = (torch.rand(batch, codes, generator=torch.Generator().manual_seed(66)) / 10).requires_grad_()
    text_plan = (torch.rand(batch, codes, generator=torch.Generator().manual_seed(67)) / 10).requires_grad_()
    return image, text, image_t, text_t, codewords, image_plan, text_plan


def test_code_loss_parts_match_by_hand():
    image, text, image_t, text_t, codewords, image_plan, text_plan = _code_inputs()
    total, parts = code_loss(image, text, image_t, text_t, codewords, image_plan, text_plan, temperature=0.1)
    unit_c = F.normalize(codewords, dim=-1)
    expected = {
        "ot_image": (image_plan * (1 - F.normalize(image_t, dim=-1) @ unit_c.T)).sum(),
        "ot_text": (text_plan * (1 - F.normalize(text_t, dim=-1) @ unit_c.T)).sum(),
        "t2p": -(image_plan / image_plan.sum(1, keepdim=True) * F.log_softmax(text @ unit_c.T / 0.1, 1)).sum(1).mean(),
        "i2p": -(text_plan / text_plan.sum(1, keepdim=True) * F.log_softmax(image @ unit_c.T / 0.1, 1)).sum(1).mean(),
    }
    assert set(parts) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(parts[name], value)
    torch.testing.assert_close(total, sum(expected.values()))


def test_code_loss_gradients_reach_codewords_and_students_only():
    image, text, image_t, text_t, codewords, image_plan, text_plan = _code_inputs()
    total, _ = code_loss(image, text, image_t, text_t, codewords, image_plan, text_plan, temperature=0.1)
    total.backward()
    for tensor in (image, text, codewords):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    for tensor in (image_t, text_t, image_plan, text_plan):
        assert tensor.grad is None


@pytest.mark.parametrize("part", ["ot_image", "ot_text"])
def test_ot_parts_move_codewords_not_student_features(part):
    image, text, image_t, text_t, codewords, image_plan, text_plan = _code_inputs()
    _, parts = code_loss(image, text, image_t, text_t, codewords, image_plan, text_plan, temperature=0.1)
    parts[part].backward()
    assert codewords.grad is not None and codewords.grad.abs().sum() > 0
    for tensor in (image, text, image_t, text_t, image_plan, text_plan):
        assert tensor.grad is None


@pytest.mark.parametrize("part, student, other", [("t2p", "text", "image"), ("i2p", "image", "text")])
def test_prediction_parts_move_their_student_and_codewords(part, student, other):
    image, text, image_t, text_t, codewords, image_plan, text_plan = _code_inputs()
    features = {"image": image, "text": text}
    _, parts = code_loss(image, text, image_t, text_t, codewords, image_plan, text_plan, temperature=0.1)
    parts[part].backward()
    assert features[student].grad is not None and features[student].grad.abs().sum() > 0
    assert codewords.grad is not None and codewords.grad.abs().sum() > 0
    assert features[other].grad is None


def test_code_loss_swaps_modalities_for_prediction():
    # Every image is assigned to codeword 1 while texts are assigned to codeword 0: t2p must be
    # lowest when the texts point at codeword 1, i.e. the text predicts the IMAGE's assignment.
    codewords = torch.eye(3, 4)
    batch, k = 2, 1
    image_plan = F.one_hot(torch.full((batch,), k), 3).float() / batch
    text_plan = F.one_hot(torch.zeros(batch, dtype=torch.long), 3).float() / batch
    image = unit(batch, 4, seed=71)
    losses_by_code = []
    for code in range(3):
        text = codewords[code].expand(batch, 4)
        _, parts = code_loss(image, text, image, text, codewords, image_plan, text_plan, temperature=0.1)
        losses_by_code.append(parts["t2p"].item())
    assert int(np.argmin(losses_by_code)) == k
    # And i2p follows the text plan: images pointing at codeword 0 beat images pointing at k.
    text = unit(batch, 4, seed=72)
    at_zero = code_loss(codewords[0].expand(batch, 4), text, text, text, codewords, image_plan, text_plan,
                        temperature=0.1)[1]["i2p"]
    at_k = code_loss(codewords[k].expand(batch, 4), text, text, text, codewords, image_plan, text_plan,
                     temperature=0.1)[1]["i2p"]
    assert at_zero < at_k


def test_code_loss_validates_shapes():
    image, text, image_t, text_t, codewords, image_plan, text_plan = _code_inputs()
    with pytest.raises(ValueError, match="image_plan"):
        code_loss(image, text, image_t, text_t, codewords, image_plan[:3], text_plan, temperature=0.1)
    with pytest.raises(ValueError, match="text_plan"):
        code_loss(image, text, image_t, text_t, codewords, image_plan, text_plan[:, :2], temperature=0.1)
    with pytest.raises(ValueError, match="codewords"):
        code_loss(image, text, image_t, text_t, codewords[:, :4], image_plan, text_plan, temperature=0.1)
    with pytest.raises(ValueError, match="text_feat"):
        code_loss(image, text[:3], image_t, text_t, codewords, image_plan, text_plan, temperature=0.1)


# ---- ITM hard negatives -------------------------------------------------------------------------
def test_hard_negatives_never_return_the_positive():
    batch = 5
    # Strongly peaked on the positive: a plain softmax would almost always pick it.
    sim = torch.eye(batch) * 50 + torch.randn(batch, batch, generator=torch.Generator().manual_seed(0))
    for seed in range(200):
        neg_image, neg_text = hard_negative_indices(sim, sim.T.contiguous(),
                                                    generator=torch.Generator().manual_seed(seed))
        assert neg_image.dtype == torch.long and neg_image.shape == (batch,)
        assert neg_text.dtype == torch.long and neg_text.shape == (batch,)
        assert not torch.any(neg_image == torch.arange(batch))
        assert not torch.any(neg_text == torch.arange(batch))


def test_hard_negatives_respect_sample_ids():
    ids = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.zeros(5, 5)
    for seed in range(200):
        neg_image, neg_text = hard_negative_indices(sim, sim, ids, generator=torch.Generator().manual_seed(seed))
        assert not torch.any(ids[neg_image] == ids)
        assert not torch.any(ids[neg_text] == ids)


def test_hard_negatives_prefer_the_most_similar_negative():
    batch, draws = 4, 400
    sim_i2t = torch.zeros(batch, batch)
    sim_i2t[0, 2] = 5.0  # image 0 looks much like text 2 -> exp(5) / (exp(5) + 2) ~ 0.987
    sim_t2i = torch.zeros(batch, batch)
    sim_t2i[1, 3] = 5.0  # text 1 looks much like image 3
    generator = torch.Generator().manual_seed(0)
    text_hits = image_hits = 0
    for _ in range(draws):
        neg_image, neg_text = hard_negative_indices(sim_i2t, sim_t2i, generator=generator)
        text_hits += int(neg_text[0] == 2)
        image_hits += int(neg_image[1] == 3)
    assert text_hits / draws > 0.9
    assert image_hits / draws > 0.9


def test_hard_negatives_raise_without_any_negative():
    # Every sample sharing one id is seen only on the device (no host sync): on the CPU that
    # assertion raises at once.
    with pytest.raises(RuntimeError, match="negative"):
        hard_negative_indices(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="negative"):
        hard_negative_indices(torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="square"):
        hard_negative_indices(torch.zeros(3, 5), torch.zeros(3, 5))


def test_hard_negatives_do_not_track_gradients():
    sim = torch.randn(4, 4, requires_grad=True)
    neg_image, neg_text = hard_negative_indices(sim, sim)
    assert not neg_image.requires_grad and not neg_text.requires_grad


# ---- ITM / MLM ----------------------------------------------------------------------------------
def test_itm_loss_is_two_way_cross_entropy():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0, 0])
    expected = -(torch.log_softmax(logits, 1)[torch.arange(3), labels]).mean()
    torch.testing.assert_close(itm_loss(logits, labels), expected)
    with pytest.raises(ValueError, match="ITM logits"):
        itm_loss(torch.zeros(3, 3), labels)


def _masked_rows(logits, labels):
    """The (N, V) logits and (N,) labels of the masked tokens of (B, L, V) logits."""
    positions = mlm_positions(labels)
    return logits.flatten(0, 1)[positions], labels.reshape(-1)[positions]


def _mlm_inputs():
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(81), requires_grad=True)
    labels = torch.tensor([[-100, 3, -100, 0], [5, -100, -100, -100]])
    return logits, labels


def test_mlm_positions_are_the_masked_tokens_in_order():
    labels = torch.tensor([[-100, 3, -100, 0], [5, -100, -100, 7]])
    assert mlm_positions(labels).tolist() == [1, 3, 4, 7]
    assert mlm_positions(torch.full((2, 3), -100)).shape == (0,)


def test_mlm_alpha_zero_is_masked_cross_entropy():
    logits, labels = _mlm_inputs()
    total, parts = mlm_loss(*_masked_rows(logits, labels))
    expected = F.cross_entropy(logits.reshape(-1, 6), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["ce"], expected)
    assert parts["distill"].item() == 0.0


def test_mlm_self_distillation_with_alpha_one_is_prediction_entropy():
    logits, labels = _mlm_inputs()
    rows, targets = _masked_rows(logits, labels)
    total, parts = mlm_loss(rows, targets, teacher_logits=rows.detach().clone(), alpha=1.0)
    probs = F.softmax(rows, -1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(total, entropy)
    torch.testing.assert_close(parts["distill"], entropy)


def test_mlm_mixes_ce_and_distillation():
    logits, labels = _mlm_inputs()
    teacher = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(82))
    rows, targets = _masked_rows(logits, labels)
    total, parts = mlm_loss(rows, targets, _masked_rows(teacher, labels)[0], alpha=0.4)
    torch.testing.assert_close(total, 0.6 * parts["ce"] + 0.4 * parts["distill"])
    total.backward()
    # Unmasked positions carry no loss, hence no gradient.
    assert logits.grad[labels == -100].abs().sum() == 0
    assert logits.grad[labels != -100].abs().sum() > 0


def test_mlm_on_the_masked_rows_equals_the_head_on_every_token_then_boolean_selection():
    """The loss and gradients of the former formulation (MLM head on all B x L tokens, masked rows
    picked by a boolean mask) on a fixed seed."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    generator = torch.Generator().manual_seed(5)
    head = BertOnlyMLMHead(BertConfig(vocab_size=40, hidden_size=16))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    teacher = BertOnlyMLMHead(BertConfig(vocab_size=40, hidden_size=16))
    teacher.load_state_dict(head.state_dict())
    hidden = torch.randn(3, 7, 16, generator=generator, requires_grad=True)
    hidden_m = torch.randn(3, 7, 16, generator=generator)
    chosen = torch.rand(3, 7, generator=generator) < 0.4
    labels = torch.where(chosen, torch.randint(40, (3, 7), generator=generator), -100)
    alpha = 0.4

    def gradients(total):
        used = [hidden] + [p for name, p in head.named_parameters() if name != "predictions.bias"]
        return torch.autograd.grad(total, used)  # the untied bias: the decoder has its own

    # Former: logits of every token, then rows by boolean mask.
    logits = head(hidden)
    masked = labels != -100
    student = logits[masked]
    ce = F.cross_entropy(student, labels[masked])
    with torch.no_grad():
        targets = F.softmax(teacher(hidden_m)[masked], dim=-1)
    distill = -(targets * F.log_softmax(student, dim=-1)).sum(-1).mean()
    old_total = (1 - alpha) * ce + alpha * distill
    old_grads = gradients(old_total)

    positions = mlm_positions(labels)
    with torch.no_grad():
        teacher_rows = teacher(hidden_m.flatten(0, 1).index_select(0, positions))
    total, parts = mlm_loss(head(hidden.flatten(0, 1).index_select(0, positions)),
                            labels.reshape(-1).index_select(0, positions), teacher_rows, alpha)
    torch.testing.assert_close(total, old_total)
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["distill"], distill)
    for new, old in zip(gradients(total), old_grads):
        torch.testing.assert_close(new, old)
    assert old_grads[0].abs().sum() > 0


def test_mlm_without_masked_tokens_is_zero_with_a_graph():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    rows, targets = _masked_rows(logits, torch.full((2, 3), -100))
    assert rows.shape == (0, 5)
    total, parts = mlm_loss(rows, targets, rows.detach(), alpha=0.4)
    assert total.item() == 0.0 and not math.isnan(total.item())
    assert total.requires_grad
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_mlm_validates_inputs():
    logits, labels = _mlm_inputs()
    rows, targets = _masked_rows(logits, labels)
    with pytest.raises(ValueError, match="logits"):
        mlm_loss(logits, labels)  # (B, L, V): the head's output on every token
    with pytest.raises(ValueError, match="labels"):
        mlm_loss(rows, targets[:2])
    with pytest.raises(ValueError, match="teacher_logits"):
        mlm_loss(rows, targets, alpha=0.4)
    with pytest.raises(ValueError, match="teacher_logits"):
        mlm_loss(rows, targets, torch.zeros(3, 5), alpha=0.4)
