/* Fused CPU kernels of Attentive Normalization (compiled on first use by _native.py).
 *
 * an_moments_*: per-row mean and biased variance of a (rows, n) array in one read.
 * an_eval_*:    a whole AttentiveNorm(BatchNorm) site in evaluation mode, sample by sample:
 *               moments of the sample's C rows -> pooled statistic -> attention head
 *               (folded linears, ReLU, GroupNorm(1, K), gate) -> lambda (K)
 *               -> per-channel scale a = lambda @ A and shift t = lambda @ T
 *               -> y = x * a + t, while the sample is still in cache.
 *               A and T hold the mixtures with the running statistics folded in.
 *
 * Moments are accumulated shifted by the mean of four of the row's values, in float vector
 * lanes over blocks of 512 values, folded into double; a row whose shifted mean^2 exceeds 4x
 * its variance (where the one-pass formula could cancel) is read again, shifted by the mean
 * just found, while it is still in cache (two-pass in double if even that could). Float32
 * rows of at most 1024 values (ResNet's 28x28 to 7x7 maps) go eight at a time (AVX2): their
 * sixteen horizontal sums and the final arithmetic are done as vectors; at 7x7, row by row,
 * they cost more than the data.
 * Threads: OpenMP, the runtime torch already loaded (libgomp.so.1 is shared by soname).
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

#define BLOCK 512

#include "_native_vec.h"
#include "_native_head.h"

/* The passes that read a feature map from memory ask for the line PREFETCH_AHEAD bytes
 * ahead of the one they read (one prefetch per 64-byte line). This machine's hardware
 * prefetcher left the 7x7 and 14x14 eval sites waiting on each row: side by side (rotating
 * inputs that live in L3, batch 32, ResNet-50 sites, three runs), AN/BN went from 1.14-1.42
 * to 0.87-1.00 at 7x7 and from 1.00-1.14 to 0.73-0.85 at 14x14, 3-13% less at 28x28 and
 * 56x56; 4-16 KiB ahead did alike, 8 KiB best. -DPREFETCH_AHEAD=0 builds without. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8192
#endif
#if PREFETCH_AHEAD > 0
#define PREFETCH(q) __builtin_prefetch((const char *)(q) + PREFETCH_AHEAD)
#else
#define PREFETCH(q)
#endif
/* Mean and biased variance of one row, two-pass in double: the fallback of the one-pass
 * kernels below for the rows where they could cancel. */
#define DEFINE_TWO_PASS(T, SUFFIX)                                                   \
    static void two_pass_##SUFFIX(const T *p, long n, double *mean, double *var) {   \
        double t = 0.0, c = 0.0;                                                     \
        for (long j = 0; j < n; j++) t += p[j];                                      \
        const double mu = t / n;                                                     \
        for (long j = 0; j < n; j++) {                                               \
            double d = (double)p[j] - mu;                                            \
            c += d * d;                                                              \
        }                                                                            \
        *mean = mu;                                                                  \
        *var = c / n;                                                                \
    }

DEFINE_TWO_PASS(float, f32)
DEFINE_TWO_PASS(double, f64)

/* Mean (about the shift s) and biased variance of one row in one read: sums of x - s in
 * vector lanes of T over blocks of BLOCK values, folded into double. */
#define DEFINE_ROW_MOMENTS(T, V, SUFFIX)                                             \
    static void shifted_moments_##SUFFIX(const T *p, long n, T s, double *m, double *v) { \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        V vs;                                                                        \
        for (int l = 0; l < W; l++) vs[l] = s;                                       \
        double s1 = 0.0, s2 = 0.0;                                                   \
        for (long i = 0; i < n; i += BLOCK) {                                        \
            long end = i + BLOCK < n ? i + BLOCK : n;                                \
            V a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};                                \
            long j = i;                                                              \
            for (; j + 2 * W <= end; j += 2 * W) {                                   \
                V u, w;                                                              \
                PREFETCH(p + j);                                                     \
                __builtin_memcpy(&u, p + j, sizeof(V));                              \
                __builtin_memcpy(&w, p + j + W, sizeof(V));                          \
                u -= vs;                                                             \
                w -= vs;                                                             \
                a1 += u;                                                             \
                a2 += u * u;                                                         \
                b1 += w;                                                             \
                b2 += w * w;                                                         \
            }                                                                        \
            T r1 = 0, r2 = 0;                                                        \
            for (; j < end; j++) {                                                   \
                T d = p[j] - s;                                                      \
                r1 += d;                                                             \
                r2 += d * d;                                                         \
            }                                                                        \
            s1 += hsum_##V(a1 + b1) + r1;                                            \
            s2 += hsum_##V(a2 + b2) + r2;                                            \
        }                                                                            \
        const double inv_n = 1.0 / (double)n;                                        \
        *m = s1 * inv_n;                                                             \
        *v = s2 * inv_n - *m * *m;                                                   \
    }                                                                                \
    /* A row whose shifted mean m came out of the pass with m^2 > 4 v (the shift was far from \
     * the mean, where the one-pass formula could cancel) is read again shifted by s + m, the \
     * mean just found (a second vector pass over a row still in cache, where activations \
     * with a structured border gave 1 row in 9 of a ResNet-50 site); two-pass in double only \
     * if that fails too (nearly constant rows, NaN). */                             \
    static int again_##SUFFIX(const T *p, long n, T s, double m, double *mean, double *var) { \
        double v;                                                                    \
        s = (T)((double)s + m);                                                      \
        shifted_moments_##SUFFIX(p, n, s, &m, &v);                                   \
        if (!(v * 4.0 >= m * m) || v < 0.0) {                                        \
            two_pass_##SUFFIX(p, n, mean, var);                                      \
            return 2;                                                                \
        }                                                                            \
        *mean = (double)s + m;                                                       \
        *var = v;                                                                    \
        return 1;                                                                    \
    }                                                                                \
    /* Shifted by a cheap estimate of the mean: four values across the row. Returns the \
     * passes it took: 0 one, 1 read again, 2 two-pass (an_row_path for the tests). */ \
    static int row_moments_##SUFFIX(const T *p, long n, double *mean, double *var) { \
        const T s = (T)(((double)p[0] + p[n / 4] + p[n / 2] + p[3 * n / 4]) * 0.25); \
        double m, v;                                                                 \
        shifted_moments_##SUFFIX(p, n, s, &m, &v);                                   \
        if (!(v * 4.0 >= m * m) || v < 0.0) return again_##SUFFIX(p, n, s, m, mean, var); \
        *mean = (double)s + m;                                                       \
        *var = v;                                                                    \
        return 0;                                                                    \
    }                                                                                \
    int an_row_path_##SUFFIX(const T *p, long n) {                                   \
        double mean, var;                                                            \
        return row_moments_##SUFFIX(p, n, &mean, &var);                              \
    }

