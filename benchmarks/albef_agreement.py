"""The official ALBEF code beside ours on the same weights: do the losses and gradients agree?

Builds ALBEF's own pretraining model (salesforce/ALBEF's models/model_pretrain.py, its xbert BERT
and its ViT) at a tiny size (its configs/config_bert.json shrunk, its VisionTransformer at width 64),
randomly initialised with teachers that differ from the students, saves its state dict as ALBEF's
scripts do, converts that file with ``codis.tasks.albef.convert_albef`` and runs one training
forward + backward of both on the same images and captions ("[CLS] x", ALBEF's tokenisation),
with ALBEF's MLM mask and ITM negatives (recorded while its forward runs) given to ours through
``CodisModel.forward(mlm_inputs=, itm_negatives=)``. Prints the largest differences of loss_ita,
loss_itm and loss_mlm, of every trainable tensor's gradient, of the teachers after the EMA step and
of the queues after the step; exits 1 if any is above ``--tolerance`` (default 1e-4).

    git -C <ALBEF clone> archive HEAD models configs | tar -x -C /tmp/albef
    python benchmarks/albef_agreement.py --albef-repo /tmp/albef

ALBEF's code was written for transformers 4.8 and timm 0.4; the shims below (in this script only,
none of ALBEF's code is copied) put back what it imports or calls from those versions: three
helpers that moved out of ``transformers.modeling_utils``, two docstring decorators whose
arguments changed (made no-ops), and the two mask helpers and the ``init_weights`` (initialise,
then tie the MLM decoder to the word embeddings) that transformers 5 dropped from or changed in
``PreTrainedModel``, as transformers 4.8 wrote them. ``from_pretrained("bert-base-uncased")`` becomes a random initialisation and the ViT gets
the tiny size: both are the script choosing what ALBEF builds, not changes to how it computes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.distributed as dist

from codis.config import preset
from codis.model import load_model
from codis.tasks.albef import convert_albef
from codis.text import load_tokenizer, tokenize

CAPTIONS = ["a red circle left of a blue square", "two green triangles",
            "a small yellow star above a large red circle and a blue square", "blue"]
TINY = {"width": 64, "heads": 2, "vision_depth": 2, "patch": 8, "image": 64, "text_layers": 1,
        "fusion_layers": 2, "intermediate": 128, "positions": 64, "embed": 32, "queue": 16}


# ---- shims: what ALBEF's code needs from transformers 4.8 ----------------------------------------
def _invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers 4.8's ModuleUtilsMixin.invert_attention_mask (fp32): 0 / -10000."""
    mask = encoder_attention_mask
    extended = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * -10000.0


def _get_head_mask(self, head_mask, num_hidden_layers: int):
    """transformers 4.8's ModuleUtilsMixin.get_head_mask for the case ALBEF uses (no head mask)."""
    if head_mask is not None:
        raise NotImplementedError("the shim covers head_mask=None, the only value ALBEF passes")
    return [None] * num_hidden_layers


def _init_weights(self) -> None:
    """transformers 4.8's PreTrainedModel.init_weights: every module initialised by the class's
    ``_init_weights``, then the output embeddings (the MLM decoder) tied to the input embeddings.
    (transformers 5's needs state that only its ``post_init`` sets, which ALBEF never calls.)"""
    self.apply(self._init_weights)
    output = self.get_output_embeddings()
    if output is not None and getattr(self.config, "tie_word_embeddings", True):
        output.weight = self.get_input_embeddings().weight


def _unused(*args, **kwargs):
    raise NotImplementedError("head pruning: imported by ALBEF's xbert, never called")


def _no_docstring(*args, **kwargs):
    """A docstring decorator that leaves the function as it is (transformers 5's reject ALBEF's
    arguments, e.g. ``tokenizer_class``)."""
    return lambda function: function


def import_albef(repo: Path) -> types.SimpleNamespace:
    """ALBEF's models package (xbert, vit, model_pretrain) imported from ``repo`` with the shims."""
    import transformers.file_utils as file_utils
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("add_code_sample_docstrings", "replace_return_docstrings"):
        setattr(file_utils, name, _no_docstring)

    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name, _unused))
    if not (repo / "models" / "model_pretrain.py").is_file():
        raise SystemExit(f"--albef-repo: no models/model_pretrain.py under {repo}")
    sys.path.insert(0, str(repo))
    from models import model_pretrain, vit, xbert

    for name, method in (("invert_attention_mask", _invert_attention_mask),
                         ("get_head_mask", _get_head_mask)):
        if not hasattr(xbert.BertPreTrainedModel, name):
            setattr(xbert.BertPreTrainedModel, name, method)
    xbert.BertPreTrainedModel.init_weights = _init_weights
    return types.SimpleNamespace(model_pretrain=model_pretrain, vit=vit, xbert=xbert)


