"""The run directory and its checkpoints: the only module that knows the on-disk layout.

    <run>/config.yaml  metrics.jsonl  model.safetensors  model.json  summary.json  status.json  .lock  .progress
    <run>/checkpoints/step_00000100/   model.safetensors  optimizer.safetensors  optimizer.json
                                       rng.safetensors  state.json  model.json  [scaler.json]  [ema.safetensors]  manifest.json
    <run>/checkpoints/step_00000100/   (--sharding fsdp) shards/shard-0000K-model-00001-of-00001.safetensors (K = rank + 1)
                                       (one per rank: its dim-0 shards of model.<name>, optim.<name>.<state> and
                                       [ema.<name>], offsets in the safetensors header) sharding.json (tied
                                       names, whether ema.* exist)
                                       optimizer.json rng.safetensors state.json model.json manifest.json
    <run>/checkpoints/best/            a copy (hard links) of the best checkpoint + best.json

Only safetensors and JSON, no pickle on any path: sharded checkpoints go through torch.distributed.checkpoint
(DCP) with its Hugging Face safetensors writer/reader and tensors only (DCP's default format pickles its
.metadata and non-tensor values; this one writes no .metadata and we keep every non-tensor in JSON). A checkpoint is written into a temporary directory
beside the others, fsynced, given a manifest with the SHA-256 of every file, then renamed: a directory
named step_* is always complete. Old checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
import struct
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from disttrain import safe_io
from disttrain.errors import TrainingError, UsageError, one_line

FORMAT = "disttrain-checkpoint"
VERSION = 1
STEP_RE = re.compile(r"^step_(\d{8})$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
REQUIRED = ("state.json", "model.json")  # and model.safetensors, or shards/ for a sharded checkpoint
SHARDS = "shards"  # key of the per-rank shards in `files`/`load_checkpoint`, and their directory
SHARDING_JSON = "sharding.json"  # beside shards/: {"tied": {name: name stored in its place}}
MAX_JSON_BYTES = safe_io.MAX_JSON
MAX_MANIFEST_BYTES = safe_io.MAX_SMALL


MARKER = ".disttrain-run"  # written first into every run directory: what --overwrite may remove is ours
TOP_FILES = ("config.yaml", "metrics.jsonl", "model.safetensors", "model.json", "summary.json", "status.json",
             ".lock", MARKER, ".progress")
TOP_DIRS = ("checkpoints", "tensorboard", "plots")
OURS_IN_CHECKPOINTS = re.compile(r"^(step_\d{8}|best|\.(tmp|old)-(step_\d{8}|best))$")
TEMP_NAME = re.compile(r"^\.[A-Za-z0-9_.-]+\.tmp\d*$")  # write_atomic's and metrics' temporary files


class RunDir:
    """Paths of a run directory, the lock, and the exported model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.model = self.path / "model.safetensors"
        self.model_meta = self.path / "model.json"
        self.summary = self.path / "summary.json"
        self.status = self.path / "status.json"
        self.progress = self.path / ".progress"  # the last finished step (recovery.Progress)
        self.best = self.checkpoints / "best"
        self.tensorboard = self.path / "tensorboard"
        self.marker = self.path / MARKER
        self._lock_fd: int | None = None
        self._created_dirs: list[Path] = []  # by lock(): abandon() removes them (and the lock file) again
        self._created_lock = False

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def step_dirs(self) -> list[Path]:
        """Complete-by-name checkpoints, newest first (never through a link)."""
        if not safe_io.check_entry(self.checkpoints, "dir"):
            return []
        found = [p for p in self.checkpoints.iterdir() if STEP_RE.match(p.name) and safe_io.check_entry(p, "dir")]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def has_history(self) -> bool:
        return self.metrics.exists() or bool(self.step_dirs()) or self.model.exists()

    def check_layout(self) -> None:
        """UsageError if any entry disttrain writes, deletes or reads is a link or of the wrong kind (a
        `checkpoints` link would make start-up delete in its target, a `.metrics.jsonl.tmp` link would
        receive the metrics): checked before anything is read or written."""
        if not safe_io.check_entry(self.path, "dir"):
            return
        for name in TOP_FILES:
            safe_io.check_entry(self.path / name, "file")
        for name in TOP_DIRS:
            safe_io.check_entry(self.path / name, "dir")
        for p in self.path.iterdir():
            if TEMP_NAME.match(p.name) or p.name.startswith(".disttrain-trash"):
                safe_io.check_entry(p, "file" if TEMP_NAME.match(p.name) else "dir")
        if safe_io.check_entry(self.checkpoints, "dir"):
            for p in self.checkpoints.iterdir():
                if OURS_IN_CHECKPOINTS.match(p.name):
                    safe_io.check_entry(p, "dir")

    def entries(self) -> list[str]:
        """Names in the directory other than the lock (empty if it does not exist)."""
        if not safe_io.check_entry(self.path, "dir"):
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != ".lock")

    def is_run(self) -> bool:
        """Written by disttrain: the marker, or (runs from before the marker) history of a run."""
        return self.marker.exists() or self.has_history()

    def mark(self) -> None:
        """The run-identity marker: written once, before anything else of the run."""
        if not safe_io.check_entry(self.marker, "file"):
            safe_io.write_json(self.marker, {"format": "disttrain-run", "version": 1, "created": time.time(),
                                             "host": socket.gethostname()})

    def lock(self, wait_s: float = 5.0) -> None:
        """Hold an exclusive flock for the life of this process. The kernel drops it when the process dies
        (even by kill -9), so a stale lock is simply taken over. Taken before anything about the directory
        is decided, so of two runs started together the second sees what the first wrote; writes nothing
        into an existing lock file (claim() does, once the run is accepted). Creates the directory and the
        lock file if needed; abandon() removes them again when the run is refused."""
        self._created_dirs = [d for d in (self.path, *self.path.parents) if not (d.exists() or d.is_symlink())]
        self.path.mkdir(parents=True, exist_ok=True)
        safe_io.check_entry(self.path, "dir")
        self._created_lock = not safe_io.check_entry(self.path / ".lock", "file")
        fd = safe_io.open_regular(self.path / ".lock", os.O_RDWR | os.O_CREAT)
        self._flock(fd, fcntl.LOCK_EX, wait_s)
        self._lock_fd = fd

    def claim(self) -> None:
        """The run is accepted (main process, lock held): name the holder in the lock and mark the
        directory as a disttrain run before anything else is written."""
        assert self._lock_fd is not None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._created_dirs, self._created_lock = [], False
        self.mark()

    def abandon(self) -> None:
        """Undo lock() of a run refused before it wrote anything: remove the lock file if this process
        created it, and the directory if it created that too and nothing else is there; release the lock."""
        if self._lock_fd is None:
            return
        try:
            if self._created_lock:
                os.unlink(self.path / ".lock")
                for d in self._created_dirs:  # deepest first; stops at the first one not empty
                    d.rmdir()
        except OSError:
            pass
        self.unlock()

    def wait_unlocked(self, wait_s: float = 5.0) -> None:
        """Wait, writing nothing, until no live run holds the directory. Needed before reading checkpoints:
        workers orphaned by a killed launcher may still be saving for up to a second
        (distributed.start_parent_watchdog), and a resume must not read a checkpoint they are pruning."""
        if not safe_io.check_entry(self.path / ".lock", "file"):
            return
        fd = safe_io.open_regular(self.path / ".lock")
        self._flock(fd, fcntl.LOCK_SH, wait_s)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _flock(self, fd: int, op: int, wait_s: float) -> None:
        """flock(fd, op), retrying for wait_s seconds; UsageError naming the holder if it stays taken."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise UsageError(f"--output-dir {self.path}: another live run holds it ({holder or 'unknown'})") from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def foreign_entries(self) -> list[str]:
        """What --overwrite would have to delete but disttrain did not write (by name)."""
        bad = [n for n in self.entries() if n not in TOP_FILES + TOP_DIRS and not TEMP_NAME.match(n)]
        if safe_io.check_entry(self.checkpoints, "dir"):
            bad += [f"checkpoints/{p.name}" for p in self.checkpoints.iterdir() if not OURS_IN_CHECKPOINTS.match(p.name)]
        if safe_io.check_entry(self.tensorboard, "dir"):
            bad += [f"tensorboard/{p.relative_to(self.tensorboard)}" for p in self.tensorboard.rglob("*")
                    if not (p.is_dir() and not p.is_symlink()) and not p.name.startswith("events.out.tfevents.")]
        plots = self.path / "plots"
        if safe_io.check_entry(plots, "dir"):
            bad += [f"plots/{p.name}" for p in plots.iterdir() if not (p.suffix == ".png" and p.is_file()
                                                                      and not p.is_symlink())]
        return sorted(bad)

    def clear(self) -> None:
        """--overwrite: remove a previous run's outputs, only those (by name: see foreign_entries), and all
        or nothing: everything is first renamed into a trash folder inside the run (renames within one
        file system), renamed back if one rename fails (a read-only checkpoints/), then deleted."""
        where = self.path.resolve()
        if where == Path(where.anchor) or where == Path.home().resolve():
            raise UsageError(f"--overwrite --output-dir {self.path}: refusing a file-system root or the home directory")
        foreign = self.foreign_entries()
        if foreign:
            raise UsageError(f"--overwrite: {self.path} holds files disttrain did not write "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); move them away or "
                             "choose another --output-dir")
        trash = self.path / f".disttrain-trash-{os.getpid()}"
        victims = [self.path / n for n in self.entries() if n not in (MARKER,) and not n.startswith(".disttrain-trash")]
        if not victims:
            return
        trash.mkdir()
        moved: list[Path] = []
        try:
            for v in victims:
                os.rename(v, trash / v.name)
                moved.append(v)
        except OSError as e:
            for v in reversed(moved):
                os.rename(trash / v.name, v)
            trash.rmdir()
            raise UsageError(f"--overwrite: cannot remove {v} ({e.strerror}); nothing was removed") from None
        shutil.rmtree(trash, ignore_errors=True)
        safe_io.fsync_dir(self.path)


# --------------------------------------------------------------------------- small file helpers


def _fsync_dir(path: Path) -> None:
    safe_io.fsync_dir(path)


def umask() -> int:
    """The process umask, read without changing it (Linux /proc; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: str | Path) -> None:
    """Give a file the mode a plain open() would have (0666 minus the umask): safetensors writes 0600."""
    os.chmod(path, 0o666 & ~umask())


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename (safe_io.write_atomic: never through a link)."""
    safe_io.write_atomic(path, data)


def write_json(path: Path, obj: Any) -> None:
    safe_io.write_json(path, obj)


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A regular file (no link, no FIFO), at most `limit` bytes, nested at most safe_io.MAX_DEPTH."""
    return safe_io.read_json(path, limit)


