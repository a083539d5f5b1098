// Runtime flags -> template parameters (the pattern of Dao-AILab's static_switch.h).
//   BOOL_SWITCH(p.causal, kCausal, [&] { run<kCausal>(p); });
// Each branch instantiates the lambda body with a compile-time constant of the given name.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                          \
    if (COND) {                                  \
      constexpr static bool CONST_NAME = true;   \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr static bool CONST_NAME = false;  \
      return __VA_ARGS__();                      \
    }                                            \
  }()

// The head dims the attention kernels are built for; the host rejects others before launch.
#define HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...) \
  [&] {                                          \
    if ((HEADDIM) <= 64) {                       \
      constexpr static int CONST_NAME = 64;      \
      return __VA_ARGS__();                      \
    } else if ((HEADDIM) <= 96) {                \
      constexpr static int CONST_NAME = 96;      \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr static int CONST_NAME = 128;     \
      return __VA_ARGS__();                      \
    }                                            \
  }()