def build_albef(albef: types.SimpleNamespace, repo: Path, workdir: Path, vocab_size: int, tokenizer,
                seed: int) -> torch.nn.Module:
    """ALBEF's ALBEF class at the tiny size: its config_bert.json shrunk (no dropout, so that both
    forwards are deterministic), its own ViT at width 64, random weights, teachers perturbed away
    from the students (ALBEF starts them equal; unequal ones show a student / teacher mix-up)."""
    bert = json.loads((repo / "configs" / "config_bert.json").read_text())
    bert.update(vocab_size=vocab_size, hidden_size=TINY["width"], encoder_width=TINY["width"],
                num_hidden_layers=TINY["text_layers"] + TINY["fusion_layers"],
                fusion_layer=TINY["text_layers"], num_attention_heads=TINY["heads"],
                intermediate_size=TINY["intermediate"], max_position_embeddings=TINY["positions"],
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (workdir / "config_bert.json").write_text(json.dumps(bert))
    config = {"image_res": TINY["image"], "vision_width": TINY["width"], "embed_dim": TINY["embed"],
              "temp": 0.07, "mlm_probability": 0.15, "queue_size": TINY["queue"], "momentum": 0.95,
              "alpha": 0.4, "bert_config": str(workdir / "config_bert.json")}

    def tiny_vit(**kwargs):
        return albef.vit.VisionTransformer(**{**kwargs, "patch_size": TINY["patch"],
                                              "embed_dim": TINY["width"], "depth": TINY["vision_depth"],
                                              "num_heads": TINY["heads"], "mlp_ratio": 2})

    albef.model_pretrain.VisionTransformer = tiny_vit
    albef.xbert.BertForMaskedLM.from_pretrained = classmethod(lambda cls, name, config: cls(config))
    torch.manual_seed(seed)
    model = albef.model_pretrain.ALBEF(text_encoder="bert-base-uncased", tokenizer=tokenizer,
                                       config=config, init_deit=False)
    for encoder in (model.text_encoder, model.text_encoder_m):
        assert encoder.cls.predictions.decoder.weight is encoder.bert.embeddings.word_embeddings.weight
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for student, teacher in model.model_pairs:
            for parameter in teacher.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


# ---- the replay ---------------------------------------------------------------------------------
def albef_step(model, images, text, alpha: float):
    """ALBEF's forward + backward, recording its MLM mask and its ITM negatives as it draws them."""
    recorded = {}
    original_mask = model.mask

    def mask(*args, **kwargs):
        ids, labels = original_mask(*args, **kwargs)
        recorded["mlm"] = (ids.clone(), labels.clone())
        return ids, labels

    draws = []
    multinomial = torch.multinomial

    def recording_multinomial(*args, **kwargs):
        drawn = multinomial(*args, **kwargs)
        draws.append(drawn.clone())
        return drawn

    model.mask = mask
    torch.multinomial = recording_multinomial
    try:
        loss_mlm, loss_ita, loss_itm = model(images, text, alpha=alpha)
    finally:
        torch.multinomial = multinomial
        del model.mask
    (loss_mlm + loss_ita + loss_itm).backward()
    batch = images.shape[0]
    # ALBEF draws a negative image for each text first, then a negative text for each image
    negatives = (torch.cat(draws[:batch]), torch.cat(draws[batch:2 * batch]))
    return {"ita": loss_ita, "itm": loss_itm, "mlm": loss_mlm}, recorded["mlm"], negatives


def largest(pairs, floor: float = 1e-9) -> tuple[float, float, int, int]:
    """Over (ours, albef) tensor pairs: the max |a - b|, the max of |a - b| / max|b| over the
    tensors whose ALBEF values reach ``floor``, the number of pairs and the number below the floor
    (gradients that are zero but for rounding, such as those of attention key biases, which a
    softmax ignores)."""
    absolute = relative = 0.0
    count = tiny = 0
    for ours, theirs in pairs:
        difference = (ours.detach().float() - theirs.detach().float()).abs().max().item()
        scale = theirs.detach().float().abs().max().item()
        absolute = max(absolute, difference)
        if scale >= floor:
            relative = max(relative, difference / scale)
        else:
            tiny += 1
        count += 1
    return absolute, relative, count, tiny


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--albef-repo", required=True, type=Path,
                        help="a salesforce/ALBEF work tree (its models/ and configs/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.4, help="distillation weight of both")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        dist.init_process_group("gloo", init_method=f"file://{workdir / 'rendezvous'}", rank=0,
                                world_size=1)  # ALBEF's queue update all-gathers
        try:
            return compare(args, workdir)
        finally:
            dist.destroy_process_group()


