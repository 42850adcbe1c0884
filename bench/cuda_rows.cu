// The Cuda backend's row kernels at ViT-B/16's shapes (batch 64: 12,608 token rows of 768 for
// LayerNorm, 151,296 attention rows of 197 for softmax), each variant the launchers can pick
// timed on its own, so that a GPU run measures what each kernel change is worth:
//
//   general      the loops over a row in memory (HATCH_CUDA_ROW_REGISTERS=0)
//   regs W=1     the row in registers, one float per load
//   regs W=4     the row in registers, 128-bit loads (cols a multiple of 4, aligned rows)
//   two kernels  LayerNorm backward as before 2026-11-28: dx by rows, then dgamma/dbeta by columns
//   one kernel   LayerNorm backward in one kernel (dx and the parameter sums; the default now)
//   gemm, fused_tile32, fused_tile64
//                attention's core (softmax(scale Q K^T) V, forward and backward): batched GEMMs and
//                the softmax kernels, or the fused kernels of cuda_attention.cuh with either tile
//
// Prints one line per row: "rows name variant median_us effective_GBps" (bytes each variant must
// move at least, over its median time of --reps launches timed with events). The PyTorch peer,
// bench/torch_rows.py, prints the same lines for F.layer_norm and softmax in the same run
// (bench/gpu.sh puts both in one table).
//
//   cuda_rows [--reps 50]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <hatch/cuda.hpp>

namespace {

using hatch::Cuda;
using Dev = hatch::Tensor<Cuda>;
namespace k = hatch::cuda_kernels;
namespace d = hatch::cuda_detail;

int reps = 50;

Dev filled(std::size_t n, float scale) {
  std::vector<float> h(n);
  std::uint64_t s = 0x9E3779B97F4A7C15ull * (n + 1);
  for (auto& v : h) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    v = scale * (float(int((s >> 33) % 2001) - 1000) / 1000.0f);
  }
  Dev t;
  t.from_host(h, {std::int64_t(n)});
  return t;
}

