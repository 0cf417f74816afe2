/* (B, C)-level kernels of AttentiveNorm's training path (compiled with _native.c into one
 * library by _native.py). At 7x7 the feature-map passes are cheaper than BatchNorm's, but the
 * small ops between them are not: each (B, C) ATen op costs 5-20 us of dispatch, and the
 * small matrix products and the head's BatchNorm1d start OpenMP/MKL threads for ~20 us of
 * work. These do a whole autograd node's forward or backward in one single-threaded call.
 * Row-major arrays; column sums over the batch accumulate in double.
 *
 * an_tail_fwd_*: the site's tail, from lambda (B, K) and the per-sample moments m, v (B, C):
 *     gamma = lambda @ Wm, beta = lambda @ Bm                  (mixtures Wm, Bm: (K, C))
 *     mean = sum_b m / B, var = sum_b v / B + sum_b (m - mean)^2 / B   (total variance)
 *     r = 1 / sqrt(var + eps), scale = gamma * r, shift = beta - scale * mean.
 * an_tail_bwd_*: its backward (formulas at _SiteTail in _norm_stats.py).
 * an_meanstd_fwd_*, an_meanstd_bwd_*: pooled = mean * s, s = 1 / sqrt(var * bessel + eps).
 * an_linbn_fwd_*, an_linbn_bwd_*: the heads' Linear (no bias, (K, C) weight) followed by a
 *     training-mode BatchNorm1d(K): h = x @ W^T, z = (h - mean) * r * gw + gb over the batch.
 */
#include <math.h>
#include <stdlib.h>

#include "_native_vec.h"

double an_dot_f32(const float *a, const float *b, long n); /* _native.c */
double an_dot_f64(const double *a, const double *b, long n);


/* out[a, :] = sum_t A[a * sa + t * st] * rows[t, :] for a < na, t < nt, (nt, c) rows, as
 * register tiles of four output rows by two vectors of channels: each pass over t loads two
 * vectors of rows[t] and four coefficients for eight multiply-adds (the loop it replaced
 * loaded and stored a whole output row per multiply-add row: 3-6x slower at B 64, K 10,
 * C 512). Both products the tails need are this form: lambda @ Wm (sa = K, st = 1) and
 * lambda^T @ G (sa = 1, st = K). */
#define DEFINE_SMALL_GEMM(T, V, SUFFIX)                                              \
    static void small_gemm_##SUFFIX(const T *A, long sa, long st, const T *rows, long na, \
                                    long nt, long c, T *restrict out) {              \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        long a = 0;                                                                  \
        for (; a + 4 <= na; a += 4) {                                                \
            const T *a0 = A + a * sa, *a1 = a0 + sa, *a2 = a1 + sa, *a3 = a2 + sa;   \
            T *o = out + a * c;                                                      \
            long j = 0;                                                              \
            for (; j + 2 * W <= c; j += 2 * W) {                                     \
                V s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0};                        \
                V s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0};                        \
                for (long t = 0; t < nt; t++) {                                      \
                    V r0, r1;                                                        \
                    __builtin_memcpy(&r0, rows + t * c + j, sizeof(V));              \
                    __builtin_memcpy(&r1, rows + t * c + j + W, sizeof(V));          \
                    const long q = t * st;                                           \
                    const V f0 = a0[q] - (V){0}, f1 = a1[q] - (V){0};                \
                    const V f2 = a2[q] - (V){0}, f3 = a3[q] - (V){0};                \
                    s00 += f0 * r0, s01 += f0 * r1, s10 += f1 * r0, s11 += f1 * r1;  \
                    s20 += f2 * r0, s21 += f2 * r1, s30 += f3 * r0, s31 += f3 * r1;  \
                }                                                                    \
                __builtin_memcpy(o + j, &s00, sizeof(V));                            \
                __builtin_memcpy(o + j + W, &s01, sizeof(V));                        \
                __builtin_memcpy(o + c + j, &s10, sizeof(V));                        \
                __builtin_memcpy(o + c + j + W, &s11, sizeof(V));                    \
                __builtin_memcpy(o + 2 * c + j, &s20, sizeof(V));                    \
                __builtin_memcpy(o + 2 * c + j + W, &s21, sizeof(V));                \
                __builtin_memcpy(o + 3 * c + j, &s30, sizeof(V));                    \
                __builtin_memcpy(o + 3 * c + j + W, &s31, sizeof(V));                \
            }                                                                        \
            for (; j < c; j++) {                                                     \
                T u0 = 0, u1 = 0, u2 = 0, u3 = 0;                                    \
                for (long t = 0; t < nt; t++) {                                      \
                    const T r = rows[t * c + j];                                     \
                    const long q = t * st;                                           \
                    u0 += a0[q] * r, u1 += a1[q] * r, u2 += a2[q] * r, u3 += a3[q] * r; \
                }                                                                    \
                o[j] = u0, o[c + j] = u1, o[2 * c + j] = u2, o[3 * c + j] = u3;      \
            }                                                                        \
        }                                                                            \
        for (; a < na; a++) {                                                        \
            const T *a0 = A + a * sa;                                                \
            T *o = out + a * c;                                                      \
            long j = 0;                                                              \
            for (; j + 2 * W <= c; j += 2 * W) {                                     \
                V s0 = {0}, s1 = {0};                                                \
                for (long t = 0; t < nt; t++) {                                      \
                    V r0, r1;                                                        \
                    __builtin_memcpy(&r0, rows + t * c + j, sizeof(V));              \
                    __builtin_memcpy(&r1, rows + t * c + j + W, sizeof(V));          \
                    const V f = a0[t * st] - (V){0};                                 \
                    s0 += f * r0, s1 += f * r1;                                      \
                }                                                                    \
                __builtin_memcpy(o + j, &s0, sizeof(V));                             \
                __builtin_memcpy(o + j + W, &s1, sizeof(V));                         \
            }                                                                        \
            for (; j < c; j++) {                                                     \
                T u = 0;                                                             \
                for (long t = 0; t < nt; t++) u += a0[t * st] * rows[t * c + j];     \
                o[j] = u;                                                            \
            }                                                                        \
        }                                                                            \
    }