DEFINE_ROW_MOMENTS(float, vf32, f32)
DEFINE_ROW_MOMENTS(double, vf64, f64)

#ifdef HAVE_AVX2
#define ROWS8_MAX 1024
/* The eight horizontal sums of v[0..7] as one vector (6 hadds, 2 lane permutes). */
static inline __m256 hsum8(const __m256 *v) {
    __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
/* Moments of eight consecutive rows of n <= ROWS8_MAX floats: per row, shifted sums in one
 * vector pair (the tail through a masked load); the sixteen reductions and the final
 * arithmetic done eight rows at a time. Rows that could cancel are read again (again_f32). */
static void rows8_moments_f32(const float *p, long n, double *mean, double *var) {
    const long body = n & ~7L;
    const int tail = (int)(n - body);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 s1[8], s2[8];
    float sh[8];
    for (int q = 0; q < 8; q++) {
        const float *r = p + q * n;
        sh[q] = (r[0] + r[n / 4] + r[n / 2] + r[3 * n / 4]) * 0.25f;
        const __m256 vs = _mm256_set1_ps(sh[q]);
        __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
        __m256 b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps();
        long j = 0;
        for (; j + 16 <= body; j += 16) {
            PREFETCH(r + j);
            __m256 u = _mm256_sub_ps(_mm256_loadu_ps(r + j), vs);
            __m256 w = _mm256_sub_ps(_mm256_loadu_ps(r + j + 8), vs);
            a1 = _mm256_add_ps(a1, u);
            a2 = _mm256_fmadd_ps(u, u, a2);
            b1 = _mm256_add_ps(b1, w);
            b2 = _mm256_fmadd_ps(w, w, b2);
        }
        if (j < body) {
            __m256 u = _mm256_sub_ps(_mm256_loadu_ps(r + j), vs);
            a1 = _mm256_add_ps(a1, u);
            a2 = _mm256_fmadd_ps(u, u, a2);
        }
        a1 = _mm256_add_ps(a1, b1);
        a2 = _mm256_add_ps(a2, b2);
        if (tail) {
            __m256 u = _mm256_sub_ps(_mm256_maskload_ps(r + body, mask), vs);
            u = _mm256_and_ps(u, _mm256_castsi256_ps(mask));
            a1 = _mm256_add_ps(a1, u);
            a2 = _mm256_fmadd_ps(u, u, a2);
        }
        s1[q] = a1;
        s2[q] = a2;
    }
    const __m256 inv_n = _mm256_set1_ps(1.0f / (float)n);
    const __m256 m = _mm256_mul_ps(hsum8(s1), inv_n);
    const __m256 v = _mm256_fnmadd_ps(m, m, _mm256_mul_ps(hsum8(s2), inv_n));
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(_mm256_mul_ps(v, _mm256_set1_ps(4.0f)),
                                                  _mm256_mul_ps(m, m), _CMP_GE_OQ),
                                    _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ));
    const __m256 mu = _mm256_add_ps(_mm256_loadu_ps(sh), m);
    _mm256_storeu_pd(mean, _mm256_cvtps_pd(_mm256_castps256_ps128(mu)));
    _mm256_storeu_pd(mean + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(mu, 1)));
    _mm256_storeu_pd(var, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(var + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    int bad = ~_mm256_movemask_ps(ok) & 0xff;
    if (!bad) return;
    float ms[8];
    _mm256_storeu_ps(ms, m);
    while (bad) {
        int q = __builtin_ctz(bad);
        bad &= bad - 1;
        again_f32(p + q * n, n, sh[q], ms[q], mean + q, var + q);
    }
}
#endif

/* Rows shorter than one vector (1x1 to 2x3 maps: the last stages of small-image proxies):
 * the vector kernels' per-row setup (shift, accumulators, masks, calls) costs several times
 * the data, so these take plain loops over the rows, two-pass in double (exact, and cheap
 * for so few values); the row-wise kernels below do the same. Threads only from
 * SHORT_PARALLEL values: the fork costs more than such passes. */
#define SHORT_PARALLEL (1L << 16)
#define DEFINE_SHORT_MOMENTS(T, SUFFIX)                                              \
    static void short_moments_##SUFFIX(const T *p, long rows, long n, double *mean,  \
                                       double *var) {                                \
        if (n == 1) {                                                                \
            for (long r = 0; r < rows; r++) mean[r] = p[r], var[r] = 0.0;            \
            return;                                                                  \
        }                                                                            \
        const double inv_n = 1.0 / (double)n;                                        \
        for (long r = 0; r < rows; r++, p += n) {                                    \
            double s = 0.0, d = 0.0;                                                 \
            for (long j = 0; j < n; j++) s += p[j];                                  \
            const double mu = s / (double)n; /* exact for a constant row */          \
            for (long j = 0; j < n; j++) d += ((double)p[j] - mu) * ((double)p[j] - mu); \
            mean[r] = mu;                                                            \
            var[r] = d * inv_n;                                                      \
        }                                                                            \
    }
DEFINE_SHORT_MOMENTS(float, f32)
DEFINE_SHORT_MOMENTS(double, f64)

/* Moments of `rows` consecutive rows of n values into double arrays: rows under a vector
 * plainly, eight rows at a time where that kernel applies (float32, AVX2, short rows), else
 * row by row. */
static void rows_moments_f32(const float *p, long rows, long n, double *mean, double *var) {
    if (n < 8) {
        short_moments_f32(p, rows, n, mean, var);
        return;
    }
    long r = 0;
#ifdef HAVE_AVX2
    if (n <= ROWS8_MAX)
        for (; r + 8 <= rows; r += 8) rows8_moments_f32(p + r * n, n, mean + r, var + r);
#endif
    for (; r < rows; r++) row_moments_f32(p + r * n, n, mean + r, var + r);
}

