// keras_blpa: CPU loops of the four fused block kernels (host only).
//
// Each kernel works on a range [byte_begin, byte_end) of PACKED BYTES, so that
// a caller can shard a tensor over any thread pool (TensorFlow's, or std::thread
// in the standalone test); bn_grad_reduce shards itself over fixed blocks
// through a caller's parallel-for. Every entry point takes the activation
// object first (blpa_activations.h). The element math is blpa_bins.h and the
// activation; here is only the walk over the data: ONE tile/run/channel
// skeleton (for_each_run) with the per-run work of each kernel as an inlined
// callable.
//
// Every kernel is compiled for three x86 instruction-set levels (the build's
// baseline AVX, AVX2, AVX-512 F/BW/VL/DQ) and runs the level the caller
// passes, capped at what the CPU supports; all levels give bit-identical
// results (checked by blpa_quant_test.cc). AVX-512F brings fused multiply-add
// instructions, so that rests on -ffp-contract=off (HOST_COPTS in
// ops/bazel/sources.bzl). This header reads no environment: callers choose the
// level (usable_cpu_level).
#ifndef KERAS_BLPA_CC_BLPA_CPU_H_
#define KERAS_BLPA_CC_BLPA_CPU_H_

#include <stdint.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cc/blpa_activations.h"
#include "cc/blpa_bins.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(BLPA_NO_MULTIVERSION)
#define BLPA_X86_DISPATCH 1
#define BLPA_INLINE inline __attribute__((always_inline))
#define BLPA_INLINE_LAMBDA __attribute__((always_inline))
#else
#define BLPA_INLINE inline
#define BLPA_INLINE_LAMBDA
#endif

