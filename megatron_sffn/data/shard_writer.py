"""Writing one webdataset shard, reproducibly and atomically.

Tar headers normally carry the wall-clock time and the writer's user; fixing
them makes a shard a pure function of its samples, which is what lets a
re-run or a resumed run be checked byte for byte.  A shard appears under its
final name only once complete, so a crash can leave at most a ``.tmp`` file.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from megatron_sffn.data.manifest import TOKEN_DTYPES, TOKEN_FIELDS, sample_key

TAR_USER = "sffn"
TAR_MODE = 0o444
TAR_MTIME = 0.0
TMP_SUFFIX = ".tmp"


def shard_name(split: str, index: int) -> str:
    """Relative path of shard ``index`` of ``split`` inside a dataset directory."""
    return f"{split}/{split}-{index:06d}.tar"


def encode_shard(samples: np.ndarray, first_index: int, token_dtype: str) -> bytes:
    """Tar bytes holding one ``<key>.tokens.u16``/``.u32`` member per row of ``samples``."""
    # Imported here: webdataset pulls in torch, which tokenizer worker processes never need.
    import webdataset as wds

    dtype = TOKEN_DTYPES[token_dtype]
    if samples.size and (samples.min() < 0 or samples.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids span [{samples.min()}, {samples.max()}], which does not fit {token_dtype}")
    field = TOKEN_FIELDS[token_dtype]
    buf = io.BytesIO()
    with wds.TarWriter(buf, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False) as tar:
        for i, row in enumerate(samples):
            tar.write({"__key__": sample_key(first_index + i), field: row.astype(dtype).tobytes()})
    return buf.getvalue()


def write_shard_atomic(path: Path, samples: np.ndarray, first_index: int, token_dtype: str) -> str:
    """Write the shard to ``path`` via a temp file and rename; returns its sha256."""
    data = encode_shard(samples, first_index, token_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()
