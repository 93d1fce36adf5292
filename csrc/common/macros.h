// Shared by the CPU (.cpp) and CUDA (.cu) kernels: per-element math in csrc/common/*.h is written once
// as INSLOC_HD functions, so CPU tests exercise the exact arithmetic the CUDA kernels run.
#pragma once

#if defined(__CUDACC__)
#define INSLOC_HD __host__ __device__ __forceinline__
#else
#define INSLOC_HD inline
#endif