namespace blpa {
namespace cpu {

// ---------------------------------------------------------------------------
// Instruction-set levels.

enum CpuLevel { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best level this CPU supports (kBaseline off x86 or without dispatch).
inline CpuLevel detected_cpu_level() {
#if defined(BLPA_X86_DISPATCH)
  static const CpuLevel level = [] {
    __builtin_cpu_init();
    CpuLevel l = kBaseline;
    if (__builtin_cpu_supports("avx2")) l = kAvx2;
    if (l == kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      l = kAvx512;
    return l;
  }();
  return level;
#else
  return kBaseline;
#endif
}

// Whether `s` is the lowercase `name` in any case.
inline bool is_name(const char* s, const char* name) {
  while (*name != '\0' && std::tolower(static_cast<unsigned char>(*s)) == *name) ++s, ++name;
  return *s == '\0' && *name == '\0';
}

// The detected level capped by `cap`, in any case: "avx" -> baseline, "avx2"
// -> at most AVX2; nullptr or any other name (e.g. "avx512") -> no cap (the
// Python loader warns about names other than avx, avx2 and avx512).
inline CpuLevel usable_cpu_level(const char* cap) {
  CpuLevel l = detected_cpu_level();
  if (cap != nullptr) {
    if (is_name(cap, "avx")) l = kBaseline;
    if (is_name(cap, "avx2") && l > kAvx2) l = kAvx2;
  }
  return l;
}

// The name `usable_cpu_level` takes for each level: the baseline is "avx" in
// a build with AVX (-mavx, HOST_COPTS on x86), "baseline" elsewhere.
inline const char* cpu_level_name(int level) {
#if defined(__AVX__)
  const char* baseline = "avx";
#else
  const char* baseline = "baseline";
#endif
  return level == kAvx512 ? "avx512" : level == kAvx2 ? "avx2" : baseline;
}

// ---------------------------------------------------------------------------
// Tiles, channel runs and bit packing.

// Elements processed per tile: codes of a tile live in a small stack buffer
// between the arithmetic loop (vectorised over channels) and the bit packing.
constexpr int64_t kTile = 2048;
// Channel counts below this are expanded into a periodic parameter buffer so
// the inner loops stay long for small C (C = 1, 3, ...).
constexpr int64_t kSmallC = 256;
constexpr int64_t kExpanded = kSmallC + 2 * kSmallC;

// Accumulator slots indexed by c + k of a run (fold with % C): the expanded
// period plus C for small C, else C.
inline int64_t reduce_scratch_size(int64_t C) {
  return C < kSmallC ? C * ((kSmallC + C - 1) / C) + C : C;
}

// NP per-channel vectors viewed from a channel c: `ptr(j, c)[k]` is vector j
// at channel (c + k) % C for 0 <= k < run(c, remaining).
template <int NP>
class ChannelView {
 public:
  BLPA_INLINE ChannelView(const float* const (&params)[NP], int64_t C) : C_(C) {
    expanded_ = C < kSmallC;
    if (expanded_) {
      period_ = C * ((kSmallC + C - 1) / C);  // multiple of C, >= kSmallC
      const int64_t len = period_ + C;
      for (int j = 0; j < NP; ++j) {
        for (int64_t i = 0; i < len; ++i) buf_[j][i] = params[j][i % C];
        ptr_[j] = buf_[j];
      }
    } else {
      period_ = C;
      for (int j = 0; j < NP; ++j) ptr_[j] = params[j];
    }
  }
  // Length of the contiguous run starting at channel c.
  BLPA_INLINE int64_t run(int64_t c, int64_t remaining) const {
    return std::min(remaining, expanded_ ? period_ : C_ - c);
  }
  BLPA_INLINE const float* ptr(int j, int64_t c) const { return ptr_[j] + c; }

 private:
  int64_t C_;
  bool expanded_;
  int64_t period_;
  const float* ptr_[NP];
  // Every row starts on a cache line (kExpanded floats are a multiple of 64
  // bytes). Measured: a few % of encode throughput with AVX-512.
  alignas(64) float buf_[NP][kExpanded];
};

// The mask edges clip(shift, 1, top) of channels [0, C) (mask_edge), built
// once per kernel range: the activations take the edge as a per-channel vector
// beside shift, so that the edge clip costs nothing per element.
class EdgeRow {
 public:
  BLPA_INLINE EdgeRow(const float* shift, int64_t C, float top) {
    float* e = stack_;
    if (C > kStack) {
      heap_.resize(C);
      e = heap_.data();
    }
    for (int64_t c = 0; c < C; ++c) e[c] = mask_edge(shift[c], top);
    ptr_ = e;
  }
  EdgeRow(const EdgeRow&) = delete;
  EdgeRow& operator=(const EdgeRow&) = delete;
  BLPA_INLINE const float* data() const { return ptr_; }

 private:
  static constexpr int64_t kStack = 1024;
  alignas(64) float stack_[kStack];
  std::vector<float> heap_;
  const float* ptr_;
};

#if defined(__GNUC__) && defined(__BYTE_ORDER__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
// Word views of the code buffer: one packed byte <-> one 16-bit (4 bits) or
// 32-bit (2 bits) word of codes, contiguous on both sides, so the loops
// vectorise. may_alias makes the views legal over the uint8_t buffer.
#define BLPA_WORD_PACKING 1
typedef uint16_t __attribute__((may_alias)) blpa_u16a;
typedef uint32_t __attribute__((may_alias)) blpa_u32a;
#endif

template <int BITS>
BLPA_INLINE void pack_codes(const uint8_t* codes, int64_t nbytes, uint8_t* out) {
  if (BITS == 8) {
    std::memcpy(out, codes, nbytes);
  } else if (BITS == 4) {
#if defined(BLPA_WORD_PACKING)
    const blpa_u16a* w = reinterpret_cast<const blpa_u16a*>(codes);
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint32_t v = w[b];  // code 2b in bits 0-7, code 2b+1 in bits 8-15
      out[b] = static_cast<uint8_t>((v & 0xFu) | ((v >> 4) & 0xF0u));
    }
#else
    for (int64_t b = 0; b < nbytes; ++b) {
      out[b] = static_cast<uint8_t>(codes[2 * b] | (codes[2 * b + 1] << 4));
    }
#endif
  } else {
#if defined(BLPA_WORD_PACKING)
    const blpa_u32a* w = reinterpret_cast<const blpa_u32a*>(codes);
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint32_t v = w[b];  // code 4b+j in bits 8j .. 8j+7
      out[b] = static_cast<uint8_t>((v & 0x3u) | ((v >> 6) & 0xCu) |
                                    ((v >> 12) & 0x30u) | ((v >> 18) & 0xC0u));
    }
#else
    for (int64_t b = 0; b < nbytes; ++b) {
      out[b] = static_cast<uint8_t>(codes[4 * b] | (codes[4 * b + 1] << 2) |
                                    (codes[4 * b + 2] << 4) |
                                    (codes[4 * b + 3] << 6));
    }
#endif
  }
}

template <int BITS>
BLPA_INLINE void unpack_codes(const uint8_t* in, int64_t nbytes, uint8_t* codes) {
  if (BITS == 8) {
    std::memcpy(codes, in, nbytes);
  } else if (BITS == 4) {
#if defined(BLPA_WORD_PACKING)
    blpa_u16a* w = reinterpret_cast<blpa_u16a*>(codes);
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint32_t v = in[b];
      w[b] = static_cast<uint16_t>((v & 0xFu) | ((v << 4) & 0xF00u));
    }
#else
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint8_t v = in[b];
      codes[2 * b] = v & 15;
      codes[2 * b + 1] = v >> 4;
    }
#endif
  } else {
#if defined(BLPA_WORD_PACKING)
    blpa_u32a* w = reinterpret_cast<blpa_u32a*>(codes);
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint32_t v = in[b];
      w[b] = (v & 0x3u) | ((v << 6) & 0x300u) | ((v << 12) & 0x30000u) |
             ((v << 18) & 0x3000000u);
    }
#else
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint8_t v = in[b];
      codes[4 * b] = v & 3;
      codes[4 * b + 1] = (v >> 2) & 3;
      codes[4 * b + 2] = (v >> 4) & 3;
      codes[4 * b + 3] = v >> 6;
    }
