#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/<target>/seed-* from the PEFT fixtures
(seed-regression-* files are inputs that once crashed a target; they are kept as they are).

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
                if f.startswith("seed-") and not f.startswith("seed-regression-"):
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

    # peft and canonical: the fixtures trimmed to one or two modules each, so that one execution
    # stays cheap (a few KiB) while every importer path (factor counts, dtypes, conv scales,
    # trained biases, modules_to_save, legacy configs) keeps a seed.
    def trim(case, keep_modules, resize=None):
        meta, tensors = st_read(os.path.join(FX, "adapters", case, "adapter_model.safetensors"))
        kept = []
        for name, dtype, shape, raw in tensors:
            if any(m in name for m in keep_modules):
                if resize and name in resize:
                    shape, n_bytes = resize[name]
                    raw = raw[:n_bytes]
                kept.append((name, dtype, shape, raw))
        assert kept, case
        return read("adapters", case, "adapter_config.json"), st_bytes(meta, kept)

    q0 = "model.layers.0.self_attn.q_proj."
    lm = "base_model.model.lm_head.weight"
    seeds = {
        "conv_f1-fc": trim("conv_f1", ["model.fc."]),
        "conv_f2-conv1": trim("conv_f2", ["model.conv1."]),
        "llama_f32_f1-q": trim("llama_f32_f1", [q0]),
        "llama_f32_f2-bf16-q": trim("llama_f32_f2_adapter_bf16", [q0]),
        "llama_bf16_f3-f16-q": trim("llama_bf16_f3_adapter_f16", [q0]),
        "llama_f32_f3-bias-lm_head": trim("llama_f32_f3", [q0, lm], {lm: ([2, 64], 2 * 64 * 4)}),
    }
    cfg = json.loads(seeds["conv_f2-conv1"][0])
    cfg.pop("exclude_modules", None)
    cfg.pop("peft_version", None)
    seeds["conv_f2-legacy-config"] = (json.dumps(cfg).encode(), seeds["conv_f2-conv1"][1])
    for name, (config, weights) in seeds.items():
        put("peft", name, peft_seed(config, weights))

    # canonical: boft-convert's output for the same trimmed adapters.
    exe = os.path.join(ROOT, "target", "debug", "boft-convert")
    tmp = tempfile.mkdtemp()
    try:
        for name, (config, weights) in seeds.items():
            if "legacy" in name:
                continue
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            open(os.path.join(folder, "adapter_config.json"), "wb").write(config)
            open(os.path.join(folder, "adapter_model.safetensors"), "wb").write(weights)
            out = os.path.join(tmp, name + ".safetensors")
            subprocess.run([exe, folder, "-o", out], check=True, stdout=subprocess.DEVNULL)
            put("canonical", name, open(out, "rb").read())
        # One with recorded base shapes (boft-convert --base).
        out = os.path.join(tmp, "conv_f1-shapes.safetensors")
        subprocess.run([exe, os.path.join(tmp, "conv_f1-fc"), "-o", out, "--base",
                        os.path.join(FX, "bases", "conv", "model.safetensors")],
                       check=True, stdout=subprocess.DEVNULL)
        put("canonical", "conv_f1-fc-shapes", open(out, "rb").read())
    finally:
        shutil.rmtree(tmp)

if __name__ == "__main__":
    main()
