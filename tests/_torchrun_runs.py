"""Run under torchrun: train.main / sample.main once per entry of the JSON file given (one launch, one gloo group).

    torchrun --nproc_per_node=2 tests/_torchrun_runs.py RUNS.json   # RUNS.json: [["train"|"sample", args...], ...]

"train-opt-on-rank0": train.main where a rank other than 0 that reads the optimizer state of the checkpoint it resumes
from fails (issue 28 item 5: under FSDP rank 0 alone reads it and sends each rank its shards).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
import train  # noqa: E402



class NotHere(dict):
    """The optimizer state as a rank other than 0 holds it: any read raises."""

    def _read(self, *a, **k):
        raise RuntimeError(f"rank {dist.get_rank()} read the optimizer state of the checkpoint")
    __getitem__ = __iter__ = __len__ = __contains__ = get = items = keys = values = _read


def opt_on_rank0(argv):
    load = torch.load

    def guarded(*a, **k):
        out = load(*a, **k)
        if dist.get_rank() and isinstance(out, dict) and "opt" in out:
            out["opt"] = NotHere()
        return out
    torch.load = guarded
    try:
        return train.main(argv)
    finally:
        torch.load = load


with open(sys.argv[1]) as f:
    runs = json.load(f)
dist.init_process_group("gloo")  # train.main / sample.main leave a group they did not create alone
for script, *argv in runs:
    {"train": train.main, "sample": sample.main, "train-opt-on-rank0": opt_on_rank0}[script](argv)
dist.destroy_process_group()
