import os
import sys

import torch

# the library is a flat set of top-level modules (nanoGPT style): make them importable from tests/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# one thread for the whole session: exact-equality checks (save/load, parity at 0.0) must not depend on
# how a reduction was split across threads, and CI has 2 cores anyway
torch.set_num_threads(1)

# hub ids (storage/checkpoint.hub_path) read the local cache only: the tests never reach the network
os.environ["HF_HUB_OFFLINE"] = "1"
