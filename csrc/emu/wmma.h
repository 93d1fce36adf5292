// The CUDA emulator's WMMA (<mma.h>, nvcuda::wmma): the m16n16k8 TF32 subset, with fp32 accumulation.
// Included by csrc/emu/cuda_emu.h. Emulated:
//   fragment<matrix_a, 16, 16, 8, precision::tf32, row_major | col_major>   A, 16 x 8 [m][k], 4 per lane
//   fragment<matrix_b, 16, 16, 8, precision::tf32, row_major | col_major>   B, 8 x 16 [k][n], 4 per lane
//   fragment<accumulator, 16, 16, 8, float>                                 C, 16 x 16 [m][n], 8 per lane
//   fill_fragment, load_matrix_sync, store_matrix_sync, mma_sync, __float_to_tf32.
// Which matrix elements a lane holds is opaque on a GPU. Here lane l's x[e] is element l * num_elements + e
// of the matrix in row-major order; a kernel may only apply one element-wise operation to every x[i] (then
// any layout gives the same result) and must not depend on which element an x[i] is.
// load_matrix_sync, store_matrix_sync and mma_sync are warp-collective: every lane of a full 32-lane warp
// calls them, with the same pointer, ldm and layout; each waits for all lanes, acts, and waits for all
// lanes again, so that no lane goes on (and overwrites what the operation reads) before every lane is done.
// Checked, and failed with a message (on a GPU each is undefined behaviour: wrong results, a hang, or an
// error far from its cause): lanes that do not all come, or pass different arguments; a pointer not 32-byte
// (256-bit) aligned; an ldm not a multiple of 4 floats (16 bytes); an A or B element in mma_sync that is
// not a TF32 value (the tensor cores would ignore its low mantissa bits).
// Each lane loads and stores only its own elements, in instrumented code at recording depth 0, so the race
// build sees every element access: two warps storing one tile in one barrier interval is a race.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32;
}

namespace emu {

template <typename>
constexpr bool kAlwaysFalse = false;

// A fragment of a matrix of `Elements` x 32 values.
template <int Elements>
struct fragment_base {
  static constexpr int num_elements = Elements;
  using element_type = float;
  float x[Elements];
};

template <typename Layout>
constexpr bool kIsLayout = std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value;

}  // namespace emu

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(emu::kAlwaysFalse<Use>,
                "cuda_emu: only the m16n16k8 TF32 WMMA fragments are emulated: matrix_a and matrix_b with "
                "precision::tf32 and row_major or col_major, and the float accumulator");
};

template <typename Layout>
struct fragment<matrix_a, 16, 16, 8, precision::tf32, Layout> : emu::fragment_base<4> {
  static_assert(emu::kIsLayout<Layout>, "cuda_emu: a matrix_a fragment is row_major or col_major");
};

template <typename Layout>
struct fragment<matrix_b, 16, 16, 8, precision::tf32, Layout> : emu::fragment_base<4> {
  static_assert(emu::kIsLayout<Layout>, "cuda_emu: a matrix_b fragment is row_major or col_major");
};

template <>
struct fragment<accumulator, 16, 16, 8, float, void> : emu::fragment_base<8> {};

