"""Checkpoints that are never lost: written to a temporary file in the same folder, then os.replace'd;
``latest`` (a one-line text file, also replaced atomically) names the newest; older ones are deleted
only after a newer one is complete. The dict format is documented in insloc/models/__init__.py."""
import glob
import os
import random
import re
import tempfile

import numpy as np
import torch

LATEST = "latest"
_NAME = re.compile(r"checkpoint_(\d+)\.pt$")


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"checkpoint_{step:08d}.pt")


def save_checkpoint(state, out_dir, keep=2):
    """Writes state (with state['step']) as out_dir/checkpoint_<step>.pt, points `latest` at it, and
    deletes all but the newest `keep` checkpoints. Returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = checkpoint_path(out_dir, state["step"])
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(os.path.join(out_dir, LATEST), lambda f: f.write(os.path.basename(path).encode() + b"\n"))
    for old in list_checkpoints(out_dir)[:-max(keep, 1)]:
        os.remove(old)
    return path


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first (by step)."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(out_dir, "checkpoint_*.pt"))
             if (m := _NAME.search(p))]
    return [p for _, p in sorted(found)]


def find_latest(out_dir):
    """The checkpoint `latest` names, else the newest by step, else None."""
    pointer = os.path.join(out_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(out_dir, f.read().strip())
        if os.path.isfile(path):
            return path
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path):
    # weights_only=False: the dict holds RNG states (numpy, python) besides tensors; only load your own files
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
