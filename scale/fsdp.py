"""FSDP2 for train.py --fsdp: `shard` (every block its own unit + the root), start-up without a full copy per rank
and the host-memory peak it reaches.

Start-up (`start_up`): the student (a DualExpert in the detail stage), its EMA and the frozen teacher are built on
the meta device, sharded, given empty local shards on the training device, and each rank then reads only its own
rows of every parameter: straight from the safetensors files with plain reads (no mmap, whose touched pages would
count as this process's memory), the EMA on resume from the memory-mapped ema.safetensors. No rank holds a full copy:
per rank, host memory is its shards (on the GPU in a real run) plus one tensor's rows in flight. A fresh detail
adapter draws its LoRA A matrices from the same seeded CPU generator, in the same order, as `DualExpert` does on a
full model, so the start-up equals the full-copy one bit for bit (tests/test_fsdp.py). `DCM_FSDP_FULL_COPY=1` runs
the old start-up (every rank loads everything, then shards): the reference. Measured host memory:
`python tests/fsdp_host_memory.py` (docs/training.md).
"""
import math
import os
import resource
from copy import deepcopy

import torch
from safetensors import safe_open

import experts
import lora
import model as models
from storage import checkpoint
from storage import safetensors_io
from student import detail_on_teacher, shares_teacher, teacher_path


def shard(m, mesh, bf16=False):
    """FSDP2: every transformer block its own unit, the rest in the root's. bf16 (--dtype bf16): a mixed-precision
    policy, so fp32 masters are all-gathered in bf16 (half the traffic; autocast would cast them for the matmuls
    anyway) and gradients reduce-scattered in fp32; forward inputs keep their dtype (t in fp32: a bf16 t would move
    981.8 to 980 and change the routing and the time embedding)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16 else MixedPrecisionPolicy()
    for block in blocks(m):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(m, mesh=mesh, mp_policy=mp)


def blocks(m, lists=False):
    """The transformer blocks of m in the order they run (each its own FSDP unit; every other parameter is in the
    root's group): HunyuanVideo's text refiner blocks, then its double and single blocks; Wan's `blocks`. lists:
    (the name of the list holding it, block) pairs."""
    names = ("transformer_blocks", "single_transformer_blocks", "blocks", "refiner_blocks")
    listed = {id(b): name for mod in m.modules() for name in names for b in (getattr(mod, name, None) or ())}
    return [(listed[id(b)], b) if lists else b for b in m.modules() if id(b) in listed]  # modules(): registration
    # order, which is the forward's here


def device_mesh(args, world, device):
    """The FSDP mesh: 1-D over the world, or with --hsdp R (HSDP) 2-D, R replicas x world/R shards, so each block's
    all-gather and reduce-scatter stay inside a group of world/R consecutive ranks (torchrun numbers a node's ranks
    consecutively: a node when world/R is its GPU count) and only the gradient all-reduce crosses groups."""
    from torch.distributed.device_mesh import init_device_mesh  # ~1 s to import with DTensor: only FSDP needs it
    if args.hsdp == 1:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (args.hsdp, world // args.hsdp), mesh_dim_names=("replicate", "shard"))


def check_hsdp(args, world):
    """--hsdp R: with --fsdp, R >= 1 dividing the world size; ValueError (one line) before any work."""
    if args.hsdp < 1 or world % args.hsdp or (args.hsdp > 1 and not args.fsdp):
        raise ValueError(f"--hsdp {args.hsdp} must be >= 1, divide the world size {world} and go with --fsdp")


def host_peak_gib():
    """This process's peak resident host memory so far (ru_maxrss, KiB on Linux) in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _Folder:
    """A diffusers transformer folder (or a step folder holding one), read a row range at a time with plain reads of
    the safetensors files: no mmap, whose touched pages would count in this process's resident memory."""

    DTYPES = safetensors_io.DTYPES  # the safetensors header's dtype names

    def __init__(self, path):
        folder = checkpoint.transformer_folder(path)
        self.shapes = checkpoint._folder_tensors(folder)[0]  # also checks the index against the files
        self.entry, self.handle = {}, {}
        for shard in checkpoint._shard_files(folder):
            f = open(os.path.join(folder, shard), "rb")  # noqa: SIM115 - kept open until the reader is dropped
            head, start = safetensors_io.read_header(f)
            for k, e in head.items():
                self.entry[k], self.handle[k] = (e["dtype"], e["shape"], start + e["data_offsets"][0]), f

    def read(self, key, rows):
        """Rows rows[0] of tensor key (FSDP2 shards dim 0; the other dims whole), read straight from the file."""
        dtype, shape, start = self.entry[key]
        dt = self.DTYPES[dtype]
        if any((s.start, s.stop) != (0, n) for s, n in zip(rows[1:], shape[1:])):
            raise ValueError(f"{key}: only row ranges can be read, got {rows}")
        lo, hi = (rows[0].start, rows[0].stop) if shape else (0, 1)
        row = math.prod(shape[1:]) * dt.itemsize
        buf = bytearray((hi - lo) * row)
        f = self.handle[key]
        f.seek(start + lo * row)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{f.name}: truncated (tensor {key} ends past the end of the file)")
        t = torch.frombuffer(buf, dtype=dt)
        return t.view(hi - lo, *shape[1:]) if shape else t[0]


class _Tensors:
    """Tensors (or safetensors slices) by key, read row range by row range: the EMA (memory-mapped ema.safetensors), a
    converted original checkpoint, a detail adapter file."""

    def __init__(self, sd, shapes=None):
        self.sd, self.shapes = sd, shapes or {k: tuple(v.shape) for k, v in sd.items()}

    def read(self, key, rows):
        return self.sd[key][rows]


def _source(path):
    """_Folder of a diffusers folder, else the converted original-format file (mmap-loaded)."""
    return _Tensors(checkpoint._load_state_dict_file(path)[1]) if os.path.isfile(path) else _Folder(path)


def _rows(p):
    """The index of this rank's local shard inside the full tensor of parameter p (DTensor or plain)."""
    from torch.distributed.tensor import DTensor  # here, not at the top: ~1 s to import, only FSDP needs it
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if not isinstance(p, DTensor):
        return tuple(slice(0, n) for n in p.shape), p
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape)), p.to_local()


