// Every insloc_ops schema, declared once. Kernels register themselves per device in csrc/cpu/ and
// csrc/cuda/ (TORCH_LIBRARY_IMPL); the *_triton ops get their kernels from insloc_ops/triton/.
// Fake (meta) kernels and autograd formulas are registered from Python (insloc_ops/_register.py).
#include <Python.h>
#include <torch/library.h>

#ifndef INSLOC_CUDA_ARCHS
#define INSLOC_CUDA_ARCHS ""
#endif
#ifndef INSLOC_NVCC_VERSION
#define INSLOC_NVCC_VERSION ""
#endif

namespace {

// The C++ and Triton implementations of an op share one signature; two ops, so that either can be
// chosen per call on the same device.
void define_twice(torch::Library& m, const std::string& name, const std::string& signature) {
  m.def((name + signature).c_str());
  m.def((name + "_triton" + signature).c_str());
}

PyObject* build_info(PyObject*, PyObject*) {
#ifdef INSLOC_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  return Py_BuildValue("{s:O,s:s,s:s}", "cuda_compiled", cuda, "cuda_archs", INSLOC_CUDA_ARCHS,
                       "nvcc_version", INSLOC_NVCC_VERSION);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this extension was compiled with."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(insloc_ops, m) {
  // features: L x [B, C, H_l, W_l]; rois: [R, 5]; levels: int64 [R] or None.
  // Returns [L, R, C, ph, pw] (levels None) or [R, C, ph, pw].
  define_twice(m, "roi_align_multilevel",
               "(Tensor[] features, Tensor rois, Tensor? levels, float[] spatial_scales, int pooled_height, "
               "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  // Gradient w.r.t. every level, each [B, C, H_l, W_l] in grad's dtype (channels_last if asked).
  define_twice(m, "roi_align_multilevel_backward",
               "(Tensor grad, Tensor rois, Tensor? levels, float[] spatial_scales, int sampling_ratio, "
               "bool aligned, int batch_size, int channels, int[] heights, int[] widths, bool channels_last) "
               "-> Tensor[]");
  // gt_boxes: [N, 4]; anchors: [A, 4]; seed: the counter-based random key's seed (SymInt: under torch.compile
  // it is drawn inside the graph, a data-dependent int).
  // Returns (anchor index int64 [N], iou float32 [N]).
  define_twice(m, "sample_anchor_boxes",
               "(Tensor gt_boxes, Tensor anchors, float iou_threshold, SymInt seed) -> (Tensor, Tensor)");
  // q, k: [G, N, D]; queue: [G, K, D]. Returns (loss float32 [G, N], lse float32 [G, N]) where lse is the
  // log-sum-exp of all K + 1 logits, saved for the backward.
  define_twice(m, "queue_infonce",
               "(Tensor q, Tensor k, Tensor queue, float temperature) -> (Tensor, Tensor)");
  // Returns (grad_q [G, N, D], grad_k [G, N, D]), both in q's dtype.
  define_twice(m, "queue_infonce_backward",
               "(Tensor grad_loss, Tensor q, Tensor k, Tensor queue, Tensor lse, float temperature) "
               "-> (Tensor, Tensor)");
  // One pass over the queue, for training (CPU kernel only): also returns neg_mean float32 [G, N, D],
  // sum_j p_ij queue_j (the softmax-weighted mean of the negatives), from which the backward needs no pass
  // over the queue. (loss, lse, neg_mean).
  m.def("queue_infonce_onepass(Tensor q, Tensor k, Tensor queue, float temperature) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_q, grad_k) in q's dtype.
  m.def("queue_infonce_onepass_backward(Tensor grad_loss, Tensor q, Tensor k, Tensor lse, Tensor neg_mean, "
        "float temperature) -> (Tensor, Tensor)");
}
