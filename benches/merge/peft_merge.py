"""The PEFT recipe the benchmark compares against, timed as a whole process by the runner:

    AutoModelForCausalLM.from_pretrained(base, dtype=...)
    PeftModel.from_pretrained(model, adapter)
    merge_and_unload()
    save_pretrained(out)          (+ fsync of every output file, as boft-merge does)

PEFT keeps more than one butterfly factor only when its CUDA extension `fbd_cuda` loads; on a
CPU-only machine it would silently fall back to one factor and then fail to load a 2-factor
adapter. As in fixtures/generate/make_peft_boft.py, a CPU stand-in for the extension is installed
first, so PEFT really performs the multi-factor merge (and the script checks it did).

Usage: python peft_merge.py BASE ADAPTER OUT DTYPE FACTORS MAX_SHARD
Prints one JSON line with the phase timings on stdout.
"""

import json
import os
import sys
import time

T0 = time.perf_counter()
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import peft  # noqa: E402
import peft.tuners.boft.layer as boft_layer  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


class FbdCudaStandin:
    """CPU replacement for PEFT's compiled "fbd_cuda" extension: forward(x)[0] is the stack of
    block-diagonal matrices, shape (N, D*H, D*H), exactly what the CUDA kernel returns."""

    @staticmethod
    def forward(inp):
        return [torch.stack([torch.block_diag(*torch.unbind(inp[z])) for z in range(inp.shape[0])])]

    @staticmethod
    def backward(grad_output, inp):
        n, d, h, _ = inp.shape
        return [
            torch.stack(
                [
                    torch.stack([grad_output[z, k * h : (k + 1) * h, k * h : (k + 1) * h] for k in range(d)])
                    for z in range(n)
                ]
            )
        ]

    def __bool__(self):
        return True


def fsync_tree(path):
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def main():
    base, adapter, out, dtype, factors, max_shard = sys.argv[1:7]
    factors = int(factors)
    boft_layer._FBD_CUDA = FbdCudaStandin()
    t_import = time.perf_counter()

    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    except TypeError:  # transformers < 4.56 only knows torch_dtype
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch_dtype)
    t_load = time.perf_counter()

    model = PeftModel.from_pretrained(model, adapter)
    n_boft = 0
    for name, mod in model.named_modules():
        if isinstance(mod, boft_layer.BOFTLayer):
            r = mod.boft_R["default"]
            assert r.shape[0] == factors, f"{name}: PEFT kept {r.shape[0]} factors, wanted {factors}"
            assert mod.fbd_cuda_available, f"{name}: stand-in not used"
            n_boft += 1
    t_adapter = time.perf_counter()

    merged = model.merge_and_unload()
    t_merge = time.perf_counter()

    merged.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard)
    t_save = time.perf_counter()
    fsync_tree(out)
    t_end = time.perf_counter()

    print(
        json.dumps(
            {
                "import": t_import - T0,
                "load_base": t_load - t_import,
                "load_adapter": t_adapter - t_load,
                "merge": t_merge - t_adapter,
                "save": t_save - t_merge,
                "fsync": t_end - t_save,
                "boft_layers": n_boft,
                "torch": torch.__version__,
                "peft": peft.__version__,
                "transformers": transformers.__version__,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