@torch.no_grad()
def fill(m, locate):
    """Fill each local shard of m (already given memory by to_empty) from locate(name) -> (source, key); None =
    left as it is (a fresh adapter's LoRA, drawn by _fresh_lora)."""
    for name, p in m.named_parameters():
        where = locate(name)
        if where is None:
            continue
        src, key = where
        rows, local = _rows(p)
        if local.numel():
            local.copy_(src.read(key, rows).to(local.dtype))


def _adapter_locate(m, base, detail, semantic):
    """name -> (source, key) for an adapter model (experts.DualExpert / SemanticLoRA): the backbone from `base`; the
    adapter it trains from its file `detail` (resume), or (fresh) its copies from what it copies and its LoRA None
    (drawn by `_fresh_lora`); a LoRA semantic expert's adapter from its file `semantic` (the semantic stage's own
    adapter: the file on resume, else fresh)."""
    table = {f"backbone.{k}": (base, k) for k in m.backbone.state_dict()}

    def adapter(lora_dict, copies_dict, file, copied):
        for n in m.lora_names:
            for attr, suffix in (("A", "lora_A"), ("B", "lora_B")):
                table[f"{lora_dict}.{lora.module_key(n)}.{attr}"] = (file, f"{n}.{suffix}.weight") if file else None
        for n in m.copy_names:
            for k in getattr(m, copies_dict)[lora.module_key(n)].state_dict():
                table[f"{copies_dict}.{lora.module_key(n)}.{k}"] = (file or copied, f"{n}.{k}")
    if isinstance(m, experts.SemanticLoRA):
        adapter("lora", "copies", semantic, base)
    else:
        if m.sem is not None:  # the frozen semantic adapter; the detail copies start as its copies
            adapter("semantic_lora", "semantic_copies", semantic, None)
        adapter("lora", "copies", detail, semantic or base)
    return table.get


@torch.no_grad()
def _fresh_lora(models_):
    """A fresh adapter's LoRA pairs, drawn as DualExpert draws them (same shapes, order and CPU generator), each
    written as its local shard into every model of models_ (the student and its EMA start equal)."""
    first = models_[0]
    for n in first.lora_names:
        key = lora.module_key(n)
        a = first.lora[key].A
        fresh = lora.LoRA(a.shape[1], first.lora[key].B.shape[0], first.rank, first.alpha)  # full, one at a time
        for mm in models_:
            for attr in ("A", "B"):
                rows, local = _rows(getattr(mm.lora[key], attr))
                if local.numel():
                    local.copy_(getattr(fresh, attr)[rows])


