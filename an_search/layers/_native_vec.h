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

/* The widest vectors the CPU has: 64 bytes with AVX-512 (GCC keeps -march=native's loops at
 * 32 bytes, but an explicit 64-byte type is one zmm register), else the 32-byte ones. For
 * loops whose operands come from L2 (the eval head's weights and mixtures): one load feeds
 * twice the lanes. AN_WIDE says which: the loops written for them took longer than the plain
 * ones with 32-byte vectors (AVX2 build on the same machine). */
#ifdef __AVX512F__
#define AN_WIDE 1
typedef float vw32 __attribute__((vector_size(64)));
typedef double vw64 __attribute__((vector_size(64)));
static inline double hsum_vw32(vw32 v) {
    vf32 a, b;
    __builtin_memcpy(&a, &v, sizeof(a));
    __builtin_memcpy(&b, (const char *)&v + sizeof(a), sizeof(b));
    return hsum_vf32(a + b);
}
static inline double hsum_vw64(vw64 v) {
    vf64 a, b;
    __builtin_memcpy(&a, &v, sizeof(a));
    __builtin_memcpy(&b, (const char *)&v + sizeof(a), sizeof(b));
    return hsum_vf64(a + b);
}
#else
#define AN_WIDE 0
typedef vf32 vw32;
typedef vf64 vw64;
static inline double hsum_vw32(vw32 v) { return hsum_vf32(v); }
static inline double hsum_vw64(vw64 v) { return hsum_vf64(v); }
#endif

#endif
