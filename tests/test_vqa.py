import json
import math

import pytest
import torch

from codis.config import ConfigError, preset
from codis.losses import answer_loss
from codis.metrics import vqa_accuracy
from codis.data.shards import write_shards
from codis.model import CodisModel, load_model
from codis.tasks.vqa import (VQAConfig, VQAModel, evaluate, finetune, load_answer_list,
                             load_vqa_model, predict, rank_answers, save_vqa_model,
                             sequence_log_likelihood)
from codis.tasks.vqa import config as vqa_config
from codis.text import tokenize
from codis.train import OptimConfig, TrainConfig, task_schedule


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained() -> CodisModel:
    torch.manual_seed(0)
    model = CodisModel(preset("tiny"))
    # Teachers that differ from the students, so that a test can tell which one a copy came from.
    with torch.no_grad():
        for parameter in list(model.text_encoder_m.parameters()) + list(model.visual_encoder_m.parameters()):
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model


# ---- configuration -------------------------------------------------------------------------------

def test_presets_follow_albef_and_bad_fields_are_named():
    paper = vqa_config("vqa")
    assert (paper.image_size, paper.k_test, paper.lr, paper.epochs, paper.batch_size, paper.alpha,
            paper.distill) == (384, 128, 2e-5, 8, 32, 0.4, True)
    train, optim = task_schedule(VQAConfig(batch_size=32, epochs=8), 1000, world_size=2)
    assert (train.steps, train.batch_size, train.alpha_warmup_steps) == (8 * 15, 32, 15)
    optim = task_schedule(paper, 100_000)[1]
    assert (optim.lr, optim.warmup_lr, optim.min_lr, optim.weight_decay) == (2e-5, 1e-5, 1e-6, 0.02)
    assert optim.warmup_steps == 400
    assert VQAConfig.from_dict(vqa_config("demo").to_dict()) == vqa_config("demo")
    for changes, field in [({"k_test": 0}, "vqa.k_test"), ({"alpha": 1.5}, "vqa.alpha"),
                           ({"momentum": 1.0}, "vqa.momentum"), ({"image_size": -1}, "vqa.image_size"),
                           ({"max_answer_length": 2}, "vqa.max_answer_length"), ({"lr": 0}, "vqa.lr"),
                           ({"distill": "yes"}, "vqa.distill")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            VQAConfig(**changes)
    with pytest.raises(ConfigError, match=r"vqa\.k_tset: unknown field"):
        VQAConfig.from_dict({"k_tset": 3})
    with pytest.raises(ConfigError, match=r"vqa\.preset"):
        vqa_config("vqa2")


# ---- the decoder ---------------------------------------------------------------------------------

def test_decoder_and_teachers_start_from_the_pretrained_fusion_weights(pretrained):
    model = VQAModel.from_pretrained(pretrained, vqa_config("demo", distill=True))
    for decoder, encoder in [(model.decoder, pretrained.text_encoder),
                             (model.decoder_m, pretrained.text_encoder_m)]:
        for mine, theirs in zip(decoder.layers, encoder.fusion, strict=True):
            for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items(), strict=True):
                assert torch.equal(a, b), name
        for name, value in encoder.bert.embeddings.state_dict().items():
            assert torch.equal(decoder.embeddings.state_dict()[name], value), name
        for name, value in encoder.mlm_head.state_dict().items():
            assert torch.equal(decoder.lm_head.state_dict()[name], value), name
        # the LM head reads the decoder's own word embeddings, a copy, not the encoder's
        assert decoder.lm_head.predictions.decoder.weight is decoder.embeddings.word_embeddings.weight
        assert decoder.embeddings.word_embeddings.weight is not encoder.bert.embeddings.word_embeddings.weight
    assert not torch.equal(model.decoder.layers[0].output.dense.weight,
                           model.decoder_m.layers[0].output.dense.weight)
    for name, value in pretrained.visual_encoder.state_dict().items():
        assert torch.equal(model.visual_encoder.state_dict()[name], value), name
    # A larger image size resamples the position embeddings to the new patch grid.
    larger = VQAModel.from_pretrained(pretrained, vqa_config("demo", image_size=48, distill=False))
    assert larger.visual_encoder.pos_embed.shape == (1, 1 + 6 * 6, 64)
    assert torch.equal(larger.visual_encoder.pos_embed[:, 0], pretrained.visual_encoder.pos_embed[:, 0])
    assert larger.visual_encoder.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 37, 64)
    with pytest.raises(ConfigError, match=r"vqa\.image_size"):
        VQAModel.from_pretrained(pretrained, vqa_config("demo", image_size=36))


