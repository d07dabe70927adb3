#include "program.h"

#include <algorithm>
#include <fstream>

#include "failure.h"

namespace ane {

using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::MethodMeta;
using executorch::runtime::Result;
using executorch::runtime::TensorInfo;

namespace {

Failure bad_program(const std::string& path, const std::string& why) {
  return Failure(ANE_RUNNER_INVALID_ARGUMENT, path + ": " + why);
}

template <typename T>
T take(Result<T> result, const std::string& path, const std::string& what) {
  if (!result.ok()) {
    throw bad_program(path, what + " (" + executorch::runtime::to_string(result.error()) + ")");
  }
  return std::move(result.get());
}

std::vector<int32_t> sizes_of(const TensorInfo& info) {
  return {info.sizes().begin(), info.sizes().end()};
}

}  // namespace

// Mmap: the weights stay in the file's pages instead of a heap copy.
Program::Program(const std::string& path)
    : path_(path), module_(path, Module::LoadMode::Mmap) {
  if (!std::ifstream(path).good()) throw bad_program(path, "no such file, or not readable");
  Error loaded = module_.load();
  if (loaded != Error::Ok) {
    throw bad_program(path, std::string("not an ExecuTorch program (") +
                                executorch::runtime::to_string(loaded) + ")");
  }
  auto names = take(module_.method_names(), path, "cannot list methods");
  if (!names.count("forward")) throw bad_program(path, "has no forward method");
  shape_ = read_shape("forward");
  for (const char* name : {"forward", "prefill"}) {
    if (names.count(name)) methods_.push_back(read_method(name));
  }
  std::sort(methods_.begin(), methods_.end(),
            [](const MethodShape& a, const MethodShape& b) { return a.seq_length < b.seq_length; });
  read_constants();
}

// Shapes come from the inputs the method declares: the one truth of what it accepts.
Shape Program::read_shape(const std::string& name) {
  MethodMeta meta = take(module_.method_meta(name), path_, "no metadata for " + name);
  size_t n_inputs = meta.num_inputs();
  if (n_inputs < kFirstCacheInput + 3 || (n_inputs - kFirstCacheInput - 1) % 2 != 0) {
    throw bad_program(path_, name + " takes " + std::to_string(n_inputs) +
                                 " inputs; the convention has 5 + 2 * n_layers");
  }
  auto key = take(meta.input_tensor_meta(kFirstCacheInput), path_, name + ": no key cache input");
  auto logits = take(meta.output_tensor_meta(0), path_, name + ": no logits output");
  auto k = sizes_of(key);
  if (k.size() != 4 || sizes_of(logits).size() != 2) {
    throw bad_program(path_, name + ": expected key caches [1, H, cache_len, D] and logits [1, vocab]");
  }
  Shape shape;
  shape.n_layers = static_cast<int32_t>((n_inputs - kFirstCacheInput - 1) / 2);
  shape.n_kv_heads = k[1];
  shape.cache_len = k[2];
  shape.head_dim = k[3];
  shape.vocab_size = sizes_of(logits)[1];
  shape.dtype = key.scalar_type();
  float_size(shape.dtype);  // throws for a dtype the runner cannot feed
  return shape;
}

MethodShape Program::read_method(const std::string& name) {
  Shape shape = read_shape(name);
  if (shape.cache_len != shape_.cache_len || shape.n_layers != shape_.n_layers ||
      shape.n_kv_heads != shape_.n_kv_heads || shape.head_dim != shape_.head_dim ||
      shape.dtype != shape_.dtype || shape.vocab_size != shape_.vocab_size) {
    throw bad_program(path_, name + "'s caches or logits differ from forward's: they must be shared");
  }
  MethodMeta meta = take(module_.method_meta(name), path_, "no metadata for " + name);
  auto tokens = sizes_of(take(meta.input_tensor_meta(kTokensInput), path_, name + ": no tokens input"));
  auto mask = sizes_of(take(meta.input_tensor_meta(kMaskInput), path_, name + ": no mask input"));
  int32_t seq = tokens.size() == 2 ? tokens[1] : 0;
  if (seq < 1 || mask.size() != 3 || mask[1] != seq || mask[2] != shape_.cache_len + seq) {
    throw bad_program(path_, name + ": expected tokens [1, S] and mask [1, S, cache_len + S]");
  }
  Error loaded = module_.load_method(name);
  if (loaded != Error::Ok) {
    throw bad_program(path_, "method " + name + " does not load (" + executorch::runtime::to_string(loaded) +
                                 "): it may need a backend this runtime lacks (a Core ML .pte runs "
                                 "on Apple platforms; elsewhere run its CPU twin, twin.pte)");
  }
  return {name, seq};
}

std::vector<int64_t> Program::constant_ints(const std::string& name) {
  auto outputs = take(module_.execute(name), path_, "constant method " + name + " failed");
  std::vector<int64_t> ints;
  for (const EValue& value : outputs) {
    if (value.isInt()) ints.push_back(value.toInt());
  }
  module_.unload_method(name);
  return ints;
}

// The table comes in whatever float the export stored; it is kept in the
// inputs' dtype so that a call's rows are a plain copy.
std::unique_ptr<FloatBuffer> Program::constant_table(const std::string& name) {
  auto outputs = take(module_.execute(name), path_, "no constant method " + name + " (the RoPE table)");
  if (outputs.empty() || !outputs[0].isTensor()) throw bad_program(path_, name + " is not a tensor");
  const auto& table = outputs[0].toTensor();
  if (table.dim() != 2 || table.size(1) != shape_.head_dim / 2) {
    throw bad_program(path_, name + ": expected [max_seq_length, head_dim / 2]");
  }
  auto buffer = std::make_unique<FloatBuffer>(shape_.dtype, table.numel());
  for (size_t i = 0; i < static_cast<size_t>(table.numel()); ++i) {
    buffer->set(i, load_float(table.const_data_ptr(), table.scalar_type(), i));
  }
  module_.unload_method(name);
  return buffer;
}

void Program::read_constants() {
  auto names = take(module_.method_names(), path_, "cannot list methods");
  freqs_cos_ = constant_table("freqs_cos");
  freqs_sin_ = constant_table("freqs_sin");
  shape_.max_seq_length = static_cast<int32_t>(freqs_cos_->count() / (shape_.head_dim / 2));
  if (freqs_sin_->count() != freqs_cos_->count()) throw bad_program(path_, "freqs_cos and freqs_sin differ in shape");
  if (names.count("max_seq_length") && constant_ints("max_seq_length") != std::vector<int64_t>{shape_.max_seq_length}) {
    throw bad_program(path_, "max_seq_length disagrees with the RoPE table's rows");
  }
  if (names.count("eos_ids")) {
    for (int64_t id : constant_ints("eos_ids")) eos_ids_.push_back(static_cast<int32_t>(id));
  }
}

std::vector<EValue> Program::run(const std::string& method, const std::vector<EValue>& inputs) {
  auto outputs = module_.execute(method, inputs);
  if (!outputs.ok()) {
    throw Failure(ANE_RUNNER_EXECUTION_FAILED,
                  method + " failed (" + std::string(executorch::runtime::to_string(outputs.error())) + ")");
  }
  return std::move(outputs.get());
}

}  // namespace ane
