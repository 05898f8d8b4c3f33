// keras_blpa: TensorFlow CPU ops of the argmax max pooling (cc/blpa_pool.h).
//
//   Blpa>ArgmaxPool      (x [n, h, w, c])     -> (y [n, ho, wo, c], code)
//   Blpa>ArgmaxPoolGrad  (dy, code)           -> dx [n, h, w, c]
//
// The geometry comes from keras_blpa/windows.py as attrs: ksize [kh, kw],
// strides [sh, sw], pads [top, left], output_size [ho, wo] (forward) and
// input_size [h, w] (gradient); a geometry in which some window holds no input
// position is an error. The gradient's code must be its forward's (a code is
// not checked against the window). `code_dtype` is uint8 for windows of at most
// 256 positions, else int32. Both ops are sharded over the intra-op pool: the
// forward by output rows, the gradient by samples (each sample's input
// gradient is written by one thread, in the outputs' row-major order).

#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

#include "cc/blpa_pool.h"

namespace keras_blpa {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// [n, size[0], size[1], c] from a rank-4 input and a two-int attr.
absl::Status Resized(InferenceContext* c, const char* attr) {
  ShapeHandle in;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &in));
  std::vector<int64_t> size;
  TF_RETURN_IF_ERROR(c->GetAttr(attr, &size));
  if (size.size() != 2) return errors::InvalidArgument(attr, " must have 2 ints");
  c->set_output(0, c->MakeShape({c->Dim(in, 0), c->MakeDim(size[0]),
                                 c->MakeDim(size[1]), c->Dim(in, 3)}));
  return absl::OkStatus();
}

REGISTER_OP("Blpa>ArgmaxPool")
    .Input("x: float")
    .Output("y: float")
    .Output("code: code_dtype")
    .Attr("ksize: list(int)")
    .Attr("strides: list(int)")
    .Attr("pads: list(int)")
    .Attr("output_size: list(int)")
    .Attr("code_dtype: {uint8, int32}")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(Resized(c, "output_size"));
      c->set_output(1, c->output(0));
      return absl::OkStatus();
    })
    .Doc(R"doc(
NHWC max pooling and the window index of each output's first maximum.
)doc");

REGISTER_OP("Blpa>ArgmaxPoolGrad")
    .Input("dy: float")
    .Input("code: code_dtype")
    .Output("dx: float")
    .Attr("ksize: list(int)")
    .Attr("strides: list(int)")
    .Attr("pads: list(int)")
    .Attr("input_size: list(int)")
    .Attr("code_dtype: {uint8, int32}")
    .SetShapeFn([](InferenceContext* c) { return Resized(c, "input_size"); })
    .Doc(R"doc(
The input gradient of Blpa>ArgmaxPool from the output gradient and the code.
)doc");

// Reads a two-int attr of positive (or, for pads, non-negative) values.
void Pair(OpKernelConstruction* ctx, const char* name, int64_t low,
          int64_t* a, int64_t* b) {
  std::vector<int64_t> v;
  OP_REQUIRES_OK(ctx, ctx->GetAttr(name, &v));
  OP_REQUIRES(ctx, v.size() == 2 && v[0] >= low && v[1] >= low,
              errors::InvalidArgument(name, " must be 2 ints >= ", low,
                                      ", got ", v.size(), " values"));
  *a = v[0];
  *b = v[1];
}

class PoolKernel : public OpKernel {
 public:
  PoolKernel(OpKernelConstruction* ctx, const char* size_attr)
      : OpKernel(ctx) {
    Pair(ctx, "ksize", 1, &g_.kh, &g_.kw);
    Pair(ctx, "strides", 1, &g_.sh, &g_.sw);
    Pair(ctx, "pads", 0, &g_.top, &g_.left);
    Pair(ctx, size_attr, 1, &size_[0], &size_[1]);
  }

 protected:
  // Fills n, h, w, c, ho, wo of the geometry; false (with a status) if the
  // tensor is not rank 4 or its size disagrees with `expect` (when given).
  bool Shape(OpKernelContext* ctx, const Tensor& t, const char* name,
             const int64_t* expect, blpa::pool::Geometry* g) const {
    if (t.dims() != 4) {
      ctx->CtxFailure(errors::InvalidArgument(name, " must be rank 4 (NHWC), got shape ",
                                              t.shape().DebugString()));
      return false;
    }
    if (expect && (t.dim_size(1) != expect[0] || t.dim_size(2) != expect[1])) {
      ctx->CtxFailure(errors::InvalidArgument(
          name, " must be ", expect[0], "x", expect[1], " spatially, got shape ",
          t.shape().DebugString()));
      return false;
    }
    *g = g_;
    g->n = t.dim_size(0);
    g->c = t.dim_size(3);
    return true;
  }

