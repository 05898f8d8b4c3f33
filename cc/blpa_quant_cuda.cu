// keras_blpa: CUDA kernels of the four fused block kernels (split design: this
// file includes only the C++ standard library, CUDA and cc/, never
// TensorFlow). The element math is the BLPA_HOST_DEVICE code of blpa_bins.h and
// of the activation (blpa_activations.h), with __f*_rn intrinsics so that
// every operation rounds like TensorFlow's separate ops (also build with
// -fmad=false); the smooth activations call CUDA's expf / erfcf / tanhf /
// powf, within a few ulp of the host's libm (not bit for bit). In the element-wise kernels one thread handles one packed byte
// (1, 2 or 4 elements); the reduction walks channel columns.
#include <type_traits>
#include <cuda_runtime.h>

#include "cc/blpa_activations.h"
#include "cc/blpa_bins.h"
#include "cc/blpa_quant_cuda.h"

namespace blpa {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t work) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loops cover the rest
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

// The activation is the last kernel parameter: the argument struct keeps its
// parameter offsets whatever the activation holds.
template <int BITS, typename Act>
__global__ void encode_kernel(EncodeArgs a, Act act) {
  constexpr int per = 8 / BITS;
  const float top = static_cast<float>((1 << BITS) - 1);
  const int64_t nbytes = packed_size(a.n, BITS);
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       b < nbytes; b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t byte = 0;
#pragma unroll
    for (int j = 0; j < per; ++j) {
      const int64_t i = b * per + j;
      if (i < a.n) {
        const int64_t c = i % a.C;
        const float y = bn_apply(a.x[i], __ldg(a.scale + c), __ldg(a.offset + c));
        a.activation[i] = act.forward(y);
        const float shift = __ldg(a.shift + c);
        byte |= act.encode(y, __ldg(a.inv_step + c), shift,
                           mask_edge(shift, top), top)
                << (j * BITS);
      }
    }
    a.packed[b] = static_cast<uint8_t>(byte);
  }
}

template <int BITS, typename Act>
__global__ void decode_kernel(DecodeArgs a, Act act) {
  constexpr int per = 8 / BITS;
  const float top = static_cast<float>((1 << BITS) - 1);
  const int64_t nbytes = packed_size(a.n, BITS);
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       b < nbytes; b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t byte = a.packed[b];
#pragma unroll
    for (int j = 0; j < per; ++j) {
      const int64_t i = b * per + j;
      if (i < a.n) {
        const int64_t c = i % a.C;
        const float shift = __ldg(a.shift + c);
        a.out[i] = act.decode(unpack_one(byte, j, BITS), __ldg(a.step + c),
                              shift, mask_edge(shift, top));
      }
    }
  }
}

template <int BITS, typename Act>
__global__ void grad_input_kernel(GradArgs a, Act act) {
  constexpr int per = 8 / BITS;
  const float top = static_cast<float>((1 << BITS) - 1);
  const int64_t nbytes = packed_size(a.n, BITS);
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       b < nbytes; b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t byte = a.packed[b];
#pragma unroll
    for (int j = 0; j < per; ++j) {
      const int64_t i = b * per + j;
      if (i < a.n) {
        const int64_t c = i % a.C;
        const uint32_t code = unpack_one(byte, j, BITS);
        const float step = __ldg(a.step + c), shift = __ldg(a.shift + c);
        const float edge = mask_edge(shift, top);
        const float y_dec = decoded_y(code, step, shift, edge);
        const float gy = act.backward(a.grad_a[i], code, step, shift, edge);
        const float xh = xhat_one(y_dec, __ldg(a.beta + c), __ldg(a.gamma + c));
        a.grad_x[i] = grad_input_one(gy, xh, __ldg(a.coef + c),
                                     __ldg(a.mean_g + c), __ldg(a.mean_gx + c));
      }
    }
  }
}

// Reduction over the [rows, C] view: one thread per channel column, the 32
// threads along x on consecutive channels (coalesced reads of grad_a);
// threadIdx.y and blockIdx.y stride over rows. Per-thread Kahan-compensated
// float sums, added in threadIdx.y order through shared memory, then one
// atomicAdd per channel and block. With more than one row block the order of
// those atomics varies from run to run, so the float sums are not bitwise
// deterministic (the CPU reduce of blpa_cpu.h is: fixed blocks, fixed order).
constexpr int kRedX = 32;
constexpr int kRedY = 8;

