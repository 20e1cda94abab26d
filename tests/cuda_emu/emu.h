// A small SIMT emulator that runs the guidedrop CUDA kernels (csrc/cuda/*.cu) on the CPU,
// for tests on machines without a GPU. tests/cuda_emu/build.py compiles the kernel sources
// as C++ with this header (and the stub CUDA headers it generates, which include it).
//
// Model: a launch `kernel<<<grid, block, smem, stream>>>(args)` (rewritten by build.py to
// `emu::Launcher(grid, block, smem, stream)(kernel, args)`) runs the blocks one after
// another; inside a block every CUDA thread is an OS thread (std::thread, kept in a pool from
// block to block), so threads really interleave and a missing __syncthreads can show up as a
// wrong result. __syncthreads (and __syncthreads_or) is a barrier of the block, warp
// intrinsics (__shfl_*_sync, __ballot_sync, __match_any_sync, ...) a rendezvous of the 32
// lanes of the warp: all 32 lanes must call them (full mask only), as on the GPU.
// `__shared__` variables are `static` (one copy, the blocks run one at a time), dynamic
// shared memory is a buffer filled with 0xAB before each launch.
//
// Errors become C++ exceptions, thrown by the launch (so the op raises a RuntimeError): an
// exception in a kernel thread, a barrier that cannot complete (some threads returned from
// the kernel while the others wait, or no barrier completed for GUIDEDROP_EMU_TIMEOUT
// seconds, default 60: a divergent __syncthreads or warp intrinsic), a launch configuration
// the GPU refuses. A thread that spins forever without reaching a barrier aborts the process.
//
// Not emulated: FMA contraction (nvcc fuses a * b + c by default; the host compiler does
// not), memory-model effects beyond sequential consistency, the speed of anything.
#pragma once

#include <vector_functions.h>
#include <vector_types.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <sched.h>
#include <unistd.h>

typedef struct CUstream_st* cudaStream_t;  // as in driver_types.h

// host_defines.h makes __shared__ empty in host code: per-thread locals would silently
// replace shared memory. One static copy is right since blocks run one at a time.
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// grid_for's cap (csrc/cuda/common.cuh: GUIDEDROP_MAX_GRID): $GUIDEDROP_EMU_MAX_GRID when
// set, read at each launch so that a test can set it (1: one block, every grid-stride loop
// a pass per block's work), else the GPU build's.
inline int64_t max_grid(int64_t fallback) {
  const char* env = std::getenv("GUIDEDROP_EMU_MAX_GRID");
  return env != nullptr && std::atoll(env) > 0 ? std::atoll(env) : fallback;
}

inline double timeout_s() {
  static const double seconds = [] {
    const char* env = std::getenv("GUIDEDROP_EMU_TIMEOUT");
    return env != nullptr && std::atof(env) > 0 ? std::atof(env) : 60.0;
  }();
  return seconds;
}

// Waiting on a 32-bit word: a few sched_yield()s (the threads that have still to arrive get
// the 2 cores), then the futex syscall itself. libstdc++'s std::atomic::wait does about the
// same with its own spin counts: 25 % slower on the emulated tests; sleeping at once, 3x slower.
inline void futex_wait(std::atomic<uint32_t>& word, uint32_t old) {
  for (int i = 0; i < 16; ++i) {
    if (word.load() != old) return;
    sched_yield();
  }
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, old, nullptr,
          nullptr, 0);
}
inline void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}

// A reusable barrier of n threads (waiting with futex_wait) that can be broken: then every
// waiter, and every later arrival, throws emu::Error.
class Barrier {
 public:
  Barrier(int n, std::string what, std::atomic<uint64_t>& progress)
      : n_(n), what_(std::move(what)), progress_(progress) {}

  void arrive_and_wait() {
    if (broken_.load()) throw Error(reason());
    const uint32_t gen = gen_.load();
    const int arrived = arrived_.fetch_add(1) + 1;
    if (arrived == n_) {  // the last one: release the others
      arrived_.store(0);
      progress_.fetch_add(1);
      gen_.fetch_add(1);
      futex_wake_all(gen_);
      return;
    }
    if (arrived + exited_.load() == n_) {
      fail("some threads returned from the kernel while the others wait at " + what_);
    }
    while (gen_.load() == gen) futex_wait(gen_, gen);
    if (broken_.load()) throw Error(reason());
  }

