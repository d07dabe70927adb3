// ane-runner: generate ids with a program, over the C ABI only (as an app would).
//
//   ane-runner MODEL.pte [-n MAX_NEW] [-t TEMPERATURE] [-p TOP_P] [-s SEED] [--stop ID,ID...] [ID ...]
//
// Prompt ids come from the arguments after the options, or from stdin when
// there are none. Generated ids go to stdout on one line; speeds to stderr.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "ane_runner.h"

namespace {

struct Options {
  std::string model;
  long max_new = 128;
  ane_runner_sampling sampling{0.f, 1.f, 0};
  bool stops_given = false;
  std::vector<int32_t> stops, prompt;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "%s\nusage: ane-runner MODEL.pte [-n MAX_NEW] [-t TEMPERATURE] [-p TOP_P] [-s SEED] "
               "[--stop ID,ID...] [ID ...]\n(prompt ids from stdin when none are given)\n",
               why);
  std::exit(2);
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::string normalized = text;
  for (char& c : normalized) c = (c == ',') ? ' ' : c;
  std::istringstream in(normalized);
  for (std::string word; in >> word;) {
    char* end = nullptr;
    long id = std::strtol(word.c_str(), &end, 10);
    if (*end) usage(("not a token id: " + word).c_str());
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

Options parse(int argc, char** argv) {
  Options o;
  std::string prompt_text;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (++i >= argc) usage(("missing value for " + arg).c_str());
      return argv[i];
    };
    if (arg == "-n") o.max_new = std::atol(value().c_str());
    else if (arg == "-t") o.sampling.temperature = std::strtof(value().c_str(), nullptr);
    else if (arg == "-p") o.sampling.top_p = std::strtof(value().c_str(), nullptr);
    else if (arg == "-s") o.sampling.seed = std::strtoull(value().c_str(), nullptr, 10);
    else if (arg == "--stop") o.stops = parse_ids(value()), o.stops_given = true;
    else if (arg == "-h" || arg == "--help") usage("ane-runner: generate token ids with an ane-build program");
    else if (o.model.empty()) o.model = arg;
    else prompt_text += arg + " ";
  }
  if (o.model.empty()) usage("no model given");
  if (prompt_text.empty()) prompt_text.assign(std::istreambuf_iterator<char>(std::cin), {});
  o.prompt = parse_ids(prompt_text);
  if (o.prompt.empty()) usage("no prompt ids given");
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int fail(ane_runner* r, const char* what) {
  std::fprintf(stderr, "ane-runner: %s: %s\n", what, ane_runner_last_error(r));
  ane_runner_close(r);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  ane_runner* r = ane_runner_open(o.model.c_str());
  if (!r) return fail(nullptr, "cannot open the program");
  if (ane_runner_set_sampling(r, &o.sampling) != ANE_RUNNER_OK) return fail(r, "sampling");
  if (o.stops_given) ane_runner_set_stop_ids(r, o.stops.data(), o.stops.size());

  auto start = std::chrono::steady_clock::now();
  if (ane_runner_prefill(r, o.prompt.data(), o.prompt.size()) != ANE_RUNNER_OK) return fail(r, "prefill");
  double prefill_s = seconds_since(start);

  start = std::chrono::steady_clock::now();
  long generated = 0;
  ane_runner_status status = ANE_RUNNER_OK;
  for (int32_t id; generated < o.max_new && (status = ane_runner_next(r, &id)) == ANE_RUNNER_OK; ++generated) {
    std::printf("%s%d", generated ? " " : "", id);
    std::fflush(stdout);
  }
  double decode_s = seconds_since(start);
  std::printf("\n");
  std::fflush(stdout);
  if (status < 0 && status != ANE_RUNNER_CONTEXT_FULL) return fail(r, "decode");

  const char* end = status == ANE_RUNNER_STOPPED        ? ", stopped at a stop id"
                    : status == ANE_RUNNER_CONTEXT_FULL ? ", context full"
                                                        : "";
  std::fprintf(stderr, "prefill: %zu tokens in %.3f s (%.1f tokens/s); ", o.prompt.size(), prefill_s,
               o.prompt.size() / prefill_s);
  std::fprintf(stderr, "decode: %ld tokens in %.3f s (%.1f tokens/s)%s\n", generated, decode_s, generated / decode_s, end);
  ane_runner_close(r);
  return 0;
}
