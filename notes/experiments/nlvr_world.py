"""A demo world with the demo recipe's evaluation splits (so NLVR²'s 400 test pairs are the
demo's, byte for byte) and PAIRS NLVR² training pairs; writes its NLVR² train and test shards.

    python notes/experiments/nlvr_world.py PAIRS OUT     # then NLVR_TRAIN=OUT/train NLVR_TEST=OUT/test
"""
import json, sys, time
import codis
from codis.data.demo_world import DemoWorldConfig, generate_demo_world
from codis.data.shards import write_shards

pairs, root, start = int(sys.argv[1]), sys.argv[2], time.time()
# Splits generated before NLVR² (retrieval, VQA) keep the demo recipe's sizes; later ones are cut.
config = DemoWorldConfig(seed=0, image_size=64, pretrain_images=10,
                         retrieval_images={"train": 200, "val": 50, "test": 100},
                         vqa_images={"train": 600, "val": 100, "test": 20}, questions_per_image=3,
                         nlvr_pairs={"train": pairs, "dev": 100, "test": 400},
                         ve_images={"train": 10, "dev": 10, "test": 10})
generate_demo_world(root + "/world", config, progress=False)
for split in ("train", "test"):
    rows = json.load(open(f"{root}/world/nlvr/{split}.json"))
    write_shards(rows, root + "/world", f"{root}/{split}", kind="nlvr", samples_per_shard=1000, progress=False)
print(f"{pairs} NLVR² training pairs in {time.time() - start:.0f} s")
