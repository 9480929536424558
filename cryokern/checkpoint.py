"""Checkpoints: one .npz that numpy.load alone can read, written atomically.

Arrays: `layers.{i}.weight` (OIHW float32), `layers.{i}.bias`, the optimizer's buffers as
`optimizer.{name}` (torch's names, e.g. optimizer.momentum_buffer.layers.0.weight), and `meta`,
a 0-d string array holding JSON (network, layouts, optimizer, position, options). The file is
written to a temporary name in the same directory, fsynced, renamed over the old one and the
directory fsynced: a crash or a full disk mid-write leaves the previous checkpoint intact.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "cryokern-checkpoint"
VERSION = 1
LAYOUT = {"weight": "OIHW", "bias": "O", "images": "NCHW"}


def save(path, params, optimizer_state, meta):
    arrays = dict(params)
    arrays.update({f"optimizer.{k}": v for k, v in optimizer_state.items()})
    meta = dict(meta, format=FORMAT, version=VERSION, layout=LAYOUT)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path):
    """(params, optimizer_state, meta) from a checkpoint; ValueError if it is not one (the
    caller names the file)."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a .npz checkpoint")
    with np.load(path) as z:
        if "meta" not in z.files:
            raise ValueError("not a cryokern checkpoint (no 'meta' entry)")
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError("not a cryokern checkpoint")
        params = {k: z[k] for k in z.files if k.startswith("layers.")}
        state = {k[len("optimizer."):]: z[k] for k in z.files if k.startswith("optimizer.")}
    return params, state, meta
