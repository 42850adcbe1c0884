#pragma once
// Mixture of experts: Moe<D, E, K, Router, Expert> replaces a block's MLP (BlockWith<D, H, Moe<...>>).
//
//   logits = gate(x)                 a Linear D -> E (bias as the router says)
//   routing = Router(logits)         on the host: top-k experts per token, combine weights, slots
//   xs = gather(x)                   each expert's tokens, contiguous: expert e owns rows
//                                    [offset_e, offset_e+1) of xs
//   ys[e] = Expert_e(xs[e])          one forward per expert over its rows: compute grows with k
//   y[t] = sum_j w[t,j] ys[slot(t,j)]  (a dropped choice adds nothing: the token keeps its residual)
//
// Routing is decided on the host from the downloaded logits (tokens x E values): the same code,
// the same choices and the same drops on every backend, and one host synchronisation per layer
// and pass on a GPU (forward: the logits; backward: the combine-weight gradients), never one
// per expert. The heavy data movement runs on the backend (gather_rows, combine_rows,
// gather_dot_rows), deterministic, without atomics.
//
// Routers (policies; ALGORITHMS.md §2-§3):
//   TopKGate<K>            m2mKD's student (fastmoe NaiveGate): gate with bias, top-k, softmax over
//                          the k chosen logits, every token reaches its experts, no auxiliary loss.
//   VmoeRouter<K, ...>     Riquelme et al.: no bias; noise N(0, 1/E^2) in training; combine weights
//                          the full-softmax probabilities; capacity ceil(k S C / E) with C = 1.05 in
//                          training; Batch Priority Routing (tokens by top-1 probability, highest
//                          first); every top-1 choice placed before any top-2 choice; importance
//                          and load losses (0.005 each) through the auxiliary-loss channel.
#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "hatch/backend/random.hpp"
#include "hatch/core/expert_load.hpp"
#include "hatch/core/layer.hpp"
#include "hatch/core/indices.hpp"
#include "hatch/layers/block.hpp"
#include "hatch/layers/linear.hpp"

namespace hatch {

// The routing of one forward pass, on the host.
struct Routing {
  int tokens = 0, k = 0, experts = 0;
  std::vector<std::int32_t> choice;  // (t, j) -> expert, t * k + j
  std::vector<std::int32_t> slot;    // (t, j) -> row of the expert buffers, or -1 when dropped
  std::vector<double> weight;        // (t, j) -> combine weight (0 when dropped)
  std::vector<std::int32_t> order;   // row of the expert buffers -> token
  std::vector<int> offset;           // expert e's rows are [offset[e], offset[e + 1])
  int dropped = 0;                   // choices dropped for capacity

  void reset(int t, int kk, int e) {
    tokens = t;
    k = kk;
    experts = e;
    choice.assign(std::size_t(t) * kk, -1);
    slot.assign(std::size_t(t) * kk, -1);
    weight.assign(std::size_t(t) * kk, 0.0);
    order.clear();
    offset.assign(std::size_t(e) + 1, 0);
    dropped = 0;
  }
  // Lays out the kept choices expert by expert, in `placement` order within an expert (the
  // order in which the router gave them their places).
  void place(const std::vector<std::int32_t>& placement) {
    next_.assign(std::size_t(experts), 0);  // first the counts, then each expert's next row
    for (const auto tj : placement) ++next_[std::size_t(choice[std::size_t(tj)])];
    for (int e = 0; e < experts; ++e) offset[std::size_t(e) + 1] = offset[std::size_t(e)] + next_[std::size_t(e)];
    order.assign(std::size_t(offset[std::size_t(experts)]), 0);
    std::copy(offset.begin(), offset.end() - 1, next_.begin());
    auto& next = next_;
    for (const auto tj : placement) {
      const int row = next[std::size_t(choice[std::size_t(tj)])]++;
      slot[std::size_t(tj)] = row;
      order[std::size_t(row)] = tj / k;
    }
  }

