"""Run under torchrun: train.main / sample.main once per entry of the JSON file given (one launch, one gloo group).

    torchrun --nproc_per_node=2 tests/_torchrun_runs.py RUNS.json   # RUNS.json: [["train"|"sample", args...], ...]
"""
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
import train  # noqa: E402

with open(sys.argv[1]) as f:
    runs = json.load(f)
dist.init_process_group("gloo")  # train.main / sample.main leave a group they did not create alone
for script, *argv in runs:
    {"train": train.main, "sample": sample.main}[script](argv)
dist.destroy_process_group()
