// The caches and per-method inputs of one generation, updated in place: the
// convention's "smart mask" ring buffer.
//
// Position p lives in cache slot p % cache_len, so once the ring is full each
// new token overwrites the oldest (a sliding window). A ring rather than a
// shift: a call writes O(new rows) instead of moving the whole cache. Keys are
// stored already rotated for their absolute position, so slot order does not
// matter to attention.
//
// Slots fill in order, so the open cache columns of the mask are always a
// prefix [0, filled): a call opens only the columns filled since its method's
// previous call. The new-token block of the mask is a fixed causal triangle.
//
// The program reads the inputs where they are (the export does not plan graph
// inputs into its arena), so a step copies nothing in proportion to the cache.
#pragma once

#include <executorch/extension/tensor/tensor.h>

#include <memory>
#include <vector>

#include "program.h"

namespace ane {

class KvRing {
 public:
  explicit KvRing(const Program& program);
  ~KvRing();  // out of line: Call is complete only in kv_ring.cpp

  // The inputs of methods()[method] for ids[0..n) at the current position.
  const std::vector<executorch::runtime::EValue>& prepare(size_t method, const int32_t* ids, size_t n);
  // Writes the call's new key and value rows into their slots; advances by n.
  void absorb(const std::vector<executorch::runtime::EValue>& outputs, size_t n);
  void reset();
  int32_t position() const { return pos_; }

 private:
  struct Call;  // one method's inputs

  std::unique_ptr<Call> make_call(int32_t seq_length);
  void close_cache_columns(Call& call);
  void open_filled_columns(Call& call);
  void copy_freqs(Call& call);
  void write_rows(FloatBuffer& cache, const executorch::aten::Tensor& rows, size_t n);

  const Program& program_;
  Shape shape_;
  std::vector<FloatBuffer> keys_, values_;  // one [1, H, cache_len, D] per layer
  std::vector<std::unique_ptr<Call>> calls_;  // as program.methods()
  int32_t pos_ = 0;
  int32_t call_seq_ = 0;  // seq_length of the call being absorbed
};

}  // namespace ane
