// Thread-pool check shared by the compiled kernels of this folder.
//
// The kernels split their work with at::parallel_for, which only runs in parallel when the extension is
// compiled with OpenMP (the loader passes -fopenmp); otherwise it silently runs on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace vmamba_threads {

// Number of distinct threads that ran a share of `tasks` one-task chunks of at::parallel_for:
// torch.get_num_threads() (capped by `tasks`) when the kernels are parallel, 1 when they are not.
inline int64_t parallel_workers(int64_t tasks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    seen.fetch_or(uint64_t{1} << (id < 63 ? id : 63));
  });
  return __builtin_popcountll(seen.load());
}

}  // namespace vmamba_threads
