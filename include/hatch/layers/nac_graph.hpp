#pragma once
// NAC signature graph priors (ALGORITHMS.md section 4): random graphs over the U latents, and an
// initialiser that places the signatures so that the kept pairs of a Kmdpa (d_uv = 1 - cos <= tau)
// are the graph's edges.
//
//   nac::Graph                                  undirected, no self loops, adjacency n x n
//   nac::barabasi_albert_graph(n, m, seed)      scale-free (the NAC default: m = 2)
//   nac::erdos_renyi_graph(n, p, seed)          every pair an edge with probability p (0.1)
//   nac::planted_partition_graph(l, k, p_in, p_out, seed)
//                                               l blocks of k latents (8 x 32), inside a block an
//                                               edge with p_in (0.9), across blocks p_out (0.05)
//   nac::ring_of_cliques_graph(cliques, size)   complete blocks, clique i linked to clique i + 1
//   nac::init_signatures_from_graph(signatures, graph, seed, options) -> SignaturePriorReport
//
// Every draw is uniform01(seed, counter) (backend/random.hpp): a graph and its signatures are a
// pure function of the seed, the same on every machine (no std:: distribution is involved).
//
// Barabasi-Albert: the graph starts as a complete graph on m + 1 latents (so every latent has
// degree >= m); each later latent links to m distinct earlier ones chosen with probability
// proportional to their degree (a draw from the list of edge endpoints; repeats redrawn).
// Ring of cliques: clique i holds latents [i size, (i + 1) size); its last latent is linked to
// the first latent of clique i + 1 (mod cliques), as networkx.ring_of_cliques.
//
// The signatures. Kmdpa keeps a pair when d_uv <= tau (0.9): an edge should have d <= tau, a
// non-edge d > tau. The initialiser works on unit vectors n_u (dim S), started as normalised
// Gaussian vectors (Box-Muller from the seeded draws; in dimension S random unit vectors have
// cos ~ 0 +- 1/sqrt(S), i.e. d ~ 1 > tau: every pair starts truncated). It then runs projected
// gradient descent on the sphere for a squared hinge with a margin m (0.05):
//   L = mean over edges of max(0, d_uv - (tau - m))^2 + mean over non-edges of max(0, tau + m - d_uv)^2
// (each half a mean, so the rare edges weigh as much as the many non-edges); a step moves every
// n_u against its gradient, step size `learning_rate`, and renormalises it. It stops early once
// every pair sits on its side of tau with the margin. This is the reference's idea (fit the
// signatures to the graph with a hinge on the distances at the truncation threshold) written
// independently: the reference starts from orthogonal vectors and runs Adam on an unsquared hinge.
// The result is written into the table at unit norm. A graph need not be realisable in S
// dimensions; the report says how much of it was: the fraction of the graph's edges with
// d <= tau (edge_recall) and of its non-edges with d > tau (non_edge_separation).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <vector>

#include "hatch/backend/random.hpp"
#include "hatch/core/error.hpp"

namespace hatch::nac {

struct Graph {
  int n = 0;
  std::vector<std::uint8_t> adjacency;  // n x n, symmetric, zero diagonal

