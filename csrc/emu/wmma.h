// nvcuda::wmma for the emulated build (included by simt.h).
//
// Shape m16n16k16 (the one the kernels and the self-tests use); inputs __half or
// __nv_bfloat16 (matrix_a / matrix_b, row_major / col_major); accumulator float.
//
// Emulation model: every lane's fragment holds the WHOLE tile in logical
// row-major order, so num_elements is rows*cols (256 for a 16x16 tile, where
// the GPU has 8 or 16 per lane). Loads, mma and stores are warp-collective:
// all non-exited lanes of the warp must call them (else the launch fails
// with a deadlock error). Element-wise code that treats frag.x[i] uniformly
// (scale, convert, fill) behaves as on the GPU; code that depends on which
// tile element x[i] is on a given lane is NOT emulated faithfully.
// The 256-bit pointer alignment and the ldm multiple-of-16-bytes rules of
// the real API are checked and reported as faults.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <vector>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <int M, int N, int K>
constexpr bool kSupportedShape = M == 16 && N == 16 && K == 16;

inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Last mma_sync inputs and result of each warp of the running block.
template <int M, int N, int K, typename TIn>
struct MmaMemo {
  bool valid = false;
  TIn a[M * K];
  TIn b[K * N];
  float c[M * N];
  float d[M * N];
};

template <int M, int N, int K, typename TIn>
inline MmaMemo<M, N, K, TIn>& mma_memo(int warp) {
  static thread_local std::vector<MmaMemo<M, N, K, TIn>> memos(32);
  return memos[static_cast<size_t>(warp)];
}

// Warp-collective entry of every load/mma/store: waits for the whole warp,
// then validates the pointer and leading dimension like the hardware API.
inline void enter(const char* what, const void* ptr, unsigned ldm,
                  size_t elem_bytes, const char* file, int line) {
  ::gam_emu::warp_op(::gam_emu::WarpOpKind::kWmma, 0xffffffffu, 0, 0, 32,
                     what, file, line);
  if (ptr == nullptr) return;  // mma_sync
  char msg[256];
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    std::snprintf(msg, sizeof(msg),
                  "%s at %s:%d: pointer %p is not 256-bit (32-byte) aligned",
                  what, file, line, ptr);
    ::gam_emu::trap(msg);
  }
  if ((ldm * elem_bytes) % 16 != 0) {
    std::snprintf(msg, sizeof(msg),
                  "%s at %s:%d: ldm=%u elements is not a multiple of 16 bytes",
                  what, file, line, ldm);
    ::gam_emu::trap(msg);
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T,
          typename Layout = void>
class fragment {
  static_assert(detail::kSupportedShape<M, N, K>,
                "emulated wmma supports m16n16k16");
  static_assert(!std::is_same<Use, accumulator>::value || std::is_same<T, float>::value,
                "emulated wmma accumulators are float");

 public:
  static constexpr int kRows = detail::shape<Use, M, N, K>::rows;
  static constexpr int kCols = detail::shape<Use, M, N, K>::cols;
  enum { num_elements = kRows * kCols };  // the whole tile (see above)
  using element_type = T;
  using storage_element_type = T;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L,
          typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  const T value = static_cast<T>(v);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

// matrix_a / matrix_b: the layout is part of the fragment type.
template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p,
                             unsigned ldm,
                             const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  static_assert(!std::is_same<Use, accumulator>::value,
                "accumulator loads take a layout_t argument");
  static_assert(std::is_same<L, row_major>::value ||
                    std::is_same<L, col_major>::value,
                "matrix_a/matrix_b fragments need row_major or col_major");
  detail::enter("wmma::load_matrix_sync", p, ldm, sizeof(T), file, line);
  using F = fragment<Use, M, N, K, T, L>;
  const bool row = std::is_same<L, row_major>::value;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = row ? p[static_cast<size_t>(r) * ldm + c]
                                  : p[static_cast<size_t>(c) * ldm + r];
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f,
                             const T* p, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  detail::enter("wmma::load_matrix_sync", p, ldm, sizeof(T), file, line);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_row_major
                           ? p[static_cast<size_t>(r) * ldm + c]
                           : p[static_cast<size_t>(c) * ldm + r];
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p,
                              const fragment<accumulator, M, N, K, T, void>& f,
                              unsigned ldm, layout_t layout,
                              const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  detail::enter("wmma::store_matrix_sync", p, ldm, sizeof(T), file, line);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      T* dst = layout == mem_row_major ? &p[static_cast<size_t>(r) * ldm + c]
                                       : &p[static_cast<size_t>(c) * ldm + r];
      *dst = f.x[r * N + c];
    }
}

// d = a * b + c, accumulated in fp32 (d may alias c).
template <int M, int N, int K, typename TIn, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d,
                     const fragment<matrix_a, M, N, K, TIn, LA>& a,
                     const fragment<matrix_b, M, N, K, TIn, LB>& b,
                     const fragment<accumulator, M, N, K, float, void>& c,
                     const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  static_assert(std::is_same<TIn, __half>::value ||
                    std::is_same<TIn, __nv_bfloat16>::value,
                "emulated wmma inputs are __half or __nv_bfloat16");
  detail::enter("wmma::mma_sync", nullptr, 0, 1, file, line);
  // All lanes normally hold identical fragments: the first lane of a warp
  // computes the product, the others reuse it when their inputs match
  // byte for byte (32x less work; a mismatch just recomputes).
  auto& memo = detail::mma_memo<M, N, K, TIn>(::gam_emu::current_warp());
  if (!(memo.valid && std::memcmp(memo.a, a.x, sizeof(a.x)) == 0 &&
        std::memcmp(memo.b, b.x, sizeof(b.x)) == 0 &&
        std::memcmp(memo.c, c.x, sizeof(c.x)) == 0)) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float acc = c.x[i * N + j];
        for (int k = 0; k < K; ++k)
          acc += detail::to_float(a.x[i * K + k]) *
                 detail::to_float(b.x[k * N + j]);
        memo.d[i * N + j] = acc;
      }
    std::memcpy(memo.a, a.x, sizeof(a.x));
    std::memcpy(memo.b, b.x, sizeof(b.x));
    std::memcpy(memo.c, c.x, sizeof(c.x));
    memo.valid = true;
  }
  std::memcpy(d.x, memo.d, sizeof(d.x));
}

}  // namespace wmma
}  // namespace nvcuda