DEFINE_SMALL_GEMM(float, vf32, f32)
DEFINE_SMALL_GEMM(double, vf64, f64)

/* out[a * nb + q] = A[a, :] . B[q, :] (summed in double; added to out where `add`) for
 * (na, c) A and (nb, c) B, as tiles of two rows of A by four of B: eight independent sums,
 * each vector of A and B loaded once per tile (an_dot per pair loaded both for each). */
#define DEFINE_SMALL_DOTS(T, V, SUFFIX)                                              \
    static void small_dots_##SUFFIX(const T *A, const T *B, long na, long nb, long c, \
                                    int add, T *restrict out) {                      \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        long a = 0;                                                                  \
        for (; a + 2 <= na; a += 2) {                                                \
            const T *x0 = A + a * c, *x1 = x0 + c;                                   \
            long q = 0;                                                              \
            for (; q + 4 <= nb; q += 4) {                                            \
                const T *w0 = B + q * c, *w1 = w0 + c, *w2 = w1 + c, *w3 = w2 + c;   \
                V s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                            \
                V s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};                            \
                long j = 0;                                                          \
                for (; j + W <= c; j += W) {                                         \
                    V u0, u1, v0, v1, v2, v3;                                        \
                    __builtin_memcpy(&u0, x0 + j, sizeof(V));                        \
                    __builtin_memcpy(&u1, x1 + j, sizeof(V));                        \
                    __builtin_memcpy(&v0, w0 + j, sizeof(V));                        \
                    __builtin_memcpy(&v1, w1 + j, sizeof(V));                        \
                    __builtin_memcpy(&v2, w2 + j, sizeof(V));                        \
                    __builtin_memcpy(&v3, w3 + j, sizeof(V));                        \
                    s0 += u0 * v0, s1 += u0 * v1, s2 += u0 * v2, s3 += u0 * v3;      \
                    s4 += u1 * v0, s5 += u1 * v1, s6 += u1 * v2, s7 += u1 * v3;      \
                }                                                                    \
                double r[8] = {hsum_##V(s0), hsum_##V(s1), hsum_##V(s2), hsum_##V(s3), \
                               hsum_##V(s4), hsum_##V(s5), hsum_##V(s6), hsum_##V(s7)}; \
                for (; j < c; j++)                                                   \
                    for (int t = 0; t < 8; t++)                                      \
                        r[t] += (double)(t < 4 ? x0 : x1)[j] * (w0 + (t & 3) * c)[j]; \
                for (int t = 0; t < 8; t++) {                                        \
                    T *o = out + (a + t / 4) * nb + q + (t & 3);                     \
                    *o = (T)(r[t] + (add ? (double)*o : 0.0));                       \
                }                                                                    \
            }                                                                        \
            for (; q < nb; q++)                                                      \
                for (int t = 0; t < 2; t++) {                                        \
                    T *o = out + (a + t) * nb + q;                                   \
                    *o = (T)(an_dot_##SUFFIX(t ? x1 : x0, B + q * c, c) + (add ? (double)*o : 0.0)); \
                }                                                                    \
        }                                                                            \
        for (; a < na; a++)                                                          \
            for (long q = 0; q < nb; q++) {                                          \
                T *o = out + a * nb + q;                                             \
                *o = (T)(an_dot_##SUFFIX(A + a * c, B + q * c, c) + (add ? (double)*o : 0.0)); \
            }                                                                        \
    }

DEFINE_SMALL_DOTS(float, vf32, f32)
DEFINE_SMALL_DOTS(double, vf64, f64)

#define DEFINE_BC(T, SUFFIX, SQRT)                                                   \
    /* out[i, :] = sum_j coef[i, j] * rows[j, :] for (r, k) coef and (k, c) rows. */ \
    static void mix_rows_##SUFFIX(const T *coef, const T *rows, long r, long k, long c, \
                                  T *restrict out) {                                 \
        small_gemm_##SUFFIX(coef, k, 1, rows, r, k, c, out);                         \
    }                                                                                \
    /* out[q, :] = sum_i coef[i, q] * rows[i, :] for (r, k) coef and (r, c) rows. */   \
    static void mix_cols_##SUFFIX(const T *coef, const T *rows, long r, long k, long c, \
                                  T *restrict out) {                                 \
        small_gemm_##SUFFIX(coef, 1, k, rows, k, r, c, out);                         \
    }                                                                                \
    int an_tail_fwd_##SUFFIX(const T *lam, const T *wm, const T *bm, const T *m, const T *v, \
                             long b, long c, long k, double eps, T *restrict gamma, \
                             T *restrict scale, T *restrict shift, T *restrict mean, \
                             T *restrict var, T *restrict r) {                       \
        double *acc = calloc(2 * c, sizeof(double));                                 \
        if (acc == NULL) return -1;                                                  \
        mix_rows_##SUFFIX(lam, wm, b, k, c, gamma);                                  \
        mix_rows_##SUFFIX(lam, bm, b, k, c, shift); /* beta, overwritten below */    \
        for (long i = 0; i < b; i++)                                                 \
            for (long j = 0; j < c; j++) acc[j] += m[i * c + j];                     \
        for (long j = 0; j < c; j++) mean[j] = (T)(acc[j] / b);                      \
        for (long i = 0; i < b; i++)                                                 \
            for (long j = 0; j < c; j++) {                                           \
                const T d = m[i * c + j] - mean[j];                                  \
                acc[c + j] += (double)v[i * c + j] + (double)(d * d);                \
            }                                                                        \
        for (long j = 0; j < c; j++) {                                               \
            var[j] = (T)(acc[c + j] / b);                                            \
            r[j] = (T)1 / SQRT(var[j] + (T)eps);                                     \
        }                                                                            \
        for (long i = 0; i < b; i++)                                                 \
            for (long j = 0; j < c; j++) {                                           \
                const T s = gamma[i * c + j] * r[j];                                 \
                scale[i * c + j] = s;                                                \
                shift[i * c + j] -= s * mean[j];                                     \
            }                                                                        \
        free(acc);                                                                   \
        return 0;                                                                    \
    }                                                                                \
    /* g_scale, g_shift may be NULL (zero). Writes g_lam (B, K), g_wm, g_bm (K, C),  \
     * g_m, g_v (B, C); the gradient of beta is g_shift. */                          \
    int an_tail_bwd_##SUFFIX(const T *g_scale, const T *g_shift, const T *lam, const T *wm, \
                             const T *bm, const T *m, const T *mean, const T *gamma, \
                             const T *r, const T *scale, long b, long c, long k,    \
                             T *restrict g_lam, T *restrict g_wm, T *restrict g_bm,  \
                             T *restrict g_m, T *restrict g_v) {                     \
        double *acc = calloc(2 * c, sizeof(double)); /* d/dr, d/dmean (direct) */    \
        T *g_gamma = malloc(sizeof(T) * b * c), *g_beta = malloc(sizeof(T) * (b + 3) * c); \
        if (acc == NULL || g_gamma == NULL || g_beta == NULL) {                      \
            free(acc), free(g_gamma), free(g_beta);                                  \
            return -1;                                                               \
        }                                                                            \
        for (long i = 0; i < b; i++)                                                 \
            for (long j = 0; j < c; j++) {                                           \
                const long q = i * c + j;                                            \
                const T gsh = g_shift ? g_shift[q] : (T)0;                           \
                const T gs = (g_scale ? g_scale[q] : (T)0) - gsh * mean[j];          \
                g_gamma[q] = gs * r[j];                                              \
                g_beta[q] = gsh;                                                     \
                acc[j] += (double)(gs * gamma[q]);                                   \
                acc[c + j] -= (double)(gsh * scale[q]);                              \
            }                                                                        \
        /* per channel, as the batch loop below uses them: g_m's direct term, g_v, and   \
         * g_m's factor of (m - mean) (a division per value of the loop took 40% of the  \
         * call at B 64, C 512) */                                                    \
        T *gm0 = g_beta + b * c, *gv = gm0 + c, *gdm = gv + c;                       \
        for (long j = 0; j < c; j++) {                                               \
            const double rj = r[j], dvar = -0.5 * acc[j] * rj * rj * rj; /* d/dvar */ \
            gm0[j] = (T)(acc[c + j] / b);                                            \
            gv[j] = (T)(dvar / b);                                                   \
            gdm[j] = (T)dvar * (T)(2.0 / b);                                         \
        }                                                                            \
        for (long i = 0; i < b; i++)                                                 \
            for (long j = 0; j < c; j++) {                                           \
                const long q = i * c + j;                                            \
                g_m[q] = gm0[j] + (m[q] - mean[j]) * gdm[j];                         \
                g_v[q] = gv[j];                                                      \
            }                                                                        \
        small_dots_##SUFFIX(g_gamma, wm, b, k, c, 0, g_lam);                         \
        small_dots_##SUFFIX(g_beta, bm, b, k, c, 1, g_lam);                          \
        mix_cols_##SUFFIX(lam, g_gamma, b, k, c, g_wm); /* lam^T @ g_gamma */         \
        mix_cols_##SUFFIX(lam, g_beta, b, k, c, g_bm);                               \
        free(acc), free(g_gamma), free(g_beta);                                      \
        return 0;                                                                    \
    }                                                                                \
    void an_meanstd_fwd_##SUFFIX(const T *mean, const T *var, long n, double bessel,  \
                                 double eps, T *out, T *s) {                         \
        const T bs = (T)bessel, e = (T)eps;                                          \
        for (long q = 0; q < n; q++) {                                               \
            s[q] = (T)1 / SQRT(var[q] * bs + e);                                     \
            out[q] = mean[q] * s[q];                                                 \
        }                                                                            \
    }                                                                                \
    void an_meanstd_bwd_##SUFFIX(const T *g, const T *mean, const T *s, long n,      \
                                 double bessel, T *g_mean, T *g_var) {               \
        const T f = (T)(-0.5 * bessel);                                              \
        for (long q = 0; q < n; q++) {                                               \
            g_mean[q] = g[q] * s[q];                                                 \
            g_var[q] = g[q] * mean[q] * (s[q] * s[q] * s[q]) * f;                    \
        }                                                                            \
    }

