// bench/train_step_cuda.cu, compiled by the host compiler against tests/cuda_on_cpu: train_step's
// --device cuda path (what bench/gpu.sh times on a GPU) run on CPU threads (train_step_on_cpu).
#include "../../bench/train_step_cuda.cu"