template <int BITS, typename Act>
__global__ void grad_reduce_kernel(GradArgs a, float* sum_g, float* sum_gx,
                                   Act act) {
  __shared__ float sg[kRedY][kRedX];
  __shared__ float sgx[kRedY][kRedX];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kRedX) + threadIdx.x;
  const int64_t rows = a.n / a.C;
  const float top = static_cast<float>((1 << BITS) - 1);
  float acc_g = 0.0f, comp_g = 0.0f, acc_gx = 0.0f, comp_gx = 0.0f;
  if (c < a.C) {
    const float step = __ldg(a.step + c), shift = __ldg(a.shift + c);
    const float gamma = __ldg(a.gamma + c), beta = __ldg(a.beta + c);
    const float edge = mask_edge(shift, top);
    for (int64_t r = blockIdx.y * static_cast<int64_t>(kRedY) + threadIdx.y;
         r < rows; r += static_cast<int64_t>(gridDim.y) * kRedY) {
      const int64_t i = r * a.C + c;
      const int per = 8 / BITS;
      const uint32_t code =
          unpack_one(a.packed[i / per], static_cast<int>(i % per), BITS);
      const float y_dec = decoded_y(code, step, shift, edge);
      const float gy = act.backward(a.grad_a[i], code, step, shift, edge);
      const float gx = __fmul_rn(gy, xhat_one(y_dec, beta, gamma));
      // Kahan summation keeps long columns accurate in float.
      float y1 = __fsub_rn(gy, comp_g);
      float t1 = __fadd_rn(acc_g, y1);
      comp_g = __fsub_rn(__fsub_rn(t1, acc_g), y1);
      acc_g = t1;
      float y2 = __fsub_rn(gx, comp_gx);
      float t2 = __fadd_rn(acc_gx, y2);
      comp_gx = __fsub_rn(__fsub_rn(t2, acc_gx), y2);
      acc_gx = t2;
    }
  }
  sg[threadIdx.y][threadIdx.x] = acc_g;
  sgx[threadIdx.y][threadIdx.x] = acc_gx;
  __syncthreads();
  if (threadIdx.y == 0 && c < a.C) {
    float tg = 0.0f, tgx = 0.0f;
#pragma unroll
    for (int k = 0; k < kRedY; ++k) {
      tg += sg[k][threadIdx.x];
      tgx += sgx[k][threadIdx.x];
    }
    atomicAdd(sum_g + c, tg);
    atomicAdd(sum_gx + c, tgx);
  }
}

int last_error() { return static_cast<int>(cudaGetLastError()); }

// Runs launch(std::integral_constant<int, BITS>) for bits in {2, 4, 8}; the
// launch status, or cudaErrorInvalidValue for other bits.
template <typename Launch>
int for_bits(int bits, Launch launch) {
  switch (bits) {
    case 2: launch(std::integral_constant<int, 2>()); break;
    case 4: launch(std::integral_constant<int, 4>()); break;
    case 8: launch(std::integral_constant<int, 8>()); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return last_error();
}

}  // namespace

template <typename Act>
int bn_encode(Act act, const EncodeArgs& a, cudaStream_t stream) {
  const int64_t nbytes = packed_size(a.n, a.bits);
  if (nbytes == 0) return 0;
  const int grid = grid_for(nbytes);
  return for_bits(a.bits, [&](auto b) {
    encode_kernel<decltype(b)::value><<<grid, kThreads, 0, stream>>>(a, act);
  });
}

template <typename Act>
int decode(Act act, const DecodeArgs& a, cudaStream_t stream) {
  const int64_t nbytes = packed_size(a.n, a.bits);
  if (nbytes == 0) return 0;
  const int grid = grid_for(nbytes);
  return for_bits(a.bits, [&](auto b) {
    decode_kernel<decltype(b)::value><<<grid, kThreads, 0, stream>>>(a, act);
  });
}

template <typename Act>
int bn_grad_input(Act act, const GradArgs& a, cudaStream_t stream) {
  const int64_t nbytes = packed_size(a.n, a.bits);
  if (nbytes == 0) return 0;
  const int grid = grid_for(nbytes);
  return for_bits(a.bits, [&](auto b) {
    grad_input_kernel<decltype(b)::value><<<grid, kThreads, 0, stream>>>(a, act);
  });
}

template <typename Act>
int bn_grad_reduce(Act act, const GradArgs& a, float* sum_g, float* sum_gx,
                   cudaStream_t stream) {
  if (a.C <= 0) return 0;
  cudaError_t err = cudaMemsetAsync(sum_g, 0, a.C * sizeof(float), stream);
  if (err == cudaSuccess)
    err = cudaMemsetAsync(sum_gx, 0, a.C * sizeof(float), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t rows = a.n / a.C;
  if (rows == 0) return 0;
  const int64_t gx = (a.C + kRedX - 1) / kRedX;
  if (gx > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  // Enough row blocks to fill the device, few enough to keep atomics cheap.
  int64_t gy = (rows + kRedY * 64 - 1) / (kRedY * 64);
  const int64_t max_blocks = 4096;
  if (gy * gx > max_blocks) gy = max_blocks / gx > 0 ? max_blocks / gx : 1;
  if (gy > 65535) gy = 65535;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const dim3 block(kRedX, kRedY);
  return for_bits(a.bits, [&](auto b) {
    grad_reduce_kernel<decltype(b)::value>
        <<<grid, block, 0, stream>>>(a, sum_g, sum_gx, act);
  });
}

// The launchers of one activation, for the callers of blpa_quant_cuda.h to link
// against: one line per activation of blpa_activations.h.
#define BLPA_CUDA_ACTIVATION(Act)                                           \
  template int bn_encode<Act>(Act, const EncodeArgs&, cudaStream_t);        \
  template int decode<Act>(Act, const DecodeArgs&, cudaStream_t);           \
  template int bn_grad_reduce<Act>(Act, const GradArgs&, float*, float*,    \
                                   cudaStream_t);                           \
  template int bn_grad_input<Act>(Act, const GradArgs&, cudaStream_t);

BLPA_CUDA_ACTIVATION(Relu)
BLPA_CUDA_ACTIVATION(Relu6)
BLPA_CUDA_ACTIVATION(LeakyRelu)
BLPA_CUDA_ACTIVATION(Silu)
BLPA_CUDA_ACTIVATION(Gelu)
BLPA_CUDA_ACTIVATION(GeluTanh)
BLPA_CUDA_ACTIVATION(HardSilu)

const char* error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // namespace cuda
}  // namespace blpa
