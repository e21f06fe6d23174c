#pragma once

// Functions marked INVK_HOST_DEVICE are compiled for the host (CPU backend, C++ unit tests) and,
// under nvcc, for the device. They hold the per-element math and index arithmetic that the CPU
// and CUDA backends share.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define INVK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define INVK_HOST_DEVICE inline
#endif
