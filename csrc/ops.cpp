// The insloc_ops library: every schema (csrc/schemas.h) defined once. Kernels register themselves per device in csrc/cpu/ and
// csrc/cuda/ (TORCH_LIBRARY_IMPL); the *_triton ops get their kernels from insloc_ops/triton/.
// Fake (meta) kernels and autograd formulas are registered from Python (insloc_ops/_register.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "schemas.h"

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
  using namespace insloc::schema;
  define_twice(m, "roi_align_multilevel", kRoiAlignMultilevel);
  define_twice(m, "roi_align_multilevel_backward", kRoiAlignMultilevelBackward);
  define_twice(m, "sample_anchor_boxes", kSampleAnchorBoxes);
  define_twice(m, "queue_infonce", kQueueInfonce);
  define_twice(m, "queue_infonce_backward", kQueueInfonceBackward);
  m.def((std::string("queue_infonce_onepass") + kQueueInfonceOnepass).c_str());
  m.def((std::string("queue_infonce_onepass_backward") + kQueueInfonceOnepassBackward).c_str());
}