static void rows_moments_f64(const double *p, long rows, long n, double *mean, double *var) {
    if (n < 4) {
        short_moments_f64(p, rows, n, mean, var);
        return;
    }
    for (long r = 0; r < rows; r++) row_moments_f64(p + r * n, n, mean + r, var + r);
}

/* Threads take contiguous ranges of rows, in groups of 8 (the eight-row kernel's unit). */
#define DEFINE_MOMENTS(T, SUFFIX)                                                    \
    void an_moments_##SUFFIX(const T *x, long rows, long n, T *mean, T *var,         \
                             int threads) {                                          \
        if (n == 1) { /* 1x1 maps: each value is its row's mean */                   \
            for (long r = 0; r < rows; r++) mean[r] = x[r], var[r] = 0;              \
            return;                                                                  \
        }                                                                            \
        const long groups = (rows + 7) / 8;                                          \
        const int par = rows * n >= SHORT_PARALLEL;                                  \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(par)")    \
        for (long g = 0; g < groups; g++) {                                          \
            const long r0 = g * 8, m = rows - r0 < 8 ? rows - r0 : 8;                \
            double mu[8], va[8];                                                     \
            rows_moments_##SUFFIX(x + r0 * n, m, n, mu, va);                         \
            for (long q = 0; q < m; q++) {                                           \
                mean[r0 + q] = (T)mu[q];                                             \
                var[r0 + q] = (T)va[q];                                              \
            }                                                                        \
        }                                                                            \
    }

DEFINE_MOMENTS(float, f32)
DEFINE_MOMENTS(double, f64)


/* Dot product of two rows of the kernel's dtype in four vector accumulators (independent
 * chains), summed in double; the linear layers' weights are stored in the kernel's dtype
 * (float32 inputs: twice the lanes and half the bytes of float64). */
#define DEFINE_LINEAR(T, V, VW, SUFFIX)                                              \
    double an_dot_##SUFFIX(const T *a, const T *b, long n) {                         \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        V s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                    \
        long i = 0;                                                                  \
        for (; i + 4 * W <= n; i += 4 * W) {                                         \
            V a0, a1, a2, a3, b0, b1, b2, b3;                                        \
            __builtin_memcpy(&a0, a + i, sizeof(a0));                                \
            __builtin_memcpy(&a1, a + i + W, sizeof(a1));                            \
            __builtin_memcpy(&a2, a + i + 2 * W, sizeof(a2));                        \
            __builtin_memcpy(&a3, a + i + 3 * W, sizeof(a3));                        \
            __builtin_memcpy(&b0, b + i, sizeof(b0));                                \
            __builtin_memcpy(&b1, b + i + W, sizeof(b1));                            \
            __builtin_memcpy(&b2, b + i + 2 * W, sizeof(b2));                        \
            __builtin_memcpy(&b3, b + i + 3 * W, sizeof(b3));                        \
            s0 += a0 * b0;                                                           \
            s1 += a1 * b1;                                                           \
            s2 += a2 * b2;                                                           \
            s3 += a3 * b3;                                                           \
        }                                                                            \
        double r = hsum_##V((s0 + s1) + (s2 + s3));                                  \
        for (; i < n; i++) r += (double)a[i] * (double)b[i];                         \
        return r;                                                                    \
    }                                                                                \
    /* The eval head's linear layer, out = (w @ in) * s + b. With AVX-512 (AN_WIDE), four \
     * rows of w at a time against one read of `in`, two accumulators each, in 64-byte   \
     * vectors: 0.52 against 1.02 us per sample for one dot at a time (C 512, K 20). */   \
    static void linear_##SUFFIX(const T *w, const double *s, const double *b, const T *in, \
                                long nin, long nout, double *out) {                  \
        enum { W = sizeof(VW) / sizeof(T) };                                         \
        long o = 0;                                                                  \
        for (; AN_WIDE && o + 4 <= nout; o += 4) {                                   \
            const T *wr = w + o * nin;                                               \
            VW a[4] = {{0}}, z[4] = {{0}};                                           \
            long i = 0;                                                              \
            for (; i + 2 * W <= nin; i += 2 * W) {                                   \
                VW x0, x1;                                                           \
                __builtin_memcpy(&x0, in + i, sizeof(x0));                           \
                __builtin_memcpy(&x1, in + i + W, sizeof(x1));                       \
                for (int q = 0; q < 4; q++) {                                        \
                    VW w0, w1;                                                       \
                    __builtin_memcpy(&w0, wr + q * nin + i, sizeof(w0));             \
                    __builtin_memcpy(&w1, wr + q * nin + i + W, sizeof(w1));         \
                    a[q] += w0 * x0;                                                 \
                    z[q] += w1 * x1;                                                 \
                }                                                                    \
            }                                                                        \
            for (int q = 0; q < 4; q++) {                                            \
                double r = hsum_##VW(a[q] + z[q]);                                   \
                for (long j = i; j < nin; j++) r += (double)wr[q * nin + j] * (double)in[j]; \
                out[o + q] = r * s[o + q] + b[o + q];                                \
            }                                                                        \
        }                                                                            \
        for (; o < nout; o++) out[o] = an_dot_##SUFFIX(w + o * nin, in, nin) * s[o] + b[o]; \
    }

DEFINE_LINEAR(float, vf32, vw32, f32)
DEFINE_LINEAR(double, vf64, vw64, f64)

static void gate(const an_head *h, double *z) {
    long k = h->k;
    if (h->gn) {
        double m = 0.0, v = 0.0;
        for (long i = 0; i < k; i++) m += z[i];
        m /= k;
        for (long i = 0; i < k; i++) v += (z[i] - m) * (z[i] - m);
        double inv = 1.0 / sqrt(v / k + h->gn_eps);
        for (long i = 0; i < k; i++) z[i] = (z[i] - m) * inv * h->gn_w[i] + h->gn_b[i];
    }
    if (h->gate == 0) {
        for (long i = 0; i < k; i++) {
            double g = (z[i] + 3.0) / 6.0;
            z[i] = g < 0.0 ? 0.0 : (g > 1.0 ? 1.0 : g);
        }
    } else if (h->gate == 1) {
        for (long i = 0; i < k; i++) z[i] = 1.0 / (1.0 + exp(-z[i]));
    } else {
        double top = z[0], sum = 0.0;
        for (long i = 1; i < k; i++) top = z[i] > top ? z[i] : top;
        for (long i = 0; i < k; i++) sum += (z[i] = exp(z[i] - top));
        for (long i = 0; i < k; i++) z[i] /= sum;
    }
}

