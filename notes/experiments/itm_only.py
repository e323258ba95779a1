import os
import sys, time, torch, torch.nn.functional as F, codis, webdataset as wds
from codis.model import load_model
from codis.data.loaders import shard_urls
from codis.text import tokenize, clean_caption
from codis.transforms import eval_transform
import codis.losses as L
torch.manual_seed(0); torch.set_num_threads(1)
model = load_model(sys.argv[1]); model.train()
mode = sys.argv[2]  # "fusion" (train all) or "headonly"
pils, caps = [], []
for s in wds.WebDataset(shard_urls(os.environ["PRETRAIN_SHARDS"]), shardshuffle=False).decode("pil"):
    pils.append(s["jpg"].copy()); caps.append(clean_caption(s["txt"]))
ids, mask = tokenize(model.tokenizer, caps, 30)
tf = eval_transform(64); X = torch.stack([tf(im) for im in pils])
params = model.itm_head.parameters() if mode == "headonly" else [p for n, p in model.named_parameters() if not n.endswith("_m") and "_m." not in n]
opt = torch.optim.AdamW(params, lr=float(sys.argv[3]))
for step in range(600):
    idx = torch.randint(len(pils), (32,))
    with torch.no_grad() if mode == "headonly" else torch.enable_grad():
        it = model.image_tokens(X[idx]); tt = model.text_tokens(ids[idx], mask[idx])
    neg = (torch.arange(32) + torch.randint(1, 32, (32,))) % 32
    images = torch.cat([it, it[neg]]); texts = torch.cat([tt, tt]); m = torch.cat([mask[idx], mask[idx]])
    logits = model.itm_logits(images, texts, m)
    labels = torch.cat([torch.ones(32), torch.zeros(32)]).long()
    loss = F.cross_entropy(logits, labels)
    opt.zero_grad(); loss.backward(); opt.step()
    if (step + 1) % 100 == 0:
        print(mode, step + 1, round(loss.item(), 3), "acc", round((logits.argmax(-1) == labels).float().mean().item(), 3), flush=True)