// Median microseconds of one call of f over reps calls (after 3 untimed ones).
template <class F>
double median_us(F&& f) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  HATCH_CUDA_CHECK(cudaEventCreate(&a));
  HATCH_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    HATCH_CUDA_CHECK(cudaEventRecord(a, Cuda::stream()));
    f();
    HATCH_CUDA_CHECK(cudaEventRecord(b, Cuda::stream()));
    HATCH_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    HATCH_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(1000.0 * ms);
  }
  HATCH_CUDA_CHECK(cudaEventDestroy(a));
  HATCH_CUDA_CHECK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void report(const char* name, const char* variant, double bytes, double us) {
  std::printf("rows %s %s %.1f %.0f\n", name, variant, us, bytes / (us * 1e3));
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc && std::atoi(argv[i + 1]) > 0) {
      reps = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "cuda_rows: unknown or bad argument '%s' (usage: cuda_rows [--reps N], N > 0)\n", argv[i]);
      return 2;
    }
  }
  if (!Cuda::device_available()) {
    std::fprintf(stderr, "cuda_rows: no CUDA device\n");
    return 1;
  }
  std::printf("device %s\n", Cuda::device_name().c_str());
  const dim3 block = d::kRowBlock;

  // ---- LayerNorm, 12,608 x 768 ----
  {
    const int rows = 12608, cols = 768;
    const std::size_t n = std::size_t(rows) * cols;
    const unsigned grid = d::row_blocks(rows);
    Dev x = filled(n, 2), dy = filled(n, 1), gamma = filled(cols, 1), beta = filled(cols, 1), y = filled(n, 0),
        dx = filled(n, 0), mean = filled(rows, 0), rstd = filled(rows, 0), dg = filled(cols, 0), db = filled(cols, 0);
    const double fwd_bytes = 4.0 * (2.0 * n + 2.0 * rows), bwd_bytes = 4.0 * (3.0 * n + 2.0 * rows);
    auto fwd = [&](const char* variant, auto launch) { report("layer_norm_forward", variant, fwd_bytes, median_us(launch)); };
    fwd("general", [&] {
      HATCH_CUDA_LAUNCH(k::layer_norm_forward<float>, grid, block, y.data(), mean.data(), rstd.data(), x.data(),
                        gamma.data(), beta.data(), rows, cols, 1e-6f);
    });
    fwd("regs_W1", [&] {
      HATCH_CUDA_LAUNCH((k::layer_norm_forward_regs<float, 1, 32>), grid, block, y.data(), mean.data(), rstd.data(),
                        x.data(), gamma.data(), beta.data(), rows, cols, 1e-6f);
    });
    fwd("regs_W4", [&] {
      HATCH_CUDA_LAUNCH((k::layer_norm_forward_regs<float, 4, 32>), grid, block, y.data(), mean.data(), rstd.data(),
                        x.data(), gamma.data(), beta.data(), rows, cols, 1e-6f);
    });
    // Backward with all three gradients, as a Block's LayerNorm needs.
    auto columns = [&] {  // dgamma and dbeta by column chunks (before 2026-11-28)
      d::layer_norm_params_by_columns(dg.data(), db.data(), dy.data(), x.data(), mean.data(), rstd.data(), rows, cols);
    };
    auto bwd = [&](const char* variant, auto launch) { report("layer_norm_backward", variant, bwd_bytes, median_us(launch)); };
    bwd("general_two_kernels", [&] {
      HATCH_CUDA_LAUNCH(k::layer_norm_backward_dx<float>, grid, block, dx.data(), dy.data(), x.data(), mean.data(),
                        rstd.data(), gamma.data(), rows, cols);
      columns();
    });
    bwd("regs_W1_two_kernels", [&] {  // the default before 2026-11-28
      d::layer_norm_backward_one_kernel<float, 1, 32>(dx.data(), nullptr, nullptr, dy.data(), x.data(), mean.data(),
                                                      rstd.data(), gamma.data(), rows, cols);
      columns();
    });
    bwd("regs_W1_one_kernel", [&] {
      d::layer_norm_backward_one_kernel<float, 1, 32>(dx.data(), dg.data(), db.data(), dy.data(), x.data(),
                                                      mean.data(), rstd.data(), gamma.data(), rows, cols);
    });
    bwd("regs_W4_one_kernel", [&] {
      d::layer_norm_backward_one_kernel<float, 4, 32>(dx.data(), dg.data(), db.data(), dy.data(), x.data(),
                                                      mean.data(), rstd.data(), gamma.data(), rows, cols);
    });
    bwd("primitive", [&] {  // what Cuda::layer_norm_backward picks
      Cuda::layer_norm_backward(dx.data(), dg.data(), db.data(), dy.data(), x.data(), mean.data(), rstd.data(),
                                gamma.data(), rows, cols);
    });
  }

  // ---- softmax, 151,296 x 197 (batch 64 x 12 heads x 197 queries) ----
  {
    const int rows = 151296, cols = 197;
    const std::size_t n = std::size_t(rows) * cols;
    const unsigned grid = d::row_blocks(rows);
    Dev x = filled(n, 3), p = filled(n, 0), dp = filled(n, 1), ds = filled(n, 0);
    const double bytes = 4.0 * 2.0 * n, bwd_bytes = 4.0 * 3.0 * n;
    report("softmax_forward", "general", bytes, median_us([&] {
             HATCH_CUDA_LAUNCH(k::softmax_forward<float>, grid, block, p.data(), x.data(), rows, cols, 1.0f);
           }));
    report("softmax_forward", "regs_W1", bytes, median_us([&] {
             HATCH_CUDA_LAUNCH((k::softmax_forward_regs<float, 1, 8>), grid, block, p.data(), x.data(), rows, cols, 1.0f);
           }));
    report("softmax_backward", "general", bwd_bytes, median_us([&] {
             HATCH_CUDA_LAUNCH(k::softmax_backward<float>, grid, block, ds.data(), dp.data(), p.data(), rows, cols, 1.0f);
           }));
    report("softmax_backward", "regs_W1", bwd_bytes, median_us([&] {
             HATCH_CUDA_LAUNCH((k::softmax_backward_regs<float, 1, 8>), grid, block, ds.data(), dp.data(), p.data(),
                               rows, cols, 1.0f);
           }));
  }
  // The same softmax on rows of 196 (a multiple of 4): what 128-bit loads give a softmax.
  {
    const int rows = 151296, cols = 196;
    const std::size_t n = std::size_t(rows) * cols;
    const unsigned grid = d::row_blocks(rows);
    Dev x = filled(n, 3), p = filled(n, 0);
    const double bytes = 4.0 * 2.0 * n;
    report("softmax_forward_196", "regs_W1", bytes, median_us([&] {
             HATCH_CUDA_LAUNCH((k::softmax_forward_regs<float, 1, 8>), grid, block, p.data(), x.data(), rows, cols, 1.0f);
           }));
    report("softmax_forward_196", "regs_W4", bytes, median_us([&] {
             HATCH_CUDA_LAUNCH((k::softmax_forward_regs<float, 4, 8>), grid, block, p.data(), x.data(), rows, cols, 1.0f);
           }));
  }
  // Attention's core at ViT-B/16's shapes (64 examples, 197 tokens, 12 heads of 64), fp32: the
  // GEMM path (two batched GEMMs and the softmax forward; four and the softmax backward) against
  // the fused kernels (HATCH_CUDA_FUSED_ATTENTION=1). Bytes: q, k, v read and out written (forward),
  // and those with dout read and dq, dk, dv written (backward): the least either must move.
  {
    const int batch = 64, n = 197, heads = 12, dh = 64;
    const std::size_t nout = std::size_t(batch) * n * heads * dh, nqkv = 3 * nout;
    Dev qkv = filled(nqkv, 2), out = filled(nout, 0), dout = filled(nout, 1), dqkv = filled(nqkv, 0);
    const float scale = 0.125f;
    const double fwd_bytes = 4.0 * (nqkv + nout), bwd_bytes = 4.0 * (2 * nqkv + 2 * nout);
    for (int tile : {0, 32, 64}) {  // 0: the GEMM path
      Cuda::set_fused_attention(tile != 0);
      if (tile) Cuda::set_attention_tile(tile);
      namespace f = hatch::fused;
      Dev saved = filled(f::attention_saved_size<Cuda>(batch, heads, n, dh), 0);
      Dev scratch = filled(f::attention_scratch_size<Cuda>(batch, heads, n, dh), 0);
      const char* variant = tile == 0 ? "gemm" : tile == 32 ? "fused_tile32" : "fused_tile64";
      report("attention_forward", variant, fwd_bytes, median_us([&] {
               f::attention_forward<Cuda>(out.data(), saved.data(), qkv.data(), batch, n, heads, dh, scale);
             }));
      report("attention_backward", variant, bwd_bytes, median_us([&] {
               f::attention_backward<Cuda>(dqkv.data(), scratch.data(), dout.data(), qkv.data(), out.data(),
                                           saved.data(), batch, n, heads, dh, scale);
             }));
    }
    Cuda::set_fused_attention(false);
  }
  Cuda::synchronize();
  return 0;
}