 private:
  std::vector<int> next_;  // kept, so that a steady state allocates nothing
};

namespace moe_detail {
// The k largest of v[0..n) (ties: the lower index first), largest first.
inline void top_k(const double* v, int n, int k, std::int32_t* idx) {
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < n; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken = taken || idx[i] == e;
      if (!taken && (best < 0 || v[e] > v[best])) best = e;
    }
    idx[j] = best;
  }
}
inline void softmax(const double* z, int n, double* p) {
  const double mx = *std::max_element(z, z + n);
  double s = 0;
  for (int i = 0; i < n; ++i) s += p[i] = std::exp(z[i] - mx);
  for (int i = 0; i < n; ++i) p[i] /= s;
}
// dz += p * (g - sum(p g)): the softmax's Jacobian applied to g.
inline void softmax_backward(const double* p, const double* g, int n, double* dz) {
  double dot = 0;
  for (int i = 0; i < n; ++i) dot += p[i] * g[i];
  for (int i = 0; i < n; ++i) dz[i] += p[i] * (g[i] - dot);
}
inline double normal_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }
inline double normal_pdf(double z) { return std::exp(-0.5 * z * z) / std::sqrt(2.0 * 3.14159265358979323846); }
}  // namespace moe_detail

// m2mKD's student router (fastmoe NaiveGate): top-k of the gate's logits, softmax over the k.
template <int K>
struct TopKGate {
  static_assert(K >= 1, "hatch::TopKGate<K>: K must be at least 1");
  static constexpr int k = K;
  static constexpr bool gate_bias = true;

  template <int E>
  class Policy {
    static_assert(K <= E, "hatch::TopKGate<K>: K must not exceed the number of experts");

   public:
    // logits: tokens x E. Every choice gets a place: no capacity, nothing dropped.
    void route(const std::vector<double>& logits, int tokens, bool, Context&, Routing& r) {
      r.reset(tokens, K, E);
      probs_.assign(std::size_t(tokens) * K, 0.0);
      placement_.clear();
      double z[K];
      for (int t = 0; t < tokens; ++t) {
        const double* l = logits.data() + std::size_t(t) * E;
        std::int32_t* c = r.choice.data() + std::size_t(t) * K;
        moe_detail::top_k(l, E, K, c);
        for (int j = 0; j < K; ++j) z[j] = l[c[j]];
        moe_detail::softmax(z, K, probs_.data() + std::size_t(t) * K);
        for (int j = 0; j < K; ++j) {
          r.weight[std::size_t(t) * K + j] = probs_[std::size_t(t) * K + j];
          placement_.push_back(t * K + j);
        }
      }
      r.place(placement_);  // token-major placement: within an expert, tokens in their order
    }
    double aux_loss() const { return 0; }
    // dweight: tokens x K gradients of the combine weights -> dlogits (tokens x E, overwritten).
    void backward(const Routing& r, const std::vector<double>& dweight, bool, std::vector<double>& dlogits) const {
      dlogits.assign(std::size_t(r.tokens) * E, 0.0);
      double dz[K];
      for (int t = 0; t < r.tokens; ++t) {
        std::fill(dz, dz + K, 0.0);
        moe_detail::softmax_backward(probs_.data() + std::size_t(t) * K, dweight.data() + std::size_t(t) * K, K, dz);
        for (int j = 0; j < K; ++j) dlogits[std::size_t(t) * E + r.choice[std::size_t(t) * K + j]] += dz[j];
      }
    }

   private:
    std::vector<double> probs_;
    std::vector<std::int32_t> placement_;
  };
};

// Riquelme et al.'s V-MoE router. CapacityPercent: C x 100 in training (105 = 1.05); EvalPercent
// the same in evaluation (0: no capacity limit). AuxWeight: the weight of each of the two
// auxiliary losses, in millionths (5000 = 0.005).
template <int K, int CapacityPercent = 105, int EvalPercent = 0, int AuxWeightMillionths = 5000>
struct VmoeRouter {
  static_assert(K >= 1, "hatch::VmoeRouter<K>: K must be at least 1");
  static constexpr int k = K;
  static constexpr bool gate_bias = false;
  static constexpr double aux_weight = AuxWeightMillionths * 1e-6;