def compare(args: argparse.Namespace, workdir: Path) -> int:
    albef = import_albef(args.albef_repo.resolve())
    tokenizer = load_tokenizer("builtin", append_sep=False)  # "[CLS] x", as ALBEF's tokenizer
    reference = build_albef(albef, args.albef_repo.resolve(), workdir, len(tokenizer), tokenizer,
                            args.seed).train()
    torch.save({"model": reference.state_dict(), "epoch": 0}, workdir / "albef.pth")
    base = preset("tiny", momentum=0.95, alpha=args.alpha, mlm_probability=0.15)  # no dropout
    conversion = convert_albef(workdir / "albef.pth", workdir / "ours.pt", base=base)
    ours = load_model(workdir / "ours.pt").train()

    generator = torch.Generator().manual_seed(args.seed + 2)
    images = torch.randn(len(CAPTIONS), 3, TINY["image"], TINY["image"], generator=generator)
    ids, mask = tokenize(ours.tokenizer, CAPTIONS, 30)
    assert bool((ids[:, 0] == tokenizer.cls_token_id).all()) and not bool((ids == tokenizer.sep_token_id).any())
    text = types.SimpleNamespace(input_ids=ids, attention_mask=mask)

    torch.manual_seed(args.seed + 3)
    losses, mlm_inputs, negatives = albef_step(reference, images, text, args.alpha)
    output = ours(images, ids, mask, alpha=args.alpha, mlm_inputs=mlm_inputs, itm_negatives=negatives)
    output.loss.backward()

    failed = False

    def line(name: str, value: float, detail: str = "") -> None:
        nonlocal failed
        failed |= not value <= args.tolerance
        print(f"{name:<34} max |diff| {value:.2e}{detail}")

    print(f"ALBEF ({args.albef_repo}) vs codis on converted weights: tiny size, batch "
          f"{len(CAPTIONS)}, seed {args.seed}, alpha {args.alpha}, torch {torch.__version__}")
    for name, ours_name in (("ita", "ica"), ("itm", "itm"), ("mlm", "mlm")):
        theirs, mine = losses[name].item(), output.parts[ours_name].item()
        line(f"loss_{name}", abs(theirs - mine), f"   (ALBEF {theirs:.6f}, codis {mine:.6f})")

    albef_parameters = dict(reference.named_parameters())
    gradients, missing = [], []
    for name, parameter in ours.named_parameters():
        if not parameter.requires_grad:
            continue
        source = albef_parameters.get(conversion.placed.get(name, ""))
        if source is None or parameter.grad is None or source.grad is None:
            missing.append(name)
            continue
        gradients.append((parameter.grad, source.grad))
    absolute, relative, count, zero = largest(gradients)
    line("gradients", absolute, f"   ({count} trainable tensors; max relative {relative:.2e}, "
                                f"{zero} of them zero but for rounding in both)")
    if missing:
        failed = True
        print(f"no gradient to compare for {len(missing)} tensor(s): {', '.join(missing[:5])}")

    ours_state = ours.state_dict()
    albef_state = reference.state_dict()
    teachers = [(ours_state[k], albef_state[v]) for k, v in conversion.placed.items()
                if k.split(".")[0].endswith("_m")]
    absolute, _, count, _ = largest(teachers)
    line("teachers after the EMA step", absolute, f"   ({count} tensors)")
    queues = [(ours.queue.image, reference.image_queue.T), (ours.queue.text, reference.text_queue.T)]
    line("queues after the step", largest(queues)[0],
         f"   (pointer ALBEF {int(reference.queue_ptr)}, codis {int(ours.queue.pointer)})")
    failed |= int(reference.queue_ptr) != int(ours.queue.pointer)
    print(f"agreement to {args.tolerance:g}: {'no' if failed else 'yes'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
