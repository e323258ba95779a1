import sys, torch, collections, re
import codis
from codis.tasks import nlvr as N
from codis.data.loaders import nlvr_loader
torch.set_num_threads(2)
ck, shards = sys.argv[1], sys.argv[2]
model = N.load_nlvr_model(ck); model.eval()
cfg = model.task_config
urls = N.local_shards(shards, ("nlvr",))
loader = nlvr_loader(urls, image_size=cfg.image_size, batch_size=64, tokenizer=model.tokenizer, max_words=cfg.max_words, max_length=model.model_config.text.max_length, num_workers=0)
def family(s):
    if "in total" in s or "exactly" in s and "in the two images" in s: return "total"
    if "does not" in s or "but not" in s: return "side_only"
    if "both images" in s or "each image" in s: return "both"
    if "exactly one" in s or "only one" in s: return "exactly_one"
    if "more shapes" in s: return "more"
    return "relation"
stats = collections.defaultdict(lambda: [0, 0])
with torch.no_grad():
    for b in loader:
        pred = model(*N._nlvr_inputs(b)).argmax(-1)
        for s, p, l in zip(b["caption"] if "caption" in b else b["sentence"], pred.tolist(), b["label"].tolist()):
            f = family(s); stats[f][0] += p == l; stats[f][1] += 1
for f, (c, n) in sorted(stats.items()): print(f, n, round(100 * c / n, 1))