  template <int E>
  class Policy {
    static_assert(K <= E, "hatch::VmoeRouter<K>: K must not exceed the number of experts");

   public:
    void route(const std::vector<double>& logits, int tokens, bool training, Context& ctx, Routing& r) {
      r.reset(tokens, K, E);
      training_ = training;
      const double sigma = 1.0 / E;
      noisy_.assign(logits.begin(), logits.end());
      if (training) {  // N(0, 1/E^2), a pure function of (seed, counter): backends and reruns agree
        const std::uint64_t base = ctx.draw(std::uint64_t(2) * noisy_.size());
        for (std::size_t i = 0; i < noisy_.size(); ++i) {
          const double u1 = std::max(uniform01(ctx.seed, base + 2 * i), 1e-300), u2 = uniform01(ctx.seed, base + 2 * i + 1);
          noisy_[i] += sigma * std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * 3.14159265358979323846 * u2);
        }
      }
      probs_.resize(noisy_.size());
      for (int t = 0; t < tokens; ++t) {
        const std::size_t o = std::size_t(t) * E;
        moe_detail::softmax(noisy_.data() + o, E, probs_.data() + o);
        moe_detail::top_k(probs_.data() + o, E, K, r.choice.data() + std::size_t(t) * K);
      }
      // Batch Priority Routing: tokens by their top-1 probability, highest first.
      priority_.resize(std::size_t(tokens));
      std::iota(priority_.begin(), priority_.end(), 0);
      // (std::sort with the token index as tie-break: stable, and no temporary buffer.)
      std::sort(priority_.begin(), priority_.end(), [&](int a, int b) {
        const double pa = probs_[std::size_t(a) * E + r.choice[std::size_t(a) * K]];
        const double pb = probs_[std::size_t(b) * E + r.choice[std::size_t(b) * K]];
        return pa > pb || (pa == pb && a < b);
      });
      const int percent = training ? CapacityPercent : EvalPercent;
      const int capacity = percent > 0 ? int(std::ceil(double(K) * tokens * percent / 100.0 / E)) : tokens;
      fill_.assign(std::size_t(E), 0);
      placement_.clear();
      for (int j = 0; j < K; ++j)  // every top-1 choice before any top-2 choice
        for (const int t : priority_) {
          const std::size_t tj = std::size_t(t) * K + j;
          const int e = r.choice[tj];
          if (fill_[std::size_t(e)] < capacity) {
            ++fill_[std::size_t(e)];
            r.weight[tj] = probs_[std::size_t(t) * E + e];
            placement_.push_back(std::int32_t(tj));
          } else {
            ++r.dropped;
          }
        }
      r.place(placement_);
      aux_ = training ? aux_terms(logits, tokens, sigma, r.choice) : 0.0;
    }
    double aux_loss() const { return aux_; }

    void backward(const Routing& r, const std::vector<double>& dweight, bool with_aux, std::vector<double>& dlogits) const {
      dlogits.assign(std::size_t(r.tokens) * E, 0.0);
      std::vector<double>& g = g_;
      for (int t = 0; t < r.tokens; ++t) {
        const std::size_t o = std::size_t(t) * E;
        g.assign(std::size_t(E), 0.0);
        for (int j = 0; j < K; ++j) {
          const std::size_t tj = std::size_t(t) * K + j;
          if (r.slot[tj] >= 0) g[std::size_t(r.choice[tj])] += dweight[tj];
        }
        if (with_aux && training_)
          for (int e = 0; e < E; ++e) g[std::size_t(e)] += aux_weight * dimportance_[std::size_t(e)];
        moe_detail::softmax_backward(probs_.data() + o, g.data(), E, dlogits.data() + o);
        if (with_aux && training_)
          for (int e = 0; e < E; ++e) dlogits[o + e] += aux_weight * dload_logit_[o + e];
      }
    }