  explicit Graph(int nodes = 0) : n(nodes), adjacency(std::size_t(nodes) * nodes, 0) {}
  bool has_edge(int u, int v) const { return adjacency[std::size_t(u) * n + v] != 0; }
  void add_edge(int u, int v) {
    if (u == v) return;
    adjacency[std::size_t(u) * n + v] = adjacency[std::size_t(v) * n + u] = 1;
  }
  int degree(int u) const {
    int d = 0;
    for (int v = 0; v < n; ++v) d += adjacency[std::size_t(u) * n + v];
    return d;
  }
  std::int64_t edges() const {
    std::int64_t e = 0;
    for (auto a : adjacency) e += a;
    return e / 2;
  }
  // edges / (n (n - 1) / 2)
  double density() const { return n < 2 ? 0.0 : double(edges()) / (double(n) * (n - 1) / 2); }
};

inline Graph barabasi_albert_graph(int n, int m, std::uint64_t seed) {
  HATCH_CHECK(m >= 1 && n > m, "barabasi_albert_graph", "needs 1 <= m < n, got n " + std::to_string(n) + ", m " + std::to_string(m));
  Graph g(n);
  std::vector<int> ends;  // every edge's two endpoints: a uniform pick is degree-proportional
  for (int u = 0; u <= m; ++u)
    for (int v = u + 1; v <= m; ++v) {
      g.add_edge(u, v);
      ends.push_back(u);
      ends.push_back(v);
    }
  std::uint64_t counter = 0;
  std::vector<int> chosen;
  for (int v = m + 1; v < n; ++v) {
    chosen.clear();
    while (int(chosen.size()) < m) {
      const int t = ends[std::size_t(uniform01(seed, counter++) * double(ends.size()))];
      if (std::find(chosen.begin(), chosen.end(), t) == chosen.end()) chosen.push_back(t);
    }
    for (int t : chosen) {
      g.add_edge(v, t);
      ends.push_back(v);
      ends.push_back(t);
    }
  }
  return g;
}

inline Graph erdos_renyi_graph(int n, double p, std::uint64_t seed) {
  Graph g(n);
  for (int u = 0; u < n; ++u)
    for (int v = u + 1; v < n; ++v)
      if (uniform01(seed, std::uint64_t(u) * n + v) < p) g.add_edge(u, v);
  return g;
}

// Latent u is in block u / block_size.
inline Graph planted_partition_graph(int blocks, int block_size, double p_in, double p_out, std::uint64_t seed) {
  const int n = blocks * block_size;
  Graph g(n);
  for (int u = 0; u < n; ++u)
    for (int v = u + 1; v < n; ++v)
      if (uniform01(seed, std::uint64_t(u) * n + v) < (u / block_size == v / block_size ? p_in : p_out)) g.add_edge(u, v);
  return g;
}

inline Graph ring_of_cliques_graph(int cliques, int clique_size) {
  HATCH_CHECK(cliques >= 2 && clique_size >= 2, "ring_of_cliques_graph", "needs at least 2 cliques of 2");
  const int n = cliques * clique_size;
  Graph g(n);
  for (int c = 0; c < cliques; ++c) {
    for (int u = 0; u < clique_size; ++u)
      for (int v = u + 1; v < clique_size; ++v) g.add_edge(c * clique_size + u, c * clique_size + v);
    g.add_edge(c * clique_size + clique_size - 1, ((c + 1) % cliques) * clique_size);
  }
  return g;
}

struct SignaturePriorOptions {
  double tau = 0.9;             // Kmdpa's truncation threshold
  double margin = 0.05;         // edges aim at d <= tau - margin, non-edges at d >= tau + margin
  int iterations = 2000;        // at most
  double learning_rate = 0.5;   // per step, on the unit vectors
};

struct SignaturePriorReport {
  double edge_recall = 0;          // graph edges with d <= tau, as a fraction of the edges
  double non_edge_separation = 0;  // non-edges with d > tau, as a fraction of the non-edges
  int iterations = 0;              // steps taken
};

// Distances d_uv = 1 - n_u . n_v of unit vectors (row-major, n x s).
inline void unit_distances(const std::vector<double>& unit, int n, int s, std::vector<double>& d) {
  d.assign(std::size_t(n) * n, 0.0);
  for (int u = 0; u < n; ++u)
    for (int v = u; v < n; ++v) {
      double c = 0;
      for (int k = 0; k < s; ++k) c += unit[std::size_t(u) * s + k] * unit[std::size_t(v) * s + k];
      d[std::size_t(u) * n + v] = d[std::size_t(v) * n + u] = 1.0 - c;
    }
}

// Scores unit vectors against a graph (see the file comment).
inline SignaturePriorReport score_signatures(const std::vector<double>& unit, int s, const Graph& g, double tau) {
  std::vector<double> d;
  unit_distances(unit, g.n, s, d);
  std::int64_t e = 0, e_ok = 0, ne = 0, ne_ok = 0;
  for (int u = 0; u < g.n; ++u)
    for (int v = u + 1; v < g.n; ++v) {
      const bool kept = d[std::size_t(u) * g.n + v] <= tau;
      if (g.has_edge(u, v)) {
        ++e;
        e_ok += kept;
      } else {
        ++ne;
        ne_ok += !kept;
      }
    }
  SignaturePriorReport r;
  r.edge_recall = e ? double(e_ok) / double(e) : 1.0;
  r.non_edge_separation = ne ? double(ne_ok) / double(ne) : 1.0;
  return r;
}

// Fits unit vectors (n x s, row-major) to the graph; see the file comment.
inline SignaturePriorReport fit_signatures(const Graph& g, int s, std::uint64_t seed, std::vector<double>& unit,
                                           const SignaturePriorOptions& opt = {}) {
  const int n = g.n;
  unit.assign(std::size_t(n) * s, 0.0);
  for (std::size_t i = 0; i < unit.size(); ++i) {  // Box-Muller, two draws per entry
    const double w1 = uniform01(seed, 2 * i), w2 = uniform01(seed, 2 * i + 1);
    unit[i] = std::sqrt(-2.0 * std::log1p(-w1)) * std::cos(2.0 * std::numbers::pi * w2);
  }
  auto normalise = [&](int u) {
    double q = 0;
    for (int k = 0; k < s; ++k) q += unit[std::size_t(u) * s + k] * unit[std::size_t(u) * s + k];
    const double inv = 1.0 / std::max(std::sqrt(q), 1e-12);
    for (int k = 0; k < s; ++k) unit[std::size_t(u) * s + k] *= inv;
  };
  for (int u = 0; u < n; ++u) normalise(u);
  const std::int64_t e = g.edges(), ne = std::int64_t(n) * (n - 1) / 2 - e;
  const double we = e ? 1.0 / double(e) : 0.0, wn = ne ? 1.0 / double(ne) : 0.0;
  std::vector<double> d, grad(unit.size());
  int it = 0;
  for (; it < opt.iterations; ++it) {
    unit_distances(unit, n, s, d);
    std::fill(grad.begin(), grad.end(), 0.0);
    bool done = true;
    for (int u = 0; u < n; ++u)
      for (int v = u + 1; v < n; ++v) {
        const double duv = d[std::size_t(u) * n + v];
        // dL/dd of this pair
        double gd = 0;
        if (g.has_edge(u, v)) {
          if (duv > opt.tau - opt.margin) gd = 2 * we * (duv - (opt.tau - opt.margin));
        } else if (duv < opt.tau + opt.margin) {
          gd = -2 * wn * (opt.tau + opt.margin - duv);
        }
        if (gd == 0) continue;
        done = false;
        // dd/dn_u = -n_v, dd/dn_v = -n_u
        for (int k = 0; k < s; ++k) {
          grad[std::size_t(u) * s + k] -= gd * unit[std::size_t(v) * s + k];
          grad[std::size_t(v) * s + k] -= gd * unit[std::size_t(u) * s + k];
        }
      }
    if (done) break;
    // the step is scaled by the number of pairs, so that learning_rate does not depend on n
    const double step = opt.learning_rate * double(n);
    for (std::size_t i = 0; i < unit.size(); ++i) unit[i] -= step * grad[i];
    for (int u = 0; u < n; ++u) normalise(u);
  }
  SignaturePriorReport r = score_signatures(unit, s, g, opt.tau);
  r.iterations = it;
  return r;
}

// Writes signatures fitted to `graph` into the table (rows = graph.n, unit norm).
// Table: LatentSignatures<B, SigDim> (layers/nac.hpp), or any table with `cols`, rows() and param.
template <class Table>
SignaturePriorReport init_signatures_from_graph(Table& signatures, const Graph& graph, std::uint64_t seed,
                                                const SignaturePriorOptions& opt = {}) {
  constexpr int SigDim = Table::cols;
  using Scalar = typename decltype(signatures.param.value.to_host())::value_type;
  HATCH_CHECK(signatures.rows() == graph.n, "init_signatures_from_graph",
              "the table has " + std::to_string(signatures.rows()) + " rows, the graph " + std::to_string(graph.n) +
                  " nodes");
  std::vector<double> unit;
  const auto report = fit_signatures(graph, SigDim, seed, unit, opt);
  std::vector<Scalar> h(unit.begin(), unit.end());
  signatures.param.value.from_host(h, {graph.n, SigDim});
  return report;
}

}  // namespace hatch::nac