def test_decoder_self_attention_is_causal_and_masks_padding(pretrained):
    model = VQAModel.from_pretrained(pretrained, vqa_config("demo", distill=False)).eval()
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(2, 5, 64, generator=generator)
    question_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = torch.randint(1000, 2000, (2, 6), generator=generator)
    ids[:, 0] = model.tokenizer.cls_token_id
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model.decoder(ids, mask, states, question_mask)
        changed = ids.clone()
        changed[:, 3] += 7
        after = model.decoder(changed, mask, states, question_mask)
        assert torch.allclose(logits[:, :3], after[:, :3], atol=1e-5)
        assert not torch.allclose(logits[:, 3:], after[:, 3:], atol=1e-3)
        # question states behind the question mask are not read
        noisy = states.clone()
        noisy[1, 3:] += 5.0
        assert torch.allclose(model.decoder(ids, mask, noisy, question_mask), logits, atol=1e-5)


# ---- answer ranking ------------------------------------------------------------------------------

CLS, SEP, A, B, C, D, PAD = range(7)


def _table_decoder(tables):
    """A decoder whose next-token distribution depends on the previous token alone, one table per
    question (question_states[:, 0, 0] holds the table index)."""
    def decode(ids, mask, states, question_mask):
        logits = torch.full((ids.shape[0], ids.shape[1], 7), math.log(1e-12))
        for row in range(ids.shape[0]):
            table = tables[int(states[row, 0, 0])]
            for position, token in enumerate(ids[row].tolist()):
                for following, p in table.get(token, {}).items():
                    logits[row, position, following] = math.log(p)
        return logits
    return decode


def test_ranking_shortlists_by_first_token_then_picks_the_most_likely_answer():
    tables = [
        {CLS: {A: 0.5, B: 0.3, D: 0.2}, A: {SEP: 0.1, C: 0.9}, B: {C: 0.5, SEP: 0.5},
         C: {SEP: 0.5, D: 0.5}, D: {SEP: 1.0}},
        {CLS: {A: 0.2, B: 0.3, D: 0.5}, A: {SEP: 1.0}, B: {C: 0.5, SEP: 0.5},
         C: {SEP: 0.5, D: 0.5}, D: {SEP: 0.1, C: 0.9}},
    ]
    # answer 0 = "a", 1 = "b c", 2 = "d"
    answer_ids = torch.tensor([[CLS, A, SEP, PAD], [CLS, B, C, SEP], [CLS, D, SEP, PAD]])
    answer_mask = (answer_ids != PAD).long()
    states = torch.tensor([0.0, 1.0]).view(2, 1, 1)
    question_mask = torch.ones(2, 1, dtype=torch.long)
    likelihood = [{0: 0.5 * 0.1, 1: 0.3 * 0.5 * 0.5, 2: 0.2 * 1.0},
                  {0: 0.2 * 1.0, 1: 0.3 * 0.5 * 0.5, 2: 0.5 * 0.1}]
    decoder = _table_decoder(tables)
    # k=1: the first token alone decides; k=2: the better of the two best first tokens, although
    # the most likely answer overall is outside the shortlist; k=3: the most likely answer.
    for k, best in [(1, [0, 2]), (2, [1, 1]), (3, [2, 0]), (10, [2, 0])]:
        ranked, scores = rank_answers(decoder, states, question_mask, answer_ids, answer_mask, k)
        assert ranked.shape == (2, min(k, 3))
        assert ranked[:, 0].tolist() == best
        for q in range(2):
            expected = [math.log(likelihood[q][int(i)]) for i in ranked[q]]
            assert scores[q].tolist() == pytest.approx(expected, rel=1e-5)
            assert scores[q].tolist() == sorted(scores[q].tolist(), reverse=True)


