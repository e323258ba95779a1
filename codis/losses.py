"""Training objectives of ALBEF (ITC/ITM/MLM with momentum distillation) and CODIS (L_ica, L_code).

Every loss is a pure function of tensors: the model owns the queues, the codebook and the transport
plans and passes them in. Shapes are checked up front so that a wiring mistake fails with a message
naming the argument rather than deep inside a matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_matrix(name: str, tensor: Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(tensor.shape)}")
    if cols is not None and tensor.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns (feature dim), got shape {tuple(tensor.shape)}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """H(y, p) = -sum_j y_j log p_j with p = softmax(logits), averaged over rows (ALBEF's ITC/MLM targets)."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def distillation_targets(hard: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    """ALBEF momentum distillation pseudo-targets: alpha * softmax(s^m / tau) + (1 - alpha) * y."""
    _check_alpha(alpha)
    if hard.shape != teacher_logits.shape:
        raise ValueError(f"hard targets {tuple(hard.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
                         "must have the same shape")
    return alpha * F.softmax(teacher_logits.detach(), dim=-1) + (1.0 - alpha) * hard


def positive_targets(batch_size: int, bank_size: int, sample_ids: Tensor | None = None,
                     bank_ids: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
    """Hard targets y^{i2t}/y^{t2i} over a bank whose first ``batch_size`` entries are the current batch.

    Without ids each row has its own column as the only positive. With ids (finetuning, where an image
    has several captions) every bank entry sharing the row's id is a positive too, and the row is
    normalised to sum to 1, as in ALBEF's retrieval finetuning.
    """
    if bank_size < batch_size:
        raise ValueError(f"bank_size ({bank_size}) must be >= batch_size ({batch_size}): "
                         "the bank starts with the current batch")
    if device is None and sample_ids is not None:
        device = sample_ids.device
    own = torch.zeros(batch_size, bank_size, device=device)
    own[:, :batch_size] = torch.eye(batch_size, device=device)
    if sample_ids is None:
        return own
    if sample_ids.shape != (batch_size,):
        raise ValueError(f"sample_ids must have shape ({batch_size},), got {tuple(sample_ids.shape)}")
    if bank_ids is None:
        if bank_size != batch_size:
            raise ValueError("bank_ids are required when the bank is larger than the batch "
                             f"(bank_size={bank_size}, batch_size={batch_size})")
        bank_ids = sample_ids
    if bank_ids.shape != (bank_size,):
        raise ValueError(f"bank_ids must have shape ({bank_size},), got {tuple(bank_ids.shape)}")
    same = sample_ids.to(device).view(-1, 1) == bank_ids.to(device).view(1, -1)
    # OR with the identity so that every row keeps its own column even if the caller's bank ids disagree.
    positives = (same | own.bool()).float()
    return positives / positives.sum(dim=1, keepdim=True)


def ica_loss(image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor,
             image_queue: Tensor, text_queue: Tensor, *, temperature: Tensor | float, alpha: float,
             intra_modal: bool, sample_ids: Tensor | None = None, id_queue: Tensor | None = None,
             terms: str = "pairs") -> tuple[Tensor, dict[str, Tensor]]:
    """CODIS L_ica: H(y, p) for p_i2t, p_t2i (ALBEF's L_itc) and, when intra_modal, p_i2i, p_t2t,
    weighted as ``terms`` says: "pairs" (i2t + t2i) / 2 + (i2i + t2t) / 2, "mean" the mean of the
    four (either is (i2t + t2i) / 2 without the intra-modal terms)."""
    _check_alpha(alpha)
    if terms not in ("pairs", "mean"):
        raise ValueError(f"terms must be 'pairs' or 'mean', got {terms!r}")
    _check_matrix("image_feat", image_feat)
    batch, dim = image_feat.shape
    _check_matrix("text_feat", text_feat, batch, dim)
    _check_matrix("image_feat_m", image_feat_m, batch, dim)
    _check_matrix("text_feat_m", text_feat_m, batch, dim)
    _check_matrix("image_queue", image_queue, cols=dim)
    _check_matrix("text_queue", text_queue, image_queue.shape[0], dim)
    queue_size = image_queue.shape[0]
    bank_ids = None
    if sample_ids is not None:
        if sample_ids.shape != (batch,):
            raise ValueError(f"sample_ids must have shape ({batch},), got {tuple(sample_ids.shape)}")
        if queue_size > 0:
            if id_queue is None or id_queue.shape != (queue_size,):
                got = None if id_queue is None else tuple(id_queue.shape)
                raise ValueError(f"id_queue must have shape ({queue_size},) when sample_ids are given "
                                 f"and the queues are not empty, got {got}")
            bank_ids = torch.cat([sample_ids, id_queue.to(sample_ids.device)])
        else:
            bank_ids = sample_ids
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        teacher_temperature: Tensor | float = temperature.detach()
    else:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        teacher_temperature = temperature

    # The teacher side and the queues are targets only: no gradient may reach them.
    image_bank = torch.cat([image_feat_m, image_queue]).detach()
    text_bank = torch.cat([text_feat_m, text_queue]).detach()
    image_feat_m, text_feat_m = image_feat_m.detach(), text_feat_m.detach()
    hard = positive_targets(batch, batch + queue_size, sample_ids, bank_ids, device=image_feat.device)

    pairs = {"i2t": (image_feat, image_feat_m, text_bank), "t2i": (text_feat, text_feat_m, image_bank)}
    if intra_modal:
        pairs.update({"i2i": (image_feat, image_feat_m, image_bank), "t2t": (text_feat, text_feat_m, text_bank)})
    parts: dict[str, Tensor] = {}
    for name, (student, teacher, bank) in pairs.items():
        with torch.no_grad():
            targets = distillation_targets(hard, teacher @ bank.t() / teacher_temperature, alpha)
        parts[name] = soft_cross_entropy(student @ bank.t() / temperature, targets)
    total = (parts["i2t"] + parts["t2i"]) / 2
    if intra_modal:
        intra = (parts["i2i"] + parts["t2t"]) / 2
        total = total + intra if terms == "pairs" else (total + intra) / 2
    return total, parts


def codeword_distance(features: Tensor, codewords: Tensor) -> Tensor:
    """CODIS transport cost D_ij = d(z_i, c_j) = 1 - cos(z_i, c_j), shape (..., N, K) for features
    (..., N, D), in float32 (or float64) even under autocast: in bf16 the cost near 1 sits on a grid
    of 0.004-0.008, several percent of the OT's epsilon."""
    if features.dim() < 2:
        raise ValueError(f"features must be (..., N, D), got shape {tuple(features.shape)}")
    _check_matrix("codewords", codewords, cols=features.shape[-1])
    dtype = torch.promote_types(torch.promote_types(features.dtype, codewords.dtype), torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        cosine = (F.normalize(features.to(dtype), dim=-1)
                  @ F.normalize(codewords.to(dtype), dim=-1).t())
    return 1.0 - cosine


def ot_loss(plan: Tensor, cost: Tensor) -> Tensor:
    """CODIS L_ot = <T, D> = sum_ij T_ij d(z_i^m, c_j) for a given transport plan T."""
    if plan.shape != cost.shape:
        raise ValueError(f"plan {tuple(plan.shape)} and cost {tuple(cost.shape)} must have the same shape")
    return (plan * cost).sum()


def code_loss(image_feat: Tensor, text_feat: Tensor, image_target_feat: Tensor, text_target_feat: Tensor,
              codewords: Tensor, image_plan: Tensor, text_plan: Tensor, *, temperature: float,
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """CODIS L_code = L_ot(Z_v^m, C) + L_ot(Z_t^m, C) + L_t2p(Z_t, C, T_i2p) + L_i2p(Z_v, C, T_t2p) (Eq. 2)."""
    _check_matrix("image_feat", image_feat)
    batch, dim = image_feat.shape
    _check_matrix("text_feat", text_feat, batch, dim)
    _check_matrix("image_target_feat", image_target_feat, batch, dim)
    _check_matrix("text_target_feat", text_target_feat, batch, dim)
    _check_matrix("codewords", codewords, cols=dim)
    num_codes = codewords.shape[0]
    if image_plan.shape != (batch, num_codes):
        raise ValueError(f"image_plan must have shape ({batch}, {num_codes}) (batch, codewords), "
                         f"got {tuple(image_plan.shape)}")
    if text_plan.shape != (batch, num_codes):
        raise ValueError(f"text_plan must have shape ({batch}, {num_codes}) (batch, codewords), "
                         f"got {tuple(text_plan.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    image_plan, text_plan = image_plan.detach(), text_plan.detach()
    # The plans were solved for these features; only the codewords move towards them.
    ot_image = ot_loss(image_plan, codeword_distance(image_target_feat.detach(), codewords))
    ot_text = ot_loss(text_plan, codeword_distance(text_target_feat.detach(), codewords))

    unit_codewords = F.normalize(codewords, dim=-1)
    # A transport plan's rows sum to the sample marginal (1/B); the prediction targets are distributions.
    image_assign = image_plan / image_plan.sum(dim=1, keepdim=True).clamp_min(torch.finfo(image_plan.dtype).tiny)
    text_assign = text_plan / text_plan.sum(dim=1, keepdim=True).clamp_min(torch.finfo(text_plan.dtype).tiny)
    # Swapped: the text predicts the image's codeword assignment and vice versa, chaining the modalities.
    t2p = soft_cross_entropy(text_feat @ unit_codewords.t() / temperature, image_assign)
    i2p = soft_cross_entropy(image_feat @ unit_codewords.t() / temperature, text_assign)
    parts = {"ot_image": ot_image, "ot_text": ot_text, "t2p": t2p, "i2p": i2p}
    return ot_image + ot_text + t2p + i2p, parts


_NO_NEGATIVE = ("hard negative mining needs at least one negative per row, but some sample has no "
                "negative in the batch (every sample of the batch shares its id)")


@torch.no_grad()
def hard_negative_indices(sim_i2t: Tensor, sim_t2i: Tensor, sample_ids: Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """ALBEF's ITM hard negatives: one negative per row drawn from softmax(s) with positives excluded.

    ``sim_i2t``/``sim_t2i`` are the in-batch (B, B) similarities (slice a bank's first B columns).
    Positives are masked to -inf before the softmax, so a positive can never be drawn, however peaked
    the similarities are. Returns (negative_image_for_text, negative_text_for_image), each (B,) long,
    drawn from ``generator`` (on its own device) when given.

    A batch of one raises ValueError. A sample whose every batch entry shares its id (so has no
    negative) is caught on the device, without a host sync: on the CPU a RuntimeError "hard
    negative mining needs at least one negative per row ...", on CUDA a device-side assert.
    """
    _check_matrix("sim_i2t", sim_i2t)
    batch = sim_i2t.shape[0]
    if sim_i2t.shape != (batch, batch) or sim_t2i.shape != (batch, batch):
        raise ValueError(f"sim_i2t {tuple(sim_i2t.shape)} and sim_t2i {tuple(sim_t2i.shape)} must both be "
                         "square (B, B) in-batch similarities")
    if sample_ids is None:
        positives = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
    else:
        if sample_ids.shape != (batch,):
            raise ValueError(f"sample_ids must have shape ({batch},), got {tuple(sample_ids.shape)}")
        ids = sample_ids.to(sim_i2t.device)
        positives = ids.view(-1, 1) == ids.view(1, -1)
    if batch < 2:
        raise ValueError("hard negative mining needs at least one negative per row, but a batch of "
                         f"{batch} has none")
    # Checked on the device: reading the answer back would stall the host every step.
    torch._assert_async(~positives.all(dim=1).any(), _NO_NEGATIVE)
    draw_device = sim_i2t.device if generator is None else generator.device

    def draw(sim: Tensor) -> Tensor:
        weights = F.softmax(sim.detach().float().masked_fill(positives, float("-inf")), dim=1)
        return torch.multinomial(weights.to(draw_device), 1, generator=generator).squeeze(1).to(sim.device)

    return draw(sim_t2i), draw(sim_i2t)


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """ALBEF L_itm = H(y^itm, p^itm(I, T)) over positive pairs and hard negatives (2-way head)."""
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"ITM logits must have shape (N, 2), got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"ITM labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    return F.cross_entropy(logits, labels.long())


def mlm_loss(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None,
             alpha: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """ALBEF L_mlm = (1 - alpha) H(y^msk, p^msk) + alpha H(softmax(teacher), p^msk) on masked tokens.

    ``logits`` (N, V) and ``teacher_logits`` (N, V) are the MLM head's outputs at the N masked
    tokens only, ``labels`` (N,) their original ids (the rows of ``codis.text.mlm_positions``);
    N = 0 gives a zero loss that keeps the graph."""
    _check_alpha(alpha)
    if logits.dim() != 2:
        raise ValueError(f"MLM logits must have shape (N, V) (masked tokens, vocabulary), "
                         f"got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"MLM labels must have shape ({logits.shape[0]},) (one per masked token), "
                         f"got {tuple(labels.shape)}")
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    if teacher_logits is None and alpha > 0:
        # Otherwise (1 - alpha) would silently shrink the MLM loss with nothing to distil from.
        raise ValueError(f"alpha={alpha} needs teacher_logits; pass alpha=0 when not distilling")

    if logits.shape[0] == 0:
        zero = logits.sum() * 0  # keeps the graph so that backward() and DDP still see every parameter
        return zero, {"ce": zero, "distill": zero}
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None:
        distill = torch.zeros((), dtype=ce.dtype, device=ce.device)
    else:
        distill = soft_cross_entropy(logits, F.softmax(teacher_logits.detach(), dim=-1))
    total = (1.0 - alpha) * ce + alpha * distill
    return total, {"ce": ce, "distill": distill}


# ---- finetuning ----------------------------------------------------------------------------------
def classification_loss(logits: Tensor, labels: Tensor,
                        teacher_logits: Tensor | None = None, alpha: float = 0.0,
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """ALBEF finetuning loss (1 - alpha) H(y, p) + alpha H(softmax(teacher), p) (model_ve/model_nlvr)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, classes), got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if teacher_logits is None and alpha > 0:
        raise ValueError(f"alpha={alpha} needs teacher_logits; pass alpha=0 when not distilling")
    ce = F.cross_entropy(logits, labels.long())
    if teacher_logits is None:
        return ce, {"ce": ce}
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    distill = soft_cross_entropy(logits, F.softmax(teacher_logits.detach().float(), dim=-1))
    return (1.0 - alpha) * ce + alpha * distill, {"ce": ce, "distill": distill}


def answer_loss(logits: Tensor, answer_ids: Tensor, answer_mask: Tensor, weights: Tensor,
                batch_size: int, teacher_logits: Tensor | None = None, alpha: float = 0.0,
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """ALBEF's VQA loss: sum_q sum_a w_qa [(1 - alpha) NLL(a | q) + alpha H(teacher, p)(a | q)] / B,
    each term summed over the answer's tokens (its [CLS] is the given prefix, not a target)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if teacher_logits is None and alpha > 0:
        raise ValueError(f"alpha={alpha} needs teacher_logits; pass alpha=0 when not distilling")
    if weights.shape != answer_ids.shape[:1]:
        raise ValueError(f"weights must have shape ({answer_ids.shape[0]},) (one per answer), "
                         f"got {tuple(weights.shape)}")
    scored = answer_mask[:, 1:].to(torch.float32)
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -(log_probs.gather(-1, answer_ids[:, 1:, None]).squeeze(-1) * scored).sum(1)
    weights = weights.to(nll.dtype)
    parts = {"answer_nll": (weights * nll).sum() / batch_size}
    per_answer = nll
    if teacher_logits is not None and alpha > 0:
        soft = F.softmax(teacher_logits[:, :-1].detach().float(), dim=-1)
        distill = (-(soft * log_probs).sum(-1) * scored).sum(1)
        per_answer = (1.0 - alpha) * nll + alpha * distill
        parts["answer_distill"] = (weights * distill).sum() / batch_size
    return (weights * per_answer).sum() / batch_size, parts
