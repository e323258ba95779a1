"""How often is ALBEF's hard ITM negative image described by the caption too? Proxy: every
(colour, shape) pair the caption names is present in the negative image's scene."""
import json, re, sys, glob, torch, torch.nn.functional as F, codis
from codis.model import load_model
from codis.text import tokenize, clean_caption
from codis.transforms import eval_transform
from codis.data.demo_world import COLORS, SHAPES
from codis import losses as L
from PIL import Image
torch.manual_seed(0); torch.set_num_threads(2)
world = sys.argv[2]
scenes = json.load(open(world + "/meta/scenes.json"))
pairs = [r for r in json.load(open(world + "/pretrain/pairs.json"))] if glob.glob(world + "/pretrain/pairs.json") else None
if pairs is None:
    import pyarrow.parquet as pq
    t = pq.read_table(world + "/pretrain/urls.parquet").to_pylist()
    pairs = [{"image": r["url"], "caption": r["caption"]} for r in t if r["url"] in scenes]
colour_words = {c: c for c in COLORS} | {"grey": "gray"}
shape_words = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES} | {"crosses": "cross", "plus": "cross"}
def mentions(caption):
    w = caption.split(); out = set()
    for i, word in enumerate(w):
        if word in colour_words:
            for nxt in w[i + 1:i + 3]:
                if nxt in shape_words: out.add((colour_words[word], shape_words[nxt])); break
    return out
def present(image):
    return {(o["color"], o["shape"]) for o in scenes[image]["objects"]}
model = load_model(sys.argv[1]); model.eval()
tf = eval_transform(64)
stats = {"hard": [0, 0], "random": [0, 0]}
g = torch.Generator().manual_seed(0)
for trial in range(30):
    idx = torch.randperm(len(pairs), generator=g)[:32].tolist()
    batch = [pairs[i] for i in idx]
    img = torch.stack([tf(Image.open(world + "/" + p["image"]).convert("RGB")) for p in batch])
    ids, mask = tokenize(model.tokenizer, [clean_caption(p["caption"]) for p in batch], 30)
    with torch.no_grad():
        f = model.pair_features(img, ids, mask)
        sim_i2t = f.image_feat @ f.text_feat_m.T / model.temp
        sim_t2i = f.text_feat @ f.image_feat_m.T / model.temp
    neg_image, _ = L.hard_negative_indices(sim_i2t, sim_t2i)
    rand_image = (torch.arange(32) + torch.randint(1, 32, (32,), generator=g)) % 32
    for kind, negs in (("hard", neg_image), ("random", rand_image)):
        for t, n in enumerate(negs.tolist()):
            m = mentions(batch[t]["caption"])
            if not m: continue
            stats[kind][0] += m <= present(batch[n]["image"]); stats[kind][1] += 1
for kind, (true, total) in stats.items():
    print(f"{kind} negatives whose image has every (colour, shape) the caption names: {true}/{total} = {100*true/total:.1f}%")
