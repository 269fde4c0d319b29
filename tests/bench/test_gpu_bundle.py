"""The GPU bundle's chunks: round trip, refusals of a missing or corrupt chunk, the vLLM prune, run.sh's dry run.
No network: payloads are random bytes and a synthetic wheel."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import bundle  # noqa: E402
import build_bundle  # noqa: E402

CHUNK = 256 * 1024


@pytest.fixture
def payload(tmp_path) -> dict[str, Path]:
    rng = random.Random(0)
    src = tmp_path / "src"
    (src / "wheels").mkdir(parents=True)
    files = {"wheels/a.whl": 2 * 2**20 + 17, "wheels/b.whl": 700_000, "assets/tok/tokenizer.json": 5000,
             "assets/tok/empty.txt": 0}
    out = {}
    for name, size in files.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
        out[name] = p
    return out


@pytest.fixture
def packed(tmp_path, payload) -> tuple[Path, dict]:
    out = tmp_path / "bundle"
    manifest = bundle.pack(payload, out, CHUNK, preset=0, meta={"vllm": "test"})
    return out, manifest


def test_round_trip_gives_identical_files(tmp_path, payload, packed):
    out, manifest = packed
    assert len(manifest["chunks"]) >= 3  # random bytes do not compress: 2.7 MiB in 256 KiB chunks
    assert all(c["size"] <= CHUNK for c in manifest["chunks"])
    assert [c["name"] for c in manifest["chunks"]] == [bundle.chunk_name(i) for i in range(len(manifest["chunks"]))]
    assert json.loads((out / bundle.MANIFEST).read_text()) == manifest
    dest = tmp_path / "dest"
    bundle.unpack(out, dest)
    for name, src in payload.items():
        assert (dest / name).read_bytes() == src.read_bytes(), name
    assert {e["path"] for e in manifest["files"]} == set(payload)


def _cli(*args) -> tuple[int, str]:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "bundle.py"), *args], capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stderr


def test_missing_chunk_is_refused_in_one_line_naming_it(tmp_path, packed):
    out, _ = packed
    (out / "chunk_01.xz").unlink()
    rc, err = _cli("verify", str(out))
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "chunk_01.xz" in err and "missing" in err and "carry" in err
    with pytest.raises(bundle.BundleError, match="chunk_01.xz"):
        bundle.unpack(out, tmp_path / "dest")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_chunk_is_refused_in_one_line_naming_it(tmp_path, packed, damage):
    out, _ = packed
    chunk = out / "chunk_02.xz"
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-10]
    chunk.write_bytes(bytes(data))
    rc, err = _cli("unpack", str(out), "--dest", str(tmp_path / "dest"))
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "chunk_02.xz" in err and "corrupt" in err
    assert not (tmp_path / "dest").exists()  # refused before anything was written


def test_missing_manifest_is_refused(tmp_path, packed):
    out, _ = packed
    (out / bundle.MANIFEST).unlink()
    rc, err = _cli("verify", str(out))
    assert rc == 2 and "manifest.json" in err and len(err.strip().splitlines()) == 1


def test_install_sh_stops_at_a_missing_chunk(tmp_path, packed):
    out, _ = packed
    (out / "chunk_00.xz").unlink()
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "install.sh"), str(out), str(tmp_path / "site")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "chunk_00.xz" in p.stderr
    assert not (tmp_path / "site").exists()


def _wheel(path: Path, files: dict[str, bytes]) -> None:
    rows = [[name, "sha256=x", str(len(data))] for name, data in files.items()]
    rows.append(["vllm-0.0.dist-info/RECORD", "", ""])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("vllm-0.0.dist-info/RECORD", buf.getvalue())


def test_prune_drops_files_and_their_record_rows(tmp_path):
    keep = {name: b"keep" for name in build_bundle.MUST_KEEP}
    gone = {"vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so": b"x" * 100, "vllm/vllm-rs": b"y" * 10,
            "vllm/_moe_C_stable_libtorch.abi3.so": b"m",
            "vllm/third_party/deep_gemm/_C.so": b"z" * 5, "vllm/third_party/deep_gemm/include/a.hpp": b"h",
            "vllm/third_party/fmha_sm100/api.py": b"f"}
    other = {"vllm/third_party/pynvml.py": b"nvml", "vllm/third_party/deep_gemm_not_a_prefix.py": b"n"}
    src, dst = tmp_path / "in.whl", tmp_path / "out.whl"
    _wheel(src, {**keep, **gone, **other})
    report = build_bundle.repack(src, dst, build_bundle.PRUNE)
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        record = {r[0] for r in csv.reader(io.StringIO(z.read("vllm-0.0.dist-info/RECORD").decode())) if r}
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    assert not names & set(gone) and not record & set(gone)
    assert set(keep) | set(other) <= names and set(keep) | set(other) <= record
    assert {r["path"]: r["bytes"] for r in report}["vllm/third_party/deep_gemm/"] == 6
    assert all(r["why"] for r in report)


def test_every_package_and_prune_says_why():
    assert all(spec.count("==") == 1 and why for spec, _, why in build_bundle.PACKAGES)
    names = [build_bundle.spec_name_version(s)[0] for s, _, _ in build_bundle.PACKAGES]
    assert len(names) == len(set(names))
    assert not set(names) & {build_bundle.norm(p) for p in build_bundle.IMAGE_PACKAGES} - {"typing-extensions"}
    assert not any(k.startswith(p) for p, _ in build_bundle.PRUNE for k in build_bundle.MUST_KEEP)
    assert build_bundle.CHUNK_MIB <= 60


def test_run_sh_dry_run_lists_every_step_with_its_budget():
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run.sh"), "--dry-run"], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    listed = dict(re.findall(r"^[* ] (\S+)\s+(\d+)s ", p.stdout, flags=re.M))
    for step in ("models", "engine_tests", "kv_release", "train_3", "side_by_side", "kernels", "learner"):
        assert int(listed[step]) > 0, step
    total = [line for line in p.stdout.splitlines() if line.startswith("selected (*)")]
    assert total and int(total[0].split()[2]) <= 480
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run.sh"), "--only", "nope"], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == 2 and "unknown step nope" in bad.stderr