def test_ranking_scores_match_each_answer_scored_alone_without_padding(pretrained):
    model = VQAModel.from_pretrained(pretrained, vqa_config("demo", distill=False)).eval()
    answers = ["red", "two people", "yes", "a very small blue circle", "no"]
    answer_ids, answer_mask = tokenize(model.tokenizer, answers, 12)
    generator = torch.Generator().manual_seed(2)
    states = torch.randn(3, 4, 64, generator=generator)
    question_mask = torch.ones(3, 4, dtype=torch.long)
    with torch.no_grad():
        ranked, scores = rank_answers(model.decoder, states, question_mask, answer_ids, answer_mask, 5)
        for q in range(3):
            alone = []
            for answer in answers:
                ids, mask = tokenize(model.tokenizer, [answer], 12)
                logits = model.decoder(ids, mask, states[q:q + 1], question_mask[q:q + 1])
                alone.append(float(sequence_log_likelihood(logits, ids, mask)))
            assert ranked[q, 0].item() == max(range(len(answers)), key=alone.__getitem__)
            assert scores[q].tolist() == pytest.approx([alone[i] for i in ranked[q]], abs=1e-4)


# ---- learning ------------------------------------------------------------------------------------

def test_a_few_dozen_steps_fit_one_fixed_batch(pretrained):
    torch.manual_seed(3)
    model = VQAModel.from_pretrained(pretrained, vqa_config("demo", distill=False))
    questions = ["what color is the star", "how many circles are there", "is there a red square",
                 "what shape is the blue thing"]
    answers = [["purple"], ["2"], ["yes"], ["circle", "square"]]
    weights = torch.tensor([1.0, 1.0, 1.0, 0.7, 0.3])
    ids, mask = tokenize(model.tokenizer, questions, 30)
    answer_ids, answer_mask = tokenize(model.tokenizer, [a for g in answers for a in g], 6)
    counts = torch.tensor([len(g) for g in answers])
    images = torch.randn(4, 3, 64, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for step in range(40):
        output = model(images, ids, mask, answer_ids, answer_mask, counts, weights)
        optimizer.zero_grad()
        output.loss.backward()
        if step == 0:  # DDP needs a gradient for every trainable parameter
            assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
        optimizer.step()
        losses.append(float(output.loss.detach()))
    assert losses[-1] < 0.25 * losses[0]
    model.eval()
    candidates = ["purple", "2", "yes", "circle", "square", "no", "red", "3"]
    list_ids, list_mask = tokenize(model.tokenizer, candidates, 6)
    ranked, _ = model.answer(images, ids, mask, list_ids, list_mask, k=4)
    assert [candidates[i] for i in ranked[:, 0].tolist()] == ["purple", "2", "yes", "circle"]


def test_answer_loss_is_the_weighted_token_nll_summed_per_answer_over_the_batch():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 9, generator=generator)
    answer_ids = torch.tensor([[0, 5, 1, 0], [0, 6, 7, 1], [0, 8, 1, 0]])
    answer_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    weights = torch.tensor([0.7, 0.3, 1.0])
    targets = answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, -100)
    per_answer = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 9), targets.reshape(-1),
                                                   reduction="none").view(3, 3).sum(1)
    loss, parts = answer_loss(logits, answer_ids, answer_mask, weights, batch_size=2)
    assert float(loss) == pytest.approx(float((weights * per_answer).sum() / 2), rel=1e-6)
    teacher = torch.randn(3, 4, 9, generator=generator)
    soft = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 9), teacher[:, :-1].softmax(-1).reshape(-1, 9),
        reduction="none").view(3, 3)
    distill = (soft * answer_mask[:, 1:]).sum(1)
    mixed, parts = answer_loss(logits, answer_ids, answer_mask, weights, 2, teacher, alpha=0.4)
    assert float(mixed) == pytest.approx(float((weights * (0.6 * per_answer + 0.4 * distill)).sum() / 2),
                                         rel=1e-6)
    with pytest.raises(ValueError, match="teacher_logits"):
        answer_loss(logits, answer_ids, answer_mask, weights, 2, alpha=0.4)


