#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/<target>/seed-* from the PEFT fixtures.

Run from the repository root after `cargo build` (the canonical seeds come from boft-convert):
    python3 fuzz/make_seeds.py
Every seed stays under 64 KiB (the -max_len the runs use).
"""
import json
import os
import shutil
import struct
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "fixtures", "peft_boft")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
MAX = 65536


def st_read(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    data = b[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = []
    for k, v in header.items():
        a, e = v["data_offsets"]
        tensors.append((k, v["dtype"], v["shape"], data[a:e]))
    return meta, tensors


def st_bytes(meta, tensors):
    header, data = {}, b""
    if meta is not None:
        header["__metadata__"] = meta
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


def put(target, name, data):
    assert len(data) <= MAX, (target, name, len(data))
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def read(*parts):
    return open(os.path.join(FX, *parts), "rb").read()


def peft_seed(config_bytes, weights_bytes):
    return struct.pack("<I", len(config_bytes)) + config_bytes + weights_bytes


def main():
    if os.path.isdir(CORPUS):
        for t in os.listdir(CORPUS):
            for f in os.listdir(os.path.join(CORPUS, t)):
                if f.startswith("seed-"):
                    os.remove(os.path.join(CORPUS, t, f))

    # header: real files, plus small hand-made ones covering metadata and every dtype.
    put("header", "conv-base", read("bases", "conv", "model.safetensors"))
    put("header", "conv-f1-adapter", read("adapters", "conv_f1", "adapter_model.safetensors"))
    put("header", "minimal", st_bytes(None, [("x", "F32", [2], b"\0" * 8)]))
    put("header", "metadata-only", st_bytes({"format": "pt"}, []))
    dtypes = [("BOOL", 1), ("U8", 1), ("I8", 1), ("F8_E5M2", 1), ("F8_E4M3", 1), ("F8_E8M0", 1),
              ("I16", 2), ("U16", 2), ("F16", 2), ("BF16", 2), ("I32", 4), ("U32", 4), ("F32", 4),
              ("F64", 8), ("I64", 8), ("U64", 8), ("C64", 8)]
    put("header", "dtypes", st_bytes({"a": "b"}, [(f"t_{d}", d, [2, 1], b"\1" * (2 * s)) for d, s in dtypes]
                                     + [("t_F4", "F4", [4], b"\2" * 2), ("t_F6", "F6_E2M3", [4], b"\3" * 3),
                                        ("empty", "F32", [0, 3], b"")]))

    # index: the sharded fixture's index and small variants.
    put("index", "llama-bf16", read("bases", "llama_bf16_sharded", "model.safetensors.index.json"))
    put("index", "small", json.dumps({"metadata": {"total_size": 8}, "weight_map": {
        "a": "model-00001.safetensors", "b": "./model-00001.safetensors", "c": "sub/model-00002.safetensors"}}).encode())
    put("index", "escape", b'{"weight_map": {"a": "../x.safetensors", "b": "/abs/y.safetensors"}}')

    # peft: length-prefixed config + weights.
    for case in ["conv_f1", "conv_f2", "llama_f32_f1", "llama_f32_f2_adapter_bf16", "llama_bf16_f3_adapter_f16"]:
        put("peft", case, peft_seed(read("adapters", case, "adapter_config.json"),
                                    read("adapters", case, "adapter_model.safetensors")))
    # A module with a trained bias (base_layer.bias) and a modules_to_save replacement, trimmed.
    meta, tensors = st_read(os.path.join(FX, "adapters", "llama_f32_f3", "adapter_model.safetensors"))
    keep = []
    for name, dtype, shape, raw in tensors:
        if "layers.0.self_attn.q_proj" in name:
            keep.append((name, dtype, shape, raw))
        elif name == "base_model.model.lm_head.weight":
            keep.append((name, dtype, [16, 64], raw[: 16 * 64 * 4]))
    put("peft", "f3-bias-replacement", peft_seed(read("adapters", "llama_f32_f3", "adapter_config.json"),
                                                 st_bytes(meta, keep)))
    # A PEFT <= 0.13 config (no exclude_modules, no peft_version) on a conv adapter.
    cfg = json.loads(read("adapters", "conv_f1", "adapter_config.json"))
    cfg.pop("exclude_modules", None)
    cfg.pop("peft_version", None)
    put("peft", "conv-legacy-config", peft_seed(json.dumps(cfg).encode(),
                                                read("adapters", "conv_f1", "adapter_model.safetensors")))

    # canonical: boft-convert's output for a few adapters (with and without recorded shapes).
    exe = os.path.join(ROOT, "target", "debug", "boft-convert")
    tmp = tempfile.mkdtemp()
    try:
        jobs = [("conv_f1", "bases/conv/model.safetensors"), ("conv_f2", None), ("llama_f32_f1", None)]
        for case, base in jobs:
            out = os.path.join(tmp, case + ".safetensors")
            cmd = [exe, os.path.join(FX, "adapters", case), "-o", out]
            if base:
                cmd += ["--base", os.path.join(FX, base)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            put("canonical", case + ("-shapes" if base else ""), open(out, "rb").read())
        trimmed = os.path.join(tmp, "f3")
        os.makedirs(trimmed)
        shutil.copy(os.path.join(FX, "adapters", "llama_f32_f3", "adapter_config.json"), trimmed)
        open(os.path.join(trimmed, "adapter_model.safetensors"), "wb").write(st_bytes(meta, keep))
        out = os.path.join(tmp, "f3.safetensors")
        subprocess.run([exe, trimmed, "-o", out], check=True, stdout=subprocess.DEVNULL)
        put("canonical", "f3-bias-replacement", open(out, "rb").read())
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
