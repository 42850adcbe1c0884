#pragma once
// Everything that does not depend on a particular backend. The umbrella headers
// <hatch/hatch.hpp> (Cpu) and <hatch/cuda.hpp> (Cuda) add a backend to this; include one of
// them rather than this file.
//
// What it brings (one include is the whole library; templates cost only when instantiated, and
// the training, data and modular headers add about 0.5 s of compile time to a program that uses
// only layers and models: 8.6 s -> 9.1 s for tests/consumer/main.cpp at -O2):
//   tensors, parameters, errors          Tensor (and zero-copy views), Shape, Parameter, Context,
//                                        Indices (int32 routing tables in a backend's memory)
//   layers                               Linear, LayerNorm, Gelu, Silu, Elementwise<Fn>, Dropout,
//                                        DropPath, Attention, Mlp, Block, PatchEmbed, ClassPos,
//                                        ClassHead, Flatten, Reshape, set_drop_path; NAC: ModFc,
//                                        Kmdpa, LatentCodes, LatentSignatures
//   composition                          Named, Sequential, Residual, Repeat, AsBlock, Stages,
//                                        Stitched, Model<Spec, B>
//   models                               Vit, presets
//   training                             losses, AdamW, schedules, fit, evaluate, progress and
//                                        metric logs, checkpoints (safetensors)
//   data                                 IDX reader, Fashion-MNIST, batching and augmentation
//   modular training                     Incubator (Deep Incubation), ModuleDistiller (m2mKD)
#include "hatch/backend/concept.hpp"
#include "hatch/compose/model.hpp"
#include "hatch/compose/sequential.hpp"
#include "hatch/compose/stages.hpp"
#include "hatch/core/arena.hpp"
#include "hatch/core/aux_loss.hpp"
#include "hatch/core/error.hpp"
#include "hatch/core/host_device.hpp"
#include "hatch/core/indices.hpp"
#include "hatch/core/parameter.hpp"
#include "hatch/data/batcher.hpp"
#include "hatch/data/fashion_mnist.hpp"
#include "hatch/data/idx.hpp"
#include "hatch/data/shift.hpp"
#include "hatch/io/safetensors.hpp"
#include "hatch/layers/activation.hpp"
#include "hatch/layers/attention.hpp"
#include "hatch/layers/block.hpp"
#include "hatch/layers/drop_path_schedule.hpp"
#include "hatch/layers/embed.hpp"
#include "hatch/layers/head.hpp"
#include "hatch/layers/linear.hpp"
#include "hatch/layers/nac.hpp"
#include "hatch/layers/nac_blocks.hpp"
#include "hatch/layers/norm.hpp"
#include "hatch/layers/regularize.hpp"
#include "hatch/layers/reshape.hpp"
#include "hatch/models/nac.hpp"
#include "hatch/models/vit.hpp"
#include "hatch/modular/distiller.hpp"
#include "hatch/modular/incubator.hpp"
#include "hatch/tensor.hpp"
#include "hatch/train/checkpoint.hpp"
#include "hatch/train/fit.hpp"
#include "hatch/train/loss.hpp"
#include "hatch/train/optimizer.hpp"
#include "hatch/train/progress.hpp"