/* lambda (K) from the per-channel moments of one sample, in the kernel's dtype up to the
 * linear layers' outputs (as the reference computes it), in double after. `pooled` holds C
 * values, `hid` hidden doubles then hidden values of the kernel's dtype. */
#define DEFINE_ATTENTION(T, SUFFIX, SQRT)                                            \
    static void attention_##SUFFIX(const an_head *h, const double *mean, const double *var, \
                                   long c, long n, T *pooled, double *hid, double *lam) { \
        const T bessel = n > 1 ? (T)n / (T)(n - 1) : (T)1, eps = (T)h->pool_eps;    \
        if (h->pool == 0)                                                            \
            for (long i = 0; i < c; i++) pooled[i] = (T)mean[i] / SQRT((T)var[i] * bessel + eps); \
        else                                                                         \
            for (long i = 0; i < c; i++) pooled[i] = (T)mean[i];                     \
        if (h->layers == 1) {                                                        \
            linear_##SUFFIX((const T *)h->w1, h->s1, h->b1, pooled, c, h->k, lam);   \
        } else {                                                                     \
            T *relu = (T *)(hid + h->hidden);                                        \
            linear_##SUFFIX((const T *)h->w1, h->s1, h->b1, pooled, c, h->hidden, hid); \
            for (long i = 0; i < h->hidden; i++) relu[i] = hid[i] > 0.0 ? (T)hid[i] : (T)0; \
            linear_##SUFFIX((const T *)h->w2, h->s2, h->b2, relu, h->hidden, h->k, lam); \
        }                                                                            \
        gate(h, lam);                                                                \
    }

DEFINE_ATTENTION(float, f32, sqrtf)
DEFINE_ATTENTION(double, f64, sqrt)

/* Scale and shift (C each) from lambda and the folded mixtures, MIX_BLOCK channels at a time
 * held in registers over the K components. The mixtures are packed block by block, in the
 * kernel's dtype (the K scale rows and K shift rows of a block are one contiguous run): read
 * as (K, C) float64 rows, a block touched 2K lines 8*C bytes apart, which at C = 512 share
 * cache sets and missed; float32 halves what the float32 kernel reads per sample. With
 * AVX-512 (AN_WIDE), two blocks run at once in 64-byte vectors, four independent chains:
 * 1.08 against 1.78 us per sample (C 512, K 20), where the mixtures' reads from L2 then set
 * the pace; in 32-byte vectors two blocks at once took longer than one. On a machine with
 * 512 KiB of L2 and no AVX-512, two samples per read of a block (tried, with the linear
 * layers likewise) took as long as one block of one sample at a time. */
#define MIX_BLOCK 16
/* The packed mixtures (80 KiB at C 512, K 20, float32) are read again for every sample, from
 * L2: prefetched like the feature maps, the 7x7 site with K 20 took 3-7% less (side by side,
 * three runs). */
#define MIX_PREFETCH(q) do { PREFETCH(q); PREFETCH((q) + MIX_BLOCK); } while (0)
#define DEFINE_MIXTURE(T, V, VW, SUFFIX)                                             \
    static void mixture_##SUFFIX(const an_head *h, const double *lam, long c, T *scale, \
                                 T *shift) {                                         \
        enum { W = sizeof(V) / sizeof(T), U = MIX_BLOCK / W };                       \
        enum { WW = sizeof(VW) / sizeof(T), UW = MIX_BLOCK / WW };                   \
        const long k = h->k, packed = 2 * k * MIX_BLOCK; /* values of a packed block */ \
        long i = 0;                                                                  \
        for (; AN_WIDE && i + 2 * MIX_BLOCK <= c; i += 2 * MIX_BLOCK) {              \
            const T *m = (const T *)h->mix + i * k * 2;                              \
            VW sa[2 * UW] = {{0}}, st[2 * UW] = {{0}}; /* channels i .. i + 32 */    \
            for (long j = 0; j < k; j++, m += 2 * MIX_BLOCK) {                       \
                MIX_PREFETCH(m);                                                     \
                MIX_PREFETCH(m + packed);                                            \
                const VW vl = (T)lam[j] - (VW){0};                                   \
                for (int u = 0; u < 2 * UW; u++) {                                   \
                    const T *q = m + (u / UW) * packed + (u % UW) * WW;              \
                    VW va, vt;                                                       \
                    __builtin_memcpy(&va, q, sizeof(va));                            \
                    __builtin_memcpy(&vt, q + MIX_BLOCK, sizeof(vt));                \
                    sa[u] += vl * va;                                                \
                    st[u] += vl * vt;                                                \
                }                                                                    \
            }                                                                        \
            __builtin_memcpy(scale + i, sa, sizeof(sa));                             \
            __builtin_memcpy(shift + i, st, sizeof(st));                             \
        }                                                                            \
        for (; i < c; i += MIX_BLOCK) {                                              \
            const T *m = (const T *)h->mix + i * k * 2;                              \
            V sa[U] = {{0}}, st[U] = {{0}};                                          \
            for (long j = 0; j < k; j++, m += 2 * MIX_BLOCK) {                       \
                MIX_PREFETCH(m);                                                     \
                const V vl = (T)lam[j] - (V){0};                                     \
                for (int u = 0; u < U; u++) {                                        \
                    V va, vt;                                                        \
                    __builtin_memcpy(&va, m + u * W, sizeof(va));                    \
                    __builtin_memcpy(&vt, m + MIX_BLOCK + u * W, sizeof(vt));        \
                    sa[u] += vl * va;                                                \
                    st[u] += vl * vt;                                                \
                }                                                                    \
            }                                                                        \
            if (c - i >= MIX_BLOCK) {                                                \
                __builtin_memcpy(scale + i, sa, sizeof(sa));                         \
                __builtin_memcpy(shift + i, st, sizeof(st));                         \
                continue;                                                            \
            }                                                                        \
            T out[2][MIX_BLOCK];                                                     \
            __builtin_memcpy(out[0], sa, sizeof(sa));                                \
            __builtin_memcpy(out[1], st, sizeof(st));                                \
            for (long q = 0; q < c - i; q++) {                                       \
                scale[i + q] = out[0][q];                                            \
                shift[i + q] = out[1][q];                                            \
            }                                                                        \
        }                                                                            \
    }                                                                                \
    /* One sample's workspace w holds WS_STRIDE doubles: its moments (mean, variance), \
     * then the scale and shift computed from them (C values of the kernel's dtype from \
     * w and from w + C); pooled; lambda; hidden. */                                 \
    static void sample_scale_shift_##SUFFIX(const an_head *h, double *w, long c, long n) { \
        double *mean = w, *var = w + c, *lam = w + 3 * c;                           \
        attention_##SUFFIX(h, mean, var, c, n, (T *)(w + 2 * c), lam + h->k, lam);   \
        mixture_##SUFFIX(h, lam, c, (T *)w, (T *)(w + c));                           \
    }