   private:
    // CV(x)^2 = var / mean^2 over experts (population variance), and its gradient.
    static double cv2(const std::vector<double>& x, std::vector<double>& dx) {
      const double n = double(x.size());
      const double m = std::accumulate(x.begin(), x.end(), 0.0) / n;
      double var = 0;
      for (const double v : x) var += (v - m) * (v - m);
      var /= n;
      dx.resize(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) dx[i] = 2.0 / (n * m * m) * ((x[i] - m) - var / m);
      return var / (m * m);
    }
    // 0.005 L_imp + 0.005 L_load; keeps what backward needs for their exact gradients, the load
    // threshold's included: a token's threshold is its k-th largest noisy logit, that of its k-th
    // choice (choice, tokens x K: top-k of the probabilities, the same order), and it moves with
    // that logit.
    double aux_terms(const std::vector<double>& logits, int tokens, double sigma,
                     const std::vector<std::int32_t>& choice) {
      importance_.assign(std::size_t(E), 0.0);
      load_.assign(std::size_t(E), 0.0);
      for (int t = 0; t < tokens; ++t)
        for (int e = 0; e < E; ++e) importance_[std::size_t(e)] += probs_[std::size_t(t) * E + e];
      const double l_imp = cv2(importance_, dimportance_);
      dload_logit_.assign(std::size_t(tokens) * E, 0.0);
      pdf_.resize(std::size_t(tokens) * E);
      for (int t = 0; t < tokens; ++t) {
        const std::size_t o = std::size_t(t) * E;
        const double thr = noisy_[o + std::size_t(choice[std::size_t(t) * K + K - 1])];
        for (int e = 0; e < E; ++e) {
          const double z = (thr - logits[o + e]) / sigma;
          load_[std::size_t(e)] += (1.0 - moe_detail::normal_cdf(z)) / tokens;
          pdf_[o + e] = moe_detail::normal_pdf(z) / (sigma * tokens);  // d load_e / d logit_(t,e)
        }
      }
      const double l_load = cv2(load_, dload_);
      for (int t = 0; t < tokens; ++t) {
        const std::size_t o = std::size_t(t) * E;
        double dthr = 0;  // load_e falls as the threshold rises: d load_e / d thr = -pdf
        for (int e = 0; e < E; ++e) {
          dload_logit_[o + e] = dload_[std::size_t(e)] * pdf_[o + e];
          dthr -= dload_[std::size_t(e)] * pdf_[o + e];
        }
        dload_logit_[o + std::size_t(choice[std::size_t(t) * K + K - 1])] += dthr;
      }
      return aux_weight * (l_imp + l_load);
    }

    bool training_ = false;
    double aux_ = 0;
    std::vector<double> noisy_, probs_, dimportance_, dload_logit_, importance_, load_, dload_, pdf_;
    mutable std::vector<double> g_;
    std::vector<int> priority_, fill_;
    std::vector<std::int32_t> placement_;
  };
};

template <Backend B, int D, int E, class Router, class ExpertSpec>
class MoeLayer : public LeafLayer<MoeLayer<B, D, E, Router, ExpertSpec>, B, D, D> {
  static_assert(E >= 1, "hatch::Moe<D, E, ...>: at least one expert");
  static_assert(ExpertSpec::in == D && ExpertSpec::out == D,
                "hatch::Moe<D, E, Router, Expert>: each expert must map width D to width D");

 public:
  using T = typename B::Scalar;
  using Expert = typename ExpertSpec::template bind<B>;
  static constexpr int experts_count = E, k = Router::k;

  void reset_parameters(Initializer& init) {
    gate.reset_parameters(init);
    for (auto& e : experts) e.reset_parameters(init);
  }

