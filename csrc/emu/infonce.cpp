// csrc/cuda/infonce.cu compiled as host C++ for the CUDA emulator (see csrc/emu/cuda_emu.h).
#define INSLOC_CUDA_EMU
#include "cuda/infonce.cu"
