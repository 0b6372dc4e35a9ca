"""Every way a student leaves the project (one command, one subcommand per format).

    python export.py authors --ckpt out/detail --out DCM_MINE/transformer [--dtype bf16]

authors: a LoRA detail expert trained here (`--lora-targets authors`, HunyuanVideo or Wan) -> the authors' released
single-file layout (storage/released.py, DESIGN sec. 7), which their inference scripts and our sample.py load.
"""
import argparse
import os
import sys

import torch

import experts
import solver
from storage import checkpoint, released
from tools import checks


def authors(args):
    """A train.py detail run / step folder -> the authors' layout."""
    src = checkpoint.resolve(args.ckpt, "--ckpt")
    adapter = args.detail or src.detail
    if src.kind != "step" or not adapter or not os.path.isfile(adapter):
        raise released.ReleasedError(f"--ckpt {args.ckpt}: not a LoRA detail-stage run or step folder (no detail adapter"
                                     f"{'' if not adapter else ' ' + adapter})")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "keep": None}[args.dtype]
    semantic = checkpoint.load_transformer(src.weights)
    if src.semantic:  # --semantic-lora: the semantic expert is its base + adapter, merged (fp32 sum)
        semantic = experts.SemanticLoRA.from_file(semantic, src.semantic).merge_into_base()
    expert = experts.DualExpert.from_detail(semantic, adapter, semantic_merged=bool(src.semantic))
    grid = solver.flow_grid(50, 17.0)  # the authors' distillation grid for both released students
    if expert.arch in released.LAYOUTS and (bad := released.routing_disagreements(expert, grid)):
        print(f"warning: their scripts route int(t) <= {released.LAYOUTS[expert.arch]['threshold']} to the detail "
              f"expert; this expert's boundary_t {expert.boundary_t:.3f} differs at grid t {bad}", file=sys.stderr)
    released.export_released(expert, args.out, dtype)
    c = expert.param_counts()
    print(f"{src.folder} -> {args.out}: {expert.arch}, {len(expert.lora_names)} LoRA linears (r {expert.rank}, "
          f"alpha {expert.alpha:g}), adapter {c['adapter'] / 1e6:.2f} M params")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("authors", help="a detail expert trained here -> the authors' single-file layout")
    e.add_argument("--ckpt", required=True, help="train.py detail run or step folder")
    e.add_argument("--detail", help="adapter file (default: the step's detail.safetensors)")
    e.add_argument("--out", required=True, help="output transformer/ folder")
    e.add_argument("--dtype", default="keep", choices=("keep", "fp32", "bf16"), help="their release is bf16")
    args = p.parse_args(argv)
    return checks.cli(lambda _: {"authors": authors}[args.cmd](args))  # bad input: one line, exit 2


if __name__ == "__main__":
    main()
