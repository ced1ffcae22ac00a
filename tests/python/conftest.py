"""Shared helpers: the fixtures, and the comparison the Rust suite makes (tests/common/mod.rs)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("BOFT_FIXTURES", REPO / "fixtures"))
PEFT = FIXTURES / "peft_boft"
# The console scripts sit beside the interpreter of the venv the wheel was installed into.
BIN = Path(sys.executable).parent


def peft_cases():
    return json.loads((PEFT / "manifest.json").read_text())


def f32_cases():
    """Cases whose base is float32: numpy has no bfloat16, so the 16-bit ones stay Rust's."""
    cases = [c for c in peft_cases() if c["base_dtype"] == "float32"]
    assert len(cases) >= 4, "the manifest lost its float32 cases"
    return cases


def base_path(case):
    """The folder for Hugging Face-style bases, the bare file for the conv base (no config)."""
    b = PEFT / case["base"]
    return b if (b / "config.json").exists() else b / "model.safetensors"


def expected_path(case):
    m = PEFT / case["merged"]
    return m if base_path(case).is_dir() else m / "model.safetensors"


def out_path(tmp, base):
    return tmp / ("out" if base.is_dir() else "out.safetensors")


def tensors(path):
    """Every tensor of a checkpoint (a file, or a folder of .safetensors files), by name."""
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    assert files, f"no safetensors in {path}"
    out = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            assert name not in out, f"{name} in two shards"
            out[name] = (f.relative_to(path) if path.is_dir() else f.name, t)
    return out


def files_under(path):
    path = Path(path)
    if not path.is_dir():
        return [path.name]
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def assert_merge_matches(out, expected, base):
    """Same layout; tensors PEFT left alone byte-identical to the base; the others within 2e-5
    of the tensor's largest magnitude (f32), as tests/common/mod.rs asserts."""
    if Path(base).is_dir():
        assert files_under(out) == files_under(base)
        for rel in files_under(base):
            if not rel.endswith(".safetensors"):
                assert (Path(out) / rel).read_bytes() == (Path(base) / rel).read_bytes(), rel
    ours, theirs, orig = tensors(out), tensors(expected), tensors(base)
    assert sorted(ours) == sorted(theirs)
    changed = 0
    for name, (file, t) in ours.items():
        efile, e = theirs[name]
        _, b = orig[name]
        assert (t.dtype, t.shape) == (e.dtype, e.shape), name
        if Path(base).is_dir():
            assert file == efile, f"{name} moved to another shard"
        if e.tobytes() == b.tobytes():
            assert t.tobytes() == b.tobytes(), f"{name}: untouched tensor not byte-identical"
        else:
            changed += 1
            assert t.dtype == np.float32, name
            scale = max(float(np.abs(e).max()), 1e-30)
            err = float(np.abs(t.astype(np.float64) - e.astype(np.float64)).max()) / scale
            assert err <= 2e-5, f"{name}: relative error {err:e} > 2e-5"
    assert changed > 0, "the fixture changed nothing: it proves nothing"


@pytest.fixture
def llama():
    """The f32 Llama with its two-factor PEFT BOFT adapter and PEFT's merge of it."""
    case = next(c for c in peft_cases() if c["name"] == "llama_f32_f2")
    return base_path(case), PEFT / case["adapter"], expected_path(case)
