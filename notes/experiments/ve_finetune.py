"""SNLI-VE finetuning of a pretrained model with the demo preset (lr, batch), STEPS steps;
prints test accuracy. The demo's hypotheses are built so that text alone reaches 50%.

    VE_TRAIN=... VE_TEST=... python notes/experiments/ve_finetune.py MODEL OUT STEPS
"""
import dataclasses, glob, os, sys, torch
import codis
from codis.tasks import ve

torch.set_num_threads(1)
pretrained, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = ve.ve_config("demo")
shards = {k: sorted(glob.glob(os.path.join(os.environ[k], "*.tar"))) for k in ("VE_TRAIN", "VE_TEST")}
train, optim = ve.training_configs(config, 1800)
checkpoint = ve.finetune(pretrained, shards["VE_TRAIN"], out, config, train=dataclasses.replace(train, steps=steps),
                         optim=optim, progress=False, resume=False)
print(pretrained, "SNLI-VE test", ve.evaluate(checkpoint, shards["VE_TEST"], progress=False))