DEFINE_MIXTURE(float, vf32, vw32, f32)
DEFINE_MIXTURE(double, vf64, vw64, f64)

/* For the channels-last kernels (_native_cl.c): the same per-sample step. */
void an_sample_scale_shift_f32(const an_head *h, double *w, long c, long n) {
    sample_scale_shift_f32(h, w, c, n);
}
void an_sample_scale_shift_f64(const an_head *h, double *w, long c, long n) {
    sample_scale_shift_f64(h, w, c, n);
}

/* Streaming (non-temporal) stores write an output line without first reading it in (the
 * read-for-ownership): a third less memory traffic in a pass that reads x and writes y. Used
 * only where y is too large to stay in cache for the next layer anyway (STREAM_MIN_BYTES) and
 * each row is whole 64-byte lines from an aligned start (ResNet's 56x56 and 28x28 maps); a
 * partly written line costs far more. Each thread fences its streamed stores before its
 * parallel region ends. */
#define STREAM_MIN_BYTES (8L << 20)

static int use_stream(const void *y, long rows, long n, long size) {
#ifdef HAVE_AVX2
    return rows * n * size >= STREAM_MIN_BYTES && (n * size) % 64 == 0 &&
           ((uintptr_t)y & 63) == 0;
#else
    (void)y, (void)rows, (void)n, (void)size;
    return 0;
#endif
}

/* The rule above, for diagnostics and tests. */
int an_streams(const void *y, long rows, long n, long size) { return use_stream(y, rows, n, size); }

static inline void stream_fence(int stream) {
#ifdef HAVE_AVX2
    if (stream) _mm_sfence();
#else
    (void)stream;
#endif
}

/* y = x * a + t and y = g * a + x * c + d over one row; `stream` only where use_stream. */
#ifdef HAVE_AVX2
#define STREAM_ROWS(T, SUFFIX, V, IS)                                                \
    static void stream_affine_##SUFFIX(const T *x, T *y, long n, T a, T t) {         \
        const V va = _mm256_set1_##IS(a), vt = _mm256_set1_##IS(t);                  \
        for (long j = 0; j < n; j += 32 / sizeof(T))                                 \
            _mm256_stream_##IS(y + j, _mm256_fmadd_##IS(_mm256_loadu_##IS(x + j), va, vt)); \
    }                                                                                \
    static void stream_affine_grad_##SUFFIX(const T *g, const T *x, T *y, long n, T a, \
                                            T c, T d) {                              \
        const V va = _mm256_set1_##IS(a), vc = _mm256_set1_##IS(c);                 \
        const V vd = _mm256_set1_##IS(d);                                            \
        for (long j = 0; j < n; j += 32 / sizeof(T)) {                               \
            V xc = _mm256_fmadd_##IS(_mm256_loadu_##IS(x + j), vc, vd);              \
            _mm256_stream_##IS(y + j, _mm256_fmadd_##IS(_mm256_loadu_##IS(g + j), va, xc)); \
        }                                                                            \
    }
STREAM_ROWS(float, f32, __m256, ps)
STREAM_ROWS(double, f64, __m256d, pd)
#define STREAM_OR(call, ...) \
    if (stream) {            \
        call(__VA_ARGS__);   \
        return;              \
    }
#else
#define STREAM_OR(call, ...) (void)stream;
#endif

/* Rows of at least one vector end with one vector that overlaps the one before it (the last
 * W values of the row, recomputed: y is never x here) instead of a scalar tail: at 7x7 the
 * tail loop and its branches cost more than the row's six vectors. */