def _sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    fd = safe_io.open_regular(path)
    with os.fdopen(fd, "rb") as f:
        n = 0
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            n += len(chunk)
            if limit is not None and n > limit:
                raise ValueError(f"{path}: larger than the manifest says")
    return h.hexdigest()


SHARED_KEY = "disttrain.shared"  # safetensors metadata: {dropped name: the name stored in its place}


def dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once (safetensors refuses tensors that share memory). Names that are the same view
    of one storage (a tied embedding and output projection) keep one entry, the lexicographically first
    name, as `safetensors.torch.save_model` does, so its `load_model` also restores them; the others are
    returned as {dropped name: kept name}. A tensor that only overlaps another (a slice) is stored as a copy.
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for k, v in tensors.items():
        if v.numel():
            groups.setdefault((str(v.device), v.untyped_storage().data_ptr()), []).append(k)
    out = dict(tensors)
    aliases: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        names.sort()
        for k in names:
            if k not in aliases:
                for n in names:
                    if n > k and n not in aliases and _same_view(tensors[n], tensors[k]):
                        aliases[n] = k
                        del out[n]
        kept = [n for n in names if n not in aliases]
        if len(kept) > 1:  # views that overlap without being the same: each stored as its own copy
            for n in kept:
                out[n] = tensors[n].clone()
    return out, aliases


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file of `tensors`, tied ones stored once (see dedupe_shared), fsynced."""
    from safetensors.torch import save_file

    kept, aliases = dedupe_shared({k: v.detach() for k, v in tensors.items()})
    meta = dict(metadata or {})
    if aliases:
        meta[SHARED_KEY] = json.dumps(aliases, sort_keys=True)
    save_file({k: v.to("cpu").contiguous() for k, v in kept.items()}, str(path), metadata=meta or None)
    apply_umask(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; names stored once for several (tied) are all present again and
    are the same tensor object, so a model's load_state_dict keeps them tied."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    os.close(safe_io.open_regular(path))  # never a link nor a FIFO
    sd = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if SHARED_KEY in meta:
        aliases = json.loads(meta[SHARED_KEY])
        if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in sd for v in aliases.values()):
            raise ValueError(f"{path.name}: bad {SHARED_KEY} metadata")
        for name, kept in aliases.items():
            sd.setdefault(name, sd[kept])
    return sd


def _remove(p: Path) -> None:
    """Remove one entry of ours without following links: a link is unlinked, a directory removed."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)  # (rmtree never follows links inside)
    else:
        os.unlink(p)


