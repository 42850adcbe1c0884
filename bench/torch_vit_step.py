#!/usr/bin/python3
"""Images per second of one full training step (forward, cross-entropy, backward, AdamW) of a
preset ViT in PyTorch on random data: the peer of build/bench/train_step.

The model is hatch's ViT written the timm way: a stride-p convolution as patch embedding, a
class token and a position embedding, pre-norm blocks (LayerNorm eps 1e-6, fused qkv attention
with bias, MLP ratio 4 with exact GELU), a final LayerNorm on the class token and a linear head.
Parameter names are timm's. AdamW decays weights only (not norms, biases, tokens), as hatch's.

  /usr/bin/python3 bench/torch_vit_step.py --preset vit-small --batch 128 --threads 2 --steps 20
  python3 bench/torch_vit_step.py --preset vit-b16 --batch 64 --device cuda [--tf32]
  /usr/bin/python3 bench/torch_vit_step.py DIM DEPTH HEADS BATCH PATCH [THREADS]

Prints the median time per step, then a last line "images_per_second=N".
Needs Debian's python3-torch.
"""
import argparse
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (patch, dim, heads, depth = total blocks over the four stages, image, channels, classes)
PRESETS = {
    "vit-micro": (7, 32, 2, 4, 28, 1, 10),
    "vit-tiny": (7, 64, 4, 4, 28, 1, 10),
    "vit-small": (7, 128, 4, 8, 28, 1, 10),
    "vit-base": (4, 192, 6, 12, 28, 1, 10),
    "vit-b16": (16, 768, 12, 12, 224, 3, 1000),  # ViT-B/16, the GPU benchmark
}
MLP_RATIO, LN_EPS = 4, 1e-6


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, MLP_RATIO * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim, channels):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    def __init__(self, dim, depth, heads, patch, image=28, channels=1, classes=10):
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.patch_embed = PatchEmbed(patch, dim, channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, classes)
        for name, p in self.named_parameters():  # timm: trunc_normal(0.02) weights, zero biases
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name == "cls_token":
                nn.init.trunc_normal_(p, std=1e-6)
            else:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        # Normalising token 0 alone gives timm's output (it normalises all, then takes token 0).
        return self.head(self.norm(x[:, 0]))


def parse(argv):
    if argv and not argv[0].startswith("-"):  # the positional form of the reference peer
        if len(argv) not in (5, 6):
            sys.exit("usage: torch_vit_step.py DIM DEPTH HEADS BATCH PATCH [THREADS]")
        try:
            vals = [int(v) for v in argv]
        except ValueError:
            sys.exit(f"torch_vit_step.py: positional arguments must be integers, got {argv}")
        dim, depth, heads, batch, patch = vals[:5]
        return argparse.Namespace(preset=f"dim{dim}-depth{depth}-heads{heads}-patch{patch}", dim=dim, depth=depth,
                                  heads=heads, batch=batch, patch=patch, threads=vals[5] if len(vals) > 5 else 2,
                                  steps=20, warmup=3, image=28, channels=1, classes=10, device="cpu", tf32=False,
                                  model="twin")
    ap = argparse.ArgumentParser(description="PyTorch training-step throughput (peer of hatch's train_step)")
    ap.add_argument("--preset", default="vit-small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions (cuda)")
    ap.add_argument("--model", default="twin", choices=["twin", "timm"],
                    help="twin: hatch's ViT written in PyTorch; timm: timm's vit_base_patch16_224 "
                         "(fused scaled_dot_product_attention), for --preset vit-b16 only")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile one more step and print the kernels by device time")
    a = ap.parse_args(argv)
    a.patch, a.dim, a.heads, a.depth, a.image, a.channels, a.classes = PRESETS[a.preset]
    return a


def main(argv):
    a = parse(argv)
    for k in ("dim", "depth", "heads", "batch", "patch", "threads", "steps"):
        if getattr(a, k) < 1:
            sys.exit(f"torch_vit_step.py: {k} must be positive, got {getattr(a, k)}")
    if a.dim % a.heads or a.image % a.patch:
        sys.exit(f"torch_vit_step.py: dim {a.dim} must divide by heads {a.heads}, {a.image} by patch {a.patch}")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_vit_step.py: --device cuda but torch sees no CUDA device")
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    torch.manual_seed(0)
    dev = torch.device(a.device)
    if a.model == "timm":
        if a.preset != "vit-b16":
            sys.exit("torch_vit_step.py: --model timm is ViT-B/16: use --preset vit-b16")
        import timm  # not a Debian package: present on the GPU machines
        model = timm.create_model("vit_base_patch16_224", num_classes=a.classes).to(dev)
    else:
        model = ViT(a.dim, a.depth, a.heads, a.patch, a.image, a.channels, a.classes).to(dev)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in ("cls_token", "pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in ("cls_token", "pos_embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    x = torch.randn(a.batch, a.channels, a.image, a.image, device=dev)
    y = torch.randint(0, a.classes, (a.batch,), device=dev)

    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    where = (f"cuda {'tf32' if a.tf32 else 'fp32'} ({torch.cuda.get_device_name()})" if dev.type == "cuda"
             else f"threads={a.threads}")
    if dev.type == "cuda":
        where += (f", matmul precision '{torch.get_float32_matmul_precision()}'"
                  f", allow_tf32 {torch.backends.cuda.matmul.allow_tf32}")
    print(f"first_loss={losses[0].item():.4f} last_loss={losses[-1].item():.4f} "
          f"(ln {a.classes} = {math.log(a.classes):.4f})")
    print(f"torch {torch.__version__} {a.preset} ({a.model}) batch={a.batch} {where}: "
          f"median {median * 1e3:.1f} ms/step (min {times[0] * 1e3:.1f})")
    if dev.type == "cuda":  # the same two numbers as hatch's train_step prints (caching allocators both)
        print(f"peak_device_mib={torch.cuda.max_memory_allocated() / 2**20:.1f} "
              f"reserved_device_mib={torch.cuda.max_memory_reserved() / 2**20:.1f}")
    if getattr(a, "profile", False):
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    print(f"images_per_second={a.batch / median:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
