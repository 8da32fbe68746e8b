// y[M, N] = x[M, K] @ W[K, N] on CPU, for a weight W stored in panels: the first 32 * (N / 32) columns as
// [N / 32, K, 32], each 32-column panel one contiguous block read front to back, then the last N % 32 columns
// as [K, N % 32]. Meant for decode, where M (the batch) is small and the step is bound by reading the
// weights: XLA's GEMM reads these shapes at about half the memory bandwidth.
//
// The panels are split over the threads of XLA's intra-op pool; within a panel, rows of x are taken kRows at a
// time, with kRows x 32 accumulators held in vector registers across the K loop. f32 throughout, fused
// multiply-adds; the sum over K in order, or in up to 4 interleaved partial sums when few rows.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;
// One vector register: 16 floats with AVX-512, 8 with AVX, else 4 (SSE, NEON). kRows: rows of x per block;
// kAccs: accumulator registers a block may use, leaving room for the panel's row.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRows = 8, kAccs = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRows = 2, kAccs = 8;
#else
constexpr int kLanes = 4, kRows = 2, kAccs = 8;
#endif
constexpr int kVecs = kPanel / kLanes;  // vector registers per panel row

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// Rows [0, R) of x (row stride k) times one panel w [k, 32] -> y rows (row stride n), 32 columns.
// With few rows, S independent partial sums over k (i mod S) keep enough multiply-adds in flight to hide
// their latency; they are added at the end.
template <int R>
void PanelRows(const float* x, const float* w, float* y, int64_t k, int64_t n) {
  constexpr int S = std::max(1, std::min(4, kAccs / (R * kVecs)));
  Vec acc[S][R][kVecs];
  for (int s = 0; s < S; ++s) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < kVecs; ++v) acc[s][r][v] = Vec{};
    }
  }
  int64_t i = 0;
  for (; i + S <= k; i += S) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      Vec row[kVecs];
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) row[v] = Load(w + (i + s) * kPanel + v * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * k + i + s];
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) acc[s][r][v] += xv * row[v];
      }
    }
  }
  for (; i < k; ++i) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < kVecs; ++v) acc[0][r][v] += x[r * k + i] * Load(w + i * kPanel + v * kLanes);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      Vec sum = acc[0][r][v];
      for (int s = 1; s < S; ++s) sum += acc[s][r][v];
      Store(y + r * n + v * kLanes, sum);
    }
  }
}

// The last N % 32 columns (`width` of them, w [k, width]): few, so plain loops.
void Tail(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n, int64_t width) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < width; ++j) {
      float acc = 0.0f;
      for (int64_t i = 0; i < k; ++i) acc += x[r * k + i] * w[i * width + j];
      y[r * n + j] = acc;
    }
  }
}

void Panel(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n) {
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows) PanelRows<kRows>(x + r * k, w, y + r * n, k, n);
  switch (m - r) {  // the remaining rows, fewer than kRows
    case 1: PanelRows<1>(x + r * k, w, y + r * n, k, n); break;
#if defined(__AVX512F__)
    case 2: PanelRows<2>(x + r * k, w, y + r * n, k, n); break;
    case 3: PanelRows<3>(x + r * k, w, y + r * n, k, n); break;
    case 4: PanelRows<4>(x + r * k, w, y + r * n, k, n); break;
    case 5: PanelRows<5>(x + r * k, w, y + r * n, k, n); break;
    case 6: PanelRows<6>(x + r * k, w, y + r * n, k, n); break;
    case 7: PanelRows<7>(x + r * k, w, y + r * n, k, n); break;
#endif
    default: break;
  }
}

// Panels are handed out in chunks from an atomic counter, to the calling thread and to helpers scheduled on the
// pool. A helper that starts after the work is gone finds nothing to do; the caller waits only for chunks that
// were taken, so it never waits on a helper that has not started (no deadlock when the pool is busy).
struct Work {
  const float *x, *w;
  float* y;
  int64_t m, k, n, panels, chunk;  // panels: the full ones, plus one for a tail
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (;;) {
      const int64_t start = next.fetch_add(chunk, std::memory_order_relaxed);
      if (start >= panels) return;
      const int64_t end = std::min(panels, start + chunk);
      for (int64_t p = start; p < end; ++p) {
        if ((p + 1) * kPanel <= n) {
          Panel(x, w + p * k * kPanel, y + p * kPanel, m, k, n);
        } else {
          Tail(x, w + p * k * kPanel, y + p * kPanel, m, k, n, n - p * kPanel);
        }
      }
      done.fetch_add(end - start, std::memory_order_release);
    }
  }
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 1 || yd.size() != 2 || yd[0] != xd[0] || wd[0] != xd[1] * yd[1]) {
    return ffi::Error::InvalidArgument("packed_matmul: want x [M, K], w [K * N] (panels), y [M, N]");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->y = y->typed_data();
  work->m = xd[0];
  work->k = xd[1];
  work->n = yd[1];
  work->panels = (work->n + kPanel - 1) / kPanel;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->chunk = std::max<int64_t>(1, work->panels / (threads * 8));
  const int64_t bytes = work->panels * work->k * kPanel * 4;
  if (threads > 1 && bytes >= (1 << 18)) {
    for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work->Run(); });
  }
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->panels) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