def _open_adapter(path, fmt, mine, want):
    """An adapter file as a _Tensors reader, checked like DualExpert.load_detail / SemanticLoRA.load: its metadata
    against `mine`, its keys against `want`."""
    info = lora.read_meta(path, fmt)
    old = {"semantic_lora": 0}  # what a detail file from before --semantic-lora left out
    bad = [f"{k}: file {info.get(k)!r} vs expert {v!r}" for k, v in mine.items() if info.get(k, old.get(k)) != v]
    if bad:
        raise ValueError(f"{path} was saved for a different expert: " + "; ".join(bad))
    f = safe_open(path, framework="pt")  # small (the adapter): its slices are read directly
    slices = {k: f.get_slice(k) for k in f.keys()}
    src = _Tensors(slices, {k: tuple(v.get_shape()) for k, v in slices.items()})
    if set(src.shapes) != set(want):
        raise ValueError(f"{path}: missing keys {sorted(set(want) - set(src.shapes))[:10]}, "
                         f"unexpected keys {sorted(set(src.shapes) - set(want))[:10]}")
    return src


def start_up(args, ckpt, state, mesh, device, tdtype, build, load):
    """(student, ema or None, teacher model or None), sharded over mesh, each rank holding only its own shards.

    build(ckpt, device): student.build_student; load(path, dtype, device): student.load (the full-copy reference path and
    a fresh, randomly initialised student, which has no file to read from: built in full, then sharded)."""
    want_ema = args.target_ema > 0 and args.stage != "teacher"
    shared, tpath = shares_teacher(args), teacher_path(args)  # shared: the teacher is the student's own base (BaseView)
    src = tpath if detail_on_teacher(args) else args.teacher if shared else ckpt or args.init or args.teacher
    if os.environ.get("DCM_FSDP_FULL_COPY") or not src:
        student = build(ckpt, torch.device("cpu"))
        ema = deepcopy(student).requires_grad_(False) if want_ema else None
        if ema is not None and state:
            ema.load_state_dict(state["ema"])
        tmodel = None if args.stage == "teacher" or shared else load(tpath, tdtype, torch.device("cpu"))
        for m in [student, ema, tmodel]:
            if m is not None:
                shard(m, mesh, args.dtype == "bf16")
        return student, ema, student.base_view() if shared else tmodel
    try:
        student = build(ckpt, "meta")
        ema = build(ckpt, "meta").requires_grad_(False) if want_ema else None
        adapted = isinstance(student, (experts.DualExpert, experts.SemanticLoRA))
        dual = isinstance(student, experts.DualExpert)
        base = _source(src)
        checkpoint.check_keys(student.backbone if adapted else student, base.shapes, src)
        detail = semantic = tmodel = teach = None
        if dual and ckpt:
            detail = _open_adapter(os.path.join(ckpt, "detail.safetensors"), lora.FORMAT, student.detail_meta(),
                                   student.detail_state())
        sem = student.sem if dual else student if adapted else None
        if sem is not None and (ckpt or dual):  # the semantic stage's file on resume; the detail stage's from --init
            folder = ckpt or checkpoint.resolve(args.init, "--init").folder
            semantic = _open_adapter(os.path.join(folder, "semantic.safetensors"), lora.SEMANTIC_FORMAT, sem.meta(),
                                     sem.state())
        if args.stage != "teacher" and not shared:
            tmodel = models.build_transformer(student.config, device="meta", dtype=tdtype)
            teach = base if tpath == src else _source(tpath)
            checkpoint.check_keys(tmodel, teach.shapes, tpath)
        for m in [student, ema, tmodel]:
            if m is not None:
                shard(m, mesh, args.dtype == "bf16")
                m.to_empty(device=device)  # DTensor params swapped in place: the DualExpert's grafted tree sees them
        if adapted:  # drawn even on resume (then overwritten): the generator ends where the full-copy start-up leaves it
            _fresh_lora([student] + ([ema] if ema is not None and not state else []))
        locate = _adapter_locate(student, base, detail, semantic) if adapted else (lambda name: (base, name))
        fill(student, locate)
        if ema is not None:
            fill(ema, (lambda name, sd=_Tensors(state["ema"]): (sd, name)) if state else locate)
        if tmodel is not None:
            fill(tmodel, lambda name: (teach, name))
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"cannot load the transformer in {src}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # noqa: BLE001 - truncated safetensors raise their own error type
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"cannot load the transformer in {src}: {str(e).splitlines()[0]}") from e
    return student, ema, student.base_view() if shared else tmodel
