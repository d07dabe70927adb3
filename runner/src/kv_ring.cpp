#include "kv_ring.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "failure.h"

namespace ane {

using executorch::aten::Tensor;
using executorch::extension::from_blob;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;

namespace {
constexpr float kClosed = -std::numeric_limits<float>::infinity();
}

struct KvRing::Call {
  Call(int32_t seq, const Shape& s)
      : seq_length(seq),
        tokens(seq, 0),
        mask(s.dtype, size_t(seq) * (s.cache_len + seq)),
        cos(s.dtype, size_t(seq) * s.head_dim / 2),
        sin(s.dtype, size_t(seq) * s.head_dim / 2) {}

  int32_t seq_length;
  std::vector<int32_t> tokens;  // [1, S]
  FloatBuffer mask;              // [1, S, cache_len + S]
  FloatBuffer cos, sin;          // [S, D / 2]
  int64_t last_valid = 0;        // [1]
  int32_t opened = 0;            // cache columns of mask opened so far
  std::vector<TensorPtr> tensors;  // views of the buffers above and the caches
  std::vector<EValue> values;      // the flat input list, built once
};

KvRing::KvRing(const Program& program) : program_(program), shape_(program.shape()) {
  size_t cache_elems = size_t(shape_.n_kv_heads) * shape_.cache_len * shape_.head_dim;
  for (int32_t l = 0; l < shape_.n_layers; ++l) {
    keys_.emplace_back(shape_.dtype, cache_elems);
    values_.emplace_back(shape_.dtype, cache_elems);
  }
  for (const MethodShape& method : program.methods()) calls_.push_back(make_call(method.seq_length));
}

KvRing::~KvRing() = default;

std::unique_ptr<KvRing::Call> KvRing::make_call(int32_t seq) {
  auto call = std::make_unique<Call>(seq, shape_);
  int32_t cols = shape_.cache_len + seq;
  // The new tokens' block: row i sees new tokens j <= i.
  for (int32_t i = 0; i < seq; ++i) {
    call->mask.fill(size_t(i) * cols, size_t(i) * cols + shape_.cache_len, kClosed);
    for (int32_t j = 0; j < seq; ++j) call->mask.set(size_t(i) * cols + shape_.cache_len + j, j <= i ? 0.f : kClosed);
  }
  std::vector<executorch::aten::SizesType> cache_sizes{1, shape_.n_kv_heads, shape_.cache_len, shape_.head_dim};
  auto& t = call->tensors;
  t.push_back(from_blob(call->tokens.data(), {1, seq}, executorch::aten::ScalarType::Int));
  t.push_back(from_blob(call->mask.at(0), {1, seq, cols}, shape_.dtype));
  t.push_back(from_blob(call->cos.at(0), {seq, shape_.head_dim / 2}, shape_.dtype));
  t.push_back(from_blob(call->sin.at(0), {seq, shape_.head_dim / 2}, shape_.dtype));
  for (auto& k : keys_) t.push_back(from_blob(k.at(0), cache_sizes, shape_.dtype));
  for (auto& v : values_) t.push_back(from_blob(v.at(0), cache_sizes, shape_.dtype));
  t.push_back(from_blob(&call->last_valid, {1}, executorch::aten::ScalarType::Long));
  for (auto& tensor : t) call->values.emplace_back(*tensor);
  return call;
}

const std::vector<EValue>& KvRing::prepare(size_t method, const int32_t* ids, size_t n) {
  Call& call = *calls_.at(method);
  // Padding after the real tokens is never seen by them (causal); zeros keep calls reproducible.
  std::fill(call.tokens.begin(), call.tokens.end(), 0);
  std::copy(ids, ids + n, call.tokens.begin());
  call.last_valid = static_cast<int64_t>(n) - 1;
  open_filled_columns(call);
  copy_freqs(call);
  call_seq_ = call.seq_length;
  return call.values;
}

void KvRing::open_filled_columns(Call& call) {
  int32_t filled = std::min(pos_, shape_.cache_len);
  if (call.opened >= filled) return;
  size_t cols = size_t(shape_.cache_len) + call.seq_length;
  for (int32_t i = 0; i < call.seq_length; ++i) call.mask.fill(i * cols + call.opened, i * cols + filled, 0.f);
  call.opened = filled;
}

void KvRing::close_cache_columns(Call& call) {
  size_t cols = size_t(shape_.cache_len) + call.seq_length;
  for (int32_t i = 0; i < call.seq_length; ++i) call.mask.fill(i * cols, i * cols + call.opened, kClosed);
  call.opened = 0;
}

// Rows of the RoPE table at the call's positions; padding past the table gets zeros.
void KvRing::copy_freqs(Call& call) {
  size_t half = shape_.head_dim / 2;
  auto copy_row = [&](const FloatBuffer& table, FloatBuffer& dest, int32_t r) {
    int32_t p = pos_ + r;
    if (p < shape_.max_seq_length) {
      std::memcpy(dest.at(r * half), table.at(p * half), dest.row_bytes(half));
    } else {
      std::memset(dest.at(r * half), 0, dest.row_bytes(half));
    }
  };
  for (int32_t r = 0; r < call.seq_length; ++r) {
    copy_row(program_.freqs_cos(), call.cos, r);
    copy_row(program_.freqs_sin(), call.sin, r);
  }
}

void KvRing::absorb(const std::vector<EValue>& outputs, size_t n) {
  size_t layers = shape_.n_layers;
  if (outputs.size() != 1 + 2 * layers) {
    throw Failure(ANE_RUNNER_EXECUTION_FAILED, "expected logits and 2 * n_layers new rows, got " +
                                                   std::to_string(outputs.size()) + " outputs");
  }
  for (size_t l = 0; l < layers; ++l) {
    write_rows(keys_[l], outputs[1 + l].toTensor(), n);
    write_rows(values_[l], outputs[1 + layers + l].toTensor(), n);
  }
  pos_ += static_cast<int32_t>(n);
}

// rows: [1, H, S, D]. Only the last cache_len of n rows survive a call longer than the ring.
void KvRing::write_rows(FloatBuffer& cache, const Tensor& rows, size_t n) {
  if (rows.scalar_type() != shape_.dtype || rows.dim() != 4 || rows.size(2) != call_seq_) {
    throw Failure(ANE_RUNNER_EXECUTION_FAILED, "new key/value rows are not [1, H, S, D] in the caches' dtype");
  }
  size_t C = shape_.cache_len, D = shape_.head_dim, S = call_seq_;
  size_t first = n > C ? n - C : 0;
  const auto* src = static_cast<const uint8_t*>(rows.const_data_ptr());
  size_t row_bytes = cache.row_bytes(D);
  for (size_t h = 0; h < size_t(shape_.n_kv_heads); ++h) {
    for (size_t i = first; i < n; ++i) {
      size_t slot = (pos_ + i) % C;
      std::memcpy(cache.at((h * C + slot) * D), src + (h * S + i) * row_bytes, row_bytes);
    }
  }
}

// Zeroed rather than left: a closed column adds -inf to the score, but
// 0 * NaN from stale garbage would still poison the weighted sum.
void KvRing::reset() {
  pos_ = 0;
  for (auto& k : keys_) k.zero();
  for (auto& v : values_) v.zero();
  for (auto& call : calls_) close_cache_columns(*call);
}

}  // namespace ane
