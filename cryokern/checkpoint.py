"""Checkpoints: one .npz that numpy.load alone can read, written atomically.

Arrays: the parameters by name (the chain's `layers.{i}.weight` (OIHW float32) and
`layers.{i}.bias`, the U-Net's `enc.{l}.conv0.weight` etc., model.py), the optimizer's buffers as
`optimizer.{name}` (torch's names, e.g. optimizer.momentum_buffer.layers.0.weight), and `meta`,
a 0-d string array holding JSON (network: the model's describe(), layouts, optimizer,
position, options). The file is written to a temporary name in the same directory, fsynced,
renamed over the old one and the directory fsynced: a crash or a full disk mid-write leaves
the previous checkpoint intact. Several names for one state (an epoch's file, best.npz,
last.npz) are one file written once, hard links renamed into place.
"""
import io
import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "cryokern-checkpoint"
VERSION = 1
LAYOUT = {"weight": "OIHW", "bias": "O", "images": "NCHW"}


def encode(params, optimizer_state, meta):
    """The checkpoint file's bytes."""
    arrays = dict(params)
    arrays.update({f"optimizer.{k}": v for k, v in optimizer_state.items()})
    meta = dict(meta, format=FORMAT, version=VERSION, layout=LAYOUT)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save(path, params, optimizer_state, meta):
    write([path], encode(params, optimizer_state, meta))


def write(paths, data):
    """`data` under every path (all in one directory): written and fsynced once, then each
    name made a hard link to it by a rename over the old file, and the directory fsynced once.
    Each name holds its old file or the whole new one at any moment. (Where hard links are
    not supported, each name gets a copy of its own.)"""
    directory = os.path.dirname(os.path.abspath(paths[0]))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for path in paths:
            _replace_with(tmp, path, data)
    finally:
        os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _replace_with(tmp, path, data):
    """Rename a second name of `tmp` (a hard link, else a fsynced copy) over `path`."""
    link = f"{tmp}.link"
    try:
        try:
            os.link(tmp, link)
        except OSError:
            with open(link, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(link, path)
    except BaseException:
        if os.path.exists(link):
            os.unlink(link)
        raise


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
        params = {k: z[k] for k in z.files if k != "meta" and not k.startswith("optimizer.")}
        state = {k[len("optimizer."):]: z[k] for k in z.files if k.startswith("optimizer.")}
    return params, state, meta
