import os
import sys, torch, codis
from codis.model import load_model
from codis.tasks import retrieval as R
from codis.text import mask_tokens
torch.manual_seed(0); torch.set_num_threads(2)
m = load_model(sys.argv[1]); m.eval()
enc = R.encode_eval_set(m, os.environ["RETRIEVAL_TEST_SHARDS"], R.retrieval_config("demo"), progress=False)
# re-tokenize not available: use encoded text tokens? need ids -> rebuild from loader
from codis.data.loaders import retrieval_eval_loader
b = next(iter(retrieval_eval_loader(os.environ["RETRIEVAL_TEST_SHARDS"], image_size=64, batch_size=100, tokenizer=m.tokenizer)))
ids, mask, t2i = b["input_ids"], b["attention_mask"], b["text_image_index"]
img_tok = m.image_tokens(b["image"])
def mlm(image_rows, seed):
    torch.manual_seed(seed)
    mids, labels = mask_tokens(ids, m.tokenizer, 0.15)
    with torch.no_grad():
        fused = m.text_encoder.fuse(m.text_encoder.encode_text(mids, mask), mask, img_tok[image_rows])
        logits = m.text_encoder.mlm_logits(fused)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100).item()
right = sum(mlm(t2i, s) for s in range(5)) / 5
wrong = sum(mlm(t2i.roll(17), s) for s in range(5)) / 5
print(sys.argv[1].split('/')[-2], "MLM loss with own image", round(right, 3), "with another image", round(wrong, 3))