#endif
  }
}

// Element range [e0, e1) of packed bytes [byte_begin, byte_end); false when
// empty.
BLPA_INLINE bool element_range(int64_t n, int bits, int64_t byte_begin,
                               int64_t byte_end, int64_t* e0, int64_t* e1) {
  const int64_t per = 8 / bits;
  *e0 = std::min(n, byte_begin * per);
  *e1 = std::min(n, byte_end * per);
  return *e0 < *e1;
}

// Where a kernel's codes go: packed after each tile, or unpacked before it.
enum class Codes { kPack, kUnpack };

// The skeleton of every CPU loop. Walks the elements of packed bytes
// [byte_begin, byte_end) of an n-element, C-channel tensor tile by tile
// (kUnpack: the tile's codes are unpacked from `packed` first; kPack: the
// codes the runs write are packed into `packed` after it), and each tile in
// runs of consecutive channels: per_run(i, c, len, codes, view) handles
// elements [i, i + len) of channels c, c + 1, ... (mod C), whose codes are
// codes[0, len) and whose per-channel vectors are view.ptr(j, c)[0, len).
// per_run is force-inlined (where BLPA_X86_DISPATCH is on): each kernel's loop
// compiles as if written here, at the level of the function it lands in.
template <int BITS, Codes CODES, int NP, typename Byte, typename Run>
BLPA_INLINE void for_each_run(int64_t n, int64_t C, int64_t byte_begin,
                              int64_t byte_end, const float* const (&params)[NP],
                              Byte* packed, Run&& per_run) {
  constexpr int64_t per = 8 / BITS;
  int64_t e0, e1;
  if (!element_range(n, BITS, byte_begin, byte_end, &e0, &e1)) return;
  const ChannelView<NP> view(params, C);
  alignas(64) uint8_t codes[kTile];
  int64_t c = e0 % C;
  for (int64_t t0 = e0; t0 < e1; t0 += kTile) {
    const int64_t t1 = std::min(e1, t0 + kTile);
    const int64_t count = t1 - t0;
    const int64_t nbytes = (count + per - 1) / per;
    if constexpr (CODES == Codes::kUnpack) {
      unpack_codes<BITS>(packed + t0 / per, nbytes, codes);
    }
    for (int64_t i = t0; i < t1;) {
      const int64_t len = view.run(c, t1 - i);
      per_run(i, c, len, codes + (i - t0), view);
      i += len;
      c = (c + len) % C;
    }
    if constexpr (CODES == Codes::kPack) {
      for (int64_t k = count; k < nbytes * per; ++k) codes[k] = 0;  // padding
      pack_codes<BITS>(codes, nbytes, packed + t0 / per);
    }
  }
}

// ---------------------------------------------------------------------------
// Tables of smooth activations (blpa_activations.h, Smooth): the decoded
// output and the backward slope of each (channel, code), built once per call
// so that the element loops are a lookup instead of libm calls. One row of
// 2^K floats per accumulator slot (reduce_scratch_size), row s for channel
// s % C: a run starting at channel c reads row c + k for its element k, like
// the reduce's accumulators (ChannelView's expansion for small C).