# --------------------------------------------------------------------------- state kinds


def optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> tensors (safetensors) + structure and hyper-parameters (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(template: dict[str, Any], tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a state_dict, keeping the live optimizer's Python types (tuples stay tuples)."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = t
    for pid, vals in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(vals)
    groups = []
    if len(meta["param_groups"]) != len(template["param_groups"]):
        raise ValueError("optimizer has a different number of parameter groups")
    for live, saved in zip(template["param_groups"], meta["param_groups"]):
        g = dict(live)
        for k, v in saved.items():
            g[k] = tuple(v) if isinstance(live.get(k), tuple) else v
        groups.append(g)
    return {"state": state, "param_groups": groups}


RNG_PARTS = ("python", "numpy", "torch", "cuda")


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as int64 tensors (python and numpy states packed losslessly)."""
    import numpy as np

    version, keys, gauss = random.getstate()
    g_bits = struct.unpack("<q", struct.pack("<d", gauss))[0] if gauss is not None else 0
    py = torch.tensor([version, *keys, int(gauss is not None), g_bits], dtype=torch.int64)
    kind, nkeys, pos, has_g, cached = np.random.get_state()
    assert kind == "MT19937"
    c_bits = struct.unpack("<q", struct.pack("<d", float(cached)))[0]
    npy = torch.tensor([*nkeys.tolist(), pos, has_g, c_bits], dtype=torch.int64)
    out = {"python": py, "numpy": npy, "torch": torch.get_rng_state().to(torch.int64)}
    out["cuda"] = (torch.cuda.get_rng_state().to(torch.int64) if torch.cuda.is_available()
                   else torch.zeros(0, dtype=torch.int64))
    return out


def set_rng_state(parts: dict[str, torch.Tensor]) -> None:
    import numpy as np

    py = parts["python"].tolist()
    gauss = struct.unpack("<d", struct.pack("<q", py[-1]))[0] if py[-2] else None
    random.setstate((py[0], tuple(py[1:-2]), gauss))
    npy = parts["numpy"].tolist()
    cached = struct.unpack("<d", struct.pack("<q", npy[-1]))[0]
    np.random.set_state(("MT19937", np.array(npy[:624], dtype=np.uint32), npy[624], npy[625], cached))
    torch.set_rng_state(parts["torch"].to(torch.uint8))
    if torch.cuda.is_available() and parts["cuda"].numel():
        torch.cuda.set_rng_state(parts["cuda"].to(torch.uint8))


def gather_rng(accelerator: Any) -> dict[str, torch.Tensor]:
    """Every rank's RNG state, gathered to all ranks as tensors (a collective; no pickle)."""
    mine = rng_state()
    sizes = [mine[k].numel() for k in RNG_PARTS]
    flat = torch.cat([mine[k] for k in RNG_PARTS]).to(accelerator.device)
    every = accelerator.gather(flat.unsqueeze(0)).cpu() if accelerator.num_processes > 1 else flat.unsqueeze(0)
    out: dict[str, torch.Tensor] = {}
    for r, row in enumerate(every):
        for k, part in zip(RNG_PARTS, row.split(sizes)):
            out[f"rank{r}.{k}"] = part.clone()
    return out


# --------------------------------------------------------------------------- save


def _fault(point: str, step: int) -> None:
    """Test hook: DISTTRAIN_FAULT=<point>:<step> kills this process (SIGKILL) at that point of that save."""
    spec = os.environ.get("DISTTRAIN_FAULT", "")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), 9)