#define DEFINE_LINBN(T, SUFFIX, SQRT)                                                \
    int an_linbn_fwd_##SUFFIX(const T *x, const T *w, const T *gw, const T *gb, long b, \
                              long c, long k, double eps, T *z, T *hhat, T *mean, T *var, \
                              T *r) {                                                \
        small_dots_##SUFFIX(x, w, b, k, c, 0, hhat); /* h */                         \
        for (long q = 0; q < k; q++) {                                               \
            double s = 0.0, d = 0.0;                                                 \
            for (long i = 0; i < b; i++) s += hhat[i * k + q];                       \
            const double mu = s / b;                                                 \
            for (long i = 0; i < b; i++) d += (hhat[i * k + q] - mu) * (hhat[i * k + q] - mu); \
            mean[q] = (T)mu;                                                         \
            var[q] = (T)(d / b);                                                     \
            r[q] = (T)1 / SQRT(var[q] + (T)eps);                                     \
        }                                                                            \
        for (long i = 0; i < b; i++)                                                 \
            for (long q = 0; q < k; q++) {                                           \
                const long j = i * k + q;                                            \
                hhat[j] = (hhat[j] - mean[q]) * r[q];                                \
                z[j] = hhat[j] * gw[q] + gb[q];                                      \
            }                                                                        \
        return 0;                                                                    \
    }                                                                                \
    int an_linbn_bwd_##SUFFIX(const T *gz, const T *x, const T *w, const T *gw,       \
                              const T *hhat, const T *r, long b, long c, long k, T *g_x, \
                              T *g_w, T *g_gw, T *g_gb) {                            \
        T *g_h = malloc(sizeof(T) * b * k);                                          \
        if (g_h == NULL) return -1;                                                  \
        for (long q = 0; q < k; q++) {                                               \
            double sg = 0.0, sgh = 0.0;                                              \
            for (long i = 0; i < b; i++) {                                           \
                sg += gz[i * k + q];                                                 \
                sgh += (double)gz[i * k + q] * hhat[i * k + q];                      \
            }                                                                        \
            g_gb[q] = (T)sg;                                                         \
            g_gw[q] = (T)sgh;                                                        \
            const T f = gw[q] * r[q] / (T)b;                                         \
            for (long i = 0; i < b; i++)                                             \
                g_h[i * k + q] = f * ((T)b * gz[i * k + q] - (T)sg - hhat[i * k + q] * (T)sgh); \
        }                                                                            \
        mix_rows_##SUFFIX(g_h, w, b, k, c, g_x); /* g_x = g_h @ W */                 \
        mix_cols_##SUFFIX(g_h, x, b, k, c, g_w); /* g_w = g_h^T @ x */               \
        free(g_h);                                                                   \
        return 0;                                                                    \
    }

