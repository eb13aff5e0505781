"""Atomic writes and safe reads: every file cqkd writes goes through ``atomic_write``; every JSON,
YAML and safetensors file it reads goes through ``read_json``, ``read_yaml`` and ``load_safetensors``."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from cqkd.errors import CqkdError

MAX_TEXT_BYTES = 64 << 20  # a JSON or YAML file cqkd reads is far smaller than this
MAX_YAML_NODES = 100_000  # nodes after expanding aliases: more is an alias bomb


def process_umask() -> int:
    """The process's umask: read from /proc/self/status on Linux (reading changes nothing), else
    by setting and at once restoring it (the only portable way)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Guarded:
    """A file object that remembers the first OSError of its ``write`` (torch.save turns it into a RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_error(path: str | os.PathLike, e: OSError) -> CqkdError:
    """The one line for a file that could not be written (a full disk, a read-only directory, ...)."""
    return CqkdError(f"cannot write {path}: {e.strerror or e}")


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def special_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` (followed through symbolic links) is when it exists and is not a regular file
    ("a character device", "a FIFO", ...); None for a regular file or nothing at all."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((what for test, what in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


def check_replaceable(path: str | os.PathLike, option: str | None = None) -> None:
    """Refuse (one line) to write ``path`` when it is a device, a FIFO, a socket or a directory:
    an atomic write would rename a regular file over it (``/dev/null`` included)."""
    kind = special_kind(path)
    if kind is not None:
        where = f"{option} {str(path)!r}" if option else str(path)
        hint = " (leave out --out to write to standard output)" if option == "--out" and kind != "a directory" else ""
        raise CqkdError(f"{where} is {kind}, not a regular file; cqkd writes only regular files{hint}")


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it in place.

    A failure leaves the previous version of ``path`` intact and no temporary file; a failed
    write of the disk (full, read-only, ...) is a ``CqkdError`` naming ``path``. A ``path`` that
    is a device, a FIFO, a socket or a directory is refused, never renamed over."""
    path = Path(path)
    check_replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    guarded = None
    try:
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            guarded = _Guarded(f)
            write(guarded)
            f.flush()
            os.fsync(f.fileno())
        check_replaceable(path)  # (again: it may have appeared while we wrote)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if guarded is not None and guarded.error is not None:
            raise write_error(path, guarded.error) from None
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as YAML to ``path`` atomically."""
    atomic_write(path, lambda f: yaml.safe_dump(data, f, sort_keys=False))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Save a dict of tensors to ``path`` (``torch.save``) atomically."""
    atomic_write(path, lambda f: torch.save(tensors, f), mode="wb")


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """An output file that can be written: a regular file or nothing yet (not a directory, device,
    FIFO or socket), in a directory that exists or can be made."""
    path = Path(path)
    if path.is_dir():
        raise CqkdError(f"{option} {str(path)!r} is a directory; name a file")
    check_replaceable(path, option)
    check_creatable(path.parent, option, str(path))


def refuse_symlink(directory: str | os.PathLike) -> Path:
    """``directory`` (a sub-directory cqkd writes into or cleans: cache, export, eval, figures, ...)
    unless it is a symbolic link, which would take cqkd's writes and deletions out of its parent."""
    directory = Path(directory)
    if directory.is_symlink():
        raise CqkdError(f"{directory} is a symbolic link; cqkd writes only inside {directory.parent} "
                        "(replace it with a directory)")
    return directory