def _errno_text(e: BaseException, where: Path) -> str:
    """'[Errno 28] ENOSPC: No space left on device (path)' from an OSError, a SafetensorError or DCP's
    CheckpointException."""
    if isinstance(e, OSError):
        return f"[Errno {e.errno}] {errno.errorcode.get(e.errno or 0, '?')}: {e.strerror} ({e.filename or where})"
    m = re.search(r"(?:code: |os error |Errno )(\d+)", str(e))
    code = int(m.group(1)) if m else 0
    return f"[Errno {code}] {errno.errorcode.get(code, '?')}: {os.strerror(code) if code else one_line(e)[:300]}"


def save_checkpoint(run: RunDir, step: int, files: dict[str, Any], keep_last: int, *, main: bool = True,
                    agree: Callable[[bool], bool] | None = None) -> Path:
    """Write one checkpoint atomically. `files` maps a file name to a dict of tensors (-> .safetensors) or a
    JSON-able object (-> .json); returns the final directory.

    Unsharded: the main process alone calls this. Sharded (`files[SHARDS]`: this rank's DTensors/tensors):
    every rank calls it, non-main ranks with only SHARDS, `main` saying which is which and `agree(flag)`
    (True on every rank if flag is on any, a collective) keeping them together; torch.distributed.checkpoint
    writes each rank's shards into the temporary directory, then the main process finishes it.

    A failed write (disk full, read-only or vanished directory) removes the temporary directory, leaves
    every earlier checkpoint as it was, and raises TrainingError naming the path and the errno (on the
    main process; on every rank if the shards could not be written)."""
    from safetensors import SafetensorError

    tmp = run.checkpoints / f".tmp-{run.step_dir(step).name}"
    sharded = SHARDS in files
    try:
        if not sharded:
            return _save_checkpoint(run, step, files, keep_last) if main else run.step_dir(step)
        assert agree is not None, "a sharded save is a collective: pass agree"
        failed: OSError | None = None
        if main:
            try:
                _start_tmp(run, tmp, step)
            except OSError as e:
                failed = e
        if agree(failed is not None):  # every rank stops together
            raise failed or FileNotFoundError(errno.ENOENT, "the main process could not create it", str(tmp))
        _save_shards(tmp / SHARDS, files[SHARDS])
        _fault("wrote-shards", step)
        if not main:
            return run.step_dir(step)
        return _finish_checkpoint(run, step, tmp, {k: v for k, v in files.items() if k != SHARDS}, keep_last)
    except (OSError, SafetensorError, _checkpoint_exception()) as e:
        if main:
            _remove_quiet(tmp)
        raise TrainingError(f"cannot write checkpoint {run.step_dir(step)}: {_errno_text(e, run.checkpoints)}; the "
                            "previous checkpoint is kept and the partial one removed") from None


