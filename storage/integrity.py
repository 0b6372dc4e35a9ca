"""Checkpoint integrity: a sha256 of every file of a step folder, recorded when the folder is written and
checked before it is trusted (resume, sample.py --ckpt, --init / --teacher step folders).

A same-size corruption (a flipped block on disk, a bad copy) passes every structural check — the
safetensors header and the zip directory still read — so only a digest of the bytes catches it.
Interrupted saves leave only a `.step_*.tmp-*` folder (the step folder appears by rename): clean_tmp removes
them when the run starts again. `CHECKSUMS` lives in the step folder:
{"algorithm": "sha256", "files": {relative path: {"size", "sha256"}}}.
Cost: sha256 reads each byte once: 0.6 s per 100 MB measured on a loaded 2-core CPU, where writing the
same 100 MB with safetensors took 0.9-1.8 s; `--verify none` skips the check for very large checkpoints. A save
pays nothing more than the hashing: its files are hashed as they are written (`hashed`) and write_checksums takes
those digests instead of reading the files back.
"""
import hashlib
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager

CHECKSUMS = "checksums.json"
ALGORITHM = "sha256"
_CHUNK = 1 << 22
TMP = re.compile(r"\.step_\d{7}\.tmp-.*")  # checkpoint.atomic_dir's temp folders: left only by a killed save
_verified = set()  # (folder, every file's size and mtime) already verified in this process: read once, not twice
_written = {}  # (device, inode, size, mtime) of a file written through `hashed` -> its digest (a rename keeps the key)


def _key(st):
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _Tee:
    """A binary file whose written bytes also go through a hash."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, b):
        self.h.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


@contextmanager
def hashed(path):
    """open(path, "wb") whose bytes are hashed on their way out; the digest is recorded for write_checksums (by
    the file's inode, size and mtime, so a later rename keeps it and a later write voids it): no read-back."""
    h = hashlib.new(ALGORITHM)
    with open(path, "wb") as f:
        yield _Tee(f, h)
    _written[_key(os.stat(path))] = h.hexdigest()


def digest(path):
    """sha256 hex digest of a file, read 4 MiB at a time into one buffer (a new bytes object per read can leave
    allocator pages resident after the hashing: a memory-mapped dataset then looked like it had been copied)."""
    h, buf = hashlib.new(ALGORITHM), bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(folder):
    """Every file under folder, as sorted relative paths (the checksum file itself excluded)."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(p for p in out if p != CHECKSUMS)


def digests(paths):
    """{path: sha256} of several files, hashed side by side (hashlib releases the GIL on large updates): a 13B
    checkpoint's shards take about one file's time per core instead of their sum on rank 0."""
    from concurrent.futures import ThreadPoolExecutor
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max(1, min(8, cores, len(paths)))) as pool:
        return dict(zip(paths, pool.map(digest, paths)))


def write_checksums(folder):
    """Record size and digest of every file of `folder` in folder/CHECKSUMS (call before the folder goes live); a
    file written through `hashed` (and not touched since) keeps the digest taken as it was written."""
    rel = _files(folder)
    sha = {os.path.join(folder, p): _written.pop(_key(os.stat(os.path.join(folder, p))), None) for p in rel}
    sha |= digests([p for p, d in sha.items() if d is None])
    files = {p: {"size": os.path.getsize(os.path.join(folder, p)), ALGORITHM: sha[os.path.join(folder, p)]}
             for p in rel}
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        json.dump({"algorithm": ALGORITHM, "files": files}, f, indent=1)
    return files


def verify(folder, skip=()):
    """[] if every file recorded in folder/CHECKSUMS is there with its size and digest (or no record exists:
    a folder written before checksums), else the problems, one string per file."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        return []
    key = (os.path.abspath(folder), skip) + tuple((p, os.stat(os.path.join(folder, p)).st_size,
                                              os.stat(os.path.join(folder, p)).st_mtime_ns) for p in _files(folder))
    if key in _verified:
        return []
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{CHECKSUMS} (unreadable)"]
    bad, hash_ = [], []
    for rel, want in files.items():
        if rel in skip:
            continue
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            bad.append(f"{rel} (missing)")
        elif os.path.getsize(p) != want["size"]:
            bad.append(f"{rel} (size {os.path.getsize(p)} != recorded {want['size']})")
        else:
            hash_.append(rel)
    sha = digests([os.path.join(folder, rel) for rel in hash_])
    bad += [f"{rel} ({ALGORITHM} mismatch: corrupted)" for rel in hash_
            if sha[os.path.join(folder, rel)] != files[rel][ALGORITHM]]
    if not bad:
        _verified.add(key)
    return bad


def clean_tmp(out):
    """Remove the temp folders of saves that were killed midway (never a live checkpoint) -> their names."""
    names = sorted(d for d in os.listdir(out) if TMP.fullmatch(d)) if os.path.isdir(out) else []
    for d in names:
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)
        print(f"removed {os.path.join(out, d)}: the leftover of an interrupted save", file=sys.stderr)
    return names


def umask():
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask(path, directory=False):
    """chmod a file (0666) or folder (0777) to what the user's umask gives ordinary files: safetensors and
    mkdtemp write 0600 / 0700."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())
