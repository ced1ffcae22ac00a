#!/usr/bin/env python3
"""The output-side case of the benchmark harness (`cargo bench --bench merge -- memory`), made and
merged by LyCORIS itself.

  gen   --out DIR --algo diag-oft|boft --dim B [--seed N] [--widths 320,640,1280]
        A module tree with diffusers UNet2DConditionModel names and SD1.5 channel widths (classes
        named Transformer2DModel and ResnetBlock2D, so LyCORIS's "full" preset picks them up as on
        a real U-Net), fp16, random weights: DIR/base/model.safetensors. A LyCORIS network
        (create_lycoris, algo, block size B) randomised and saved with save_weights():
        DIR/adapter.safetensors.
  merge --base DIR --adapter FILE --out DIR
        LyCORIS's own merge, as a user runs it: load the base, create_lycoris_from_weights(1.0),
        merge_to(1.0), save. Prints one JSON line with the time of each step.

LyCORIS comes from `pip install --no-deps --target DIR lycoris-lora==4.1.3 einops toml` (pass DIR
with --lycoris, default /work/lycoris-4); torch, safetensors from fixtures/generate/requirements.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([nn.Linear(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn1 = Attention(dim)
        self.attn2 = Attention(dim)
        self.ff = FeedForward(dim)


class Transformer2DModel(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch)])
        self.proj_out = nn.Linear(ch, ch)


class ResnetBlock2D(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(32, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)


class Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch), ResnetBlock2D(ch)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch), Transformer2DModel(ch)])


class UNetShaped(nn.Module):
    """down_blocks.<i> and up_blocks.<i> at each width: two resnets (3x3 convs) and two transformer
    blocks (self- and cross-attention projections, feed-forward) each, as in SD1.5's U-Net."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([Block(w) for w in widths])
        self.up_blocks = nn.ModuleList([Block(w) for w in reversed(widths)])


def tree(widths):
    torch.manual_seed(0)
    with torch.device("meta"):
        m = UNetShaped(widths)
    return m.to_empty(device="cpu")


def lycoris_path(p):
    if p not in sys.path:
        sys.path.insert(0, p)


def gen(a) -> None:
    lycoris_path(a.lycoris)
    from lycoris import create_lycoris

    widths = [int(w) for w in a.widths.split(",")]
    gen_ = torch.Generator().manual_seed(a.seed)
    model = tree(widths)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Weights of the scale real checkpoints have; values only need to be finite and varied.
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen_) / math.sqrt(fan_in))
    model = model.half()
    base = os.path.join(a.out, "base")
    os.makedirs(base, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(base, "model.safetensors"))
    net = create_lycoris(model, 1.0, linear_dim=a.dim, linear_alpha=1, conv_dim=a.dim, conv_alpha=1,
                         algo=a.algo, constraint=0.0, rescaled=False, preset="full")
    net.apply_to()
    net = net.float()
    with torch.no_grad():
        for lora in net.loras:
            lora.oft_blocks.add_(0.02 * torch.randn(lora.oft_blocks.shape, generator=gen_))
    net.save_weights(os.path.join(a.out, "adapter.safetensors"), None, None)
    print(json.dumps({"modules": len(net.loras), "widths": widths,
                      "base_bytes": os.path.getsize(os.path.join(base, "model.safetensors"))}))


def merge(a) -> None:
    lycoris_path(a.lycoris)
    from lycoris.wrapper import create_lycoris_from_weights

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    sd = load_file(os.path.join(a.base, "model.safetensors"))
    widths = [int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
              for i in range(len({k.split(".")[1] for k in sd if k.startswith("down_blocks.")}))]
    model = tree(widths).half()
    model.load_state_dict(sd, strict=True)
    t1 = time.perf_counter()
    net, _ = create_lycoris_from_weights(1.0, a.adapter, model)
    net.apply_to()
    t2 = time.perf_counter()
    with torch.no_grad():
        net.merge_to(1.0)
    t3 = time.perf_counter()
    net.restore()
    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, "model.safetensors"))
    t4 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "network_s": t2 - t1, "merge_to_s": t3 - t2, "save_s": t4 - t3,
                      "total_s": t4 - t0, "threads": torch.get_num_threads(), "modules": len(net.loras)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--out", required=True)
    g.add_argument("--algo", choices=["diag-oft", "boft"], default="diag-oft")
    g.add_argument("--dim", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--widths", default="320,640,1280")
    m = sub.add_parser("merge")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    for p in (g, m):
        p.add_argument("--lycoris", default="/work/lycoris-4")
    a = ap.parse_args()
    gen(a) if a.cmd == "gen" else merge(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
