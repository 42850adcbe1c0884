#pragma once
// One preset's programs, instantiated for one backend. Each file in examples/presets/ includes
// this header and names what its preset runs with the macros below, inside namespace examples.
// CMake compiles every such file twice in a CUDA build: as C++ for the Cpu backend, and through a
// generated .cu file that includes it (nvcc) for the Cuda backend. The programs' own translation
// units (train_e2e.cpp, cuda_train_e2e.cu, ...) only declare these functions, so a parallel build
// compiles the presets side by side, and each preset's model is compiled once for all programs.
#if defined(__CUDACC__) || defined(HATCH_CUDA_ON_CPU)  // (tests/cuda_on_cpu builds vit-micro's on the host)
#include "cuda_device.cuh"
#define HATCH_EXAMPLE_BACKEND hatch::Cuda
#else
#include <hatch/hatch.hpp>
#define HATCH_EXAMPLE_BACKEND hatch::Cpu
#endif
#include "program_bodies.hpp"

// train_e2e of preset V (hatch::presets::V).
#define HATCH_EXAMPLE_E2E(V) \
  template int train_e2e_as<HATCH_EXAMPLE_BACKEND, hatch::presets::V>(const E2eOptions&, const Dataset&, const Dataset&);

// train_e2e and incubate of preset V, with the Deep Incubation phases that distill reuses to
// incubate V as a teacher.
#define HATCH_EXAMPLE_VIT(V)                                                                                        \
  HATCH_EXAMPLE_E2E(V)                                                                                              \
  template hatch::FitResult incubation_phases<HATCH_EXAMPLE_BACKEND, hatch::presets::V>(                            \
      const IncubateOptions&, const Dataset&, const Dataset&, double*, double*);                                    \
  template int incubate_as<HATCH_EXAMPLE_BACKEND, hatch::presets::V>(const IncubateOptions&, const Dataset&, \
                                                                     const Dataset&);

// The teacher T's incubation phases are instantiated in T's own file (HATCH_EXAMPLE_VIT(T)):
// another preset's file that distils from T says so first, and does not compile them again.
#define HATCH_EXAMPLE_TEACHER_ELSEWHERE(T)                                                   \
  extern template hatch::FitResult incubation_phases<HATCH_EXAMPLE_BACKEND, hatch::presets::T>( \
      const IncubateOptions&, const Dataset&, const Dataset&, double*, double*);

// distill from teacher T into student S (a pair that with_distill_pair in programs.hpp names).
#define HATCH_EXAMPLE_DISTILL(T, S)                                                                         \
  template int distill_as<HATCH_EXAMPLE_BACKEND, hatch::presets::T, hatch::presets::S>(                   \
      const DistillOptions&, const Dataset&, const Dataset&, const std::string&);