  // The calling thread has returned from the kernel. (Seq-cst counters: of an arrival and
  // an exit that race, at least one sees the other.)
  void exit() {
    const int exited = exited_.fetch_add(1) + 1;
    const int arrived = arrived_.load();
    if (arrived > 0 && arrived + exited == n_) {
      fail("some threads returned from the kernel while the others wait at " + what_, false);
    }
  }

  // Break the barrier (waiters throw `why`); returns false when it was broken already.
  bool fail(const std::string& why, bool throw_ = true) {
    bool was = false;
    {
      std::lock_guard<std::mutex> lock(m_);
      was = broken_.load();
      if (!was) {
        reason_ = "emu: " + why;
        broken_.store(true);
      }
    }
    gen_.fetch_add(1);
    futex_wake_all(gen_);
    if (throw_) throw Error(reason());
    return !was;
  }

  // "what: a of n threads waiting" when some threads wait here; else empty.
  std::string waiting() const {
    const int a = arrived_.load();
    if (a == 0) return "";
    return what_ + ": " + std::to_string(a) + " of " + std::to_string(n_) + " threads waiting";
  }

  std::string reason() {
    std::lock_guard<std::mutex> lock(m_);
    return reason_;
  }

 private:
  const int n_;
  const std::string what_;
  std::atomic<uint64_t>& progress_;
  std::atomic<uint32_t> gen_{0};
  std::atomic<int> arrived_{0}, exited_{0};
  std::atomic<bool> broken_{false};
  std::mutex m_;
  std::string reason_;
};

inline dim3 gridDim_, blockDim_;
inline thread_local uint3 tidx, bidx;
inline std::vector<unsigned char> dyn;  // dynamic shared memory

struct BlockState {
  std::atomic<uint64_t> progress{0};  // barrier completions and thread exits
  std::unique_ptr<Barrier> block;
  std::vector<std::unique_ptr<Barrier>> warp;
  std::vector<uint64_t> slots;  // one per thread: the values lanes exchange
  std::mutex m;
  std::condition_variable all_done;
  int done = 0;
  std::exception_ptr error;

  void fail_all(const std::string& why) {
    block->fail(why, false);
    for (auto& w : warp) w->fail(why, false);
  }
};
inline BlockState* bs = nullptr;

// The OS threads that run the CUDA threads of a block, kept from block to block and from
// launch to launch: creating and joining 256 threads costs ~17 ms on a 2-core machine, more
// than most emulated blocks compute, and it was most of the emulated tests' time (in the
// kernel). Worker t runs CUDA thread t of every block (the job sets its thread_locals). The
// workers never exit; a forked child, which has none of them, starts a pool of its own.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = nullptr;  // leaked on purpose: its threads outlive every destructor
    static pid_t owner = 0;
    if (pool == nullptr || owner != getpid()) {
      pool = new Pool;
      owner = getpid();
    }
    return *pool;
  }

  // Start job(t) on workers t = 0 .. n - 1 (they run while the caller watches the block).
  void start(int n, const std::function<void(int)>& job) {
    job_ = &job;
    running_.store(static_cast<uint32_t>(n));
    while (static_cast<int>(go_.size()) < n) {
      go_.push_back(std::make_unique<std::atomic<uint32_t>>(0));
      std::thread([this, t = static_cast<int>(go_.size()) - 1, go = go_.back().get()] {
        for (;;) {
          while (go->load() == 0) futex_wait(*go, 0);
          go->store(0);
          (*job_)(t);
          if (running_.fetch_sub(1) == 1) futex_wake_all(running_);
        }
      }).detach();
    }
    for (int t = 0; t < n; ++t) {
      go_[t]->store(1);
      futex_wake_all(*go_[t]);
    }
  }

  // Wait until every worker of the last start has returned from the job (a join).
  void join() {
    for (uint32_t r; (r = running_.load()) != 0;) futex_wait(running_, r);
  }

 private:
  std::vector<std::unique_ptr<std::atomic<uint32_t>>> go_;
  std::atomic<uint32_t> running_{0};
  const std::function<void(int)>* job_ = nullptr;
};

