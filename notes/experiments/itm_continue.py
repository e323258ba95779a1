"""ITM alone, continued from a pretrained model, with random or ALBEF-style hard negatives (one
negative image per text, 1:1), on preloaded pretraining pairs (eval transform); saves the model
so that the downstream scripts can start from it.

    PRETRAIN_SHARDS=... python notes/experiments/itm_continue.py MODEL OUT STEPS LR [random|hard]
"""
import os, sys, torch, torch.nn.functional as F, webdataset as wds
import codis
from codis.data.loaders import shard_urls
from codis.losses import hard_negative_indices
from codis.model import load_model, save_model
from codis.text import clean_caption, tokenize
from codis.transforms import eval_transform

torch.manual_seed(0); torch.set_num_threads(1)
model = load_model(sys.argv[1]).train()
out, steps, lr = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
negatives = sys.argv[5] if len(sys.argv) > 5 else "random"
pils, captions = [], []
for sample in wds.WebDataset(shard_urls(os.environ["PRETRAIN_SHARDS"]), shardshuffle=False).decode("pil"):
    pils.append(sample["jpg"].copy()); captions.append(clean_caption(sample["txt"]))
ids, mask = tokenize(model.tokenizer, captions, model.config.text.max_length)
images = torch.stack([eval_transform(model.config.vision.image_size)(im) for im in pils])
students = [p for n, p in model.named_parameters() if not n.endswith("_m") and "_m." not in n]
opt = torch.optim.AdamW(students, lr=lr)
batch = 32
for step in range(steps):
    idx = torch.randint(len(pils), (batch,))
    image_tokens, text_tokens = model.image_tokens(images[idx]), model.text_tokens(ids[idx], mask[idx])
    if negatives == "hard":
        with torch.no_grad():
            sim = model.image_embedding(image_tokens) @ model.text_embedding(text_tokens).T / model.config.temperature
        negative, _ = hard_negative_indices(sim, sim.T)
    else:
        negative = (torch.arange(batch) + torch.randint(1, batch, (batch,))) % batch
    logits = model.itm_logits(torch.cat([image_tokens, image_tokens[negative]]),
                              torch.cat([text_tokens, text_tokens]), torch.cat([mask[idx], mask[idx]]))
    labels = torch.cat([torch.ones(batch), torch.zeros(batch)]).long()
    loss = F.cross_entropy(logits, labels)
    opt.zero_grad(); loss.backward(); opt.step()
    if (step + 1) % 100 == 0:
        print(step + 1, f"loss {loss.item():.3f}", f"accuracy {(logits.argmax(-1) == labels).float().mean().item():.3f}", flush=True)
save_model(model, out)
