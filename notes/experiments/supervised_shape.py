"""Can the tiny ViT learn shapes at all? Trains it (plus a linear head on the max-pooled patch
tokens) directly on "which shapes does the image hold" (7 binary labels) of 4000 demo-world
training images, then prints the balanced accuracy on 500 held-out ones (chance 50%).

    python notes/experiments/supervised_shape.py WORLD STEM STEPS      # STEM: patch | conv
"""
import dataclasses, json, sys, time, torch, torch.nn.functional as F
from PIL import Image
import codis
from codis.config import tiny
from codis.encoders import build_image_encoder
from codis.transforms import eval_transform

torch.manual_seed(0); torch.set_num_threads(1)
world, stem, steps = sys.argv[1].rstrip("/") + "/", sys.argv[2], int(sys.argv[3])
scenes = json.load(open(world + "meta/scenes.json"))
paths = sorted(p for p in scenes if "_train/" in p)[:4000]
shapes = sorted({o["shape"] for s in scenes.values() for o in s["objects"]})
labels = torch.tensor([[any(o["shape"] == s for o in scenes[p]["objects"]) for s in shapes] for p in paths]).float()
images = torch.stack([eval_transform(64)(Image.open(world + p).convert("RGB")) for p in paths])
config = dataclasses.replace(tiny().vision, stem=stem)
vit = build_image_encoder(config)
head = torch.nn.Linear(config.width, len(shapes))
opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), 1e-3)
n, start = 3500, time.time()
for step in range(steps):
    idx = torch.randint(n, (32,))
    loss = F.binary_cross_entropy_with_logits(head(vit.forward_features(images[idx])[:, 1:].amax(1)), labels[idx])
    opt.zero_grad(); loss.backward(); opt.step()
vit.eval()
with torch.no_grad():
    predicted = head(vit.forward_features(images[n:])[:, 1:].amax(1)) > 0
truth = labels[n:] > 0.5
recall = (predicted & truth).sum(0).float() / truth.sum(0)
specificity = (~predicted & ~truth).sum(0).float() / (~truth).sum(0)
print(f"stem {stem}, {steps} steps: shape presence balanced accuracy "
      f"{100 * ((recall + specificity) / 2).mean().item():.1f}% ({time.time() - start:.0f} s)")