  const Tensor<B>& forward(const Tensor<B>& x, Context& ctx) {
    HATCH_CHECK(x.cols() == D, "Moe", "input width " + std::to_string(x.cols()) + ", expected " + std::to_string(D));
    x_ = &x;
    const int tokens = int(x.rows());
    const Tensor<B>& logits = gate.forward(x, ctx);
    host_.resize(std::size_t(tokens) * E);
    B::download(host_.data(), logits.data(), host_.size());  // the layer's one synchronisation
    logits_.assign(host_.begin(), host_.end());
    router_.route(logits_, tokens, ctx.training, ctx, routing_);
    if (ctx.training) {  // the epoch's expert load (take_expert_load)
      for (int e = 0; e < E; ++e) load_[std::size_t(e)] += routing_.offset[std::size_t(e) + 1] - routing_.offset[std::size_t(e)];
      dropped_ += routing_.dropped;
      choices_ += std::int64_t(tokens) * k;
    }
    upload_routing();

    const int rows = routing_.offset[E];
    xs_.resize({std::max(rows, 1), D});
    ys_.resize({std::max(rows, 1), D});
    B::gather_rows(xs_.data(), x.data(), order_.data(), nullptr, rows, D);
    each_expert(xs_, views_, ys_, ctx, [&](Expert& ex, const Tensor<B>& rows_e) -> const Tensor<B>& {
      return ex.forward(rows_e, ctx);
    });
    y_.resize(x.shape());
    B::combine_rows(y_.data(), ys_.data(), slots_.data(), weights_.data(), tokens, k, D);
    return y_;
  }

  const Tensor<B>& backward(const Tensor<B>& dy, Context& ctx) {
    const int tokens = routing_.tokens, rows = routing_.offset[E];
    // Combine weights: dw[t, j] = dy[t] . ys[slot(t, j)], on the host for the router.
    dweight_dev_.resize({std::max(tokens * k, 1)});
    B::gather_dot_rows(dweight_dev_.data(), dy.data(), ys_.data(), slots_.data(), tokens, k, D);
    host_.resize(std::size_t(tokens) * k);
    B::download(host_.data(), dweight_dev_.data(), host_.size());  // the backward's one synchronisation
    dweight_.assign(host_.begin(), host_.end());
    // A frozen layer adds no auxiliary gradient; the router knows whether its pass had terms.
    router_.backward(routing_, dweight_, ctx.param_grads, dlogits_);

    // Each expert row's gradient: dys[row] = w(t, j) dy[t] for the (t, j) placed there.
    dys_.resize({std::max(rows, 1), D});
    B::gather_rows(dys_.data(), dy.data(), order_.data(), row_weights_.data(), rows, D);
    dxs_.resize({std::max(rows, 1), D});
    each_expert(dys_, dviews_, dxs_, ctx, [&](Expert& ex, const Tensor<B>& rows_e) -> const Tensor<B>& {
      return backward_inner(ex, rows_e, ctx);  // dx sums the experts' input gradients
    });
    // The gate: dlogits back through the Linear, then dx = sum over a token's places + gate path.
    host_.assign(dlogits_.begin(), dlogits_.end());
    dlogits_dev_.resize(gate.output().shape());
    B::upload(dlogits_dev_.data(), host_.data(), host_.size());
    const Tensor<B>& dgate = gate.backward(dlogits_dev_, ctx);
    if (!ctx.input_grad) return dx_;
    Tensor<B>& dx = grad_buffer(ctx, dx_, x_->shape());
    B::combine_rows(dx.data(), dxs_.data(), slots_.data(), nullptr, tokens, k, D);
    B::axpy(dx.data(), T(1), dgate.data(), std::size_t(dx.numel()));
    release_grad(ctx, dgate);
    return dx;
  }

