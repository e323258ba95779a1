"""Linear probes on frozen image tokens: shape (7-way) and colour (10-way) of every object of the
demo world's training images, read from the patch token under the object's centre.

    python notes/experiments/shape_probe.py WORLD MODEL [MODEL ...]

MODEL: a model.pt, a training state (.../checkpoints/step-*.pt) or "random" (untrained tiny).
"""
import json, sys, torch, torch.nn.functional as F
from PIL import Image
import codis
from codis.config import ModelConfig, tiny
from codis.model import CodisModel, load_model
from codis.transforms import eval_transform

torch.manual_seed(0); torch.set_num_threads(2)
world = sys.argv[1].rstrip("/") + "/"
scenes = json.load(open(world + "meta/scenes.json"))
paths = sorted(p for p in scenes if "_train/" in p)[:2000]
objects = [(i, o) for i, p in enumerate(paths) for o in scenes[p]["objects"]]
classes = {what: sorted({o[what] for _, o in objects}) for what in ("shape", "color")}
images = torch.stack([eval_transform(64)(Image.open(world + p).convert("RGB")) for p in paths])


def probe(tokens: torch.Tensor, what: str) -> float:
    grid = int(tokens.shape[1] ** 0.5)
    x = torch.stack([tokens[i, min(int(o["y"] * grid), grid - 1) * grid + min(int(o["x"] * grid), grid - 1)]
                     for i, o in objects])
    y = torch.tensor([classes[what].index(o[what]) for _, o in objects])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(0.8 * len(x))
    linear = torch.nn.Linear(x.shape[1], len(classes[what]))
    opt = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):
        loss = F.cross_entropy(linear(x[:n]), y[:n]); opt.zero_grad(); loss.backward(); opt.step()
    return 100 * (linear(x[n:]).argmax(-1) == y[n:]).float().mean().item()


for path in sys.argv[2:]:
    if path == "random":
        model = CodisModel(tiny())
    elif "/checkpoints/" in path:  # a training state of codis.train
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = CodisModel(ModelConfig.from_dict(state["config"]["model"]))
        model.load_state_dict(state["model"])
    else:
        model = load_model(path)
    model.eval()
    with torch.no_grad():
        tokens = torch.cat([model.image_tokens(images[i:i + 256]) for i in range(0, len(images), 256)])[:, 1:]
    print(path, " ".join(f"{what} {probe(tokens, what):.1f}% (chance {100 / len(classes[what]):.1f})"
                         for what in ("shape", "color")), flush=True)