#define DEFINE_ROWS_AFFINE(T, V, SUFFIX)                                             \
    static void rows_affine_##SUFFIX(const T *x, T *y, long n, T a_, T t_, int stream) { \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        STREAM_OR(stream_affine_##SUFFIX, x, y, n, a_, t_)                           \
        if (n < W) {                                                                 \
            for (long j = 0; j < n; j++) y[j] = x[j] * a_ + t_;                      \
            return;                                                                  \
        }                                                                            \
        const V va = a_ - (V){0}, vt = t_ - (V){0};                                  \
        V v;                                                                         \
        long j = 0;                                                                  \
        for (; j + W <= n; j += W) {                                                 \
            PREFETCH(x + j);                                                         \
            __builtin_memcpy(&v, x + j, sizeof(v));                                  \
            v = v * va + vt;                                                         \
            __builtin_memcpy(y + j, &v, sizeof(v));                                  \
        }                                                                            \
        if (j < n) {                                                                 \
            __builtin_memcpy(&v, x + n - W, sizeof(v));                              \
            v = v * va + vt;                                                         \
            __builtin_memcpy(y + n - W, &v, sizeof(v));                              \
        }                                                                            \
    }                                                                                \
    static void rows_affine_grad_##SUFFIX(const T *g, const T *x, T *y, long n, T a, \
                                          T c, T d, int stream) {                    \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        STREAM_OR(stream_affine_grad_##SUFFIX, g, x, y, n, a, c, d)                  \
        const V va = a - (V){0}, vc = c - (V){0}, vd = d - (V){0};                   \
        long j = 0;                                                                  \
        for (; j + W <= n; j += W) {                                                 \
            V u, v;                                                                  \
            PREFETCH(g + j);                                                         \
            PREFETCH(x + j);                                                         \
            __builtin_memcpy(&u, g + j, sizeof(u));                                  \
            __builtin_memcpy(&v, x + j, sizeof(v));                                  \
            v = u * va + (v * vc + vd);                                              \
            __builtin_memcpy(y + j, &v, sizeof(v));                                  \
        }                                                                            \
        for (; j < n; j++) y[j] = g[j] * a + x[j] * c + d;                           \
    }

DEFINE_ROWS_AFFINE(float, vf32, f32)
DEFINE_ROWS_AFFINE(double, vf64, f64)

/* The eval kernel streams its output one run of rows at a time instead (the rule above
 * needs whole-line rows): a group of G rows of one sample is G * n consecutive values, and
 * with G = 8 (16 for float32 rows of odd length) it starts and ends on a 64-byte line, so
 * its streamed vectors write whole lines; a vector that straddles two rows takes each lane's
 * coefficients. That covers 14x14 and 7x7 maps, where a sample's rows are not whole lines:
 * against row-by-row stores, 26-29% less time for the pass over 32 samples read from
 * memory. Outputs under EVAL_STREAM_MIN_BYTES stay in cache for the next layer. */
#define EVAL_STREAM_MIN_BYTES (1L << 20)

static long eval_stream_group(const void *y, long b, long c, long n, long size) {
#ifdef HAVE_AVX2
    if (b * c * n * size < EVAL_STREAM_MIN_BYTES || n * size < 32 || (c * n * size) % 64 ||
        ((uintptr_t)y & 63))
        return 0;
    return (8 * n * size) % 64 == 0 ? 8 : 16;
#else
    (void)y, (void)b, (void)c, (void)n, (void)size;
    return 0;
#endif
}

/* The rule above, for diagnostics and tests: rows per streamed run, 0 for plain stores. */
long an_eval_streams(const void *y, long b, long c, long n, long size) {
    return eval_stream_group(y, b, c, n, size);
}

#ifdef HAVE_AVX2
#define STREAM_RUN(T, SUFFIX, V, IS, VI, LANES, SET1I, CMPGT)                        \
    static void stream_run_##SUFFIX(const T *x, T *y, long n, long r0, long r1,      \
                                    const T *sc, const T *sh) {                      \
        enum { W = 32 / sizeof(T) };                                                 \
        const VI lane = LANES;                                                       \
        long r = r0, end = (r0 + 1) * n; /* where row r ends */                      \
        V va = _mm256_set1_##IS(sc[r]), vt = _mm256_set1_##IS(sh[r]);                \
        for (long j = r0 * n; j < r1 * n; j += W) {                                  \
            const V v = _mm256_loadu_##IS(x + j);                                    \
            if (j + W <= end) {                                                      \
                _mm256_stream_##IS(y + j, _mm256_fmadd_##IS(v, va, vt));             \
                if (j + W == end && ++r < r1) {                                      \
                    va = _mm256_set1_##IS(sc[r]), vt = _mm256_set1_##IS(sh[r]);      \
                    end += n;                                                        \
                }                                                                    \
                continue;                                                            \
            }                                                                        \
            /* lanes before `end` are row r's, the others row r + 1's (n >= W) */    \
            const V na = _mm256_set1_##IS(sc[r + 1]), nt = _mm256_set1_##IS(sh[r + 1]); \
            const V m = _mm256_castsi256_##IS(CMPGT(SET1I(end - j), lane));          \
            _mm256_stream_##IS(y + j, _mm256_fmadd_##IS(v, _mm256_blendv_##IS(na, va, m), \
                                                       _mm256_blendv_##IS(nt, vt, m))); \
            r++, va = na, vt = nt, end += n;                                         \
        }                                                                            \
    }
STREAM_RUN(float, f32_256, __m256, ps, __m256i, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
           _mm256_set1_epi32, _mm256_cmpgt_epi32)
STREAM_RUN(double, f64, __m256d, pd, __m256i, _mm256_setr_epi64x(0, 1, 2, 3),
           _mm256_set1_epi64x, _mm256_cmpgt_epi64)
#if AN_WIDE
/* The float32 run in 64-byte vectors (rows of at least 16 values, so that a vector spans at
 * most two rows; the run starts on a line, so each streamed vector is one whole line): a
 * straddling vector takes row r's coefficients in its first end - j lanes by a mask. */
static void stream_run_w32(const float *x, float *y, long n, long r0, long r1, const float *sc,
                           const float *sh) {
    enum { W = 16 };
    long r = r0, end = (r0 + 1) * n;
    __m512 va = _mm512_set1_ps(sc[r]), vt = _mm512_set1_ps(sh[r]);
    for (long j = r0 * n; j < r1 * n; j += W) {
        const __m512 v = _mm512_loadu_ps(x + j);
        if (j + W <= end) {
            _mm512_stream_ps(y + j, _mm512_fmadd_ps(v, va, vt));
            if (j + W == end && ++r < r1) {
                va = _mm512_set1_ps(sc[r]), vt = _mm512_set1_ps(sh[r]);
                end += n;
            }
            continue;
        }
        const __m512 na = _mm512_set1_ps(sc[r + 1]), nt = _mm512_set1_ps(sh[r + 1]);
        const __mmask16 m = (__mmask16)((1u << (end - j)) - 1u);
        _mm512_stream_ps(y + j, _mm512_fmadd_ps(v, _mm512_mask_blend_ps(m, na, va),
                                                _mm512_mask_blend_ps(m, nt, vt)));
        r++, va = na, vt = nt, end += n;
    }
}
#endif
/* The float32 run: 64-byte vectors where AN_WIDE and the rows allow, else 32-byte ones. */
static void stream_run_f32(const float *x, float *y, long n, long r0, long r1, const float *sc,
                           const float *sh) {
#if AN_WIDE
    if (n >= 16) {
        stream_run_w32(x, y, n, r0, r1, sc, sh);
        return;
    }
#endif
    stream_run_f32_256(x, y, n, r0, r1, sc, sh);
}
#define STREAM_RUN_OR(SUFFIX, ...)             \
    if (group) {                               \
        stream_run_##SUFFIX(__VA_ARGS__);      \
        return;                                \
    }