/* The one-node training site's (_cpu_site.py) remaining (B, C) steps:
 * an_site_coefs_*: the input gradient dx = g * scale + c * x + d per row, from the moments'
 *     gradients g_m, g_v (the tail's) and the pooled statistic's g_p, which adds
 *     (g_p * s, -bessel / 2 * g_p * m * s^3) for meanstd (pooled = m * s) or (g_p, 0) for the
 *     average (pooled = m): c = 2 g_v / n, d = g_m / n - c * m (mean = sum x / n, var = sum x^2
 *     / n - mean^2); c = 0 where n = 1 (x = mean: the variance's share is 0, and c * x - c * m
 *     would cancel catastrophically, s^3 being ~3e4 there).
 * an_running_*: BatchNorm's running statistics after a batch of `count` values per channel:
 *     the counter (if any) goes up by one; f = momentum, or 1 / counter where momentum < 0
 *     (None: the cumulative average; 0 without a counter); running += f * (batch - running)
 *     as torch.lerp computes it, the variance unbiased by count / (count - 1). */
#define DEFINE_SITE(T, SUFFIX)                                                       \
    void an_site_coefs_##SUFFIX(const T *g_m, const T *g_v, const T *g_p, const T *m,   \
                                const T *s, long rows, long n, double bessel, int meanstd, \
                                T *restrict c, T *restrict d) {                      \
        const T inv_n = (T)(1.0 / (double)n), f = (T)(-0.5 * bessel);                \
        const T two_n = n > 1 ? (T)2 * inv_n : (T)0; /* n = 1: the variance's share is 0 */ \
        if (meanstd)                                                                 \
            for (long i = 0; i < rows; i++) {                                        \
                const T gv = g_v[i] + g_p[i] * m[i] * (s[i] * s[i] * s[i]) * f;      \
                c[i] = gv * two_n;                                                   \
                d[i] = (g_m[i] + g_p[i] * s[i]) * inv_n - c[i] * m[i];               \
            }                                                                        \
        else                                                                         \
            for (long i = 0; i < rows; i++) {                                        \
                c[i] = g_v[i] * two_n;                                               \
                d[i] = (g_m[i] + g_p[i]) * inv_n - c[i] * m[i];                      \
            }                                                                        \
    }                                                                                \
    static inline T lerp_##SUFFIX(T a, T b, T w) {                                   \
        return (w < (T)0.5 && w > (T)-0.5) ? a + w * (b - a) : b - (b - a) * ((T)1 - w); \
    }                                                                                \
    void an_running_##SUFFIX(T *rm, T *rv, long long *counter, const T *mean,         \
                             const T *var, long c, double momentum, double count) {  \
        double f = momentum < 0.0 ? 0.0 : momentum;                                  \
        if (counter != NULL) {                                                       \
            *counter += 1;                                                           \
            if (momentum < 0.0) f = 1.0 / (double)*counter;                          \
        }                                                                            \
        const T w = (T)f, unbias = (T)(count / (count - 1.0));                       \
        for (long j = 0; j < c; j++) {                                               \
            rm[j] = lerp_##SUFFIX(rm[j], mean[j], w);                                \
            rv[j] = lerp_##SUFFIX(rv[j], var[j] * unbias, w);                        \
        }                                                                            \
    }

DEFINE_BC(float, f32, sqrtf)
DEFINE_BC(double, f64, sqrt)
DEFINE_SITE(float, f32)
DEFINE_SITE(double, f64)
DEFINE_LINBN(float, f32, sqrtf)
DEFINE_LINBN(double, f64, sqrt)
