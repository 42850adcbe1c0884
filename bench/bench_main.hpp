#pragma once
// The main() of the Google Benchmark programs: threads from HATCH_THREADS (default 2), recorded
// in the report's context with the batch size.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace bench {

inline int benchmark_main(const char* program, int batch, int argc, char** argv) {
  int threads = 2;
  if (const char* env = std::getenv("HATCH_THREADS")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || v < 1 || v > 1024) {
      std::fprintf(stderr, "%s: HATCH_THREADS must be an integer in [1, 1024], got '%s'\n", program, env);
      return 2;
    }
    threads = int(v);
  }
  omp_set_num_threads(threads);
  benchmark::AddCustomContext("hatch_threads", std::to_string(threads));
  benchmark::AddCustomContext("batch", std::to_string(batch));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace bench
