"""`--dataset text:PATH`: a UTF-8 text file, or a folder of them, as character-level language-model data.

- Corpus: a file, or every regular file under a folder (sorted by relative path, hidden names and links
  skipped, at most MAX_DEPTH levels, MAX_BYTES in all), each ending in a newline, concatenated.
- Split by position, as nanoGPT does: the first 1 - val_fraction of the characters train, the rest
  (--val-fraction) validate. Deterministic, and independent of the world size.
- Vocabulary: the distinct characters of the training split, sorted by code point (token id = rank).
  Characters that occur only in the validation split map to U+FFFD (added to the vocabulary only when
  needed). The vocabulary is saved with the model (model.json's spec.vocab) so generation decodes the
  same characters. Character level, not bytes: a token is a character, so bits per token = bits per
  character, the figure char-level papers and nanoGPT report.
- Samples: fixed windows of --block-size tokens (inputs) and the same windows shifted by one (targets),
  starting every `stride` tokens (dataset kwarg; default block_size: each token is a target once per
  epoch). Validation windows never overlap, so every validation token is predicted once (the tail
  shorter than a window is left out). Being plain indexable samples, windows go through the same
  DistributedSampler order, epochs, resume and world-size rules as every other dataset; since every
  window has the same number of tokens, the per-sample mean loss the loop uses is exactly the per-token
  mean on any world size and accumulation.
- Cache: encoded once into data_dir/disttrain-cache/text-<key>.safetensors (uint8 token ids when the
  vocabulary has at most 256 entries, else uint16/int32; the vocabulary in its metadata), keyed by the
  files' paths, sizes and modification times and the split; rebuilt when any changes. Loaded, the ids
  are widened once to int64, the index type nn.Embedding and cross_entropy take, and the windows are
  views of that one tensor (no copy per window).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disttrain.config import TEXT_PREFIX, Config
from disttrain.data.base import ArrayDataset, DataSpec
from disttrain.errors import UsageError, one_line

MAX_BYTES = 2 << 30  # corpus size limit (characters are read into memory)
MAX_DEPTH = 8  # folder levels searched
MAX_FILES = 100_000
UNK = "\ufffd"
KWARGS = {"stride"}


def corpus_files(root: Path) -> list[Path]:
    """The files a text:PATH corpus reads, in order. Links are not followed; the walk is bounded."""
    if root.is_symlink():
        raise UsageError(f"--dataset text:{root}: is a symbolic link; links are not followed")
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UsageError(f"--dataset text:{root}: no such file or directory")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < MAX_DEPTH)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not f.startswith(".") and p.is_file() and not p.is_symlink():
                found.append(p)
        if len(found) > MAX_FILES:
            raise UsageError(f"--dataset text:{root}: more than {MAX_FILES} files")
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not found:
        raise UsageError(f"--dataset text:{root}: the folder holds no files")
    return found


def read_corpus(files: list[Path]) -> str:
    """The files' text, each ending in a newline. UsageError naming a file that is not UTF-8 or too big."""
    total = sum(p.stat().st_size for p in files)
    if total > MAX_BYTES:
        raise UsageError(f"--dataset text: corpus of {total} bytes is larger than the {MAX_BYTES}-byte limit")
    parts = []
    for p in files:
        try:
            with open(p, "rb") as f:
                s = f.read(MAX_BYTES + 1).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--dataset text: {p} is not UTF-8 text ({one_line(e)[:120]})") from None
        except OSError as e:
            raise UsageError(f"--dataset text: cannot read {p} ({one_line(e)})") from None
        parts.append(s if s.endswith("\n") or not s else s + "\n")
    return "".join(parts)