def _checkpoint_exception() -> type[BaseException]:
    """DCP's CheckpointException derives from BaseException: `except Exception` would miss it."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _save_checkpoint(run: RunDir, step: int, files: dict[str, Any], keep_last: int) -> Path:
    """An unsharded checkpoint, written by the main process alone."""
    tmp = run.checkpoints / f".tmp-{run.step_dir(step).name}"
    _start_tmp(run, tmp, step)
    return _finish_checkpoint(run, step, tmp, files, keep_last)


def _start_tmp(run: RunDir, tmp: Path, step: int) -> None:
    if not safe_io.check_entry(run.checkpoints, "dir"):
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    _remove(tmp)  # a save killed earlier left it; it was never valid
    tmp.mkdir()
    _fault("started", step)


def _save_shards(folder: Path, shards: dict[str, torch.Tensor]) -> None:
    """This rank's part of a sharded state (a collective): one safetensors file per rank, each holding the
    rank's shards with their offsets in the header (DCP's Hugging Face writer, save_distributed=True).
    Replicated plain tensors (BN statistics, optimizer step counts) are written once, by the lowest rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, HuggingFaceStorageWriter

    bad = [k for k, v in shards.items() if not isinstance(v, torch.Tensor)]
    if bad:  # the writer would store them as torch.save bytes: a file that "saves" but never loads
        raise TypeError(f"sharded checkpoint values must be tensors, not {bad[:3]}")
    dcp.save(shards, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
             planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))


