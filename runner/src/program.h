// A .pte speaking the static-LLM convention, loaded through ExecuTorch's
// Module: its methods' shapes, its constants, and calls to its methods.
#pragma once

#include <executorch/extension/module/module.h>

#include <memory>
#include <string>
#include <vector>

#include "floats.h"

namespace ane {

// Flat input order of forward and prefill (the convention's).
constexpr size_t kTokensInput = 0;
constexpr size_t kMaskInput = 1;
constexpr size_t kCosInput = 2;
constexpr size_t kSinInput = 3;
constexpr size_t kFirstCacheInput = 4;  // L key caches, then L value caches

struct Shape {
  int32_t cache_len = 0;
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t vocab_size = 0;
  int32_t max_seq_length = 0;
  ScalarType dtype = ScalarType::Float;
};

struct MethodShape {
  std::string name;
  int32_t seq_length;  // tokens per call
};

class Program {
 public:
  explicit Program(const std::string& path);  // throws Failure

  const Shape& shape() const { return shape_; }
  // Smallest seq_length first.
  const std::vector<MethodShape>& methods() const { return methods_; }
  const FloatBuffer& freqs_cos() const { return *freqs_cos_; }
  const FloatBuffer& freqs_sin() const { return *freqs_sin_; }
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }

  std::vector<executorch::runtime::EValue> run(
      const std::string& method,
      const std::vector<executorch::runtime::EValue>& inputs);

 private:
  MethodShape read_method(const std::string& name);
  Shape read_shape(const std::string& name);
  std::vector<int64_t> constant_ints(const std::string& name);
  std::unique_ptr<FloatBuffer> constant_table(const std::string& name);
  void read_constants();

  std::string path_;
  executorch::extension::Module module_;
  Shape shape_;
  std::vector<MethodShape> methods_;
  std::unique_ptr<FloatBuffer> freqs_cos_, freqs_sin_;
  std::vector<int32_t> eos_ids_;
};

}  // namespace ane