// Which activations use them: silu and both gelus. hard_silu's f is a few
// float operations that vectorise, faster per element than a lookup
// (measured), so it keeps its per-element backward.
template <typename Act>
struct Tabled : std::false_type {};
template <typename F>
struct Tabled<Smooth<F>>
    : std::integral_constant<bool, !std::is_same<F, HardSiluFn>::value> {};

enum class Table { kDecoded, kSlope };

class SmoothTables {
 public:
  // `act` with its `which` table (one of SmoothTables' own, valid while it
  // lives) attached; unchanged if it is no smooth activation or already has
  // one. parallel_for(C, fn) must call fn(first, last) on disjoint channel
  // ranges covering [0, C), on any threads. C >= 1.
  template <typename Act, typename ParallelFor>
  Act attach(Act act, Table which, const float* step, const float* shift,
             int64_t C, int bits, ParallelFor&& parallel_for) {
    if constexpr (Tabled<Act>::value) {
      const float*& table = which == Table::kDecoded ? act.decoded : act.slope;
      if (table != nullptr) return act;
      const int64_t L = int64_t{1} << bits;
      const int64_t rows = reduce_scratch_size(C);
      data_.resize(rows * L);
      float* const t = data_.data();
      const bool decoded = which == Table::kDecoded;
      parallel_for(C, [&](int64_t first, int64_t last) {
        for (int64_t c = first; c < last; ++c) {
          act.table_row(step[c], shift[c], decoded ? t + c * L : nullptr,
                        decoded ? nullptr : t + c * L);
        }
      });
      for (int64_t r = C; r < rows; ++r) {
        std::memcpy(t + r * L, t + (r % C) * L, L * sizeof(float));
      }
      table = t;
    }
    return act;
  }

 private:
  std::vector<float> data_;
};

// Runs fn(0, total) on the calling thread.
struct Serial {
  template <typename Fn>
  void operator()(int64_t total, Fn&& fn) const {
    fn(int64_t{0}, total);
  }
};

// The table entries of a run of `len` elements starting at channel c, into
// out[0, len): out[k] = table[(c + k) * 2^K + codes[k]]. A plain loop of
// scalar loads (compilers tuned for today's x86 emit no gathers); the
// kernels' arithmetic then reads out[k] in its own, vectorised, loop.
template <int BITS>
BLPA_INLINE void look_up(const float* __restrict__ table, int64_t c,
                         const uint8_t* __restrict__ codes, int64_t len,
                         float* __restrict__ out) {
  const float* __restrict__ row = table + (c << BITS);
  for (int64_t k = 0; k < len; ++k) out[k] = row[(k << BITS) + codes[k]];
}

// dL/dy of element k of a run: g times its slope (looked up into slope[k]) for
// a tabled smooth activation, else act.backward.
template <typename Act>
BLPA_INLINE float grad_y(const Act& act, const float* __restrict__ slope,
                         int64_t k, float g, uint32_t code, float step,
                         float shift, float edge) {
  if constexpr (Tabled<Act>::value) {
    return mul_rn(g, slope[k]);
  } else {
    return act.backward(g, code, step, shift, edge);
  }
}

// Room for a run's slopes (tabled smooth activations only).
template <int BITS, typename Act>
struct SlopeBuffer {
  BLPA_INLINE const float* fill(const Act& act, int64_t c,
                                const uint8_t* codes, int64_t len) {
    if constexpr (Tabled<Act>::value) {
      look_up<BITS>(act.slope, c, codes, len, data);
    }
    return data;
  }
  alignas(64) float data[Tabled<Act>::value ? kTile : 1];
};

// ---------------------------------------------------------------------------
// The four kernels: the per-run work of each, inside the skeleton.