inline int linear() {
  return static_cast<int>(tidx.x + tidx.y * blockDim_.x + tidx.z * blockDim_.x * blockDim_.y);
}
template <class T>
T* dyn_smem() {
  return reinterpret_cast<T*>(dyn.data());
}

inline std::string str(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) +
         ")";
}

// Kernel launches since the library was loaded (tests/test_launches.py reads it through
// torch.ops.guidedrop_emu.emu_launches()).
inline std::atomic<int64_t>& launch_count() {
  static std::atomic<int64_t> n{0};
  return n;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Record mode (emu_record): launches are checked and recorded, not run.
inline std::atomic<bool>& recording() {
  static std::atomic<bool> on{false};
  return on;
}
inline std::vector<std::string>& records() {  // under launch_mutex()
  static std::vector<std::string> r;
  return r;
}

struct Launcher {
  dim3 g, b;
  size_t smem;
  const char* site = "";  // "<source>:<line> <kernel>", set by build.py's rewrite
  Launcher(dim3 g_, dim3 b_, size_t smem_ = 0, cudaStream_t = nullptr)
      : g(g_), b(b_), smem(smem_) {}
  Launcher& at(const char* s) {
    site = s;
    return *this;
  }

  void check() const {
    const auto fail = [&](const std::string& why) {
      throw Error("emu: invalid launch grid " + str(g) + " block " + str(b) + ": " + why);
    };
    if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0)
      fail("a zero dimension (CUDA: invalid configuration argument)");
    if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) fail("grid too large");
    if (b.x > 1024 || b.y > 1024 || b.z > 64) fail("block dimension too large");
    const uint64_t nt = uint64_t(b.x) * b.y * b.z;
    if (nt > 1024) fail("more than 1024 threads per block");
    if (nt % 32 != 0) fail("the emulator needs whole warps (threads per block % 32 == 0)");
    if (smem > 48 * 1024) fail("more than 48 KiB of dynamic shared memory (no opt-in here)");
  }

  template <class F, class... A>
  void operator()(F f, A... a) {
    check();
    ++launch_count();
    std::lock_guard<std::mutex> launch_lock(launch_mutex());
    if (recording().load()) {
      records().push_back(std::string(site) + " " + str(g) + " " + str(b));
      return;
    }
    const int nt = static_cast<int>(b.x * b.y * b.z);
    gridDim_ = g;
    blockDim_ = b;
    dyn.assign(smem + 16, 0xAB);
    for (unsigned bz = 0; bz < g.z; ++bz)
      for (unsigned by = 0; by < g.y; ++by)
        for (unsigned bx = 0; bx < g.x; ++bx) run_block(nt, dim3(bx, by, bz), f, a...);
  }

  template <class F, class... A>
  void run_block(int nt, dim3 block_idx, F f, A... a) {
    const std::string where = " of block " + str(block_idx);
    BlockState st;
    st.block = std::make_unique<Barrier>(nt, "__syncthreads" + where, st.progress);
    for (int w = 0; w < nt / 32; ++w)
      st.warp.push_back(std::make_unique<Barrier>(
          32, "a warp intrinsic of warp " + std::to_string(w) + where, st.progress));
    st.slots.assign(nt, 0);
    bs = &st;
    const std::function<void(int)> job = [&](int t) {
      tidx = make_uint3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
      bidx = make_uint3(block_idx.x, block_idx.y, block_idx.z);
      try {
        f(a...);
        st.block->exit();
        st.warp[t / 32]->exit();
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(st.m);
          if (!st.error) st.error = std::current_exception();
        }
        st.fail_all("another thread" + where + " failed");
      }
      st.progress.fetch_add(1);
      std::lock_guard<std::mutex> lock(st.m);
      if (++st.done == nt) st.all_done.notify_all();
    };
    Pool& pool = Pool::get();
    pool.start(nt, job);
    // Watchdog: no barrier completed and no thread returned for timeout_s(): a deadlock.
    {
      std::unique_lock<std::mutex> lock(st.m);
      uint64_t seen = st.progress.load();
      auto last = std::chrono::steady_clock::now();
      bool broke = false;
      while (st.done < nt) {
        st.all_done.wait_for(lock, std::chrono::milliseconds(500));
        const uint64_t now = st.progress.load();
        if (now != seen) {
          seen = now;
          last = std::chrono::steady_clock::now();
        } else if (std::chrono::steady_clock::now() - last >
                   std::chrono::duration<double>(timeout_s())) {
          std::string stuck = st.block->waiting();
          for (auto& w : st.warp) {
            const std::string s = w->waiting();
            if (!s.empty()) stuck += (stuck.empty() ? "" : "; ") + s;
          }
          if (broke) {  // a thread spins without reaching a barrier: nothing to unwind
            std::fprintf(stderr, "emu: no progress%s after breaking its barriers; abort\n",
                         where.c_str());
            std::abort();
          }
          char secs[32];
          std::snprintf(secs, sizeof secs, "%g", timeout_s());
          const std::string why = "emu: no progress in " + std::string(secs) + " s" +
                                  where + " (divergent __syncthreads or warp intrinsic?): " +
                                  (stuck.empty() ? "no thread at a barrier" : stuck);
          if (!st.error) st.error = std::make_exception_ptr(Error(why));
          broke = true;
          lock.unlock();
          st.fail_all(why.substr(5));
          lock.lock();
          last = std::chrono::steady_clock::now();
        }
      }
    }
    pool.join();
    bs = nullptr;
    if (st.error) std::rethrow_exception(st.error);
  }
};

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "emu: values of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
inline void check_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu)
    throw Error(std::string("emu: ") + what + " with a partial mask is not emulated");
}
inline void warp_sync() { bs->warp[linear() / 32]->arrive_and_wait(); }
// Every lane publishes v; returns the value published by lane src of the warp.
template <class T>
T gather(T v, int src) {
  const int l = linear(), base = (l / 32) * 32;
  bs->slots[l] = to_bits(v);
  warp_sync();
  const T r = from_bits<T>(bs->slots[base + src]);
  warp_sync();  // nobody overwrites its slot before every lane has read
  return r;
}
template <class Pred>
unsigned warp_bits(uint64_t mine, Pred pred) {  // bit i: pred(slot of lane i, mine)
  const int l = linear(), base = (l / 32) * 32;
  bs->slots[l] = mine;
  warp_sync();
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if (pred(bs->slots[base + i], mine)) r |= 1u << i;
  warp_sync();
  return r;
}
inline int lane() { return linear() % 32; }

}  // namespace emu