  // The weighted auxiliary terms of the last training forward (0 for TopKGate, and in evaluation).
  double aux_loss() const { return router_.aux_loss(); }
  // The last forward's routing (expert load, drops): metrics and tests.
  const Routing& routing() const { return routing_; }
  // The training forwards since the last call: the fraction of the kept choices each expert
  // received, and the fraction of all choices dropped for capacity. Resets the counts. fit
  // writes these into metrics.jsonl each epoch ("expert_load", "dropped_fraction").
  ExpertLoad take_expert_load() {
    ExpertLoad r;
    const double kept = double(choices_ - dropped_);
    for (const auto n : load_) r.load.push_back(kept > 0 ? double(n) / kept : 0.0);
    r.dropped = choices_ > 0 ? double(dropped_) / double(choices_) : 0.0;
    load_.fill(0);
    dropped_ = choices_ = 0;
    return r;
  }

  template <class F>
  void visit(F&& f, const std::string& prefix) {
    gate.visit(f, prefix + "gate.");
    for (int e = 0; e < E; ++e) experts[std::size_t(e)].visit(f, prefix + "experts." + std::to_string(e) + ".");
  }

  LinearLayer<B, D, E, Router::gate_bias> gate;
  std::array<Expert, E> experts;

 private:
  // For every expert with rows: f(expert, a view of its rows of `in`), and the result copied into
  // the same rows of `out`. (The views are members: an expert's layers keep pointers to them.)
  template <class F>
  void each_expert(const Tensor<B>& in, std::array<Tensor<B>, E>& views, Tensor<B>& out, const Context& ctx, F&& f) {
    for (int e = 0; e < E; ++e) {
      const int first = routing_.offset[std::size_t(e)], n = routing_.offset[std::size_t(e) + 1] - first;
      if (n == 0) continue;
      views[std::size_t(e)].view_rows(in, first, n);
      const Tensor<B>& r = f(experts[std::size_t(e)], views[std::size_t(e)]);
      B::copy(out.data() + std::size_t(first) * D, r.data(), std::size_t(n) * D);
      release_grad(ctx, r, views[std::size_t(e)]);  // an expert's input gradient, copied (a no-op forward)
    }
  }

  void upload_routing() {
    const auto& r = routing_;
    if (!r.order.empty()) order_.from_host(r.order);
    slots_.from_host(r.slot);
    host_.resize(r.weight.size());
    std::copy(r.weight.begin(), r.weight.end(), host_.begin());
    weights_.resize({std::max<std::int64_t>(std::int64_t(host_.size()), 1)});
    B::upload(weights_.data(), host_.data(), host_.size());
    // The weight of each expert row (for the backward's scaled gather).
    host_.assign(std::max<std::size_t>(r.order.size(), 1), T(0));
    for (std::size_t tj = 0; tj < r.slot.size(); ++tj)
      if (r.slot[tj] >= 0) host_[std::size_t(r.slot[tj])] = T(r.weight[tj]);
    row_weights_.resize({std::int64_t(host_.size())});
    B::upload(row_weights_.data(), host_.data(), host_.size());
  }

  typename Router::template Policy<E> router_;
  Routing routing_;
  std::array<std::int64_t, E> load_{};
  std::int64_t dropped_ = 0, choices_ = 0;
  const Tensor<B>* x_ = nullptr;
  std::vector<T> host_;
  std::vector<double> logits_, dweight_, dlogits_;
  Indices<B> order_, slots_;
  Tensor<B> weights_, row_weights_, xs_, ys_, dys_, dxs_, y_, dx_, dweight_dev_, dlogits_dev_;
  std::array<Tensor<B>, E> views_, dviews_;
};

// Moe<D, E, Router, Expert>: E experts (default the ViT MLP, D -> 4D -> D), routed by Router.
template <int D, int E, class Router, class ExpertSpec = Mlp<D, 4 * D>>
struct Moe {
  static constexpr int in = D, out = D;
  template <Backend B> using bind = MoeLayer<B, D, E, Router, ExpertSpec>;
};

}  // namespace hatch