def encode_corpus(text: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(train ids, val ids, vocab): the split by position and the training split's character vocabulary."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n_val = int(round(len(cp) * val_fraction))
    train_cp, val_cp = cp[:len(cp) - n_val], cp[len(cp) - n_val:]
    chars = np.unique(train_cp)
    unseen = np.setdiff1d(np.unique(val_cp), chars)
    if len(unseen) and ord(UNK) not in chars:
        chars = np.union1d(chars, [ord(UNK)]).astype(np.uint32)
    vocab = [chr(c) for c in chars]
    return _ids(train_cp, chars), _ids(val_cp, chars), vocab


def _ids(cp: np.ndarray, chars: np.ndarray) -> np.ndarray:
    ids = np.searchsorted(chars, cp)
    known = (ids < len(chars)) & (chars[np.minimum(ids, len(chars) - 1)] == cp)
    if not known.all():
        ids = np.where(known, ids, int(np.searchsorted(chars, ord(UNK))))
    dtype = np.uint8 if len(chars) <= 256 else np.uint16 if len(chars) <= 65536 else np.int32
    return ids.astype(dtype)


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    """A string -> int64 token ids [len(text)] in this vocabulary; UsageError naming an unknown character."""
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        if UNK not in index:
            raise UsageError(f"characters {''.join(unknown)[:20]!r} are not in the model's vocabulary")
        return torch.tensor([index.get(c, index[UNK]) for c in text], dtype=torch.long)
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def decode(ids: list[int] | torch.Tensor, vocab: list[str]) -> str:
    """Token ids -> the string."""
    return "".join(vocab[int(i)] for i in ids)


def _cache_key(root: Path, files: list[Path], val_fraction: float) -> str:
    h = hashlib.sha256(json.dumps([str(root.resolve()), val_fraction, 1]).encode())
    for p in files:
        st = p.stat()
        h.update(json.dumps([p.relative_to(root).as_posix() if p != root else p.name, st.st_size,
                             st.st_mtime_ns]).encode())
    return h.hexdigest()[:20]


def _cached_tokens(root: Path, cfg: Config, accelerator: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train ids, val ids, vocab) from the cache; the local main process builds it first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    files = corpus_files(root)
    cache = Path(cfg.data_dir) / "disttrain-cache" / f"text-{_cache_key(root, files, cfg.val_fraction)}.safetensors"
    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process and not cache.is_file():
            train, val, vocab = encode_corpus(read_corpus(files), cfg.val_fraction)
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
                save_file({"train": torch.from_numpy(train), "val": torch.from_numpy(val)}, str(tmp),
                          metadata={"vocab": json.dumps(vocab), "source": str(root)})
                os.replace(tmp, cache)
            except OSError as e:
                raise UsageError(f"--data-dir {cfg.data_dir}: cannot write the text cache ({one_line(e)})") from None
    try:
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            vocab = json.loads(f.metadata()["vocab"])
        t = load_file(str(cache))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UsageError(f"text cache {cache}: unreadable ({one_line(e)}); delete it to rebuild") from None
    return t["train"].long(), t["val"].long(), vocab


def windows(ids: torch.Tensor, block_size: int, stride: int) -> ArrayDataset:
    """Inputs ids[s:s+T] and targets ids[s+1:s+T+1] for s = 0, stride, 2 stride, ... (views, no copy)."""
    return ArrayDataset(ids[:-1].unfold(0, block_size, stride), ids[1:].unfold(0, block_size, stride))


def load_text(cfg: Config, accelerator: Any) -> tuple[ArrayDataset, ArrayDataset | None, DataSpec]:
    """(train windows, val windows or None, spec) for --dataset text:PATH."""
    root = Path(cfg.dataset[len(TEXT_PREFIX):])
    extra = set(cfg.dataset_kwargs) - KWARGS
    if extra:
        raise UsageError(f"--dataset-kwargs {sorted(extra)} not accepted by text datasets; expected {sorted(KWARGS)}")
    stride = cfg.dataset_kwargs.get("stride", cfg.block_size)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise UsageError(f"--dataset-kwargs stride must be a positive integer, got {stride!r}")
    if cfg.augment != "none":
        raise UsageError(f"--augment {cfg.augment} applies to image datasets, not --dataset {cfg.dataset}")
    T = cfg.block_size
    train_ids, val_ids, vocab = _cached_tokens(root, cfg, accelerator)
    if len(train_ids) < T + 1:
        raise UsageError(f"--dataset {cfg.dataset}: the training split has {len(train_ids)} characters, fewer "
                         f"than --block-size {T} + 1")
    if cfg.val_fraction > 0 and len(val_ids) < T + 1:
        raise UsageError(f"--val-fraction {cfg.val_fraction}: the validation split has {len(val_ids)} characters, "
                         f"fewer than --block-size {T} + 1")
    val = windows(val_ids, T, T) if cfg.val_fraction > 0 else None
    spec = DataSpec("classification", [T], len(vocab), [T], vocab=vocab)
    return windows(train_ids, T, stride), val, spec