def _finish_checkpoint(run: RunDir, step: int, tmp: Path, files: dict[str, Any], keep_last: int) -> Path:
    final = run.step_dir(step)
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": step, "files": {}}
    if safe_io.check_entry(tmp / SHARDS, "dir"):
        for path in sorted((tmp / SHARDS).iterdir()):
            fd = safe_io.open_regular(path)  # (DCP fsyncs too; this makes it the main process's guarantee)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            manifest["files"][f"{SHARDS}/{path.name}"] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        _fsync_dir(tmp / SHARDS)
    for name, content in files.items():
        path = tmp / name
        if name.endswith(".safetensors"):
            save_tensors(path, content)
        else:
            with open(path, "w") as f:
                json.dump(content, f)
                f.flush()
                os.fsync(f.fileno())
        manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        _fault(f"wrote-{name}", step)
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    _fault("before-rename", step)
    if safe_io.check_entry(final, "dir"):  # the same step saved by an earlier attempt: replace it, never leave none
        old = run.checkpoints / f".old-{final.name}"
        _remove(old)
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(run.checkpoints)
    _fault("after-rename", step)
    for old in run.step_dirs()[keep_last:]:
        if old != final:
            _remove_quiet(old)
    return final


def _remove_quiet(p: Path) -> None:
    try:
        _remove(p)
    except OSError:
        pass


def save_best(run: RunDir, ckpt: Path, info: dict[str, Any]) -> None:
    """checkpoints/best/: hard links to the files of `ckpt` (never modified in place) + best.json."""
    tmp = run.checkpoints / ".tmp-best"
    _remove(tmp)
    shutil.copytree(ckpt, tmp, copy_function=os.link)
    write_json(tmp / "best.json", info)
    old = run.checkpoints / ".old-best"
    _remove(old)
    if safe_io.check_entry(run.best, "dir"):
        os.rename(run.best, old)
    os.rename(tmp, run.best)
    _remove(old)
    _fsync_dir(run.checkpoints)


def clean_partial(run: RunDir) -> None:
    """Remove temporary directories of saves that were killed (main process, at start). Inside a real
    checkpoints/ folder only, and a link there is removed itself, never followed."""
    if safe_io.check_entry(run.checkpoints, "dir"):
        for p in run.checkpoints.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                _remove_quiet(p)


# --------------------------------------------------------------------------- verify and load


