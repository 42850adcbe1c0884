#pragma once
// Lineage of the files of a modular run (Deep Incubation, m2mKD): which meta model, teacher,
// modules and assembly each file was made from, so that a phase refuses inputs that do not
// belong together (a meta directory mixed from two runs, modules incubated on an earlier meta
// model, ...). See docs/checkpoints.md, "Lineage of modular runs".
//
// Every file a modular phase writes carries in its metadata
//   "lineage"      the id of what the file is part of: the meta model (all K meta stage files
//                  share it), the teacher split, one module, the assembly, the fine-tuned model;
//   "meta_id"      the meta model it was made from (modules, assembled, finetuned; = lineage
//                  for the meta stages);
//   "teacher_id"   the teacher split a distilled module was made with (m2mKD only, and carried
//                  on into assembled and finetuned);
//   "module_ids"   the K modules an assembly was made of (assembled, finetuned), comma-separated;
//   "assembly_id"  the assembly a fine-tuned model started from (finetuned).
// An id is 16 hex digits of a 64-bit FNV-1a hash over the phase, the run's tag and seed, the
// training recipe (the FitOptions that change the result), the ids of the inputs and the bytes
// of every tensor written. It is deterministic: the same run, in one process or phase by phase,
// writes the same ids.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "hatch/core/error.hpp"
#include "hatch/core/parameter.hpp"
#include "hatch/train/fit.hpp"

namespace hatch {

// 64-bit FNV-1a over everything added, each piece preceded by its length (so that "ab"+"c" and
// "a"+"bc" differ).
class LineageHash {
 public:
  LineageHash& add(std::string_view s) {
    const std::uint64_t n = s.size();
    bytes(&n, sizeof n);
    bytes(s.data(), s.size());
    return *this;
  }
  LineageHash& add(std::uint64_t v) { return bytes(&v, sizeof v); }
  LineageHash& bytes(const void* p, std::size_t n) {
    const auto* c = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) {
      h_ ^= c[i];
      h_ *= 0x100000001b3ULL;
    }
    return *this;
  }
  // Every parameter of a module: its name and its values' bytes.
  template <class M>
  LineageHash& parameters(M& layer) {
    using B = typename M::backend;
    layer.visit(
        [&](const std::string& name, Parameter<B>& p) {
          add(name);
          const auto h = p.value.to_host();
          add(std::uint64_t(h.size()));
          if (!h.empty()) bytes(h.data(), h.size() * sizeof(h[0]));
        },
        "");
    return *this;
  }
  std::string hex() const {
    char s[17];
    std::snprintf(s, sizeof s, "%016llx", static_cast<unsigned long long>(h_));
    return s;
  }

 private:
  std::uint64_t h_ = 0xcbf29ce484222325ULL;
};

// The FitOptions that change what training produces, as text for a lineage id. Left out: where
// files go (out), resume, progress and the bookkeeping of earlier phases (images_before,
// seconds_before), which differ between one process and separate ones for the same result.
inline std::string lineage_recipe(const FitOptions& o) { return options_recipe(o).dump(); }

// One input file of a phase, the stage it holds and the id it carries for the key checked.
struct LineageEntry {
  std::filesystem::path file;
  std::size_t stage = 0;
  std::string id;
};

namespace detail {
inline std::string stage_list(const std::vector<std::size_t>& stages) {
  std::string s;
  for (std::size_t i = 0; i < stages.size(); ++i) s += (i ? ", " : "") + std::to_string(stages[i]);
  return s;
}
}  // namespace detail

// Throws one hatch::Error when the entries do not all carry the same id, or (expected non-empty)
// not all carry `expected`. The message names every file with its id, grouped by id, marks the
// expected one, and ends with `rerun` applied to the stages to make again:
//   "<where>: mixed lineage in the meta model's stage files: meta id 1a2b... in
//    run/meta/stage0.safetensors, run/meta/stage2.safetensors; meta id 9f8e... in
//    run/meta/stage1.safetensors. Rerun the meta phase (pretrain_meta) to write all 4 stage
//    files again."
// or, with an expected id that none or only some of the files carry, "<what> are stale, made
// from another meta id: ..." / the mixed form, both ending "; expected meta id <id>, <expected_is>".
// what: "the meta model's stage files"; id_name: "meta id"; expected_is: "the meta model in
// run/meta", which names where the expected id comes from; rerun(stages) says what to do about
// the files that disagree (all of them when no id is expected).
template <class Rerun>
void require_one_lineage(const std::string& where, const std::string& what, const std::string& id_name,
                         const std::vector<LineageEntry>& entries, const std::string& expected,
                         const std::string& expected_is, Rerun&& rerun) {
  std::set<std::string> ids;
  for (const auto& e : entries) ids.insert(e.id);
  const bool ok = expected.empty() ? ids.size() <= 1 : (ids.empty() || (ids.size() == 1 && *ids.begin() == expected));
  if (ok) return;
  // Group by id, in the order of first appearance.
  std::vector<std::pair<std::string, std::vector<const LineageEntry*>>> groups;
  for (const auto& e : entries) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == e.id; });
    if (it == groups.end()) groups.push_back({e.id, {&e}});
    else it->second.push_back(&e);
  }
  std::string msg = where + ": " +
                    (expected.empty() || ids.size() > 1 ? "mixed lineage in " + what
                                                        : what + " are stale, made from another " + id_name) +
                    ": ";
  std::vector<std::size_t> redo;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    msg += (g ? "; " : "") + id_name + " " + groups[g].first;
    if (!expected.empty() && groups[g].first == expected) msg += " (" + expected_is + ")";
    msg += " in ";
    for (std::size_t k = 0; k < groups[g].second.size(); ++k) {
      msg += (k ? ", " : "") + groups[g].second[k]->file.string();
      if (expected.empty() || groups[g].first != expected) redo.push_back(groups[g].second[k]->stage);
    }
  }
  if (!expected.empty()) msg += "; expected " + id_name + " " + expected + ", " + expected_is;
  std::sort(redo.begin(), redo.end());
  msg += ". " + rerun(redo);
  throw Error(msg);
}

}  // namespace hatch
