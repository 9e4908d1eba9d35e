// SIMD helpers shared by tokenmill's CPU kernels: GCC vector extensions, which -march=native
// turns into AVX-512 where the CPU has it and into AVX2 pairs where it does not.
#pragma once
#include <c10/util/BFloat16.h>
#include <cstdint>
#include <cstring>

namespace tokenmill {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));

inline v16f load16(const float* p) { v16f v; std::memcpy(&v, p, sizeof v); return v; }
inline v16f load16(const c10::BFloat16* p) {
  v16h h; std::memcpy(&h, p, sizeof h);
  v16u u = __builtin_convertvector(h, v16u) << 16;  // bf16 is the top half of an fp32
  v16f f; std::memcpy(&f, &u, sizeof f); return f;
}
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
inline float hsum(v16f v) {  // a tree of shuffles, not 15 dependent scalar adds
  v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

}  // namespace tokenmill
