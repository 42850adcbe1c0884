#pragma once
// Checkpoints: a model's parameters (or one stage's, or parameters + optimizer state for
// resuming) in a safetensors file under their timm names, so a checkpoint moves between hatch
// and PyTorch (tests/fixtures/torch_interop.py loads one with strict=True). See
// docs/checkpoints.md.
//
// Saving downloads every tensor (Tensor::to_host) and writes the file atomically (temporary
// file, fsync, rename: SafeTensorsWriter::write), so a run killed mid-save keeps the previous
// checkpoint. Loading validates the whole file first -- every expected tensor present with
// exactly its shape, no unexpected ones, the metadata asked for -- into host buffers, and only
// then uploads; a file that fails any check leaves the model (and optimizer) untouched.
//
// The parts, one concern each (this header includes them all; include this one):
//   checkpoint/metadata.hpp        format tag, vit_metadata, stage_file, file_fingerprint,
//                                  read_metadata, expect_metadata
//   checkpoint/slots.hpp           the model's tensors under their names (visit_unique,
//                                  parameter_slots)
//   checkpoint/load.hpp            LoadOptions; validate then upload (prepare, commit);
//                                  load_parameters, load_stage, load_stages
//   checkpoint/save.hpp            save_parameters, save_stage, save_stages
//   checkpoint/training_state.hpp  save_training_state, load_training_state (optimizer slots)
#include "hatch/train/checkpoint/load.hpp"
#include "hatch/train/checkpoint/metadata.hpp"
#include "hatch/train/checkpoint/save.hpp"
#include "hatch/train/checkpoint/slots.hpp"
#include "hatch/train/checkpoint/training_state.hpp"
