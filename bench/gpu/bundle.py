"""The GPU bundle's container format: pack files into xz-compressed numbered chunks with a manifest, check the
chunks, reassemble and unpack them, and check that what was installed imports. Standard library only: it runs
on the lent machine before anything is installed there.

    python3 bench/gpu/bundle.py verify /tmp/fast_srt_bundle            # every chunk present and intact
    python3 bench/gpu/bundle.py unpack /tmp/fast_srt_bundle --dest DIR # verify, reassemble, extract, check files
    python3 bench/gpu/bundle.py imports                                # import what the GPU run uses, versions

Format (manifest.json beside the chunks): one tar archive of the payload (wheels and assets), compressed as one
xz stream, cut into chunk_00.xz, chunk_01.xz, ... The manifest holds the size and sha256 of every chunk, of the
reassembled stream and of every file in the archive. A missing or corrupt chunk is refused in one line that
names it and says what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
_BLOCK = 1 << 20


class BundleError(Exception):
    """A bundle that cannot be used; the message is one line saying what is wrong and what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def chunk_name(i: int) -> str:
    return f"chunk_{i:02d}.xz"


def _write_tar(files: dict[str, Path], out: Path) -> list[dict]:
    """An uncompressed tar of `files` (archive name -> source), in sorted order with fixed metadata."""
    entries = []
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            src = Path(files[name])
            info = tarfile.TarInfo(name)
            info.size = src.stat().st_size
            info.mode, info.mtime, info.uid, info.gid = 0o644, 0, 0, 0
            with open(src, "rb") as f:
                tar.addfile(info, f)
            entries.append({"path": name, "size": info.size, "sha256": sha256_file(src)})
    return entries


def _compress(src: Path, dst: Path, preset: int) -> str:
    """xz-compress `src` to `dst`; the xz tool with all cores when there is one, else Python's lzma."""
    xz = shutil.which("xz")
    if xz:
        with open(dst, "wb") as out:
            subprocess.run([xz, f"-{preset}", "-T0", "-c", str(src)], stdout=out, check=True)
        return f"xz -{preset} -T0"
    with open(src, "rb") as f, lzma.open(dst, "wb", preset=preset) as out:
        shutil.copyfileobj(f, out, _BLOCK)
    return f"python lzma preset {preset}"


