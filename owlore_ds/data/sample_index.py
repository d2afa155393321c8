"""Sample indices of indexed datasets (a blend's order, each epoch's shuffle), built once and
kept as .npy files beside the data, which every rank then opens memory-mapped."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
from typing import Callable

import numpy as np

from owlore_ds import distributed as dist
from owlore_ds.data.indexed import write_atomic

log = logging.getLogger(__name__)

VERSION = "1"  # of how the indices are computed: a new one names new files


class SampleIndexCache:
    """Where the sample indices of the indexed datasets `prefixes` are kept: in the folder of
    the first prefix when this process can write there, else under `cache_dir`.

    A file's name holds a hash of all it depends on: the datasets' identity (path, size and
    modification time of each .idx and .bin), the caller's key (block size, weights, seed,
    epoch...) and VERSION, so a changed input names a new file and never reads a stale one.
    A missing file is built by the first rank of each host that misses it and written under
    a temporary name, then renamed: hosts sharing the folder that build it at the same time
    write the same bytes, and a reader sees a whole file or none. So no rank holds a
    corpus-sized index in memory once the file exists (the first build holds it once per
    node, briefly).
    """

    def __init__(self, prefixes: list[str], cache_dir: str):
        self.prefixes = prefixes
        self.cache_dir = cache_dir
        self.identity = [_identity(prefix) for prefix in prefixes]

    @functools.cached_property
    def folder(self) -> str:
        beside = os.path.dirname(os.path.abspath(self.prefixes[0]))
        if _writable(beside):
            log.info("sample indices of %s: kept beside the data, in %s", self.prefixes[0], beside)
            return beside
        fallback = os.path.join(os.path.expanduser(self.cache_dir), "sample_index")
        os.makedirs(fallback, exist_ok=True)
        log.info("sample indices of %s: %s is not writable, kept under --cache_dir in %s", self.prefixes[0], beside,
                 fallback)
        return fallback

    def path(self, name: str, key: dict) -> str:
        text = json.dumps({"version": VERSION, "data": self.identity, "key": key}, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return os.path.join(self.folder, f"{os.path.basename(self.prefixes[0])}.{name}.{digest}.npy")

    def array(self, name: str, key: dict, build: Callable[[], np.ndarray]) -> np.ndarray:
        """The index `name` for `key`, memory-mapped; built (and written) first if missing.

        Every rank calls this at the same point (a collective): of the ranks on one host that
        miss the file, the first builds it while the others wait, so a node holds one
        corpus-sized permutation at a time, not one per rank."""
        path = self.path(name, key)
        where = (socket.gethostname(), path)
        builders: dict = {}
        for r, (seen_where, exists) in enumerate(dist.all_gather_object((where, os.path.isfile(path)))):
            if not exists:
                builders.setdefault(tuple(seen_where), r)
        error = None
        if builders.get(where) == dist.rank():
            try:
                log.info("building sample index %s", path)
                write_atomic(path, lambda fh: np.save(fh, build()))
            except Exception as exc:
                error = exc
        if not dist.all_agree(error is None):
            if error is not None:
                raise error
            raise RuntimeError(f"building the sample index {path} failed on another rank")
        return np.load(path, mmap_mode="r")


def _identity(prefix: str) -> list:
    """What identifies an indexed dataset's content without reading it: its files' sizes and mtimes."""
    files = [f"{prefix}.idx", f"{prefix}.bin"]
    return [os.path.realpath(prefix)] + [[os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


def _writable(folder: str) -> bool:
    """Whether this process can create files in `folder` (tried, not asked of os.access, which
    answers for the real user id)."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".owlore-probe.")
    except OSError:
        return False
    os.close(handle)
    os.remove(probe)
    return True