def test_distillation_mixes_in_the_teacher_and_moves_it_by_ema(pretrained):
    model = VQAModel.from_pretrained(pretrained, vqa_config("demo", distill=True, momentum=0.9))
    ids, mask = tokenize(model.tokenizer, ["what color is the star"], 30)
    answer_ids, answer_mask = tokenize(model.tokenizer, ["purple"], 6)
    teacher_before = model.decoder_m.layers[0].output.dense.weight.clone()
    student = model.decoder.layers[0].output.dense.weight.detach().clone()
    output = model(torch.randn(1, 3, 64, 64), ids, mask, answer_ids, answer_mask, torch.tensor([1]),
                   torch.tensor([1.0]), alpha=0.4)
    assert set(output.parts) == {"answer_nll", "answer_distill"}
    expected = 0.6 * output.parts["answer_nll"] + 0.4 * output.parts["answer_distill"]
    assert float(output.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert torch.allclose(model.decoder_m.layers[0].output.dense.weight,
                          0.9 * teacher_before + 0.1 * student, atol=1e-6)


# ---- end to end on a tiny demo world -------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tiny_world, tiny_checkpoint):
    """The shared tiny world (8 / 4 / 2 VQA images, 3 questions each; its shards are
    ``shards("vqa", split)``) and the tiny pretrained checkpoint."""
    return tiny_world, tiny_checkpoint


def test_finetune_resume_evaluate_and_predict_end_to_end(world, shards, tmp_path):
    root, checkpoint = world
    config = vqa_config("demo", image_size=48, k_test=8, distill=True, num_workers=0, shuffle_buffer=8)
    train = TrainConfig(steps=4, batch_size=6, alpha_warmup_steps=2, checkpoint_every=2, log_every=1,
                        seed=1)
    optim = OptimConfig(lr=1e-3, warmup_lr=1e-4, warmup_steps=1, min_lr=1e-4)
    logged = {}
    common = dict(train=train, optim=optim, progress=False,
                  callback=lambda step, metrics: logged.setdefault(step, metrics))
    output = finetune(checkpoint, shards("vqa", "train"), tmp_path / "run", config, stop_after=2,
                      **common)
    assert not output.exists() and (tmp_path / "run" / "checkpoints" / "step-00000002.pt").is_file()
    output = finetune(checkpoint, shards("vqa", "train"), tmp_path / "run", config, **common)
    assert output == tmp_path / "run" / "model.pt" and output.is_file()
    assert sorted(logged) == [1, 2, 3, 4]
    assert {"loss", "answer_nll", "alpha", "lr"} <= set(logged[4])
    assert logged[1]["alpha"] == 0.0 and logged[4]["alpha"] == pytest.approx(0.4)
    assert all(math.isfinite(m["loss"]) for m in logged.values())

    model = load_vqa_model(output)
    assert model.image_size == 48 and not model.has_teachers and model.config == config

    types = root / "meta" / "vqa_question_types.json"
    metrics = evaluate(output, shards("vqa", "val"), progress=False, question_types=types)
    assert 0.0 <= metrics["accuracy"] <= 100.0
    val = json.loads((root / "vqa" / "val.json").read_text())
    present = {json.loads(types.read_text())[str(r["question_id"])] for r in val}
    assert set(metrics) == {"accuracy"} | {f"accuracy_{t}" for t in present}
    assert evaluate(output, shards("vqa", "val"), progress=False, question_types=types) == metrics

    result = tmp_path / "vqa_result.json"
    answers = predict(output, shards("vqa", "test"), progress=False, output=result)
    test = json.loads((root / "vqa" / "test.json").read_text())
    assert sorted(answers) == sorted(r["question_id"] for r in test)
    allowed = set(json.loads((root / "vqa" / "answer_list.json").read_text()))
    assert set(answers.values()) <= allowed
    assert json.loads(result.read_text()) == [{"question_id": q, "answer": a} for q, a in answers.items()]

    # The accuracy is the mean VQA accuracy of the predictions, by the official metric unless
    # "min3" is asked for.
    predicted = predict(output, shards("vqa", "val"), progress=False)
    for metric in ("official", "min3"):
        expected = 100 * sum(vqa_accuracy(predicted[r["question_id"]], r["answer"], metric=metric)
                             for r in val) / len(val)
        found = metrics if metric == "official" else evaluate(output, shards("vqa", "val"),
                                                              progress=False, metric=metric)
        assert found["accuracy"] == pytest.approx(expected)
    assert found["accuracy"] >= metrics["accuracy"]

    # A split without answers (test-dev) is not scored: the predictions become the evaluation
    # server's result file, as predict() writes it.
    server = tmp_path / "server" / "vqa_test_result.json"
    assert evaluate(output, shards("vqa", "test"), progress=False, result_file=server) == {
        "questions": len(test)}
    assert json.loads(server.read_text()) == json.loads(result.read_text())
    assert all(isinstance(r["question_id"], int) and isinstance(r["answer"], str)
               for r in json.loads(server.read_text()))


def test_accuracy_per_answer_type_when_the_records_carry_one(world, shards, tmp_path):
    root, checkpoint = world
    model = tmp_path / "vqa.pt"
    torch.manual_seed(0)
    save_vqa_model(VQAModel.from_pretrained(load_model(checkpoint), vqa_config("demo", k_test=4)),
                   model)
    val = json.loads((root / "vqa" / "val.json").read_text())
    kinds = ("yes/no", "number", "other")
    typed = [dict(r, answer_type=kinds[i % 3]) for i, r in enumerate(val)]
    folder = tmp_path / "typed"
    write_shards(typed, root, folder, kind="vqa", progress=False,
                 source={"answer_list": str(root / "vqa" / "answer_list.json")})
    metrics = evaluate(model, folder, progress=False)
    assert set(metrics) == {"accuracy", "accuracy_answer_yes_no", "accuracy_answer_number",
                            "accuracy_answer_other"}
    predicted = predict(model, folder, progress=False)
    for kind in kinds:
        rows = [r for r in typed if r["answer_type"] == kind]
        expected = 100 * sum(vqa_accuracy(predicted[r["question_id"]], r["answer"])
                             for r in rows) / len(rows)
        assert metrics[f"accuracy_answer_{kind.replace('/', '_')}"] == pytest.approx(expected)
    assert metrics["accuracy"] == pytest.approx(sum(
        metrics[f"accuracy_answer_{k.replace('/', '_')}"] * sum(r["answer_type"] == k for r in typed)
        for k in kinds) / len(typed))


def test_bad_inputs_are_named_before_any_compute(world, shards, tmp_path):
    root, checkpoint = world
    with pytest.raises(ConfigError, match=r"vqa\.image_size"):
        finetune(checkpoint, shards("vqa", "train"), tmp_path / "bad", vqa_config("demo", image_size=36),
                 train=TrainConfig(steps=1, batch_size=2), optim=OptimConfig(), progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(FileNotFoundError, match="pretrained"):
        finetune(tmp_path / "missing.pt", shards("vqa", "train"), tmp_path / "bad", vqa_config("demo"),
                 train=TrainConfig(steps=1, batch_size=2), optim=OptimConfig())
    with pytest.raises(ValueError, match="a 'pretrain' checkpoint; expected 'vqa'"):
        load_vqa_model(checkpoint)
    with pytest.raises(ValueError, match="result_file: .*no annotator answers"):
        evaluate(checkpoint, shards("vqa", "test"), progress=False)
    with pytest.raises(ValueError, match="metric: expected one of official, min3"):
        evaluate(checkpoint, shards("vqa", "val"), progress=False, metric="vqa2")
    val = json.loads((root / "vqa" / "val.json").read_text())
    mixed = [val[0], {k: v for k, v in val[1].items() if k != "answer"}]
    write_shards(mixed, root, tmp_path / "mixed", kind="vqa", progress=False)
    with pytest.raises(ValueError, match="1 of 2 questions have no annotator answers"):
        evaluate(checkpoint, tmp_path / "mixed", progress=False, result_file=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ValueError, match="answer_list"):
        load_answer_list([str(p) for p in shards("vqa", "val").glob("*.tar")])
    assert load_answer_list(shards("vqa", "val")) == json.loads(
        (root / "vqa" / "answer_list.json").read_text())
    with pytest.raises(FileNotFoundError, match="answer_list"):
        load_answer_list(shards("vqa", "val"), tmp_path / "nope.json")
