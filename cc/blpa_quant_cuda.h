// keras_blpa: CUDA launchers of the four fused block kernels.
//
// Plain C++ declarations with no CUDA header needed by the caller: the stream
// is the raw cudaStream_t (declared here exactly as CUDA's driver_types.h
// does), so the TensorFlow op (compiled by g++) and the standalone test can
// call into the object nvcc builds from blpa_quant_cuda.cu. The launchers are
// templates over the activation (blpa_activations.h), defined and instantiated
// for each activation in blpa_quant_cuda.cu (BLPA_CUDA_ACTIVATION). Every
// launcher is asynchronous on `stream` and returns its launch status, a
// cudaError_t as an int (0 = success); error_string turns it into text.
// Argument structs and semantics are those of blpa_bins.h and of the CPU entry
// points of blpa_cpu.h (all pointers are device pointers).
#ifndef KERAS_BLPA_CC_BLPA_QUANT_CUDA_H_
#define KERAS_BLPA_CC_BLPA_QUANT_CUDA_H_

#include "cc/blpa_bins.h"

typedef struct CUstream_st* cudaStream_t;

namespace blpa {
namespace cuda {

template <typename Act>
int bn_encode(Act act, const EncodeArgs& args, cudaStream_t stream);
template <typename Act>
int decode(Act act, const DecodeArgs& args, cudaStream_t stream);
// Writes the per-channel float sums (C each; zeroed first by the launcher).
// The row blocks add into them with atomicAdd in no fixed order, so the sums
// can differ in the last bits from run to run (the CPU reduce's do not).
template <typename Act>
int bn_grad_reduce(Act act, const GradArgs& args, float* sum_g, float* sum_gx,
                   cudaStream_t stream);
template <typename Act>
int bn_grad_input(Act act, const GradArgs& args, cudaStream_t stream);

const char* error_string(int error);

}  // namespace cuda
}  // namespace blpa

#endif  // KERAS_BLPA_CC_BLPA_QUANT_CUDA_H_
