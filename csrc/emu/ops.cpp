// The CUDA emulator's test library: torch.ops.insloc_emu.* carry the insloc_ops signatures of the ops that
// have CUDA kernels, and csrc/emu/{roi_align,anchors,infonce}.cpp register those kernels, compiled as host
// code, for CPU tensors. Built by tests/cuda_emu.py; never part of the installed package.
#include <torch/library.h>

#include <string>

#include "schemas.h"

TORCH_LIBRARY(insloc_emu, m) {
  using namespace insloc::schema;
  m.def((std::string("roi_align_multilevel") + kRoiAlignMultilevel).c_str());
  m.def((std::string("roi_align_multilevel_backward") + kRoiAlignMultilevelBackward).c_str());
  m.def((std::string("sample_anchor_boxes") + kSampleAnchorBoxes).c_str());
  m.def((std::string("queue_infonce") + kQueueInfonce).c_str());
  m.def((std::string("queue_infonce_backward") + kQueueInfonceBackward).c_str());
}
