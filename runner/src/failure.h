// One exception type inside the library; the C functions turn it into a
// status and a message, so nothing throws across the C ABI.
#pragma once

#include <stdexcept>
#include <string>

#include "ane_runner.h"

namespace ane {

class Failure : public std::runtime_error {
 public:
  Failure(ane_runner_status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  ane_runner_status status() const { return status_; }

 private:
  ane_runner_status status_;
};

}  // namespace ane
