#!/usr/bin/python3
"""The PyTorch twin of `examples/train_e2e`: the same ViT (bench/torch_vit_step.py), the same
recipe — AdamW (weight decay 0.05 on weights only), linear warmup from 1e-6 then cosine to
min-lr per step, label smoothing 0.1, batch 128, no augmentation, timm initialisation — on the
same Fashion-MNIST files, so that hatch's accuracy can be checked against PyTorch's.

  /usr/bin/python3 bench/torch_fmnist_train.py --preset vit-tiny --epochs 3 [--lr 2e-3]
      [--warmup-epochs 1] [--train-limit N] [--test-limit N] [--threads 2] [--seed 0] [--device cuda]

Prints one line per epoch, "train_seconds=S" (training only, evaluation excluded, as hatch's
`seconds=`) and a last line "test_accuracy=0.XXXX". On --device cuda each batch is copied from
pinned host memory without blocking, and the loss is read once per epoch.
"""
import argparse
import gzip
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_vit_step import PRESETS, ViT  # noqa: E402

MEAN, STD = 0.2860, 0.3530


def load(root, split, limit):
    prefix = "train" if split == "train" else "t10k"
    def read(name, offset):
        path = os.path.join(root, name)
        opener = gzip.open if os.path.exists(path) else open
        path = path if os.path.exists(path) else path[:-3]
        with opener(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)
    x = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    y = read(f"{prefix}-labels-idx1-ubyte.gz", 8)
    if limit:
        x, y = x[:limit], y[:limit]
    x = (torch.tensor(x, dtype=torch.float32) / 255 - MEAN) / STD
    return x, torch.tensor(y, dtype=torch.long)


def init_timm(model):
    for name, p in model.named_parameters():
        if name == "cls_token":
            nn.init.trunc_normal_(p, std=1e-6, a=-2e-6, b=2e-6)
        elif name == "pos_embed" or (p.dim() > 1):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name and name.endswith("weight"):
            nn.init.ones_(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vit-tiny", choices=sorted(k for k, v in PRESETS.items() if v[4] == 28))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--train-limit", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    xtr, ytr = load(a.data, "train", a.train_limit)
    xte, yte = load(a.data, "test", a.test_limit)
    patch, dim, heads, depth = PRESETS[a.preset][:4]
    model = ViT(dim, depth, heads, patch)
    init_timm(model)
    model.to(dev)
    if a.device == "cuda":
        xtr, ytr = xtr.pin_memory(), ytr.pin_memory()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and n not in ("cls_token", "pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and n not in ("cls_token", "pos_embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    per_epoch = (len(xtr) + a.batch - 1) // a.batch
    warmup, total = int(a.warmup_epochs * per_epoch), max(1, a.epochs * per_epoch)

    def lr_at(step):
        if step < warmup:
            return 1e-6 + (a.lr - 1e-6) * step / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * t))

    lossf = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
    gen = torch.Generator().manual_seed(a.seed)
    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    step, start, acc, train_seconds = 0, time.time(), 0.0, 0.0
    for epoch in range(a.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), a.batch):
            j = perm[i:i + a.batch]
            xb, yb = xtr[j], ytr[j]
            if a.device == "cuda":
                xb, yb = xb.pin_memory().to(dev, non_blocking=True), yb.pin_memory().to(dev, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss = lossf(model(xb), yb)
            loss.backward()
            opt.step()
            step += 1
        sync()
        train_seconds += time.time() - t0
        model.eval()
        with torch.no_grad():
            correct = sum((model(xte[i:i + 500].to(dev)).argmax(1).cpu() == yte[i:i + 500]).sum().item()
                          for i in range(0, len(xte), 500))
        acc = correct / len(xte)
        print(f"epoch {epoch + 1} loss {loss.item():.4f} test_accuracy {acc:.4f} "
              f"elapsed {time.time() - start:.0f}s", flush=True)
    print(f"train_seconds={train_seconds:.2f}")
    print(f"test_accuracy={acc:.4f}")


if __name__ == "__main__":
    main()
