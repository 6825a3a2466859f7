"""Reading and writing files that someone else may have crafted (docs/security.md is the threat model).

Every file disttrain reads goes through `read_bytes`: opened without following a symbolic link
(O_NOFOLLOW), refused unless it is a regular file (a FIFO would block, /dev/zero never ends), and read up to
a size cap. JSON and YAML are then parsed under a depth and node budget, YAML with a loader that builds no
Python objects, refuses duplicate keys and allows only a few aliases ("billion laughs" expands a 1 KB file
into gigabytes). Every write is `write_atomic` (a new temporary file that must not exist, then a rename
over a target that must be a regular file or absent); appends and locks open their files O_NOFOLLOW too.

Errors are `UnsafeInput`: a `UsageError` (one line, exit 2) that is also a `ValueError`, so code that
treats "unreadable" as "this checkpoint is bad" (checkpoint.verify) catches it with the other parse errors.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from disttrain.errors import UsageError, one_line

KiB, MiB = 1 << 10, 1 << 20
MAX_SMALL = 1 * MiB  # manifest.json, model.json, config.yaml, status.json, marker files
MAX_JSON = 64 * MiB  # state.json, optimizer.json, scheduler.json (optimizer scalars grow with parameters)
MAX_METRICS = 256 * MiB  # metrics.jsonl (a line per --log-every steps)
MAX_DEPTH = 32  # nesting of any JSON/YAML document (configs and checkpoints use at most 5)
MAX_NODES = 1_000_000  # values in one document, aliases expanded
MAX_CONFIG_NODES = 10_000  # values in one config (its kwargs are saved in every checkpoint)
MAX_ALIASES = 16  # YAML aliases (*name) in one config file
MAX_LINE = 1 * MiB  # one metrics.jsonl line


class UnsafeInput(UsageError, ValueError):
    """A file or value that disttrain refuses to read or write: one line, exit 2."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o644, follow: bool = False) -> int:
    """A file descriptor for `path`, which must be a regular file and not a link (its parent folders may be
    links: a run directory may live under a symlinked scratch space). `follow=True` accepts a link to a
    regular file: for the user's own data (a dataset of symlinked images), never for run-directory files.
    Raises UnsafeInput or OSError."""
    try:
        fd = os.open(path, flags | (0 if follow else os.O_NOFOLLOW) | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component is a symbolic link
            raise UnsafeInput(f"{path}: is a symbolic link; disttrain does not follow links") from None
        if e.errno == 6 or e.errno == 19:  # ENXIO (FIFO without a writer), ENODEV
            raise UnsafeInput(f"{path}: not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeInput(f"{path}: is {_kind(st.st_mode)}, expected a regular file")
    if flags & (os.O_WRONLY | os.O_RDWR):
        os.set_blocking(fd, True)
    return fd


def read_bytes(path: str | Path, limit: int, follow: bool = False) -> bytes:
    """The whole of a regular file of at most `limit` bytes. UnsafeInput if it is larger or not regular;
    FileNotFoundError if it is missing. `follow`: see open_regular."""
    fd = open_regular(path, follow=follow)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafeInput(f"{path}: {size} bytes, more than the {_size(limit)} disttrain reads from it")
        chunks, n = [], 0
        while True:  # st_size may lie (procfs-like files): stop at the cap whatever it said
            b = os.read(fd, min(1 * MiB, limit + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
            if n > limit:
                raise UnsafeInput(f"{path}: more than the {_size(limit)} disttrain reads from it")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | Path, limit: int) -> str:
    try:
        return read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeInput(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB" if n >= KiB else f"{n} bytes"


def check_tree(obj: Any, what: str, depth: int = MAX_DEPTH, nodes: int = MAX_NODES) -> Any:
    """`obj` unchanged if its nesting is at most `depth` and it holds at most `nodes` values, counting a
    shared (aliased) value once per place it appears; else UnsafeInput naming `what`. Iterative: no
    RecursionError however deep."""
    count, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        count += 1
        if count > nodes:
            raise UnsafeInput(f"{what}: more than {nodes:,} values (aliases expanded); refused")
        if isinstance(o, (dict, list, tuple)):
            if d > depth:
                raise UnsafeInput(f"{what}: nested deeper than {depth} levels; refused")
            items = o.values() if isinstance(o, dict) else o
            stack.extend((v, d + 1) for v in items)
    return obj


def loads_json(text: str | bytes, what: str, depth: int = MAX_DEPTH, nodes: int = MAX_NODES) -> Any:
    """json.loads under a depth and node budget; UnsafeInput naming `what` for anything malformed."""
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise UnsafeInput(f"{what}: nested deeper than {depth} levels; refused") from None
    except UnicodeDecodeError as e:
        raise UnsafeInput(f"{what}: not UTF-8 text ({e.reason})") from None
    except ValueError as e:
        raise UnsafeInput(f"{what}: not valid JSON ({one_line(e)[:200]})") from None
    return check_tree(obj, what, depth, nodes)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_json(path: str | Path, limit: int = MAX_JSON, depth: int = MAX_DEPTH) -> Any:
    """A JSON file, bounded in size and depth (see module doc). FileNotFoundError if missing."""
    return loads_json(read_bytes(path, limit), str(path), depth)


# --------------------------------------------------------------------------- YAML


def _yaml_loader(what: str, max_aliases: int, depth: int) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader (plain data only) that counts aliases and nesting and refuses duplicate keys."""

        aliases = 0
        level = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                Loader.aliases += 1
                if Loader.aliases > max_aliases:
                    raise UnsafeInput(f"{what}: more than {max_aliases} YAML aliases; refused (alias bombs "
                                      "expand a small file into gigabytes)")
            Loader.level += 1
            try:
                if Loader.level > depth:
                    raise UnsafeInput(f"{what}: nested deeper than {depth} levels; refused")
                return super().compose_node(parent, index)
            finally:
                Loader.level -= 1

        def construct_yaml_int(self, node: Any) -> Any:
            try:
                return super().construct_yaml_int(node)
            except ValueError:  # more than 4300 digits: keep the text, the field's check names key and value
                return self.construct_scalar(node)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:
                    raise UnsafeInput(f"{what}: a key that is not a plain value (line {key_node.start_mark.line + 1})")
                if dup:
                    raise UnsafeInput(f"{what}: duplicate key {key!r} (line {key_node.start_mark.line + 1}); "
                                      "each key may appear once")
            return super().construct_mapping(node, deep)

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    # 1e-3 is a float: YAML 1.1 (PyYAML) wants a dot (1.0e-3) and would give the string "1e-3", which a
    # number field refuses (quoted values stay strings)
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def loads_yaml(text: str, what: str, max_aliases: int = MAX_ALIASES, depth: int = MAX_DEPTH,
               nodes: int = MAX_CONFIG_NODES) -> Any:
    """Plain data from YAML text (no Python objects, no duplicate keys, bounded aliases/depth/values)."""
    import yaml

    try:
        obj = yaml.load(text, Loader=_yaml_loader(what, max_aliases, depth))  # noqa: S506 - a SafeLoader subclass
    except UnsafeInput:
        raise
    except RecursionError:
        raise UnsafeInput(f"{what}: nested deeper than {depth} levels; refused") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:  # int('9'*5000) is a ValueError
        raise UnsafeInput(f"{what}: not valid YAML ({one_line(e)[:300]})") from None
    return check_tree(obj, what, depth, nodes)


def read_yaml(path: str | Path, limit: int = MAX_SMALL) -> Any:
    return loads_yaml(read_text(path, limit), str(path))


# --------------------------------------------------------------------------- writing


def check_entry(path: Path, want: str) -> bool:
    """True if `path` exists as `want` ("file" or "dir"), False if absent; UnsafeInput if it is anything
    else (a link, a FIFO, a file where a folder belongs)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    ok = stat.S_ISREG(st.st_mode) if want == "file" else stat.S_ISDIR(st.st_mode)
    if not ok:
        raise UnsafeInput(f"{path}: is {_kind(st.st_mode)}, expected a {'regular file' if want == 'file' else 'directory'}; "
                          "disttrain neither follows nor replaces it")
    return True


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename: readers see the old file or the new one, never half of one. The temporary
    file is created new (O_EXCL, never through a link); the target must be a regular file or absent."""
    path = Path(path)
    check_entry(path, "file")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = _create_new(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    fsync_dir(path.parent)


def _create_new(tmp: Path) -> int:
    """O_CREAT|O_EXCL|O_NOFOLLOW; a leftover regular file of ours (same name: same pid, killed) is replaced,
    anything else at that name (a link planted there) is refused."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(tmp, flags, 0o644)
    except FileExistsError:
        if not check_entry(tmp, "file"):  # raced away
            return os.open(tmp, flags, 0o644)
        os.unlink(tmp)
        return os.open(tmp, flags, 0o644)


def _unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def open_append(path: Path) -> Any:
    """A text file object appending to `path` (created if absent), never through a link."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