// cvt.rna.tf32.f32: to nearest with ties away from zero, to 10 explicit mantissa bits (the low 13 bits zero).
// On the bits: adding half of the last kept bit rounds the magnitude half away from zero, and a carry into
// the exponent is right too, up to overflow: values past the largest TF32 value round to +-Inf (the PTX
// cvt.rna.tf32.f32 without .satfinite; .satfinite is the variant that clamps). Inf stays Inf; a NaN stays a
// NaN (quiet, its sign and high payload bits kept).
inline float __float_to_tf32(float in) {
  uint32_t bits;
  std::memcpy(&bits, &in, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) {
    bits = (bits + 0x1000u) & 0xffffe000u;
  } else if ((bits & 0x007fffffu) != 0) {
    bits = (bits | 0x00400000u) & 0xffffe000u;
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

namespace emu {

// What a lane passes to a collective operation, published to the other lanes of its warp.
struct Call {
  const char* what;
  int kind;             // the fragment types and layouts, the same in every lane
  const void* pointer;  // load, store: the memory operand
  unsigned ldm;
  layout_t layout;
  const float* a;  // mma: this lane's fragments
  const float* b;
};

template <typename Layout>
constexpr layout_t kLayout = std::is_same<Layout, row_major>::value ? mem_row_major : mem_col_major;

inline std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

// This lane's place in its warp, after checking that the warp is a full one.
INSLOC_EMU_INTERNAL inline int lane_of_full_warp(const char* what) {
  insloc_emu::Quiet quiet;
  insloc_emu::State& s = insloc_emu::state();
  const int i = s.current->linear, threads = int(s.fibers.size());
  const int lo = i - i % insloc_emu::kWarpSize;
  if (lo + insloc_emu::kWarpSize > threads)
    insloc_emu::fail(std::string(what) + " needs a full warp of 32 lanes; the last warp of this " +
                     std::to_string(threads) + "-thread block has " + std::to_string(threads - lo));
  return i % insloc_emu::kWarpSize;
}

// Publishes this lane's call, waits for the whole warp, and checks that every lane called the same: returns
// the warp's calls, lane by lane (each a Call, valid until leave()).
INSLOC_EMU_INTERNAL inline const void* const* enter(const Call& call, bool memory) {
  insloc_emu::Quiet quiet;
  insloc_emu::State& s = insloc_emu::state();
  const int i = s.current->linear, lane = i % insloc_emu::kWarpSize;
  if (memory) {
    if (reinterpret_cast<uintptr_t>(call.pointer) % 32 != 0)
      insloc_emu::fail(std::string(call.what) + ": the pointer " + hex(call.pointer) +
                       " is not 32-byte (256-bit) aligned");
    if (call.ldm % 4 != 0)
      insloc_emu::fail(std::string(call.what) + ": ldm " + std::to_string(call.ldm) +
                       " is not a multiple of 4 floats (16 bytes)");
  }
  s.exchange_record[size_t(i)] = &call;
  insloc_emu::warp_sync(call.what);
  const void* const* calls = &s.exchange_record[size_t(i - lane)];
  const Call& first = *static_cast<const Call*>(calls[0]);
  auto differ = [&](const char* what) {
    insloc_emu::fail(std::string(call.what) + ": lanes 0 and " + std::to_string(lane) + " of warp " +
                     std::to_string(i / insloc_emu::kWarpSize) + " pass different " + what +
                     "; every lane of the warp must pass the same");
  };
  if (call.kind != first.kind) differ("fragment types");
  if (memory && call.pointer != first.pointer)
    differ(("pointers (" + hex(first.pointer) + " and " + hex(call.pointer) + ")").c_str());
  if (memory && call.ldm != first.ldm)
    differ(("ldm (" + std::to_string(first.ldm) + " and " + std::to_string(call.ldm) + ")").c_str());
  if (memory && call.layout != first.layout) differ("layouts");
  return calls;
}

// Waits until every lane of the warp is done with the operation (and with the calls enter() returned).
INSLOC_EMU_INTERNAL inline void leave(const Call& call) { insloc_emu::warp_sync(call.what); }

// The offset of element (r, c) of a matrix in memory.
inline size_t offset(int r, int c, unsigned ldm, layout_t layout) {
  return layout == mem_row_major ? size_t(r) * ldm + size_t(c) : size_t(c) * ldm + size_t(r);
}

// This lane's elements of a matrix with Cols columns, read from and written to memory. Instrumented (not
// INSLOC_EMU_INTERNAL, never inlined into emulator internals) and called outside any Quiet scope: the race
// build records each access.
template <int Cols, int E>
__attribute__((noinline)) void load_elements(float (&x)[E], const float* p, unsigned ldm, layout_t layout,
                                             int lane) {
  for (int e = 0; e < E; ++e) {
    const int index = lane * E + e;
    x[e] = p[offset(index / Cols, index % Cols, ldm, layout)];
  }
}

template <int Cols, int E>
__attribute__((noinline)) void store_elements(float* p, const float (&x)[E], unsigned ldm, layout_t layout,
                                              int lane) {
  for (int e = 0; e < E; ++e) {
    const int index = lane * E + e;
    p[offset(index / Cols, index % Cols, ldm, layout)] = x[e];
  }
}

template <int Cols, int E>
INSLOC_EMU_INTERNAL void load(float (&x)[E], int kind, const float* p, unsigned ldm, layout_t layout) {
  const char* what = "wmma::load_matrix_sync";
  const int lane = lane_of_full_warp(what);
  const Call call{what, kind, p, ldm, layout, nullptr, nullptr};
  enter(call, true);
  load_elements<Cols>(x, p, ldm, layout, lane);
  leave(call);
}

INSLOC_EMU_INTERNAL inline bool is_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x1fffu) == 0 || std::isnan(v);
}

template <typename Frag>
INSLOC_EMU_INTERNAL void check_tf32(const Frag& f, const char* name, int lane) {
  for (int e = 0; e < f.num_elements; ++e) {
    if (is_tf32(f.x[e])) continue;
    char value[32];
    std::snprintf(value, sizeof value, "%.9g", double(f.x[e]));
    insloc_emu::fail(std::string("wmma::mma_sync: element ") + std::to_string(e) + " of lane " +
                     std::to_string(lane) + "'s " + name + " fragment (" + value +
                     ") is not a TF32 value (its low 13 mantissa bits are not zero); convert the elements "
                     "with wmma::__float_to_tf32 first");
  }
}

}  // namespace emu