#else
#define STREAM_RUN_OR(SUFFIX, ...) (void)group;
#endif

/* Rows [r0, r1) of one sample (xs, ys at its start): one streamed run where `group`, else
 * row by row with plain stores. */
#define DEFINE_AFFINE_RANGE(T, SUFFIX)                                               \
    static void affine_range_##SUFFIX(const T *xs, T *ys, long n, long r0, long r1,  \
                                      const T *sc, const T *sh, long group) {        \
        STREAM_RUN_OR(SUFFIX, xs, ys, n, r0, r1, sc, sh)                             \
        if (n == 1) { /* 1x1 maps: elementwise (vectorised) */                        \
            for (long r = r0; r < r1; r++) ys[r] = xs[r] * sc[r] + sh[r];            \
            return;                                                                  \
        }                                                                            \
        if (n * (long)sizeof(T) < 32) { /* rows under a vector: no per-row calls */  \
            for (long r = r0; r < r1; r++)                                           \
                for (long j = r * n; j < (r + 1) * n; j++) ys[j] = xs[j] * sc[r] + sh[r]; \
            return;                                                                  \
        }                                                                            \
        for (long r = r0; r < r1; r++)                                               \
            rows_affine_##SUFFIX(xs + r * n, ys + r * n, n, sc[r], sh[r], 0);        \
    }

DEFINE_AFFINE_RANGE(float, f32)
DEFINE_AFFINE_RANGE(double, f64)

/* Whether a thread reads sample s + 1 while it writes sample s (samples of `bytes` each):
 * where two samples fit in this core's L2, that overlap hides the next sample's reads (7x7
 * and 14x14 at ResNet-50's widths, 3-8% faster); larger samples (28x28, 56x56) crowd each
 * other out of L2 before the affine pass reads them again, so there a thread reads a sample
 * whole, then writes it from its last rows back, the ones still in L2 (2-12% faster in three
 * side-by-side runs, backwards another 0-5% at 56x56; batch 32, 2 threads, L2 of 512 KiB). */
static int eval_ahead(long bytes) {
    static long l2;
    if (l2 <= 0) {
        const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
        l2 = v > 0 ? v : 1L << 20;
    }
    return 2 * bytes <= l2;
}

/* The rule above, for diagnostics and tests. */
int an_eval_ahead(long bytes) { return eval_ahead(bytes); }

/* A sample of at most this many bytes (1x1 to 4x4 maps at ResNet widths) is one group: in
 * groups of 8 rows, the calls per group cost more than its few values (512x1 at batch 64:
 * the affine pass took a fifth of the kernel's time). */
#ifndef WHOLE_SAMPLE_BYTES
#define WHOLE_SAMPLE_BYTES (16L << 10)
#endif
static long eval_rows_per_group(long c, long n, long size) {
    return c * n * size <= WHOLE_SAMPLE_BYTES ? c : 8;
}

/* The rule above (outputs not streamed), for the tests. */
long an_eval_rows_per_group(long c, long n, long size) { return eval_rows_per_group(c, n, size); }

/* Samples run in parallel when there are at least as many as threads (each thread reads
 * sample s + 1, a group of rows at a time, while it writes sample s where eval_ahead says so,
 * in two workspaces it alternates); otherwise each sample's rows do, in groups, with one
 * workspace. A group is 8 rows (a whole sample where eval_rows_per_group says so), or the
 * streamed run's G (eval_stream_group). The workspaces
 * (WS_STRIDE doubles each, see sample_scale_shift) are one malloc here: returns 0, or -1 when
 * that fails (nothing written). */
#define DEFINE_EVAL(T, SUFFIX)                                                       \
    int an_eval_##SUFFIX(const an_head *h, const T *x, T *y, long b, long c, long n, \
                         int threads) {                                              \
        const long group = eval_stream_group(y, b, c, n, sizeof(T));                 \
        const long bytes = c * n * (long)sizeof(T), stride = WS_STRIDE(h, c);        \
        const long step = group ? group : eval_rows_per_group(c, n, sizeof(T));      \
        const int parallel_samples = b >= threads;                                   \
        double *ws = malloc(sizeof(double) * stride * (parallel_samples ? 2 * threads : 1)); \
        if (ws == NULL) return -1;                                                   \
        if (parallel_samples) {                                                      \
            _Pragma("omp parallel num_threads(threads)")                             \
            {                                                                        \
                int tid = omp_get_thread_num(), nth = omp_get_num_threads();         \
                long s0 = b * tid / nth, s1 = b * (tid + 1) / nth;                   \
                double *slots[2] = {ws + 2 * tid * stride, ws + (2 * tid + 1) * stride}; \
                if (s0 < s1)                                                         \
                    rows_moments_##SUFFIX(x + s0 * c * n, c, n, slots[0], slots[0] + c); \
                const int ahead = eval_ahead(bytes);                                 \
                const long groups = (c + step - 1) / step;                           \
                for (long s = s0; s < s1; s++) {                                     \
                    const T *xs = x + s * c * n, *xn = xs + c * n;                   \
                    T *ys = y + s * c * n;                                           \
                    double *w = slots[(s - s0) & 1], *wn = slots[(s - s0 + 1) & 1];  \
                    if (!ahead && s > s0) rows_moments_##SUFFIX(xs, c, n, w, w + c); \
                    sample_scale_shift_##SUFFIX(h, w, c, n);                         \
                    const T *sc = (const T *)w, *sh = (const T *)(w + c);            \
                    for (long g = 0; g < groups; g++) {                              \
                        const long i = (ahead ? g : groups - 1 - g) * step;          \
                        const long m = c - i < step ? c - i : step;                  \
                        affine_range_##SUFFIX(xs, ys, n, i, i + m, sc, sh, group);   \
                        if (ahead && s + 1 < s1)                                     \
                            rows_moments_##SUFFIX(xn + i * n, m, n, wn + i, wn + c + i); \
                    }                                                                \
                }                                                                    \
                stream_fence(group != 0);                                            \
            }                                                                        \
            free(ws);                                                                \
            return 0;                                                                \
        }                                                                            \
        const long groups = (c + 7) / 8;                                             \
        double *w = ws;                                                              \
        for (long s = 0; s < b; s++) {                                               \
            const T *xs = x + s * c * n;                                             \
            T *ys = y + s * c * n;                                                   \
            _Pragma("omp parallel for schedule(static) num_threads(threads)")        \
            for (long g = 0; g < groups; g++) {                                      \
                const long i = g * 8, m = c - i < 8 ? c - i : 8;                     \
                rows_moments_##SUFFIX(xs + i * n, m, n, w + i, w + c + i);           \
            }                                                                        \
            sample_scale_shift_##SUFFIX(h, w, c, n);                                 \
            const T *sc = (const T *)w, *sh = (const T *)(w + c);                    \
            _Pragma("omp parallel num_threads(threads)")                             \
            {                                                                        \
                _Pragma("omp for schedule(static)")                                  \
                for (long i = 0; i < c; i += step)                                   \
                    affine_range_##SUFFIX(xs, ys, n, i, c - i < step ? c : i + step, sc, sh, \
                                          group);                                    \
                stream_fence(group != 0);                                            \
            }                                                                        \
        }                                                                            \
        free(ws);                                                                    \
        return 0;                                                                    \
    }

