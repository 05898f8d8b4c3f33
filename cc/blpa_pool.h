// keras_blpa: max pooling that keeps only the argmax code (framework-free CPU loops).
//
// The code of an output is the index k = i * kw + j (window row i, column j)
// of the first maximum of its window in row-major window order; positions in
// the padding are never the maximum. The backward adds each output's gradient
// at its maximum's input position, visiting the outputs in row-major order
// (TensorFlow's MaxPoolGrad order), so overlapping windows sum as stock does.
// Semantics: keras_blpa/windows.py and keras_blpa/backends/tensorflow/pooling.py.
#ifndef KERAS_BLPA_CC_BLPA_POOL_H_
#define KERAS_BLPA_CC_BLPA_POOL_H_

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace blpa {
namespace pool {

// One NHWC pooling: input [n, h, w, c], output [n, ho, wo, c], window kh x kw,
// strides sh, sw, and the padding before the first row (top) and column (left).
struct Geometry {
  int64_t n, h, w, c;
  int64_t ho, wo;
  int64_t kh, kw, sh, sw;
  int64_t top, left;
};

// best[t] = max(best[t], x[t]) and its index for t < n, the first maximum kept
// (strict >, so a NaN already in `best` stays).
inline void update(float* __restrict__ best, float* __restrict__ index,
                   const float* __restrict__ x, float k, int64_t n) {
  // Written as a max and an add so that the compiler emits plain stores, not
  // masked ones (slow on AMD): k - i and i + (k - i) are exact for indices.
  for (int64_t t = 0; t < n; ++t) {
    const float v = x[t], b = best[t], i = index[t];
    best[t] = std::max(b, v);  // b < v ? v : b
    index[t] = i + (b < v ? k - i : 0.0f);
  }
}

// Output rows [begin, end) of the n * ho rows: y and the code. A row's running
// maxima and indices live in scratch (float, int32), started from each
// output's first valid window position and then updated window position by
// window position over the row (contiguous when the stride is 1), so that the
// loops vectorise; the row is written out once.
template <typename Code>
void forward(const Geometry& g, const float* x, float* y, Code* code,
             int64_t begin, int64_t end) {
  const int64_t C = g.c, row = g.wo * C;
  std::vector<float> best_v(row);
  std::vector<float> index_v(row);  // exact: a window has fewer than 2^24 positions
  float* best = best_v.data();
  float* index = index_v.data();
  // Output columns [lo, hi) whose window column j lies inside the input.
  auto columns = [&g](int64_t j, int64_t* lo, int64_t* hi) {
    const int64_t first = g.left - j;  // ow * sw >= left - j
    *lo = first <= 0 ? 0 : (first + g.sw - 1) / g.sw;
    const int64_t last = g.w - 1 + g.left - j;  // ow * sw <= w - 1 + left - j
    *hi = last < 0 ? 0 : last / g.sw + 1;
    if (*hi > g.wo) *hi = g.wo;
    if (*lo > *hi) *lo = *hi;
  };
  for (int64_t r = begin; r < end; ++r) {
    const int64_t s = r / g.ho, oh = r % g.ho;
    const float* xs = x + s * g.h * g.w * C;
    const int64_t i0 = g.top - oh * g.sh > 0 ? g.top - oh * g.sh : 0;
    for (int64_t ow = 0; ow < g.wo; ++ow) {  // each output's first valid position
      const int64_t j0 = g.left - ow * g.sw > 0 ? g.left - ow * g.sw : 0;
      const float* xp = xs + ((oh * g.sh - g.top + i0) * g.w + ow * g.sw - g.left + j0) * C;
      std::memcpy(best + ow * C, xp, sizeof(float) * C);
      std::fill(index + ow * C, index + (ow + 1) * C, static_cast<float>(i0 * g.kw + j0));
    }
    for (int64_t i = i0; i < g.kh; ++i) {
      const int64_t hi = oh * g.sh - g.top + i;
      if (hi >= g.h) break;
      const float* xr = xs + hi * g.w * C;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo, end_col;
        columns(j, &lo, &end_col);
        const float k = static_cast<float>(i * g.kw + j);
        if (g.sw == 1) {
          update(best + lo * C, index + lo * C, xr + (lo - g.left + j) * C, k,
                 (end_col - lo) * C);
          continue;
        }
        for (int64_t ow = lo; ow < end_col; ++ow)
          update(best + ow * C, index + ow * C, xr + (ow * g.sw - g.left + j) * C, k, C);
      }
    }
    float* yr = y + r * row;
    Code* kr = code + r * row;
    std::memcpy(yr, best, sizeof(float) * row);
    for (int64_t t = 0; t < row; ++t) kr[t] = static_cast<Code>(index[t]);
  }
}

// Input gradient of samples [begin, end): dx zeroed there, then each output's
// gradient added at its maximum, outputs in row-major order.
template <typename Code>
void backward(const Geometry& g, const float* dy, const Code* code, float* dx,
              int64_t begin, int64_t end) {
  const int64_t C = g.c;
  const int64_t in_size = g.h * g.w * C, out_size = g.ho * g.wo * C;
  std::vector<int64_t> offset(g.kh * g.kw);  // code k -> its input offset from the corner
  for (int64_t k = 0; k < g.kh * g.kw; ++k) offset[k] = ((k / g.kw) * g.w + k % g.kw) * C;
  for (int64_t s = begin; s < end; ++s) {
    float* dxs = dx + s * in_size;
    std::memset(dxs, 0, sizeof(float) * in_size);
    const float* dys = dy + s * out_size;
    const Code* ks = code + s * out_size;
    for (int64_t oh = 0; oh < g.ho; ++oh) {
      for (int64_t ow = 0; ow < g.wo; ++ow) {
        const int64_t o = (oh * g.wo + ow) * C;
        const int64_t corner = ((oh * g.sh - g.top) * g.w + (ow * g.sw - g.left)) * C;
        for (int64_t ch = 0; ch < C; ++ch)
          dxs[corner + offset[static_cast<int64_t>(ks[o + ch])] + ch] += dys[o + ch];
      }
    }
  }
}

}  // namespace pool
}  // namespace blpa

#endif  // KERAS_BLPA_CC_BLPA_POOL_H_
