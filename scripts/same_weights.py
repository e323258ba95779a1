"""Does a code change alter training? Pretrain a few steps of one run config with two checkouts of
codis (say, before and after a refactor) and compare losses and final weights bit for bit.

    git worktree add /tmp/before <commit>
    .venv/bin/python scripts/same_weights.py --before /tmp/before --after . \\
        --run runs/store/pretrain/<key>/run.yaml --steps 30

Each checkout runs in its own process with its folder first on sys.path, one thread, on the run
config's own shards and initial weights; prints the losses and how many tensors differ.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import dataclasses, sys
sys.path.insert(0, sys.argv[1])
import torch
from codis.train import PretrainConfig, pretrain
torch.set_num_threads(1)
config = PretrainConfig.load(sys.argv[2])
steps = int(sys.argv[4])
config = dataclasses.replace(config, output_dir=sys.argv[3], train=dataclasses.replace(
    config.train, steps=steps, checkpoint_every=steps, log_every=1))
losses = []
path = pretrain(config, resume=False, progress=False, callback=lambda step, m: losses.append(m["loss"]))
state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
torch.save({"state": state, "losses": losses}, sys.argv[3] + "/same_weights.pt")
"""


def _train(root: Path, run: Path, folder: Path, steps: int) -> dict:
    import torch

    subprocess.run([sys.executable, "-c", _CHILD, str(root.resolve()), str(run.resolve()),
                    str(folder), str(steps)], check=True, cwd=folder)
    return torch.load(folder / "same_weights.pt", weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the old code")
    parser.add_argument("--after", type=Path, default=Path("."), help="checkout of the new code")
    parser.add_argument("--run", type=Path, required=True, help="a pretraining run.yaml")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as work:
        runs = {}
        for name, root in (("before", args.before), ("after", args.after)):
            folder = Path(work, name).resolve()
            folder.mkdir()
            runs[name] = _train(root, args.run, folder, args.steps)
    before, after = runs["before"], runs["after"]
    differ = [k for k in before["state"] if not torch.equal(before["state"][k], after["state"].get(k))]
    missing = sorted(set(before["state"]) ^ set(after["state"]))
    print(f"losses equal: {before['losses'] == after['losses']} "
          f"(last {before['losses'][-1]:.6f} / {after['losses'][-1]:.6f})")
    print(f"tensors: {len(before['state'])}; differing: {len(differ)}; only in one: {len(missing)}")
    sys.exit(1 if differ or missing or before["losses"] != after["losses"] else 0)


if __name__ == "__main__":
    main()
