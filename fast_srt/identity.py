"""What identifies a model directory: the full content of every file that changes what the model computes.

Cache keys (the format warm-up, the judge probe) and resume checks hash `model_identity(dir)`: the sha256 of every
weight file's full content and of every small config, tokenizer and chat-template file. Two checkpoints of the
same size that differ anywhere get different identities.

Hashing a large weight file takes a while (about 1 s per GB), so each file's digest is kept in a small cache beside
the other caches (`file_digests.json`), keyed by the file's real path, size, inode and modification time: a file
rewritten in any way (new mtime or inode) is hashed again; one left alone is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from fast_srt.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SMALL_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
SMALL_LIMIT = 64 << 20  # config/tokenizer files larger than this are not small files
DIGEST_CACHE = "file_digests.json"
_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    """sha256 of a file's whole content, remembered per (real path, size, inode, mtime) in the cache directory."""
    from fast_srt.config import cache_dir

    path = Path(path)
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_ino}:{st.st_mtime_ns}"
    cache = cache_dir() / DIGEST_CACHE
    real = str(path.resolve())
    known = _read_cache(cache)
    hit = known.get(real)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    digest = h.hexdigest()
    known = _read_cache(cache)  # another process may have added entries meanwhile
    known[real] = {"stamp": stamp, "sha256": digest}
    _write_cache(cache, known)
    return digest


def model_identity(model_dir: Path) -> dict:
    """{file name: sha256} over the weight files and the small config/tokenizer/template files of a model directory
    (names starting with "." and fast_srt's own marker files are skipped)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a Hugging Face checkpoint directory (no config.json); pass a model "
                        f"directory saved with save_pretrained")
    out: dict[str, str] = {}
    for p in sorted(model_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.startswith("fast_srt_"):
            continue
        if p.suffix in WEIGHT_SUFFIXES:
            out[p.name] = file_sha256(p)
        elif p.suffix in SMALL_SUFFIXES and p.stat().st_size <= SMALL_LIMIT:
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    if not any(Path(k).suffix in WEIGHT_SUFFIXES for k in out):
        raise UserError(f"{model_dir} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); pass a checkpoint "
                        f"saved with save_pretrained(safe_serialization=True)")
    return out


def identity_digest(model_dir: Path) -> str:
    """One sha256 over `model_identity`."""
    blob = json.dumps(model_identity(model_dir), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: digests are recomputed, never trusted from a bad file


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs hashing again next time
