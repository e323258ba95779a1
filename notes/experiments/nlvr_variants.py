"""NLVR² finetuning variants on the demo world, through codis.tasks.nlvr (finetune + evaluate) with
monkeypatched pieces; prints train and test accuracy.

    NLVR_TRAIN=... NLVR_TEST=... [PRETRAIN_SHARDS=...] python notes/experiments/nlvr_variants.py MODEL OUT STEPS LR

Environment knobs (default: what the demo recipe runs):
    CROP=none|<scale>   finetuning augmentation: no augmentation, or random-resized-crop min scale (ALBEF 0.5)
    TA_STEPS=N          run the text-assignment pre-step first (needs PRETRAIN_SHARDS); TA_LR (1e-4),
    TA_CROP             its crop min scale (0.2, the pretraining default), TA_TEMPERATURE (0.07;
                        1e6 draws partner images uniformly)
    FREEZE=vtf          freeze the ViT (v), the text layers (t), the fusion layers (f)
    SIAMESE=1           instead of ALBEF's two-image fusion: fuse text with each image separately,
                        concatenate the two [CLS] states, MLP head (a diagnostic, not ALBEF's design)
"""
import os, sys, torch
import codis
import codis.data.loaders as loaders
import codis.transforms as transforms
from codis.tasks import nlvr
from codis.data.loaders import nlvr_loader
from codis.train import OptimConfig, TrainConfig
from codis.tasks.ve import FusionClassifier, evaluate_classifier, fuse, mlp_head, pretrained_backbone

torch.set_num_threads(1)
pretrained, out, steps, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
train_shards, test_shards = os.environ["NLVR_TRAIN"], os.environ["NLVR_TEST"]
crop = os.environ.get("CROP", "0.5")
loaders.train_transform = (lambda size, hflip=True: transforms.eval_transform(size)) if crop == "none" else \
    (lambda size, hflip=True: transforms._augmenting(size, float(crop), hflip))
_pretrain_loader = loaders.pretrain_loader
nlvr.pretrain_loader = lambda *a, **k: _pretrain_loader(*a, **{**k, "crop_min_scale": float(os.environ.get("TA_CROP", "0.2"))})
nlvr.TA_TEMPERATURE = float(os.environ.get("TA_TEMPERATURE", nlvr.TA_TEMPERATURE))
config = nlvr.nlvr_config("demo")


class Siamese(FusionClassifier):
    def classify(self, image_tokens, input_ids, attention_mask):
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(torch.cat([fuse(self.fusion, text, attention_mask, [t])[:, 0] for t in image_tokens], -1))


built = {}
_initial = nlvr.initial_nlvr_model


def initial(path, task_config):
    if os.environ.get("SIAMESE"):
        backbone = pretrained_backbone(path, task_config)
        model = Siamese(backbone.visual_encoder, backbone.text, backbone.fusion, mlp_head(2 * backbone.width, 2))
    else:
        model, backbone = _initial(path, task_config)
    frozen = os.environ.get("FREEZE", "")
    for letter, part in (("v", model.visual_encoder), ("t", model.text), ("f", model.fusion)):
        part.requires_grad_(letter not in frozen)
    built.update(model=model, tokenizer=backbone.tokenizer)
    return model, backbone


nlvr.initial_nlvr_model = initial
if int(os.environ.get("TA_STEPS", "0")):
    ta = int(os.environ["TA_STEPS"])
    pretrained = nlvr.text_assignment(
        pretrained, os.environ["PRETRAIN_SHARDS"], out + "_ta", config, progress=False,
        train=TrainConfig(steps=ta, batch_size=16, alpha_warmup_steps=0, checkpoint_every=ta, log_every=50),
        optim=OptimConfig(lr=float(os.environ.get("TA_LR", "1e-4")), weight_decay=0.02, warmup_lr=1e-5,
                          warmup_steps=min(100, ta // 10), min_lr=1e-5))
# The demo recipe's NLVR schedule (codis.tasks.ve.schedule over 1500 pairs, batch 16, steps from the recipe).
train = TrainConfig(steps=steps, batch_size=16, alpha_warmup_steps=93, checkpoint_every=93, log_every=50)
optim = OptimConfig(lr=lr, weight_decay=0.02, warmup_lr=1e-5, warmup_steps=93, min_lr=1e-6)
path = nlvr.finetune(pretrained, train_shards, out, config, train=train, optim=optim, progress=False)


def accuracy(shards):
    # The trained student in memory: a SIAMESE checkpoint cannot be read back by nlvr.load_nlvr_model.
    batches = nlvr_loader(shards, image_size=config.image_size, batch_size=64, tokenizer=built["tokenizer"])
    with torch.no_grad():
        return evaluate_classifier(built["model"], batches, nlvr._nlvr_inputs, progress=False)["accuracy"]


print(f"{pretrained}: NLVR2 train {accuracy(train_shards):.1f}% test {accuracy(test_shards):.1f}%")
