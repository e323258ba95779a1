import os
import sys, torch
import codis
from codis.model import load_model
from codis.tasks import retrieval as R
torch.set_num_threads(1)
shards = os.environ["RETRIEVAL_TEST_SHARDS"]
for ck in sys.argv[1:]:
    model = load_model(ck).eval()
    enc = R.encode_eval_set(model, shards, R.retrieval_config("demo"), progress=False)
    n = len(enc.text_to_image)
    pos_img = enc.text_to_image
    neg_img = (pos_img + torch.randint(1, enc.image_feat.shape[0], (n,))) % enc.image_feat.shape[0]
    with torch.no_grad():
        p = model.itm_logits(enc.image_tokens[pos_img], enc.text_tokens, enc.text_mask)
        q = model.itm_logits(enc.image_tokens[neg_img], enc.text_tokens, enc.text_mask)
    sp, sn = p[:, 1] - p[:, 0], q[:, 1] - q[:, 0]
    auc = (sp[:, None] > sn[None, :]).float().mean().item()
    paired = (sp > sn).float().mean().item()
    print(ck, "ITM AUC random negatives", round(auc, 3), "paired (same text)", round(paired, 3), "logit std", round(sp.std().item(), 3))
