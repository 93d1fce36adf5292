"""Checkpoints that are never lost: written to a temporary file in the same folder, then os.replace'd;
``latest`` (a one-line text file, also replaced atomically) names the newest; older ones are deleted
only after a newer one is complete. The dict format is documented in insloc/models/__init__.py."""
import glob
import importlib
import os
import pickle
import random
import re
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch

LATEST = "latest"
_NAME = re.compile(r"checkpoint_(\d+)\.pt$")
_RUN_FILE = re.compile(rf"^({LATEST}|checkpoint_\d+(\.superseded-\d+)?\.pt)$")


def is_run_file(name):
    """Whether a file name is one a run writes: a checkpoint (or one kept aside as superseded) or `latest`."""
    return _RUN_FILE.match(name) is not None


def pointed_step(pointer):
    """The step of the checkpoint a `latest` file names, or None if it is not such a file (unreadable, binary,
    other text)."""
    try:
        with open(pointer) as f:
            match = _NAME.search(f.read(4096).strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(match.group(1)) if match else None


def _umask():
    mask = os.umask(0o022)  # the only way to read it (Linux also shows it in /proc/self/status)
    os.umask(mask)
    return mask


def sync_folder(folder):
    """Makes the folder's entries (a rename, a new file) durable: without it a power loss can undo a rename
    that an unlink made after it outlives (the old checkpoint deleted, the new one's name lost). A no-op where
    a folder cannot be opened or synced (Windows, some network filesystems)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Calls write(f) on a temporary file next to path, syncs it to disk, renames it to path and syncs the
    folder: a reader sees the old file or the complete new one, also after a power loss. The file gets the
    mode open() would give it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    sync_folder(folder)


def remove_stale_temporaries(out_dir, min_age_s=300):
    """Deletes the temporary files of checkpoints (and `latest`) that a killed run left unfinished (atomic_write
    removes its own on an exception, but not when the process is killed), once untouched for ``min_age_s``
    seconds (a file still being written by another process is left); returns their paths."""
    now = time.time()
    stale = [p for pattern in (".tmp_checkpoint_*", ".tmp_" + LATEST + "*")
             for p in glob.glob(os.path.join(glob.escape(out_dir), pattern))
             if now - os.path.getmtime(p) >= min_age_s]
    for path in stale:
        os.remove(path)
    return stale


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"checkpoint_{step:08d}.pt")


def save_checkpoint(state, out_dir, keep=2):
    """Writes state (with state['step']) as out_dir/checkpoint_<step>.pt, points `latest` at it, and keeps
    it and the `keep` - 1 newest checkpoints of lower step, deleting older ones. Checkpoints of a higher step
    (the run before a run resumed from an older checkpoint, or unreadable ones) are left alone, and one of the
    same step is kept as checkpoint_<step>.superseded-<n>.pt (which nothing deletes or resumes from). Returns
    the path."""
    os.makedirs(out_dir, exist_ok=True)
    step = state["step"]
    path = checkpoint_path(out_dir, step)
    if os.path.exists(path):
        n = 1
        while os.path.exists(aside := path[:-len(".pt")] + f".superseded-{n}.pt"):
            n += 1
        try:  # a second name for the old file; `path` itself names a complete checkpoint throughout
            os.link(path, aside)
        except OSError:  # a filesystem without hard links: a copy, complete or none (a full disk)
            def copy(f):
                with open(path, "rb") as source:
                    shutil.copyfileobj(source, f, 1 << 20)
            atomic_write(aside, copy)
        warnings.warn(f"kept the checkpoint this one replaces as {aside}", stacklevel=2)
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(os.path.join(out_dir, LATEST), lambda f: f.write(os.path.basename(path).encode() + b"\n"))
    earlier = [p for s, p in numbered_checkpoints(out_dir) if s < step]
    for old in earlier[:max(len(earlier) - (max(keep, 1) - 1), 0)]:
        os.remove(old)
    return path


def numbered_checkpoints(out_dir):
    """[(step, path)] of the complete checkpoints in out_dir, by step."""
    return sorted((int(m.group(1)), p) for p in glob.glob(os.path.join(glob.escape(out_dir), "checkpoint_*.pt"))
                  if (m := _NAME.search(p)))


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first (by step)."""
    return [p for _, p in numbered_checkpoints(out_dir)]


def _candidates(out_dir):
    """Checkpoints to resume from, best first: the one `latest` names, then the others of lower step
    (newest first), then those of higher step (another run's)."""
    numbered = numbered_checkpoints(out_dir)
    pointer, named = os.path.join(out_dir, LATEST), None
    if os.path.isfile(pointer):
        named = pointed_step(pointer)
    if named is None or named not in {s for s, _ in numbered}:
        if named is not None:
            warnings.warn(f"{pointer} names a checkpoint that is gone; taking the newest by step", stacklevel=3)
        return [p for _, p in reversed(numbered)]
    return [p for s, p in numbered if s == named] + [p for s, p in reversed(numbered) if s < named] + \
        [p for s, p in numbered if s > named]


def find_latest(out_dir):
    """The checkpoint `latest` names, else the newest by step, else None."""
    found = _candidates(out_dir)
    return found[0] if found else None


def is_pointer(path):
    """Whether ``path`` is a run's ``latest`` file (a line of text naming a checkpoint), not a checkpoint."""
    return os.path.basename(path) == LATEST and os.path.isfile(path) and os.path.getsize(path) <= 4096 and \
        pointed_step(path) is not None


def resolve_checkpoint(path):
    """The checkpoint file ``path`` stands for: itself, or for a run folder or its ``latest`` pointer file, the
    checkpoint ``latest`` names (else the newest by step), as ``--resume auto`` takes it. FileNotFoundError
    where there is none."""
    folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".") if is_pointer(path) else None
    if folder is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        return path
    found = find_latest(folder)
    if found is None:
        raise FileNotFoundError(f"{path}: a folder without checkpoints (checkpoint_<step>.pt)")
    return found


