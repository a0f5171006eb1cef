// Compile-time switches: turn a run-time value into a constexpr for the lambda body, so that one
// call site instantiates each variant. Every switch of the CUDA kernels goes through these.
#pragma once

#define FA_BOOL_SWITCH(COND, NAME, ...)   \
  [&] {                                   \
    if (COND) {                           \
      constexpr static bool NAME = true;  \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr static bool NAME = false; \
      return __VA_ARGS__();               \
    }                                     \
  }()

// T = __half or __nv_bfloat16
#define FA_DTYPE_SWITCH(IS_BF16, T, ...) \
  [&] {                                  \
    if (IS_BF16) {                       \
      using T = __nv_bfloat16;           \
      return __VA_ARGS__();              \
    } else {                             \
      using T = __half;                  \
      return __VA_ARGS__();              \
    }                                    \
  }()
