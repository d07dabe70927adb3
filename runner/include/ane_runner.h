/*
 * ane_runner: drive an ane-build ExecuTorch program (.pte) from C, C++ or Swift.
 *
 * The program speaks the static-LLM calling convention (ane-build's
 * ane_build/model/ane_llama.py): a one-token "forward", an S-token "prefill",
 * per-layer KV caches the runner owns as a ring buffer. Shapes are read from
 * the methods' inputs; the RoPE tables and eos ids from the program's constant
 * methods.
 *
 * Tokenization stays with the caller: ids in, ids out.
 *
 *   ane_runner* r = ane_runner_open("twin.pte");
 *   if (!r) fprintf(stderr, "%s\n", ane_runner_last_error(NULL));
 *   ane_runner_prefill(r, prompt, n_prompt);
 *   int32_t id;
 *   while (ane_runner_next(r, &id) == ANE_RUNNER_OK) emit(id);
 *   ane_runner_close(r);
 *
 * A handle is not thread-safe: use one per thread, or lock around it.
 */
#ifndef ANE_RUNNER_H
#define ANE_RUNNER_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#define ANE_RUNNER_API __attribute__((visibility("default")))
#else
#define ANE_RUNNER_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ane_runner ane_runner;

typedef enum ane_runner_status {
  ANE_RUNNER_OK = 0,
  /* ane_runner_next sampled a stop id (written to *out_id, not fed). */
  ANE_RUNNER_STOPPED = 1,
  ANE_RUNNER_INVALID_ARGUMENT = -1,
  /* The tokens would pass max_seq_length; nothing was fed. */
  ANE_RUNNER_CONTEXT_FULL = -2,
  /* ane_runner_next before any token was fed: there are no logits yet. */
  ANE_RUNNER_NO_LOGITS = -3,
  /* The program failed to run; the caches are in an unknown state: reset. */
  ANE_RUNNER_EXECUTION_FAILED = -4
} ane_runner_status;

typedef struct ane_runner_info {
  int32_t seq_length;     /* tokens per prefill call */
  int32_t cache_len;      /* ring slots: the attention window of past tokens */
  int32_t max_seq_length; /* the whole context: positions the RoPE table covers */
  int32_t vocab_size;
  int32_t n_layers;
  int32_t dtype_bits;     /* 16 or 32: the caches', mask's and logits' float */
  int32_t position;       /* tokens fed so far (the next token's position) */
} ane_runner_info;

typedef struct ane_runner_sampling {
  float temperature; /* 0: greedy (argmax) */
  float top_p;       /* in (0, 1]: keep the fewest likeliest tokens reaching it */
  uint64_t seed;     /* same seed, same prompt: same ids, on every platform */
} ane_runner_sampling;

/* Loads the program and its methods. NULL on failure: see
   ane_runner_last_error(NULL). */
ANE_RUNNER_API ane_runner* ane_runner_open(const char* pte_path);

/* Frees the handle (NULL is a no-op). */
ANE_RUNNER_API void ane_runner_close(ane_runner* runner);

/* The message of the last failed call on runner, or with NULL, of the last
   failed ane_runner_open on this thread. Valid until the next call; "" if none. */
ANE_RUNNER_API const char* ane_runner_last_error(const ane_runner* runner);

ANE_RUNNER_API ane_runner_status ane_runner_get_info(const ane_runner* runner,
                                                     ane_runner_info* out);

/* Feeds ids at the current position: in chunks of seq_length through
   "prefill", a lone token through "forward". Leaves the logits of the last
   id for ane_runner_next. A token sampled by ane_runner_next and not yet fed
   goes first, so a chat can append its next turn. */
ANE_RUNNER_API ane_runner_status ane_runner_prefill(ane_runner* runner,
                                                    const int32_t* ids,
                                                    size_t n);

/* Samples the next id from the last logits into *out_id. ANE_RUNNER_OK: a
   generated id, fed to the program on the next call that needs its logits
   (so stopping costs no wasted call); ANE_RUNNER_STOPPED: a stop id. */
ANE_RUNNER_API ane_runner_status ane_runner_next(ane_runner* runner,
                                                 int32_t* out_id);

/* Sampling for ane_runner_next; reseeds. Default: greedy. */
ANE_RUNNER_API ane_runner_status ane_runner_set_sampling(
    ane_runner* runner, const ane_runner_sampling* sampling);

/* Ids that end a generation. Default: the program's eos_ids, if it has any. */
ANE_RUNNER_API ane_runner_status ane_runner_set_stop_ids(ane_runner* runner,
                                                         const int32_t* ids,
                                                         size_t n);

/* Copies up to capacity stop ids into out; returns how many there are. */
ANE_RUNNER_API size_t ane_runner_get_stop_ids(const ane_runner* runner,
                                              int32_t* out, size_t capacity);

/* The last fed token's logits (vocab_size floats, as fp32), or NULL before
   any. Valid until the next call that feeds tokens. */
ANE_RUNNER_API const float* ane_runner_logits(const ane_runner* runner);

/* Back to position 0 with empty caches; reseeds the sampler. */
ANE_RUNNER_API void ane_runner_reset(ane_runner* runner);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ANE_RUNNER_H */
