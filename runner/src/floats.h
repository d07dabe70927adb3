// Float storage in the program's dtype, fp16 or fp32, chosen at run time.
//
// The caches, the mask and the RoPE rows must be handed to the program in the
// dtype its inputs declare; everything else in the runner thinks in float.
#pragma once

#include <executorch/runtime/core/exec_aten/exec_aten.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace ane {

using executorch::aten::ScalarType;

size_t float_size(ScalarType type);  // 2 or 4; throws for other types
float load_float(const void* data, ScalarType type, size_t index);
void store_float(void* data, ScalarType type, size_t index, float value);

class FloatBuffer {
 public:
  FloatBuffer(ScalarType type, size_t count)
      : type_(type), size_(float_size(type)), bytes_(count * size_, 0) {}

  ScalarType type() const { return type_; }
  size_t count() const { return bytes_.size() / size_; }
  size_t row_bytes(size_t elements) const { return elements * size_; }
  uint8_t* at(size_t index) { return bytes_.data() + index * size_; }
  const uint8_t* at(size_t index) const { return bytes_.data() + index * size_; }
  void set(size_t index, float value) { store_float(bytes_.data(), type_, index, value); }
  void fill(size_t begin, size_t end, float value);
  void zero() { std::memset(bytes_.data(), 0, bytes_.size()); }

 private:
  ScalarType type_;
  size_t size_;
  std::vector<uint8_t> bytes_;
};

}  // namespace ane
