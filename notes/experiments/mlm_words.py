"""MLM on colour words and on shape words only: each such word of the demo retrieval test captions
is masked alone and predicted by the fusion encoder with the caption's own image and with another
image (accuracy and loss). A fusion that reads a word's referent from the image predicts it
better with the own image.

    RETRIEVAL_TEST_SHARDS=... python notes/experiments/mlm_words.py MODEL
"""
import os, sys, torch, torch.nn.functional as F
import codis
from codis.data.demo_world import COLORS, SHAPES
from codis.data.loaders import retrieval_eval_loader
from codis.model import load_model

torch.set_num_threads(2)
model = load_model(sys.argv[1]).eval()
batch = next(iter(retrieval_eval_loader(os.environ["RETRIEVAL_TEST_SHARDS"], image_size=64, batch_size=100,
                                        tokenizer=model.tokenizer)))
ids, mask, own = batch["input_ids"], batch["attention_mask"], batch["text_image_index"]
with torch.no_grad():
    image_tokens = model.image_tokens(batch["image"])
vocab = model.tokenizer.get_vocab()
for name, words in (("colour", COLORS), ("shape", SHAPES)):
    targets = {vocab[w] for w in words if w in vocab}
    spots = [(r, c) for r in range(ids.shape[0]) for c in range(ids.shape[1]) if ids[r, c].item() in targets]
    line = []
    for tag, image_of in (("own image", own), ("another image", own.roll(17))):
        losses, hits = [], []
        for r, c in spots:
            masked = ids[r:r + 1].clone(); target = int(masked[0, c]); masked[0, c] = model.tokenizer.mask_token_id
            with torch.no_grad():
                text = model.text_encoder.encode_text(masked, mask[r:r + 1])
                fused = model.text_encoder.fuse(text, mask[r:r + 1], image_tokens[image_of[r]:image_of[r] + 1])
                logits = model.text_encoder.mlm_logits(fused)[0, c]
            losses.append(F.cross_entropy(logits[None], torch.tensor([target])).item())
            hits.append(int(logits.argmax()) == target)
        line.append(f"{tag}: accuracy {100 * sum(hits) / len(hits):.0f}% loss {sum(losses) / len(losses):.2f}")
    print(f"{sys.argv[1]} {name} words (n={len(spots)}, chance {100 / len(targets):.0f}%): " + " | ".join(line))