#define GUIDEDROP_MAX_GRID (emu::max_grid(kMaxGrid))

#define threadIdx emu::tidx
#define blockIdx emu::bidx
#define blockDim emu::blockDim_
#define gridDim emu::gridDim_
#define warpSize 32

// ------------------------------------------------------------------------ intrinsics

inline void __syncthreads() { emu::bs->block->arrive_and_wait(); }
// Every thread publishes its predicate in its slot (no warp intrinsic runs meanwhile: the
// whole block is here), then reads every slot.
inline int __syncthreads_or(int pred) {
  emu::bs->slots[emu::linear()] = pred != 0;
  __syncthreads();
  int any = 0;
  for (const uint64_t s : emu::bs->slots) any |= s != 0;
  __syncthreads();  // nobody overwrites its slot before every thread has read
  return any;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::check_mask(mask, "__syncwarp");
  emu::warp_sync();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  emu::check_mask(mask, "__shfl_sync");
  const int lane = emu::lane(), base = lane & ~(width - 1);
  return emu::gather(v, base + (src % width));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int d, int width = 32) {
  emu::check_mask(mask, "__shfl_xor_sync");
  const int lane = emu::lane(), src = lane ^ d;
  return emu::gather(v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  emu::check_mask(mask, "__shfl_up_sync");
  const int lane = emu::lane(), in = lane % width;
  return emu::gather(v, in >= static_cast<int>(d) ? lane - static_cast<int>(d) : lane);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  emu::check_mask(mask, "__shfl_down_sync");
  const int lane = emu::lane(), in = lane % width;
  return emu::gather(v, in + static_cast<int>(d) < width ? lane + static_cast<int>(d) : lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu::check_mask(mask, "__ballot_sync");
  return emu::warp_bits(pred ? 1 : 0, [](uint64_t s, uint64_t) { return s != 0; });
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == ~0u; }
inline unsigned __activemask() { return 0xffffffffu; }
template <class T>
unsigned __match_any_sync(unsigned mask, T v) {
  emu::check_mask(mask, "__match_any_sync");
  return emu::warp_bits(emu::to_bits(v), [](uint64_t s, uint64_t m) { return s == m; });
}

inline unsigned __float_as_uint(float f) { return emu::from_bits<unsigned>(emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return emu::from_bits<float>(u); }
inline int __float_as_int(float f) { return emu::from_bits<int>(emu::to_bits(f)); }
inline float __int_as_float(int i) { return emu::from_bits<float>(static_cast<uint32_t>(i)); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __ffsll(unsigned long long x) { return __builtin_ffsll(static_cast<long long>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(unsigned x) { return x == 0 ? 32 : __builtin_clz(x); }
inline int __clzll(unsigned long long x) { return x == 0 ? 64 : __builtin_clzll(x); }
// byte n of the result: byte (s >> 4n) & 7 of y:x (x the low 4 bytes), CUDA's default mode
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) {
    r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xffu) << (8 * n);
  }
  return r;
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
// Rounded float ops: the host compiler does not contract anything at -ffp-contract=off.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
// 1/a rounded up (IEEE): the nearest quotient, one float up where it lies below 1/a (a * r
// is exact in double); NaN products (a = 0, Inf, NaN) leave it as it is.
inline float __frcp_ru(float a) {
  const float r = 1.f / a;
  const double p = static_cast<double>(a) * static_cast<double>(r);
  return (a > 0.f ? p < 1.0 : p > 1.0) ? std::nextafter(r, INFINITY) : r;
}
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
template <class T>
T __ldg(const T* p) {
  return *p;
}

// Atomics (sequentially consistent; they return the old value like CUDA's). The value
// converts to the pointee type, as with CUDA's overloads for int, unsigned, float, ...
template <class T>
T atomicAdd(T* p, std::type_identity_t<T> v) {
  if constexpr (std::is_floating_point_v<T>) {
    T cur, want;
    __atomic_load(p, &cur, __ATOMIC_SEQ_CST);
    do {
      want = cur + v;
    } while (!__atomic_compare_exchange(p, &cur, &want, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST));
    return cur;
  } else {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  }
}
template <class T>
T atomicSub(T* p, std::type_identity_t<T> v) {
  return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
T atomicOr(T* p, std::type_identity_t<T> v) {
  return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
T atomicAnd(T* p, std::type_identity_t<T> v) {
  return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
T atomicXor(T* p, std::type_identity_t<T> v) {
  return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
T atomicExch(T* p, std::type_identity_t<T> v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
T atomicCAS(T* p, std::type_identity_t<T> expected, std::type_identity_t<T> desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
template <class T>
T atomicMax(T* p, std::type_identity_t<T> v) {
  T cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (cur < v &&
         !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return cur;
}
template <class T>
T atomicMin(T* p, std::type_identity_t<T> v) {
  T cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (cur > v &&
         !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return cur;
}

// CUDA's device min / max overloads (mixed argument types convert to the common type).
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  return static_cast<T>(a) < static_cast<T>(b) ? static_cast<T>(a) : static_cast<T>(b);
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  return static_cast<T>(a) > static_cast<T>(b) ? static_cast<T>(a) : static_cast<T>(b);
}
