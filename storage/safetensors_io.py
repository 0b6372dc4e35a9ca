"""safetensors files written by this project: the same bytes as `safetensors.torch.save_file`, hashed on their way to
the disk (storage/integrity.py `hashed`), so a checkpoint's checksums never read its files back (issue 28, item 4).

The format: an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape", "data_offsets"}} (and
"__metadata__": str -> str) padded with spaces to a multiple of 8, then the tensors' raw bytes, ordered by dtype (8-byte
ones first) and by name within a dtype, as the reference writer orders them (tests/test_checkpoint.py compares the bytes).
"""
import json
import os
import struct

import torch

from storage import integrity

DTYPES = {"I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "I32": torch.int32, "BF16": torch.bfloat16,
          "F16": torch.float16, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}  # the header's dtype names, in the reference writer's file order
_ORDER = {v: i for i, v in enumerate(DTYPES.values())}


def header(tensors, metadata=None):
    """(header bytes with its length prefix, the tensors in file order) of a safetensors file holding `tensors`."""
    order = sorted(tensors.items(), key=lambda kv: (_ORDER.get(kv[1].dtype, -1), kv[0]))
    head, off = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}), 0  # sorted: the reference
    # writes its metadata in hash-map order (random per process), so only one entry compares byte for byte
    for k, v in order:
        if v.dtype not in NAMES:
            raise ValueError(f"{k}: dtype {v.dtype} has no safetensors name")
        n = v.numel() * v.element_size()
        head[k] = {"dtype": NAMES[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(head, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, order


def spec(v):
    """A meta tensor of v's shape and dtype: what save_each needs to know of a tensor before it is made (a DTensor's
    shape is the whole tensor's)."""
    return torch.empty(v.shape, dtype=v.dtype, device="meta")


def save(tensors, path, metadata=None):
    """Write `tensors` (name -> tensor, any device) to `path` atomically (a temp file, then a rename: a crash never
    leaves half a file), hashed as it is written; the file gets the user's umask like any other."""
    save_each({k: spec(v) for k, v in tensors.items()}, tensors.__getitem__, path, metadata)


def save_each(specs, produce, path, metadata=None):
    """save() of tensors made one at a time: specs = name -> a meta tensor of its shape and dtype, produce(name) the
    tensor, asked for in the file's order, so no more than one is held. path None: produce every tensor in that order
    and write nothing (the other ranks of a gather, whose collectives must match the writing rank's)."""
    head, order = header(specs, metadata)
    if path is None:
        for k, _ in order:
            produce(k)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with integrity.hashed(tmp) as f:
            f.write(head)
            for k, spec in order:
                b = produce(k).detach().to("cpu").contiguous().reshape(-1)  # [numel]: its bytes in C order
                if (b.dtype, b.numel()) != (spec.dtype, spec.numel()):
                    raise ValueError(f"{k}: made {b.dtype} x {b.numel()}, the header says {spec.dtype} x {spec.numel()}")
                if b.numel():
                    f.write(memoryview(b.view(torch.uint8).numpy()))
        integrity.as_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_header(f):
    """(the header's tensor entries {name: {"dtype", "shape", "data_offsets"}}, the byte where the data starts) of an
    open safetensors file, read from its start."""
    n = struct.unpack("<Q", f.read(8))[0]
    return {k: e for k, e in json.loads(f.read(n)).items() if k != "__metadata__"}, 8 + n


def mapped(path):
    """{name: tensor} of a safetensors file, memory-mapped (private: pages are read when touched, a write stays in
    memory): a 13B model's AdamW moments cost no memory until they are used, and only on the ranks that use them."""
    with open(path, "rb") as f:
        head, start = read_header(f)
    st = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    out = {}
    for k, e in head.items():
        dt, (a, b) = DTYPES[e["dtype"]], e["data_offsets"]
        t = torch.empty(0, dtype=dt)
        out[k] = t.set_(st, (start + a) // t.element_size(), e["shape"]) if b > a else torch.empty(e["shape"], dtype=dt)
    return out