DEFINE_EVAL(float, f32)
DEFINE_EVAL(double, f64)

/* Per-row affine maps of a (rows, n) array, per-row coefficients (threads over rows):
 * an_affine_*:      y = x * a[r] + t[r]
 * an_affine_grad_*: y = g * a[r] + x * c[r] + d[r]   (AN's input gradient, one pass)
 * an_row_dots_*:    sgx[r] = sum(g * x), sg[r] = sum(g)   (gradients of a and t) */
/* Rows under a vector (see short_moments): `body` for value j of row r, as plain loops;
 * 1x1 maps elementwise (vectorised). */
#define SHORT_ROWWISE(T, V, body)                                                    \
    if (n == 1) {                                                                    \
        for (long r = 0, j = 0; r < rows; r++, j++) body;                            \
        return;                                                                      \
    }                                                                                \
    if (n < (long)(sizeof(V) / sizeof(T))) {                                         \
        const int par = rows * n >= SHORT_PARALLEL;                                  \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(par)")    \
        for (long r = 0; r < rows; r++)                                              \
            for (long j = r * n; j < (r + 1) * n; j++) body;                         \
        return;                                                                      \
    }
#define DEFINE_ROWWISE(T, V, SUFFIX)                                                 \
    void an_affine_##SUFFIX(const T *x, const T *a, const T *t, T *y, long rows,     \
                            long n, int threads) {                                   \
        SHORT_ROWWISE(T, V, y[j] = x[j] * a[r] + t[r])                               \
        const int stream = use_stream(y, rows, n, sizeof(T));                        \
        _Pragma("omp parallel num_threads(threads)")                                 \
        {                                                                            \
            _Pragma("omp for schedule(static)")                                      \
            for (long r = 0; r < rows; r++)                                          \
                rows_affine_##SUFFIX(x + r * n, y + r * n, n, a[r], t[r], stream);   \
            stream_fence(stream);                                                    \
        }                                                                            \
    }                                                                                \
    void an_affine_grad_##SUFFIX(const T *g, const T *x, const T *a, const T *c,     \
                                 const T *d, T *y, long rows, long n, int threads) { \
        SHORT_ROWWISE(T, V, y[j] = g[j] * a[r] + x[j] * c[r] + d[r])                 \
        const int stream = use_stream(y, rows, n, sizeof(T));                        \
        _Pragma("omp parallel num_threads(threads)")                                 \
        {                                                                            \
            _Pragma("omp for schedule(static)")                                      \
            for (long r = 0; r < rows; r++)                                          \
                rows_affine_grad_##SUFFIX(g + r * n, x + r * n, y + r * n, n, a[r], c[r], \
                                          d[r], stream);                             \
            stream_fence(stream);                                                    \
        }                                                                            \
    }                                                                                \
    void an_row_dots_##SUFFIX(const T *g, const T *x, T *sgx, T *sg, long rows,      \
                              long n, int threads) {                                 \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        if (n == 1) {                                                                \
            for (long r = 0; r < rows; r++) sgx[r] = g[r] * x[r], sg[r] = g[r];      \
            return;                                                                  \
        }                                                                            \
        if (n < W) {                                                                 \
            const int par = rows * n >= SHORT_PARALLEL;                              \
            _Pragma("omp parallel for schedule(static) num_threads(threads) if(par)") \
            for (long r = 0; r < rows; r++) {                                        \
                double s1 = 0.0, s2 = 0.0;                                           \
                for (long j = r * n; j < (r + 1) * n; j++) {                         \
                    s1 += (double)g[j] * x[j];                                       \
                    s2 += g[j];                                                      \
                }                                                                    \
                sgx[r] = (T)s1;                                                      \
                sg[r] = (T)s2;                                                       \
            }                                                                        \
            return;                                                                  \
        }                                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")            \
        for (long r = 0; r < rows; r++) {                                            \
            const T *gr = g + r * n, *xr = x + r * n;                                \
            double s1 = 0.0, s2 = 0.0;                                               \
            for (long i = 0; i < n; i += BLOCK) {                                    \
                long end = i + BLOCK < n ? i + BLOCK : n, j = i;                     \
                V a1 = {0}, a2 = {0};                                                \
                for (; j + W <= end; j += W) {                                       \
                    V u, w;                                                          \
                    PREFETCH(gr + j);                                                \
                    PREFETCH(xr + j);                                                \
                    __builtin_memcpy(&u, gr + j, sizeof(V));                         \
                    __builtin_memcpy(&w, xr + j, sizeof(V));                         \
                    a1 += u * w;                                                     \
                    a2 += u;                                                         \
                }                                                                    \
                T r1 = 0, r2 = 0;                                                    \
                for (; j < end; j++) {                                               \
                    r1 += gr[j] * xr[j];                                             \
                    r2 += gr[j];                                                     \
                }                                                                    \
                s1 += hsum_##V(a1) + r1;                                             \
                s2 += hsum_##V(a2) + r2;                                             \
            }                                                                        \
            sgx[r] = (T)s1;                                                          \
            sg[r] = (T)s2;                                                           \
        }                                                                            \
    }

DEFINE_ROWWISE(float, vf32, f32)
DEFINE_ROWWISE(double, vf64, f64)