struct BnEncode {
  template <int BITS, typename Act>
  static BLPA_INLINE void range(Act act, const EncodeArgs& a, int64_t b0,
                                int64_t b1) {
    const float top = static_cast<float>((1 << BITS) - 1);
    const EdgeRow edge(a.shift, a.C, top);
    const float* params[5] = {a.scale, a.offset, a.inv_step, a.shift,
                              edge.data()};
    for_each_run<BITS, Codes::kPack>(
        a.n, a.C, b0, b1, params, a.packed,
        [&](int64_t i, int64_t c, int64_t len, uint8_t* codes,
            const ChannelView<5>& v) BLPA_INLINE_LAMBDA {
          const float* __restrict__ x = a.x + i;
          float* __restrict__ out = a.activation + i;
          uint8_t* __restrict__ cd = codes;
          const float* __restrict__ sc = v.ptr(0, c);
          const float* __restrict__ of = v.ptr(1, c);
          const float* __restrict__ is = v.ptr(2, c);
          const float* __restrict__ sh = v.ptr(3, c);
          const float* __restrict__ ed = v.ptr(4, c);
          for (int64_t k = 0; k < len; ++k) {
            const float y = bn_apply(x[k], sc[k], of[k]);
            out[k] = act.forward(y);
            cd[k] = static_cast<uint8_t>(
                act.encode(y, is[k], sh[k], ed[k], top));
          }
        });
  }
};

struct Decode {
  template <int BITS, typename Act>
  static BLPA_INLINE void range(Act act, const DecodeArgs& a, int64_t b0,
                                int64_t b1) {
    const float top = static_cast<float>((1 << BITS) - 1);
    const EdgeRow edge(a.shift, a.C, top);
    const float* params[3] = {a.step, a.shift, edge.data()};
    for_each_run<BITS, Codes::kUnpack>(
        a.n, a.C, b0, b1, params, a.packed,
        [&](int64_t i, int64_t c, int64_t len, uint8_t* codes,
            const ChannelView<3>& v) BLPA_INLINE_LAMBDA {
          const uint8_t* __restrict__ cd = codes;
          float* __restrict__ out = a.out + i;
          const float* __restrict__ st = v.ptr(0, c);
          const float* __restrict__ sh = v.ptr(1, c);
          const float* __restrict__ ed = v.ptr(2, c);
          if constexpr (Tabled<Act>::value) {
            look_up<BITS>(act.decoded, c, cd, len, out);
          } else {
            for (int64_t k = 0; k < len; ++k) {
              out[k] = act.decode(cd[k], st[k], sh[k], ed[k]);
            }
          }
        });
  }
};

// Adds the per-channel sums of g and g * x_hat (g = act.backward(grad_a, ...))
// over the range to sum_g and sum_gx (C doubles each); `scratch` holds
// 2 * reduce_scratch_size(C) doubles.
struct BnGradPartialSums {
  template <int BITS, typename Act>
  static BLPA_INLINE void range(Act act, const GradArgs& a, int64_t b0,
                                int64_t b1, double* sum_g, double* sum_gx,
                                double* scratch) {
    int64_t e0, e1;
    if (!element_range(a.n, BITS, b0, b1, &e0, &e1)) return;
    const int64_t slots = reduce_scratch_size(a.C);
    double* const acc_g = scratch;
    double* const acc_gx = scratch + slots;
    std::fill(scratch, scratch + 2 * slots, 0.0);
    const float top = static_cast<float>((1 << BITS) - 1);
    const EdgeRow edge(a.shift, a.C, top);
    const float* params[5] = {a.step, a.shift, a.gamma, a.beta, edge.data()};
    SlopeBuffer<BITS, Act> slopes;
    for_each_run<BITS, Codes::kUnpack>(
        a.n, a.C, b0, b1, params, a.packed,
        [&](int64_t i, int64_t c, int64_t len, uint8_t* codes,
            const ChannelView<5>& v) BLPA_INLINE_LAMBDA {
          const uint8_t* __restrict__ cd = codes;
          const float* __restrict__ g = a.grad_a + i;
          const float* __restrict__ st = v.ptr(0, c);
          const float* __restrict__ sh = v.ptr(1, c);
          const float* __restrict__ ga = v.ptr(2, c);
          const float* __restrict__ be = v.ptr(3, c);
          const float* __restrict__ ed = v.ptr(4, c);
          double* __restrict__ ag = acc_g + c;
          double* __restrict__ agx = acc_gx + c;
          const float* __restrict__ sl = slopes.fill(act, c, cd, len);
          for (int64_t k = 0; k < len; ++k) {
            const float y_dec = decoded_y(cd[k], st[k], sh[k], ed[k]);
            const float gy = grad_y(act, sl, k, g[k], cd[k], st[k], sh[k], ed[k]);
            const float xh = xhat_one(y_dec, be[k], ga[k]);
            ag[k] += static_cast<double>(gy);
            agx[k] += static_cast<double>(mul_rn(gy, xh));
          }
        });
    for (int64_t j = 0; j < slots; ++j) {
      sum_g[j % a.C] += acc_g[j];
      sum_gx[j % a.C] += acc_gx[j];
    }
  }
};