def check_creatable(directory: Path, option: str, shown: str) -> None:
    """``directory`` exists and is writable, or can be created: its nearest existing ancestor is a
    writable directory."""
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CqkdError(f"{option} {shown!r}: {str(ancestor)!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CqkdError(f"{option} {shown!r}: {str(ancestor)!r} is not writable")


# ---------------------------------------------------------------------- reading

def describe_load_error(e: BaseException) -> str:
    """A short reason for a failed ``torch.load(weights_only=True)`` (without torch's advice to
    retry with ``weights_only=False``, which would execute whatever the file contains)."""
    text = str(e)
    if "Weights only load failed" in text:
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
        reason = lines[0] if lines else "not plain tensors"
        return f"not loadable as plain tensors: {reason[:120]}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a dict of tensors without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CqkdError(f"{path} does not exist") from None
    except Exception as e:
        raise CqkdError(f"{path} is corrupt or not a tensor file; refusing to load it ({describe_load_error(e)})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in chunks."""

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_error(path: str | os.PathLike, e: BaseException) -> CqkdError:
    if isinstance(e, FileNotFoundError):
        return CqkdError(f"{path} does not exist")
    reason = " ".join(str(e).split())[:200] or type(e).__name__
    return CqkdError(f"{path} is corrupt or not a safetensors file ({reason})")


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never unpickles)."""

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ValueError, ...
        raise _safetensors_error(path, e) from None


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(shape of each tensor, metadata) of a safetensors file, without reading the tensors."""

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise _safetensors_error(path, e) from None


def _read_text(path: str | os.PathLike, name: str) -> str:
    """A small UTF-8 text file (one line naming ``name`` when it is missing, binary or too large)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:
        raise CqkdError(f"{name} does not exist") from None
    except IsADirectoryError:
        raise CqkdError(f"{name} is a directory, not a file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise CqkdError(f"cannot read {name}: {getattr(e, 'strerror', None) or e}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise CqkdError(f"{name} is larger than {MAX_TEXT_BYTES >> 20} MiB; not a cqkd file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CqkdError(f"{name} is not a text file (not UTF-8)") from None
    if "\x00" in text:
        raise CqkdError(f"{name} is not a text file (it holds NUL bytes)")
    return text


def _check_shape(data: Any, shape: type | None, name: str, what: str | None) -> Any:
    if shape is not None and not isinstance(data, shape):
        found = "nothing" if data is None else f"a {type(data).__name__}"
        expected = what or {dict: "a mapping", list: "a list"}.get(shape, shape.__name__)
        raise CqkdError(f"{name} must hold {expected}, not {found}")
    return data


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_json(path: str | os.PathLike, shape: type | None = dict, name: str | None = None,
              what: str | None = None) -> Any:
    """Parse a JSON file that must hold a ``shape`` (dict by default; None: anything), without duplicate keys."""
    name = name or str(path)
    text = _read_text(path, name)
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as e:
        raise CqkdError(f"{name} is not valid JSON: duplicate key {e.args[0]!r}") from None
    except json.JSONDecodeError as e:
        raise CqkdError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise CqkdError(f"{name} is not valid JSON (nested too deeply)") from None
    return _check_shape(data, shape, name, what)


def _yaml_reason(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e)
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _check_yaml_nodes(root: yaml.Node, name: str) -> None:
    """Reject duplicate mapping keys and documents whose aliases expand beyond ``MAX_YAML_NODES``
    (or refer to themselves)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        if done:
            open_nodes.discard(id(node))
            children = _children(node)
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise CqkdError(f"{name} expands to more than {MAX_YAML_NODES} values through its aliases; "
                                "not a cqkd configuration")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise CqkdError(f"{name}: a YAML alias refers to itself; not a cqkd configuration")
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in seen:
                        raise CqkdError(f"{name} is not valid YAML: duplicate key {key.value!r} "
                                        f"at line {key.start_mark.line + 1}")
                    seen.add((key.tag, key.value))
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_yaml(path: str | os.PathLike, shape: type | None = dict, name: str | None = None,
              what: str | None = None) -> Any:
    """Parse a YAML file (safe tags only) that must hold a ``shape`` (dict by default; None: anything).

    Rejects binary content, duplicate keys and alias bombs with one line naming the file."""
    name = name or str(path)
    text = _read_text(path, name)
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is not None:
            _check_yaml_nodes(node, name)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise CqkdError(f"{name} is not valid YAML: {_yaml_reason(e)}") from None
    except RecursionError:
        raise CqkdError(f"{name} is not valid YAML: nested too deeply") from None
    except CqkdError:
        raise
    except Exception as e:  # a safe tag with a value it cannot take, e.g. !!int "x"
        raise CqkdError(f"{name} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return _check_shape(data, shape, name, what)