def numpy_rng_globals():
    """What torch.load(weights_only=True) must allow besides tensors and plain values to read a checkpoint:
    the numpy RNG state's array and dtype."""
    # numpy RNG state in the checkpoint's "rng" entry: plain arrays, safe to allow. numpy 2 pickles them with
    # numpy._core.multiarray._reconstruct, numpy 1.x with numpy.core.multiarray._reconstruct: allow both
    # names, so a checkpoint written under either loads under either. Imported by name: numpy 1.26's
    # numpy._core has no multiarray attribute, and numpy 2's numpy.core warns.
    try:
        reconstruct = importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # numpy < 1.26
        reconstruct = importlib.import_module("numpy.core.multiarray")._reconstruct
    names = [(reconstruct, f"{module}._reconstruct") for module in ("numpy._core.multiarray", "numpy.core.multiarray")]
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)]
    return [*names, np.ndarray, np.dtype, *dtypes]


def unsafe_globals(path):
    """The globals a file names that torch.load(weights_only=True) does not load ([] if it cannot tell)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []


def load_checkpoint(path):
    """The checkpoint dict at `path`, read with weights_only=True (tensors, plain values and the numpy RNG
    state: unpickling runs no code the file names); a file that cannot be read, or holds other objects, gives
    a RuntimeError naming it."""
    try:
        with torch.serialization.safe_globals(numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = unsafe_globals(path) if isinstance(e, pickle.UnpicklingError) else []
        if unsafe:  # (torch's own message runs to a page)
            raise RuntimeError(f"cannot read checkpoint {path}: it holds Python objects other than tensors, plain "
                               f"values and numpy's RNG state ({', '.join(unsafe[:4])}), which are not unpickled "
                               "(a checkpoint of insloc pretrain holds none)") from e
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def load_latest_checkpoint(out_dir):
    """(checkpoint dict, path) of the newest readable checkpoint in out_dir (see find_latest), or (None, None)
    when there is none. An unreadable one (a damaged disk; a crash cannot leave one, see atomic_write) is
    skipped with a warning naming it, for the next older one."""
    failures = []
    for path in _candidates(out_dir):
        try:
            ckpt = load_checkpoint(path)
        except RuntimeError as e:
            warnings.warn(f"{e}; trying an older checkpoint", stacklevel=2)
            failures.append(path)
            continue
        return ckpt, path
    if failures:
        raise RuntimeError(f"no checkpoint in {out_dir} could be read: {', '.join(failures)}")
    return None, None


def rng_state(device=None):
    """The RNG states a resumed run restores. CUDA: this process's GPU only (``device``, default the current
    one): another machine may have fewer GPUs, and shuffle-BN's permutation is rank 0's, broadcast."""
    cuda = None
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        cuda = torch.cuda.get_rng_state(device if device is not None else torch.cuda.current_device())
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state, device=None):
    """Restores rng_state()'s dict; its CUDA state goes to ``device`` (default the current GPU). A checkpoint
    of an older version holds one CUDA state per GPU that was visible: the one of this GPU's index is taken
    (none if that machine had fewer)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        index = torch.device(device).index if device is not None else None
        index = torch.cuda.current_device() if index is None else index
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, index)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