struct BnGradInput {
  template <int BITS, typename Act>
  static BLPA_INLINE void range(Act act, const GradArgs& a, int64_t b0,
                                int64_t b1) {
    const float top = static_cast<float>((1 << BITS) - 1);
    const EdgeRow edge(a.shift, a.C, top);
    const float* params[8] = {a.step, a.shift,  a.gamma,   a.beta,
                              a.coef, a.mean_g, a.mean_gx, edge.data()};
    SlopeBuffer<BITS, Act> slopes;
    for_each_run<BITS, Codes::kUnpack>(
        a.n, a.C, b0, b1, params, a.packed,
        [&](int64_t i, int64_t c, int64_t len, uint8_t* codes,
            const ChannelView<8>& v) BLPA_INLINE_LAMBDA {
          const uint8_t* __restrict__ cd = codes;
          // Not __restrict__: grad_x may be grad_a's buffer (in place).
          const float* g = a.grad_a + i;
          float* dx = a.grad_x + i;
          const float* __restrict__ st = v.ptr(0, c);
          const float* __restrict__ sh = v.ptr(1, c);
          const float* __restrict__ ga = v.ptr(2, c);
          const float* __restrict__ be = v.ptr(3, c);
          const float* __restrict__ co = v.ptr(4, c);
          const float* __restrict__ mg = v.ptr(5, c);
          const float* __restrict__ mgx = v.ptr(6, c);
          const float* __restrict__ ed = v.ptr(7, c);
          const float* __restrict__ sl = slopes.fill(act, c, cd, len);
          for (int64_t k = 0; k < len; ++k) {
            const float y_dec = decoded_y(cd[k], st[k], sh[k], ed[k]);
            const float gy = grad_y(act, sl, k, g[k], cd[k], st[k], sh[k], ed[k]);
            const float xh = xhat_one(y_dec, be[k], ga[k]);
            dx[k] = grad_input_one(gy, xh, co[k], mg[k], mgx[k]);
          }
        });
  }
};

// ---------------------------------------------------------------------------
// Instruction-set and bits dispatch: Kernel::range<BITS> compiled once per
// level and activation (inlined into a function with that target), chosen at
// run time.

template <typename Kernel, int BITS, typename Act, typename Args,
          typename... More>
void run_baseline(Act act, const Args& a, int64_t b0, int64_t b1,
                  More... more) {
  Kernel::template range<BITS>(act, a, b0, b1, more...);
}

#if defined(BLPA_X86_DISPATCH)
template <typename Kernel, int BITS, typename Act, typename Args,
          typename... More>
__attribute__((target("avx2"))) void run_avx2(Act act, const Args& a,
                                               int64_t b0, int64_t b1,
                                               More... more) {
  Kernel::template range<BITS>(act, a, b0, b1, more...);
}

template <typename Kernel, int BITS, typename Act, typename Args,
          typename... More>
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"))) void
run_avx512(Act act, const Args& a, int64_t b0, int64_t b1, More... more) {
  Kernel::template range<BITS>(act, a, b0, b1, more...);
}
#endif

template <typename Kernel, int BITS, typename Act, typename Args,
          typename... More>
inline void run_level(CpuLevel level, Act act, const Args& a, int64_t b0,
                      int64_t b1, More... more) {
#if defined(BLPA_X86_DISPATCH)
  // Never above what the CPU supports, whatever the caller asks.
  level = std::min(level, detected_cpu_level());
  if (level == kAvx512)
    return run_avx512<Kernel, BITS>(act, a, b0, b1, more...);
  if (level == kAvx2) return run_avx2<Kernel, BITS>(act, a, b0, b1, more...);
#else
  (void)level;  // one level only
#endif
  run_baseline<Kernel, BITS>(act, a, b0, b1, more...);
}