def verify(path: Path) -> str | None:
    """None if `path` is a complete, untampered checkpoint, else why not (one line). Reads only regular
    files, the manifest at most safe_io.MAX_SMALL bytes, each file no further than its listed size."""
    mf = path / "manifest.json"
    try:
        if not safe_io.check_entry(path, "dir"):
            return f"{path}: missing"
        manifest = read_json(mf, MAX_MANIFEST_BYTES)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            return f"{mf}: not a disttrain checkpoint manifest"
        listed = manifest["files"]
        for name in REQUIRED:
            if name not in listed:
                return f"{mf}: does not list {name}"
        shards = [n for n in listed if n.startswith(f"{SHARDS}/")]
        if "model.safetensors" not in listed and not shards:
            return f"{mf}: does not list model.safetensors"
        if shards and safe_io.check_entry(path / SHARDS, "dir"):  # (never a link) DCP's reader reads every file there: no stowaways
            extra = sorted(p.name for p in (path / SHARDS).iterdir() if f"{SHARDS}/{p.name}" not in listed)
            if extra:
                return f"{path / SHARDS}: files not in the manifest: {extra[:3]}"
        for name, info in listed.items():
            base = name[len(SHARDS) + 1:] if name.startswith(f"{SHARDS}/") else name
            if not SAFE_NAME.match(base) or "/" in base or base in (".", ".."):
                return f"{mf}: refuses file name {name!r} (outside the checkpoint)"
            if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and info["bytes"] >= 0
                    and isinstance(info.get("sha256"), str)):
                return f"{mf}: malformed entry for {name}"
            f = path / name
            if not safe_io.check_entry(f, "file"):
                return f"{f}: missing"
            size = os.lstat(f).st_size
            if size != info["bytes"]:
                return f"{f}: truncated or changed ({size} bytes, manifest says {info['bytes']})"
            if _sha256(f, info["bytes"]) != info["sha256"]:
                return f"{f}: checksum mismatch (corrupted or tampered)"
    except FileNotFoundError:
        return f"{mf}: missing (incomplete checkpoint)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # (safe_io.UnsafeInput is a ValueError)
        return f"{mf}: unreadable ({one_line(e)[:300]})"
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir (newest valid), or its manifest."""
    p = Path(path)
    if p.name == "manifest.json" and safe_io.check_entry(p, "file"):
        p = p.parent
    if (p / "manifest.json").exists() or (p / "manifest.json").is_symlink():
        return p
    run = RunDir(p)
    if run.step_dirs():
        good, bad = find_latest(run)
        if good is None:
            raise UsageError(f"--resume {path}: no valid checkpoint ({'; '.join(bad)})")
        return good
    raise UsageError(f"--resume {path}: not a checkpoint directory (no manifest.json)")


def run_dir_of(path: str | Path) -> tuple[Path | None, Path | None]:
    """For a --resume PATH: (the run directory that holds it or None for a loose checkpoint, the checkpoint
    directory or None when PATH is a run directory). Nothing is verified here (load_checkpoint does)."""
    p = Path(path)
    if p.is_file() and p.name == "manifest.json":
        p = p.parent
    if (p / "manifest.json").exists():
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        return (run if run is not None and (run / "checkpoints").is_dir() else None), p
    return p, None


def saved_run_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config a checkpoint was saved with (its state.json), or None if unreadable."""
    try:
        cfg = read_json(checkpoint / "state.json").get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def find_latest(run: RunDir) -> tuple[Path | None, list[str]]:
    """Newest checkpoint that verifies and whose contents fit the schema, and why newer ones were skipped."""
    bad = []
    for d in run.step_dirs():
        why = verify(d)
        if why is None:
            try:
                load_checkpoint(d, weights=False)
            except UsageError as e:
                why = one_line(e).removeprefix("checkpoint ")
        if why is None:
            return d, bad
        bad.append(why)
    return None, bad


def _pickle_hint(f: Path) -> str:
    """A note when the file is a pickle (protocol 2+ starts with 0x80): say code was refused, not just bytes."""
    try:
        with open(safe_io.open_regular(f), "rb") as fh:
            head = fh.read(2)
    except (OSError, ValueError):
        return ""
    return "; it is a pickle, and disttrain never unpickles: refused to run code from it" if head[:1] == b"\x80" else ""


def load_checkpoint(path: Path, weights: bool = True) -> dict[str, Any]:
    """Verify, read and schema-check a checkpoint: tensors via safetensors, the rest via bounded JSON.
    UsageError if bad (nothing of it is used before every file passed). weights=False skips the model
    and optimizer tensors (a quick check of everything else)."""
    from disttrain import schema

    why = verify(path)
    if why is not None:
        raise UsageError(f"checkpoint {why}")
    f = path / "manifest.json"
    try:
        out: dict[str, Any] = {}
        for name in read_json(path / "manifest.json", MAX_MANIFEST_BYTES)["files"]:
            f = path / name
            if name.startswith(f"{SHARDS}/"):  # read by load_shards / read_shards_full, which reshard
                out[SHARDS] = path / SHARDS
                continue
            if not weights and name in ("model.safetensors", "optimizer.safetensors"):
                continue
            limit = MAX_MANIFEST_BYTES if name == "model.json" else MAX_JSON_BYTES
            out[name] = load_tensors(f) if name.endswith(".safetensors") else read_json(f, limit)
    except Exception as e:  # noqa: BLE001 - verified but still unreadable: report, never load garbage
        kind = "safetensors" if f.name.endswith(".safetensors") else "JSON"
        raise UsageError(f"checkpoint {f}: unreadable, expected {kind}{_pickle_hint(f)} "
                         f"({type(e).__name__}: {one_line(e)[:200]})") from None
    schema.check_checkpoint(out, path)
    return out