template <typename Layout>
INSLOC_EMU_INTERNAL void load_matrix_sync(fragment<matrix_a, 16, 16, 8, precision::tf32, Layout>& a, const float* p,
                                          unsigned ldm) {
  emu::load<8>(a.x, 0 + int(emu::kLayout<Layout>), p, ldm, emu::kLayout<Layout>);
}

template <typename Layout>
INSLOC_EMU_INTERNAL void load_matrix_sync(fragment<matrix_b, 16, 16, 8, precision::tf32, Layout>& b, const float* p,
                                          unsigned ldm) {
  emu::load<16>(b.x, 2 + int(emu::kLayout<Layout>), p, ldm, emu::kLayout<Layout>);
}

INSLOC_EMU_INTERNAL inline void load_matrix_sync(fragment<accumulator, 16, 16, 8, float>& c, const float* p,
                                                 unsigned ldm, layout_t layout) {
  emu::load<16>(c.x, 4, p, ldm, layout);
}

INSLOC_EMU_INTERNAL inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 8, float>& c,
                                                  unsigned ldm, layout_t layout) {
  const char* what = "wmma::store_matrix_sync";
  const int lane = emu::lane_of_full_warp(what);
  const emu::Call call{what, 4, p, ldm, layout, nullptr, nullptr};
  emu::enter(call, true);
  emu::store_elements<16>(p, c.x, ldm, layout, lane);
  emu::leave(call);
}

// d = a b + c: d[m][n] = c[m][n] + a[m][0] b[0][n] + ... + a[m][7] b[7][n], in float from left to right
// (products of TF32 values are exact in float). Every lane's inputs are gathered before any lane writes its
// d, which may be c.
template <typename LayoutA, typename LayoutB>
INSLOC_EMU_INTERNAL void mma_sync(fragment<accumulator, 16, 16, 8, float>& d,
                                  const fragment<matrix_a, 16, 16, 8, precision::tf32, LayoutA>& a,
                                  const fragment<matrix_b, 16, 16, 8, precision::tf32, LayoutB>& b,
                                  const fragment<accumulator, 16, 16, 8, float>& c) {
  insloc_emu::Quiet quiet;  // touches only fragments (the lanes' stacks) and the emulator's own messages
  const char* what = "wmma::mma_sync";
  const int lane = emu::lane_of_full_warp(what);
  emu::check_tf32(a, "matrix_a", lane);
  emu::check_tf32(b, "matrix_b", lane);
  constexpr int kA = 4, kB = 4, kC = 8;  // elements per lane
  const emu::Call call{what, 2 * int(emu::kLayout<LayoutA>) + int(emu::kLayout<LayoutB>), nullptr, 0,
                       mem_row_major, a.x, b.x};
  const void* const* calls = emu::enter(call, false);
  float am[16][8], bm[8][16], cm[kC];
  for (int l = 0; l < insloc_emu::kWarpSize; ++l) {
    const emu::Call& other = *static_cast<const emu::Call*>(calls[l]);
    for (int e = 0; e < kA; ++e) am[(l * kA + e) / 8][(l * kA + e) % 8] = other.a[e];
    for (int e = 0; e < kB; ++e) bm[(l * kB + e) / 16][(l * kB + e) % 16] = other.b[e];
  }
  for (int e = 0; e < kC; ++e) cm[e] = c.x[e];
  emu::leave(call);
  for (int e = 0; e < kC; ++e) {
    const int m = (lane * kC + e) / 16, n = (lane * kC + e) % 16;
    float acc = cm[e];
    for (int k = 0; k < 8; ++k) acc += am[m][k] * bm[k][n];
    d.x[e] = acc;
  }
}

}  // namespace wmma
}  // namespace nvcuda