// Runs Kernel over packed bytes [b0, b1) at `level` (callers validate a.bits
// with valid_bits).
template <typename Kernel, typename Act, typename Args, typename... More>
inline void run_kernel(CpuLevel level, Act act, const Args& a, int64_t b0,
                       int64_t b1, More... more) {
  switch (a.bits) {
    case 2: return run_level<Kernel, 2>(level, act, a, b0, b1, more...);
    case 4: return run_level<Kernel, 4>(level, act, a, b0, b1, more...);
    default: return run_level<Kernel, 8>(level, act, a, b0, b1, more...);
  }
}

// ---------------------------------------------------------------------------
// Entry points.

// BN -> activation forward: act.forward(y) and the packed codes of y.
template <typename Act>
inline void bn_encode(Act act, const EncodeArgs& a, int64_t b0, int64_t b1,
                      CpuLevel level) {
  run_kernel<BnEncode>(level, act, a, b0, b1);
}

// The activation output rebuilt from the codes. A smooth activation should
// come with its decoded table (SmoothTables::attach, once per tensor): else
// this call builds one for itself.
template <typename Act>
inline void decode(Act act, const DecodeArgs& a, int64_t b0, int64_t b1,
                   CpuLevel level) {
  if (a.n == 0) return;
  SmoothTables own;
  act = own.attach(act, Table::kDecoded, a.step, a.shift, a.C, a.bits, Serial());
  run_kernel<Decode>(level, act, a, b0, b1);
}

// BN input gradient coef * ((g - mean_g) - x_hat * mean_gx), g = act.backward
// (a smooth activation: as for decode, with its slope table).
template <typename Act>
inline void bn_grad_input(Act act, const GradArgs& a, int64_t b0, int64_t b1,
                          CpuLevel level) {
  if (a.n == 0) return;
  SmoothTables own;
  act = own.attach(act, Table::kSlope, a.step, a.shift, a.C, a.bits, Serial());
  run_kernel<BnGradInput>(level, act, a, b0, b1);
}

// Fixed partition of the packed bytes into blocks for the reduction: the
// result depends only on the tensor size, never on the number of threads.
constexpr int64_t kReduceBlockBytes = 1 << 15;

inline int64_t reduce_num_blocks(int64_t nbytes) {
  return std::max<int64_t>(1, (nbytes + kReduceBlockBytes - 1) /
                                  kReduceBlockBytes);
}

// Per-channel sums of g and g * x_hat (g = act.backward(grad_a, ...)) over the
// whole tensor, written to sum_g and sum_gx (C floats each; a smooth
// activation: as for decode, with its slope table). Deterministic: one
// double partial sum per fixed block of kReduceBlockBytes packed bytes, each
// accumulated in element order, the blocks added in block order; the same bits
// for any thread count and level. parallel_for(blocks, fn) must call
// fn(first, last) on disjoint ranges covering [0, blocks), on any threads.
template <typename Act, typename ParallelFor>
void bn_grad_reduce(Act act, const GradArgs& a, CpuLevel level, float* sum_g,
                    float* sum_gx, ParallelFor&& parallel_for) {
  const int64_t C = a.C;
  if (a.n == 0) {
    std::fill(sum_g, sum_g + C, 0.0f);
    std::fill(sum_gx, sum_gx + C, 0.0f);
    return;
  }
  SmoothTables own;
  act = own.attach(act, Table::kSlope, a.step, a.shift, C, a.bits, Serial());
  const int64_t nbytes = packed_size(a.n, a.bits);
  const int64_t blocks = reduce_num_blocks(nbytes);
  const int64_t slots = reduce_scratch_size(C);
  std::vector<double> part(2 * C * blocks, 0.0);
  parallel_for(blocks, [&](int64_t first, int64_t last) {
    std::vector<double> scratch(2 * slots);
    for (int64_t b = first; b < last; ++b) {
      const int64_t lo = b * kReduceBlockBytes;
      const int64_t hi = std::min(nbytes, lo + kReduceBlockBytes);
      run_kernel<BnGradPartialSums>(level, act, a, lo, hi, &part[2 * C * b],
                                    &part[2 * C * b + C], scratch.data());
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double tg = 0.0, tgx = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      tg += part[2 * C * b + c];
      tgx += part[2 * C * b + C + c];
    }
    sum_g[c] = static_cast<float>(tg);
    sum_gx[c] = static_cast<float>(tgx);
  }
}

}  // namespace cpu
}  // namespace blpa

#endif  // KERAS_BLPA_CC_BLPA_CPU_H_
