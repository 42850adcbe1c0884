#!/usr/bin/env python3
"""PyTorch's peer of bench/cuda_rows.cu: LayerNorm, softmax and attention at ViT-B/16's shapes on the GPU,
printed as the same "rows name variant median_us effective_GBps" lines (bytes counted as there),
so that bench/gpu.sh can put both in one table.

    python3 bench/torch_rows.py [--reps 50]
"""
import argparse
import sys

import torch
import torch.nn.functional as F


def median_us(f, reps):
    for _ in range(3):
        f()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(1000.0 * a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def report(name, variant, nbytes, us):
    print(f"rows {name} {variant} {us:.1f} {nbytes / (us * 1e3):.0f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args()
    if a.reps <= 0:
        sys.exit("torch_rows.py: --reps must be positive")
    if not torch.cuda.is_available():
        sys.exit("torch_rows.py: no CUDA device")
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")

    rows, cols = 12608, 768
    n = rows * cols
    x = (torch.rand(rows, cols, device=dev) * 4 - 2).requires_grad_(True)
    w = torch.rand(cols, device=dev).requires_grad_(True)
    b = torch.rand(cols, device=dev).requires_grad_(True)
    dy = torch.rand(rows, cols, device=dev) * 2 - 1
    with torch.no_grad():
        report("layer_norm_forward", "torch", 4.0 * (2 * n + 2 * rows),
               median_us(lambda: F.layer_norm(x, (cols,), w, b, 1e-6), a.reps))
    y = F.layer_norm(x, (cols,), w, b, 1e-6)
    # The backward alone: the graph is kept, each call computes dx, dgamma and dbeta afresh.
    report("layer_norm_backward", "torch", 4.0 * (3 * n + 2 * rows),
           median_us(lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True), a.reps))

    rows, cols = 151296, 197
    n = rows * cols
    s = (torch.rand(rows, cols, device=dev) * 6 - 3).requires_grad_(True)
    dp = torch.rand(rows, cols, device=dev) * 2 - 1
    with torch.no_grad():
        report("softmax_forward", "torch", 8.0 * n, median_us(lambda: torch.softmax(s, -1), a.reps))
    prob = torch.softmax(s, -1)
    report("softmax_backward", "torch", 12.0 * n,
           median_us(lambda: torch.autograd.grad(prob, (s,), dp, retain_graph=True), a.reps))

    # attention's core: scaled_dot_product_attention on (batch, heads, tokens, head width), fp32,
    # with PyTorch's own choice of kernel (a fused one where it has one for fp32)
    batch, n, heads, dh = 64, 197, 12, 64
    nout = batch * n * heads * dh
    q, k, v = ((torch.rand(batch, heads, n, dh, device=dev) * 4 - 2).requires_grad_(True) for _ in range(3))
    do = torch.rand(batch, heads, n, dh, device=dev) * 2 - 1
    with torch.no_grad():
        report("attention_forward", "torch", 4.0 * 4 * nout,
               median_us(lambda: F.scaled_dot_product_attention(q, k, v), a.reps))
    o = F.scaled_dot_product_attention(q, k, v)
    report("attention_backward", "torch", 4.0 * 8 * nout,
           median_us(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), a.reps))


if __name__ == "__main__":
    main()
