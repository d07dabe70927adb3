#include "floats.h"

#include "failure.h"

namespace ane {

using executorch::aten::Half;

size_t float_size(ScalarType type) {
  if (type == ScalarType::Half) return 2;
  if (type == ScalarType::Float) return 4;
  throw Failure(ANE_RUNNER_INVALID_ARGUMENT,
                "expected fp16 or fp32 tensors, got scalar type " +
                    std::to_string(static_cast<int>(type)));
}

float load_float(const void* data, ScalarType type, size_t index) {
  if (type == ScalarType::Half) return static_cast<const Half*>(data)[index];
  return static_cast<const float*>(data)[index];
}

void store_float(void* data, ScalarType type, size_t index, float value) {
  if (type == ScalarType::Half) {
    static_cast<Half*>(data)[index] = Half(value);
  } else {
    static_cast<float*>(data)[index] = value;
  }
}

void FloatBuffer::fill(size_t begin, size_t end, float value) {
  for (size_t i = begin; i < end; ++i) set(i, value);
}

}  // namespace ane
