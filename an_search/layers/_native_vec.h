/* The vector types both kernel files (_native.c, _native_bc.c) compute in. */
#ifndef AN_NATIVE_VEC_H
#define AN_NATIVE_VEC_H

/* GCC/Clang vector extensions: 32-byte vectors, lowered to whatever the CPU has. */
typedef float vf32 __attribute__((vector_size(32)));
typedef double vf64 __attribute__((vector_size(32)));

/* Pairwise horizontal sums (short dependency chains). */
static inline double hsum_vf32(vf32 v) {
    float a = (v[0] + v[4]) + (v[1] + v[5]), b = (v[2] + v[6]) + (v[3] + v[7]);
    return (double)a + (double)b;
}
static inline double hsum_vf64(vf64 v) { return (v[0] + v[2]) + (v[1] + v[3]); }

#endif