def with_tied(sd: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's model.<name> tensors, with the tied names it stored once added back."""
    for name, kept in saved.get(SHARDING_JSON, {}).get("tied", {}).items():
        if kept in sd:
            sd.setdefault(name, sd[kept])
    return sd


def is_sharded(saved: dict[str, Any]) -> bool:
    """Whether a load_checkpoint() result holds per-rank shards (written under --sharding fsdp)."""
    return SHARDS in saved


def _reader(saved: dict[str, Any]) -> Any:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(saved[SHARDS]))


def load_shards(saved: dict[str, Any], template: dict[str, torch.Tensor]) -> None:
    """Fill `template` (this rank's DTensors/tensors, any world size) in place from a sharded checkpoint:
    DCP reads just the slices each rank needs (a collective). UsageError if it does not fit."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(template, storage_reader=_reader(saved))
    except (_checkpoint_exception(), RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise UsageError(f"checkpoint {saved[SHARDS].parent}: shards do not fit this model "
                         f"({type(e).__name__}: {one_line(e)[:300]})") from None


def read_shards_full(saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, whole, on this process alone (no collective)."""
    import torch.distributed.checkpoint as dcp

    reader = _reader(saved)
    try:
        meta = reader.read_metadata()
        out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": reading alone is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=_reader(saved), no_dist=True)
    except (_checkpoint_exception(), RuntimeError, ValueError, KeyError, AssertionError, OSError) as e:
        raise UsageError(f"checkpoint {saved[SHARDS].parent}: unreadable shards "
                         f"({type(e).__name__}: {one_line(e)[:300]})") from None
    return out


# --------------------------------------------------------------------------- exported model


def export_model(run: RunDir, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Final weights (unwrapped state_dict, keys unchanged) + what rebuilds the model, atomically.
    TrainingError (one line, with the errno) when the disk is full or the directory unwritable."""
    from safetensors import SafetensorError

    tmp = run.path / f".model.safetensors.tmp{os.getpid()}"
    try:
        safe_io.check_entry(run.model, "file")
        _remove(tmp)
        save_tensors(tmp, state_dict, {"format": "pt", "disttrain": json.dumps({"model": meta.get("model")})})
        write_json(run.model_meta, meta)
        os.replace(tmp, run.model)
        _fsync_dir(run.path)
    except (OSError, SafetensorError) as e:
        _remove_quiet(tmp)
        raise TrainingError(f"cannot export the final model {run.model}: {_errno_text(e, run.path)}; the "
                            "checkpoints are kept (resume with --resume auto once there is room)") from None


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path]:
    """Weights from a model.safetensors, a run directory, or a checkpoint directory (its EMA weights,
    ema.safetensors or the ema.* shards, when the run kept an average: those were evaluated); plus model.json
    when one is beside them (schema-checked), and the directory they came from. UsageError when unreadable."""
    from safetensors import SafetensorError

    from disttrain import schema

    p = Path(path)
    if p.is_dir() and ((p / "manifest.json").exists() or (p / "manifest.json").is_symlink()):
        data = load_checkpoint(p)
        if is_sharded(data):
            full = read_shards_full(data)
            prefix = "ema." if data.get(SHARDING_JSON, {}).get("ema") else "model."  # the evaluated weights
            sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            return with_tied(sd, data), data["model.json"], p
        return data.get("ema.safetensors", data["model.safetensors"]), data["model.json"], p
    if p.is_dir():
        p = p / "model.safetensors"
    if not (p.exists() or p.is_symlink()):
        raise UsageError(f"{path}: no model.safetensors or checkpoint there")
    try:
        sd = load_tensors(p)
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{p}: not a readable safetensors file{_pickle_hint(p)} ({one_line(e)[:200]})") from None
    meta_path = p.parent / "model.json"
    meta = None
    if meta_path.exists() or meta_path.is_symlink():
        meta = read_json(meta_path, MAX_MANIFEST_BYTES)
        schema.check_model_meta(meta, str(meta_path))
    return sd, meta, p.parent


def now() -> float:
    return time.time()
