import os
import sys, torch
import codis
from codis.model import load_model
from codis.tasks import retrieval as R
torch.set_num_threads(1)
shards = os.environ["RETRIEVAL_TEST_SHARDS"]
for ck in sys.argv[1:]:
    model = load_model(ck).eval()
    cfg = R.retrieval_config("demo")
    enc = R.encode_eval_set(model, shards, cfg, progress=False)
    sim = enc.similarity()
    itc = R.retrieval_metrics(sim, sim.T, enc.text_to_image)
    si2t, st2i = R.rerank(model, enc, sim, k_test=cfg.k_test)
    itm = R.retrieval_metrics(si2t, st2i, enc.text_to_image)
    f = lambda m: {k: round(m[k], 1) for k in ("txt_r5", "img_r5", "r_mean")}
    print(ck, "ITC", f(itc), "ITM", f(itm), flush=True)
