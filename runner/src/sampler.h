// The next id from logits: argmax at temperature 0, else a draw from
// softmax(logits / temperature) cut to the top-p nucleus.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace ane {

class Sampler {
 public:
  void configure(float temperature, float top_p, uint64_t seed);
  void reseed() { rng_.seed(seed_); }
  int32_t sample(const std::vector<float>& logits);

 private:
  std::vector<int32_t> nucleus(const std::vector<double>& probs) const;
  double uniform();

  float temperature_ = 0.f;
  float top_p_ = 1.f;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

}  // namespace ane
