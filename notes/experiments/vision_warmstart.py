"""A supervised warm start for the tiny ViT, the demo's stand-in for DeiT's ImageNet weights
(the experiment behind codis.train.vision_init, whose classifier, loss and metric it uses):
multi-label "which shapes and which colours does the image hold" (BCE on the max-pooled patch
tokens) on the world's pretraining images (labels from `meta/scenes.json`), the last 300 held out;
prints their balanced accuracy and saves the ViT's weights as safetensors, loadable as
`model.vision.pretrained` of a `codis pretrain` run config (same `stem`).

    python notes/experiments/vision_warmstart.py WORLD STEM STEPS OUT.safetensors [THREADS]
"""
import dataclasses, json, sys, time, torch
from PIL import Image
from safetensors.torch import save_file
import codis
from codis.config import tiny
from codis.transforms import eval_transform
from codis.train.vision_init import LabelClassifier, balanced_accuracy, multilabel_bce

torch.manual_seed(0); torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
world, stem, steps, out = sys.argv[1].rstrip("/") + "/", sys.argv[2], int(sys.argv[3]), sys.argv[4]
scenes = json.load(open(world + "meta/scenes.json"))
paths = sorted(p for p in scenes if "/pretrain/" in p)
shapes = sorted({o["shape"] for s in scenes.values() for o in s["objects"]})
colors = sorted({o["color"] for s in scenes.values() for o in s["objects"]})


def present(path):
    objects = scenes[path]["objects"]
    return ([any(o["shape"] == s for o in objects) for s in shapes]
            + [any(o["color"] == c for o in objects) for c in colors])


labels = torch.tensor([present(p) for p in paths]).float()
images = torch.stack([eval_transform(64)(Image.open(world + p).convert("RGB")) for p in paths])
config = dataclasses.replace(tiny().vision, stem=stem)
model = LabelClassifier(config, labels.shape[1])
opt = torch.optim.AdamW(model.parameters(), 1e-3)
n, start = len(paths) - 300, time.time()
for step in range(steps):
    idx = torch.randint(n, (64,))
    loss = multilabel_bce(model(images[idx]), labels[idx])
    opt.zero_grad(); loss.backward(); opt.step()
model.eval()
with torch.no_grad():
    balanced = balanced_accuracy(model(images[n:]), labels[n:])
print(f"stem {stem}, {steps} steps: held-out balanced accuracy shape {balanced[:len(shapes)].mean():.1f}% "
      f"colour {balanced[len(shapes):].mean():.1f}% ({time.time() - start:.0f} s)")
save_file({k: v.contiguous() for k, v in model.visual_encoder.state_dict().items()}, out)
