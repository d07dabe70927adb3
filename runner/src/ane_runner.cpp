// The C ABI over Program, KvRing and Sampler. Every entry point catches: no
// exception crosses into C or Swift.
#include "ane_runner.h"

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "failure.h"
#include "kv_ring.h"
#include "program.h"
#include "sampler.h"

struct ane_runner {
  explicit ane_runner(const char* path) : program(path), ring(program), stop_ids(program.eos_ids()) {}

  ane::Program program;
  ane::KvRing ring;
  ane::Sampler sampler;  // greedy until configured
  std::vector<int32_t> stop_ids;
  std::vector<float> logits;       // the last fed token's; empty before any
  std::optional<int32_t> pending;  // sampled by next, not fed yet
  std::string error;
};

namespace {

using ane::Failure;

thread_local std::string open_error;

template <typename Body>
ane_runner_status guarded(ane_runner* r, Body&& body) {
  if (!r) return ANE_RUNNER_INVALID_ARGUMENT;
  try {
    r->error.clear();
    return body();
  } catch (const Failure& e) {
    r->error = e.what();
    return e.status();
  } catch (const std::exception& e) {
    r->error = e.what();
    return ANE_RUNNER_EXECUTION_FAILED;
  }
}

void check_fits(const ane_runner& r, const std::vector<int32_t>& ids) {
  const ane::Shape& shape = r.program.shape();
  for (int32_t id : ids) {
    if (id < 0 || id >= shape.vocab_size) {
      throw Failure(ANE_RUNNER_INVALID_ARGUMENT,
                    "token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                        std::to_string(shape.vocab_size) + ")");
    }
  }
  if (r.ring.position() + ids.size() > size_t(shape.max_seq_length)) {
    throw Failure(ANE_RUNNER_CONTEXT_FULL,
                  std::to_string(ids.size()) + " tokens at position " + std::to_string(r.ring.position()) +
                      " pass the context of " + std::to_string(shape.max_seq_length) + " tokens");
  }
}

void keep_logits(ane_runner& r, const executorch::runtime::EValue& value) {
  const auto& t = value.toTensor();
  r.logits.resize(t.numel());
  for (size_t i = 0; i < r.logits.size(); ++i) r.logits[i] = ane::load_float(t.const_data_ptr(), t.scalar_type(), i);
}

// A chunk goes to the method with the fewest tokens per call that holds it,
// so a lone token takes forward instead of a padded prefill.
size_t method_for(const ane_runner& r, size_t chunk) {
  const auto& methods = r.program.methods();
  for (size_t m = 0; m < methods.size(); ++m) {
    if (size_t(methods[m].seq_length) >= chunk) return m;
  }
  return methods.size() - 1;
}

void feed(ane_runner& r, const std::vector<int32_t>& ids) {
  check_fits(r, ids);
  size_t longest = r.program.methods().back().seq_length;
  for (size_t start = 0; start < ids.size();) {
    size_t chunk = std::min(longest, ids.size() - start);
    size_t m = method_for(r, chunk);
    auto outputs = r.program.run(r.program.methods()[m].name, r.ring.prepare(m, ids.data() + start, chunk));
    keep_logits(r, outputs.at(0));
    r.ring.absorb(outputs, chunk);
    start += chunk;
  }
}

// The pending id goes in before anything that follows it.
void feed_pending(ane_runner& r, std::vector<int32_t> ids) {
  if (r.pending) ids.insert(ids.begin(), *r.pending);
  if (ids.empty()) return;
  feed(r, ids);
  r.pending.reset();
}

}  // namespace

extern "C" {

ane_runner* ane_runner_open(const char* pte_path) {
  open_error.clear();
  if (!pte_path) {
    open_error = "no path given";
    return nullptr;
  }
  try {
    return new ane_runner(pte_path);
  } catch (const std::exception& e) {
    open_error = e.what();
    return nullptr;
  }
}

void ane_runner_close(ane_runner* runner) { delete runner; }

const char* ane_runner_last_error(const ane_runner* runner) {
  return runner ? runner->error.c_str() : open_error.c_str();
}

ane_runner_status ane_runner_get_info(const ane_runner* runner, ane_runner_info* out) {
  if (!runner || !out) return ANE_RUNNER_INVALID_ARGUMENT;
  const ane::Shape& s = runner->program.shape();
  out->seq_length = runner->program.methods().back().seq_length;
  out->cache_len = s.cache_len;
  out->max_seq_length = s.max_seq_length;
  out->vocab_size = s.vocab_size;
  out->n_layers = s.n_layers;
  out->dtype_bits = static_cast<int32_t>(8 * ane::float_size(s.dtype));
  out->position = runner->ring.position();
  return ANE_RUNNER_OK;
}

ane_runner_status ane_runner_prefill(ane_runner* runner, const int32_t* ids, size_t n) {
  return guarded(runner, [&] {
    if (!ids && n) throw Failure(ANE_RUNNER_INVALID_ARGUMENT, "ids is NULL");
    feed_pending(*runner, std::vector<int32_t>(ids, ids + n));
    return ANE_RUNNER_OK;
  });
}

ane_runner_status ane_runner_next(ane_runner* runner, int32_t* out_id) {
  return guarded(runner, [&] {
    if (!out_id) throw Failure(ANE_RUNNER_INVALID_ARGUMENT, "out_id is NULL");
    feed_pending(*runner, {});
    if (runner->logits.empty()) throw Failure(ANE_RUNNER_NO_LOGITS, "nothing fed yet: prefill a prompt first");
    int32_t id = runner->sampler.sample(runner->logits);
    *out_id = id;
    const auto& stops = runner->stop_ids;
    if (std::find(stops.begin(), stops.end(), id) != stops.end()) return ANE_RUNNER_STOPPED;
    runner->pending = id;
    return ANE_RUNNER_OK;
  });
}

ane_runner_status ane_runner_set_sampling(ane_runner* runner, const ane_runner_sampling* sampling) {
  return guarded(runner, [&] {
    if (!sampling) throw Failure(ANE_RUNNER_INVALID_ARGUMENT, "sampling is NULL");
    runner->sampler.configure(sampling->temperature, sampling->top_p, sampling->seed);
    return ANE_RUNNER_OK;
  });
}

ane_runner_status ane_runner_set_stop_ids(ane_runner* runner, const int32_t* ids, size_t n) {
  return guarded(runner, [&] {
    if (!ids && n) throw Failure(ANE_RUNNER_INVALID_ARGUMENT, "ids is NULL");
    runner->stop_ids.assign(ids, ids + n);
    return ANE_RUNNER_OK;
  });
}

size_t ane_runner_get_stop_ids(const ane_runner* runner, int32_t* out, size_t capacity) {
  if (!runner) return 0;
  const auto& stops = runner->stop_ids;
  if (out) std::copy_n(stops.begin(), std::min(capacity, stops.size()), out);
  return stops.size();
}

const float* ane_runner_logits(const ane_runner* runner) {
  return runner && !runner->logits.empty() ? runner->logits.data() : nullptr;
}

void ane_runner_reset(ane_runner* runner) {
  if (!runner) return;
  runner->ring.reset();
  runner->logits.clear();
  runner->pending.reset();
  runner->sampler.reseed();
  runner->error.clear();
}

}  // extern "C"