def pack(files: dict[str, Path], out_dir: Path, chunk_bytes: int, preset: int = 6,
         meta: dict | None = None) -> dict:
    """Tar `files`, compress, cut into chunks of at most `chunk_bytes` in `out_dir`, write the manifest there.

    Old chunks in `out_dir` are removed first, so the folder holds exactly one bundle."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("chunk_*.xz"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=out_dir) as tmp:
        tar_path, xz_path = Path(tmp) / "payload.tar", Path(tmp) / "payload.tar.xz"
        entries = _write_tar(files, tar_path)
        tar_size = tar_path.stat().st_size
        compressor = _compress(tar_path, xz_path, preset)
        tar_path.unlink()
        chunks = []
        with open(xz_path, "rb") as f:
            while data := f.read(chunk_bytes):
                name = chunk_name(len(chunks))
                (out_dir / name).write_bytes(data)
                chunks.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        archive = {"size": xz_path.stat().st_size, "sha256": sha256_file(xz_path), "tar_size": tar_size,
                   "compressor": compressor}
    manifest = {"format": FORMAT, **(meta or {}), "chunk_bytes": chunk_bytes, "archive": archive,
                "chunks": chunks, "files": entries}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_manifest(chunk_dir: Path) -> dict:
    path = Path(chunk_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: carry gpu_bundle/{MANIFEST} with the first chunk (docs/gpu.md)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise BundleError(f"{path} is not valid JSON ({e}): carry gpu_bundle/{MANIFEST} again") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} has format {manifest.get('format')!r}, this script reads {FORMAT}: rebuild "
                          f"with `make gpu-bundle` from the same commit as this script")
    return manifest


def verify_chunks(chunk_dir: Path, manifest: dict | None = None) -> dict:
    """Every chunk the manifest names is present with its size and sha256; raises BundleError naming the first
    one that is not (missing ones first: they are cheaper to see than a hash)."""
    chunk_dir = Path(chunk_dir)
    manifest = manifest or load_manifest(chunk_dir)
    n = len(manifest["chunks"])
    for c in manifest["chunks"]:
        if not (chunk_dir / c["name"]).is_file():
            raise BundleError(f"chunk {c['name']} (of {n}) is missing from {chunk_dir}: carry "
                              f"gpu_bundle/{c['name']} and move it there (docs/gpu.md), then run this again")
    for c in manifest["chunks"]:
        path = chunk_dir / c["name"]
        size = path.stat().st_size
        digest = sha256_file(path) if size == c["size"] else None
        if size != c["size"] or digest != c["sha256"]:
            got = f"{size} bytes" if size != c["size"] else f"sha256 {digest[:12]}..."
            want = f"{c['size']} bytes" if size != c["size"] else f"{c['sha256'][:12]}..."
            raise BundleError(f"chunk {c['name']} (of {n}) in {chunk_dir} is corrupt ({got}, expected {want}): "
                              f"carry gpu_bundle/{c['name']} again (docs/gpu.md), then run this again")
    return manifest


class _Chunks(io.RawIOBase):
    """The chunks read back to back as one stream, hashed as they are read."""

    def __init__(self, paths: list[Path]):
        self._paths, self._f, self.sha = list(paths), None, hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self._f is None:
                if not self._paths:
                    return 0
                self._f = open(self._paths.pop(0), "rb")
            n = self._f.readinto(buf)
            if n:
                self.sha.update(memoryview(buf)[:n])
                self.size += n
                return n
            self._f.close()
            self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        super().close()


def unpack(chunk_dir: Path, dest: Path) -> dict:
    """Verify the chunks, decompress them as one stream into `dest`, check the stream's and every file's sha256."""
    chunk_dir, dest = Path(chunk_dir), Path(dest)
    manifest = verify_chunks(chunk_dir)
    dest.mkdir(parents=True, exist_ok=True)
    expected = {e["path"]: e for e in manifest["files"]}
    stream = _Chunks([chunk_dir / c["name"] for c in manifest["chunks"]])
    try:
        with lzma.open(io.BufferedReader(stream, _BLOCK)) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
            for member in tar:
                if member.name not in expected or not member.isfile():
                    raise BundleError(f"the archive holds {member.name!r}, which the manifest does not list: "
                                      f"rebuild the bundle with `make gpu-bundle`")
                target = dest / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                src = tar.extractfile(member)
                with open(target, "wb") as out:
                    while block := src.read(_BLOCK):
                        h.update(block)
                        out.write(block)
                want = expected[member.name]
                if h.hexdigest() != want["sha256"] or member.size != want["size"]:
                    raise BundleError(f"{member.name} unpacked with sha256 {h.hexdigest()[:12]}..., expected "
                                      f"{want['sha256'][:12]}...: rebuild the bundle with `make gpu-bundle`")
            xz.read()  # to the end of the stream, so the whole of it is hashed
    except (lzma.LZMAError, tarfile.TarError, EOFError) as e:
        raise BundleError(f"the reassembled archive does not decompress ({type(e).__name__}: {e}) although every "
                          f"chunk matches the manifest: rebuild the bundle with `make gpu-bundle`") from None
    finally:
        stream.close()
    if stream.sha.hexdigest() != manifest["archive"]["sha256"]:
        raise BundleError(f"the reassembled archive's sha256 {stream.sha.hexdigest()[:12]}... differs from the "
                          f"manifest's: rebuild the bundle with `make gpu-bundle`")
    missing = [p for p in expected if not (dest / p).is_file()]
    if missing:
        raise BundleError(f"{len(missing)} file(s) listed in the manifest are not in the archive (first: "
                          f"{missing[0]}): rebuild the bundle with `make gpu-bundle`")
    return manifest


# What the GPU run imports, in the order a failure is easiest to read: module, what it is for, the attribute
# whose presence is checked (or "").
IMPORTS = [
    ("vllm", "the engine", "__version__"),
    ("vllm.entrypoints.llm", "vllm.LLM, the in-process engine", "LLM"),
    ("vllm.v1.engine.core", "the engine core (in-process)", "EngineCore"),
    ("vllm.v1.worker.gpu_worker", "the GPU worker", "Worker"),
    ("vllm.v1.worker.gpu_model_runner", "the GPU model runner", "GPUModelRunner"),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttention backend", "FlashAttentionBackend"),
    ("vllm.vllm_flash_attn", "FlashAttention 3 for Hopper (FA2 is pruned)", "flash_attn_varlen_func"),
    ("vllm.device_allocator.cumem", "sleep mode (the KV cache released while training)", "CuMemAllocator"),
    ("vllm.v1.structured_output.backend_xgrammar", "structured outputs (the judge's regex)", "XgrammarBackend"),
    ("vllm.lora.punica_wrapper.punica_gpu", "LoRA through vLLM's GPU kernels", "PunicaWrapperGPU"),
    ("vllm.lora.request", "LoRA requests", "LoRARequest"),
    ("vllm.config", "the pooling runner's config", "PoolerConfig"),
    ("vllm.distributed.device_communicators.pynccl", "TRL's weight sync in colocate mode", "PyNcclCommunicator"),
    ("fast_srt.engine.engine", "fast_srt's engine", "Engine"),
    ("fast_srt.cli", "fast_srt's command line (tyro)", "main"),
    ("gguf", "the default model's GGUF file", ""),
    ("trl", "the TRL comparison", "__version__"),
    ("trl.trainer.grpo_trainer", "TRL's GRPOTrainer", "GRPOTrainer"),
    ("datasets", "TRL's dataset", "Dataset"),
    ("liger_kernel.transformers", "Liger's kernels (TRL's use_liger_kernel, the log-prob peers)", ""),
    ("liger_kernel.chunked_loss", "Liger's fused linear GRPO loss", ""),
]
# distributions whose versions the report names
VERSIONS = ["torch", "triton", "transformers", "vllm", "trl", "liger-kernel", "datasets", "accelerate", "pydantic",
            "msgspec", "pyzmq", "xgrammar", "llguidance", "openai", "fastapi", "tyro", "gguf", "typing-extensions"]


def check_imports() -> int:
    """Import every module in IMPORTS, print one line each and the versions; the number that failed."""
    import importlib
    import importlib.metadata as md
    import time
    import traceback

    failed = 0
    for module, why, attr in IMPORTS:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(module)
            if attr and not hasattr(mod, attr):
                raise ImportError(f"{module} has no {attr}")
            where = getattr(mod, "__file__", "") or ""
            print(f"ok    {module:46s} {time.perf_counter() - t0:5.1f}s  {why}  [{where}]", flush=True)
        except BaseException as e:  # an extension that fails to load can raise anything; report it and go on
            failed += 1
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            print(f"FAIL  {module:46s} {why}: {last[:400]}", flush=True)
    fa = sys.modules.get("vllm.vllm_flash_attn.flash_attn_interface")
    if fa is not None:
        print(f"flash-attn in vLLM: FA2 available {fa.FA2_AVAILABLE} (pruned), FA3 available {fa.FA3_AVAILABLE}"
              + ("" if fa.FA3_AVAILABLE else f" ({fa.FA3_UNAVAILABLE_REASON})"))
    versions = {}
    for dist in VERSIONS:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(json.dumps({"imports_failed": failed, "versions": versions}))
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check that every chunk is present and intact")
    v.add_argument("chunk_dir", type=Path)
    u = sub.add_parser("unpack", help="verify, reassemble and extract the payload")
    u.add_argument("chunk_dir", type=Path)
    u.add_argument("--dest", type=Path, required=True)
    sub.add_parser("imports", help="import what the GPU run uses and print versions")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "verify":
            m = verify_chunks(a.chunk_dir)
            print(f"bundle: {len(m['chunks'])} chunks intact in {a.chunk_dir} "
                  f"({sum(c['size'] for c in m['chunks']) / 2**20:.1f} MiB)")
        elif a.cmd == "unpack":
            m = unpack(a.chunk_dir, a.dest)
            print(f"bundle: {len(m['files'])} files unpacked into {a.dest} and checked "
                  f"({m['archive']['tar_size'] / 2**20:.1f} MiB)")
        else:
            return 1 if check_imports() else 0
    except BundleError as e:
        print(f"bundle: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
