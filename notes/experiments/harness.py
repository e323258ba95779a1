"""Harness: full CodisModel on preloaded PIL images, engine-like schedule, periodic ITC R@5."""
import os
import argparse, time, math, json, dataclasses, torch, torch.nn.functional as F
import codis
from codis.config import preset, LossWeights
from codis.model import CodisModel
from codis.data.loaders import retrieval_eval_loader, shard_urls
from codis.text import tokenize, clean_caption
from codis.transforms import eval_transform, _augmenting
from codis.train import learning_rate, distillation_alpha, OptimConfig
from timm.optim import create_optimizer_v2
import webdataset as wds
p = argparse.ArgumentParser()
p.add_argument("--mode", default="albef"); p.add_argument("--steps", type=int, default=600)
p.add_argument("--bs", type=int, default=32); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--warmup", type=int, default=-1); p.add_argument("--mom", type=float, default=0.995)
p.add_argument("--queue", type=int, default=256); p.add_argument("--size", type=int, default=64)
p.add_argument("--aug", type=float, default=0.0, help="min crop scale; 0 = no augmentation")
p.add_argument("--itm", type=float, default=1.0); p.add_argument("--mlm", type=float, default=1.0)
p.add_argument("--fusion", type=int, default=1); p.add_argument("--std", type=float, default=0.02)
p.add_argument("--wd", type=float, default=0.02); p.add_argument("--alpha", type=float, default=0.4)
p.add_argument("--randneg", type=int, default=0); p.add_argument("--randneg_steps", type=int, default=0); p.add_argument("--clip", type=int, default=0); p.add_argument("--drop", type=float, default=0.1); p.add_argument("--every", type=int, default=100); p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
torch.manual_seed(a.seed); torch.set_num_threads(1)
m = preset("tiny", mode=a.mode, momentum=a.mom, queue_size=a.queue, alpha=a.alpha,
           loss_weights=LossWeights(itm=a.itm, mlm=a.mlm))
m = m.replace(vision=dataclasses.replace(m.vision, image_size=a.size),
              text=dataclasses.replace(m.text, fusion_layers=a.fusion))
model = CodisModel(m)
if a.std != 0.02:
    from transformers import BertConfig
    def reinit(mod):
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(mod.weight, std=a.std)
    model.text_encoder.apply(reinit); model.text_encoder.tie_mlm_head()
    for s, t in zip(model._students(), model._teachers()): t.load_state_dict(s.state_dict())
if a.drop != 0.1:
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout): mod.p = a.drop
if a.clip:
    def clip_loss(f, alpha, sample_ids=None, intra_modal=None):
        logits = f.image_feat @ f.text_feat.T / model.temp
        lab = torch.arange(len(logits))
        l = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
        return l, {"i2t": l}
    model.contrastive_loss = clip_loss
STEP = [0]
if a.randneg_steps:
    import codis.losses as L
    _hard = L.hard_negative_indices
    def curriculum(sim_i2t, sim_t2i, sample_ids=None, generator=None):
        if STEP[0] < a.randneg_steps:
            return _hard(torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i), sample_ids, generator)
        return _hard(sim_i2t, sim_t2i, sample_ids, generator)
    L.hard_negative_indices = curriculum
if a.randneg:
    import codis.losses as L
    def rn(sim_i2t, sim_t2i, sample_ids=None, generator=None):
        B = sim_i2t.shape[0]
        off = torch.randint(1, B, (2, B))
        return (torch.arange(B) + off[0]) % B, (torch.arange(B) + off[1]) % B
    L.hard_negative_indices = rn
pils, caps = [], []
for s in wds.WebDataset(shard_urls(os.environ["PRETRAIN_SHARDS"]), shardshuffle=False).decode("pil"):
    pils.append(s["jpg"].copy()); caps.append(clean_caption(s["txt"]))
ids, mask = tokenize(model.tokenizer, caps, 30)
evt = eval_transform(a.size)
tf = _augmenting(a.size, a.aug, False) if a.aug > 0 else evt
X = None if a.aug > 0 else torch.stack([evt(im) for im in pils])
test = next(iter(retrieval_eval_loader(os.environ["RETRIEVAL_TEST_SHARDS"], image_size=a.size, batch_size=100, tokenizer=model.tokenizer)))
def evaluate():
    model.eval()
    with torch.no_grad():
        I, _ = model.encode_image(test["image"]); T, _ = model.encode_text(test["input_ids"], test["attention_mask"])
    model.train()
    sim = T @ I.T; t2i = test["text_image_index"]
    rank = (sim > sim.gather(1, t2i[:, None])).sum(1)
    sp = lambda z: round((z - z.mean(0)).norm(dim=1).mean().item(), 3)
    return round(float((rank < 5).float().mean()) * 100, 1), sp(I), sp(T)
warm = a.steps // 10 if a.warmup < 0 else a.warmup
oc = OptimConfig(lr=a.lr, weight_decay=a.wd, warmup_steps=warm, warmup_lr=1e-5, min_lr=1e-5)
opt = create_optimizer_v2(model, "adamw", lr=a.lr, weight_decay=a.wd)
g = torch.Generator().manual_seed(a.seed)
t0 = time.time(); hist = []
for step in range(a.steps):
    STEP[0] = step
    for gr in opt.param_groups: gr["lr"] = learning_rate(step, a.steps, oc)
    idx = torch.randint(len(pils), (a.bs,), generator=g)
    img = X[idx] if X is not None else torch.stack([tf(pils[i]) for i in idx.tolist()])
    alpha = distillation_alpha(step, a.alpha, a.steps // 4)
    out = model(img, ids[idx], mask[idx], alpha=alpha)
    opt.zero_grad(); out.loss.backward(); opt.step()
    if (step + 1) % a.every == 0 or step + 1 == a.steps:
        r = evaluate(); hist.append((step + 1, r[0]))
        print(step + 1, round(time.time() - t0), {k: round(float(v), 2) for k, v in out.parts.items() if k in ("ica", "itm", "mlm", "code")},
              "T", round(model.temp.item(), 3), "R@5/spreadI/spreadT", r, flush=True)
print("RESULT", json.dumps(vars(a)), "final R@5", hist[-1][1], "best", max(h[1] for h in hist), "time", round(time.time() - t0))
