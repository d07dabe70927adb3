#include "sampler.h"

#include <algorithm>
#include <cmath>

#include "failure.h"

namespace ane {

namespace {
constexpr size_t kNucleusGuess = 64;  // tokens first looked at for top-p
}

void Sampler::configure(float temperature, float top_p, uint64_t seed) {
  if (!(temperature >= 0.f)) throw Failure(ANE_RUNNER_INVALID_ARGUMENT, "temperature must be 0 (greedy) or more");
  if (!(top_p > 0.f && top_p <= 1.f)) throw Failure(ANE_RUNNER_INVALID_ARGUMENT, "top_p must be in (0, 1]");
  temperature_ = temperature;
  top_p_ = top_p;
  seed_ = seed;
  reseed();
}

// mt19937_64's output is fixed by the standard but its distributions are not,
// so the draw is built from raw bits: the same seed gives the same ids with
// libstdc++ (Linux) and libc++ (Apple).
double Sampler::uniform() { return (rng_() >> 11) * 0x1.0p-53; }

int32_t Sampler::sample(const std::vector<float>& logits) {
  auto best = std::max_element(logits.begin(), logits.end());
  if (temperature_ == 0.f) return static_cast<int32_t>(best - logits.begin());
  std::vector<double> probs(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    probs[i] = std::exp((double(logits[i]) - *best) / temperature_);
    total += probs[i];
  }
  for (double& p : probs) p /= total;
  std::vector<int32_t> ids = nucleus(probs);
  double kept = 0;
  for (int32_t id : ids) kept += probs[id];
  double u = uniform() * kept;
  for (int32_t id : ids) {
    u -= probs[id];
    if (u < 0) return id;
  }
  return ids.back();  // u rounded past the sum
}

// The fewest likeliest ids whose probabilities reach top_p (all ids at 1).
// A partial sort of a guess, grown until it reaches top_p: the nucleus is
// usually a few dozen tokens, and sorting a whole 50k vocabulary costs ms.
std::vector<int32_t> Sampler::nucleus(const std::vector<double>& probs) const {
  std::vector<int32_t> ids(probs.size());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
  if (top_p_ >= 1.f) return ids;
  auto likelier = [&](int32_t a, int32_t b) { return probs[a] > probs[b] || (probs[a] == probs[b] && a < b); };
  for (size_t k = std::min(kNucleusGuess, ids.size());; k = std::min(k * 8, ids.size())) {
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), likelier);
    double sum = 0;
    for (size_t i = 0; i < k; ++i) {
      sum += probs[ids[i]];
      if (sum >= top_p_) {
        ids.resize(i + 1);  // the likeliest always stays
        return ids;
      }
    }
    if (k == ids.size()) return ids;
  }
}

}  // namespace ane