  // False (with a status) unless every window holds a position of the input.
  bool Fits(OpKernelContext* ctx, const blpa::pool::Geometry& g) const {
    if (g.top < g.kh && g.left < g.kw && (g.ho - 1) * g.sh - g.top < g.h &&
        (g.wo - 1) * g.sw - g.left < g.w)
      return true;
    ctx->CtxFailure(errors::InvalidArgument(
        "a ", g.h, "x", g.w, " input and a ", g.ho, "x", g.wo, " output do not fit ksize ",
        g.kh, "x", g.kw, ", strides ", g.sh, "x", g.sw, " and pads (top, left) ", g.top, ", ",
        g.left, ": some window would hold no input position"));
    return false;
  }

  void Parallel(OpKernelContext* ctx, int64_t total, int64_t cost,
                const std::function<void(int64_t, int64_t)>& fn) const {
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(total, cost, fn);
  }

  blpa::pool::Geometry g_{};
  int64_t size_[2];
};

template <typename Code>
class ArgmaxPoolOp : public PoolKernel {
 public:
  explicit ArgmaxPoolOp(OpKernelConstruction* ctx) : PoolKernel(ctx, "output_size") {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    blpa::pool::Geometry g;
    if (!Shape(ctx, x, "x", nullptr, &g)) return;
    g.h = x.dim_size(1);
    g.w = x.dim_size(2);
    g.ho = size_[0];
    g.wo = size_[1];
    if (!Fits(ctx, g)) return;
    TensorShape out({g.n, g.ho, g.wo, g.c});
    Tensor *y = nullptr, *code = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out, &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, out, &code));
    if (out.num_elements() == 0) return;
    const float* xp = x.flat<float>().data();
    float* yp = y->flat<float>().data();
    Code* kp = code->flat<Code>().data();
    Parallel(ctx, g.n * g.ho, g.wo * g.c * g.kh * g.kw * 2,
             [&g, xp, yp, kp](int64_t b, int64_t e) {
               blpa::pool::forward(g, xp, yp, kp, b, e);
             });
  }
};

template <typename Code>
class ArgmaxPoolGradOp : public PoolKernel {
 public:
  explicit ArgmaxPoolGradOp(OpKernelConstruction* ctx) : PoolKernel(ctx, "input_size") {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& code = ctx->input(1);
    blpa::pool::Geometry g;
    if (!Shape(ctx, dy, "dy", nullptr, &g)) return;
    OP_REQUIRES(ctx, code.shape() == dy.shape(),
                errors::InvalidArgument("code must have dy's shape ", dy.shape().DebugString(),
                                        ", got ", code.shape().DebugString()));
    g.ho = dy.dim_size(1);
    g.wo = dy.dim_size(2);
    g.h = size_[0];
    g.w = size_[1];
    if (!Fits(ctx, g)) return;
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({g.n, g.h, g.w, g.c}), &dx));
    if (dx->NumElements() == 0) return;
    const float* dyp = dy.flat<float>().data();
    const Code* kp = code.flat<Code>().data();
    float* dxp = dx->flat<float>().data();
    Parallel(ctx, g.n, (g.h * g.w + g.ho * g.wo * 4) * g.c,
             [&g, dyp, kp, dxp](int64_t b, int64_t e) {
               blpa::pool::backward(g, dyp, kp, dxp, b, e);
             });
  }
};

#define BLPA_REGISTER_POOL(T)                                                     \
  REGISTER_KERNEL_BUILDER(                                                        \
      Name("Blpa>ArgmaxPool").Device(DEVICE_CPU).TypeConstraint<T>("code_dtype"), \
      ArgmaxPoolOp<T>);                                                           \
  REGISTER_KERNEL_BUILDER(Name("Blpa>ArgmaxPoolGrad")                             \
                              .Device(DEVICE_CPU)                                 \
                              .TypeConstraint<T>("code_dtype"),                   \
                          ArgmaxPoolGradOp<T>);
BLPA_REGISTER_POOL(uint8_t)
BLPA_REGISTER_POOL(int32_t)
#undef BLPA_REGISTER_POOL

}  // namespace
}  // namespace keras_blpa
