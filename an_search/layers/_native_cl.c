/* Channels-last kernels of Attentive Normalization (compiled with _native.c by _native.py).
 *
 * A channels-last map (torch.channels_last, channels_last_3d) holds each sample as an (n, C)
 * array, channels contiguous: the per-channel reductions run down its columns, four vectors of
 * channels at a time, and the affine pass multiplies vectors of channels by vectors of scales.
 * ATen's reductions over such a map's positions are not vectorised (linalg.vector_norm over
 * the positions of a channels-last 512x7x7 map took 3.7 ms, 14x BatchNorm2d's evaluation).
 *
 * an_moments_cl_*: per-(sample, channel) mean and biased variance of a (B, n, C) array.
 * an_affine_cl_*, an_affine_grad_cl_*, an_row_dots_cl_*: the training path's passes, as
 *                  _native.c's row-wise kernels (per (sample, channel) coefficients):
 *                  y = x * a + t; y = g * a + x * c + d; sum(g * x) and sum(g).
 * an_eval_cl_*:    a whole AttentiveNorm(BatchNorm) site in evaluation mode, sample by sample,
 *                  as an_eval_* (_native.c) for (B, C, n) maps: moments, the shared per-sample
 *                  head and mixtures (an_sample_scale_shift_*), then y = x * a + t while the
 *                  sample is still in cache.
 *
 * With AVX-512 (AN_WIDE) the column blocks, the affine passes and the dots run in 64-byte
 * vectors first, then 32-byte ones, then column by column: side by side with the 32-byte-only
 * kernels (bench/native_ab.py --channels-last, batch 32), evaluation 0.88-0.93x from 64x56 to
 * 512x7 and the training step 0.91-0.98x.
 *
 * Numerics as the row kernels': sums of x - s, s an estimate of the channel's mean (the mean
 * of four of its values), in the kernel's dtype over CL_PB positions at a time, folded into
 * double; a channel whose shifted mean^2 exceeds 4x its variance (where the one-pass formula
 * could cancel), or whose variance is not >= 0 (NaN), is summed again two-pass in double.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

#include "_native_head.h"
#include "_native_vec.h"

#define CL_PB 64          /* positions summed in the kernel's dtype before folding into double */
#define CL_PAR (1L << 16) /* values of a lone sample from which its passes take threads */
#define CL_U 4            /* vectors of channels a column block holds */

/* Outputs of at least CL_STREAM_MIN_BYTES are written with streaming stores (no read of each
 * output line before it is written, as _native.c's eval kernel does) where every position's
 * C values start on a vector boundary: each sample's (n, C) block is written whole, line by
 * line. Each thread fences its streamed stores before its parallel region ends. The training
 * passes (y = x * a + t forward, the input's gradient backward) stream too: side by side,
 * the training step took 0.75-0.91x the time of unstreamed passes from 64x56 to 512x7 (batch
 * 32, bench/native_ab.py --channels-last --modes train). */
#define CL_STREAM_MIN_BYTES (1L << 20)
#ifdef HAVE_AVX2
static inline void cl_stream_f32(float *p, vf32 v) { _mm256_stream_ps(p, (__m256)v); }
static inline void cl_stream_f64(double *p, vf64 v) { _mm256_stream_pd(p, (__m256d)v); }
static void cl_fence(int stream) {
    if (stream) _mm_sfence();
}
static int cl_streams(const void *y, long total, long c, long size) {
    return total * size >= CL_STREAM_MIN_BYTES && (c * size) % 32 == 0 && ((uintptr_t)y & 31) == 0;
}
#else
static inline void cl_stream_f32(float *p, vf32 v) { memcpy(p, &v, sizeof(v)); }
static inline void cl_stream_f64(double *p, vf64 v) { memcpy(p, &v, sizeof(v)); }
static void cl_fence(int stream) { (void)stream; }
static int cl_streams(const void *y, long total, long c, long size) {
    (void)y, (void)total, (void)c, (void)size;
    return 0;
}
#endif

/* 64-byte vectors (AN_WIDE): streamed where the output and every position's C values start on
 * a 64-byte line (cl_wide). Without AVX-512, vw32 is vf32 and no wide loop runs. */
#if AN_WIDE
static inline void cl_stream_w32(float *p, vw32 v) { _mm512_stream_ps(p, (__m512)v); }
static inline void cl_stream_w64(double *p, vw64 v) { _mm512_stream_pd(p, (__m512d)v); }
#else
#define cl_stream_w32 cl_stream_f32
#define cl_stream_w64 cl_stream_f64
#endif
static inline int cl_wide(const void *y, long c, long size, int stream) {
    return AN_WIDE && (!stream || ((c * size) % 64 == 0 && ((uintptr_t)y & 63) == 0));
}

/* The rule above, for the tests. */
int an_cl_streams(const void *y, long total, long c, long size) {
    return cl_streams(y, total, c, size);
}

/* Two-pass mean and biased variance, in double, of column j of an (n, C) sample. */
#define DEFINE_CL_TWO_PASS(T, SUFFIX)                                                \
    static void cl_two_pass_##SUFFIX(const T *x, long n, long c, long j, double *mean, \
                                     double *var) {                                  \
        double t = 0.0, d = 0.0;                                                     \
        for (long p = 0; p < n; p++) t += x[p * c + j];                              \
        const double mu = t / (double)n;                                             \
        for (long p = 0; p < n; p++) {                                               \
            const double e = (double)x[p * c + j] - mu;                              \
            d += e * e;                                                              \
        }                                                                            \
        *mean = mu;                                                                  \
        *var = d / (double)n;                                                        \
    }

/* Moments of the CL_U * W columns from j0 of an (n, C) sample into mean[j], var[j]. */
#define DEFINE_CL_BLOCK(T, V, SUFFIX, NAME)                                          \
    static void cl_block_##NAME(const T *x, long n, long c, long j0, double *mean,   \
                                double *var) {                                       \
        enum { W = sizeof(V) / sizeof(T), CB = CL_U * W };                           \
        const long at[4] = {0, n / 4, n / 2, 3 * n / 4};                             \
        V sh[CL_U], a1[CL_U], a2[CL_U];                                              \
        double s1[CB], s2[CB];                                                       \
        for (int u = 0; u < CL_U; u++) {                                             \
            V acc = {0}, v;                                                          \
            for (int q = 0; q < 4; q++) {                                            \
                memcpy(&v, x + at[q] * c + j0 + u * W, sizeof(v));                   \
                acc += v;                                                            \
            }                                                                        \
            sh[u] = acc * (T)0.25;                                                   \
        }                                                                            \
        for (int i = 0; i < CB; i++) s1[i] = s2[i] = 0.0;                            \
        for (long p0 = 0; p0 < n; p0 += CL_PB) {                                     \
            const long p1 = p0 + CL_PB < n ? p0 + CL_PB : n;                         \
            for (int u = 0; u < CL_U; u++) a1[u] = a2[u] = (V){0};                   \
            for (long p = p0; p < p1; p++) {                                         \
                const T *r = x + p * c + j0;                                         \
                for (int u = 0; u < CL_U; u++) {                                     \
                    V v;                                                             \
                    memcpy(&v, r + u * W, sizeof(v));                                \
                    v -= sh[u];                                                      \
                    a1[u] += v;                                                      \
                    a2[u] += v * v;                                                  \
                }                                                                    \
            }                                                                        \
            for (int u = 0; u < CL_U; u++)                                           \
                for (int q = 0; q < W; q++) {                                        \
                    s1[u * W + q] += (double)a1[u][q];                               \
                    s2[u * W + q] += (double)a2[u][q];                               \
                }                                                                    \
        }                                                                            \
        const double inv_n = 1.0 / (double)n;                                        \
        for (int i = 0; i < CB; i++) {                                               \
            const long j = j0 + i;                                                   \
            const double m = s1[i] * inv_n, v = s2[i] * inv_n - m * m;               \
            if (4.0 * v >= m * m && v >= 0.0) {                                      \
                mean[j] = (double)sh[i / W][i % W] + m;                              \
                var[j] = v;                                                          \
            } else {                                                                 \
                cl_two_pass_##SUFFIX(x, n, c, j, mean + j, var + j);                 \
            }                                                                        \
        }                                                                            \
    }

/* Moments of columns [j0, j1) of an (n, C) sample: whole blocks from j0, the rest (C not a
 * multiple of a block) two-pass column by column. */
#define DEFINE_CL_COLUMNS(T, V, VW, SUFFIX, WIDE)                                    \
    static void cl_columns_##SUFFIX(const T *x, long n, long c, long j0, long j1,    \
                                    double *mean, double *var) {                     \
        enum { CB = CL_U * (sizeof(V) / sizeof(T)), CBW = CL_U * (sizeof(VW) / sizeof(T)) }; \
        long j = j0;                                                                 \
        for (; AN_WIDE && j + CBW <= j1; j += CBW) cl_block_##WIDE(x, n, c, j, mean, var); \
        for (; j + CB <= j1; j += CB) cl_block_##SUFFIX(x, n, c, j, mean, var);      \
        for (; j < j1; j++) cl_two_pass_##SUFFIX(x, n, c, j, mean + j, var + j);     \
    }

/* cl_affine's loop over the channels [j, ...) of position p in vectors of type VEC while one
 * fits, each stored by STORE where `stream`, else plainly; one prefetch of `ahead` a line. */
#define CL_AFFINE_VECTORS(T, VEC, STORE)                                             \
    for (const long n_ = sizeof(VEC) / sizeof(T); j + n_ <= c; j += n_) {            \
        VEC v, va, vt;                                                               \
        if (ahead && (n_ >= LINE || (p * c + j) % LINE == 0))                        \
            __builtin_prefetch(ahead + p * c + j);                                   \
        memcpy(&v, xr + j, sizeof(v));                                               \
        memcpy(&va, a + j, sizeof(va));                                              \
        memcpy(&vt, t + j, sizeof(vt));                                              \
        v = v * va + vt;                                                             \
        if (stream)                                                                  \
            STORE(yr + j, v);                                                        \
        else                                                                         \
            memcpy(yr + j, &v, sizeof(v));                                           \
    }

/* y = x * a + t over positions [p0, p1) of an (n, C) sample, a and t per channel; where
 * `ahead` is not NULL, each line of x read here asks for the same line of `ahead` (the next
 * sample, which the moments read next, a column block at a time: strides of C values that the
 * hardware prefetcher did not follow). */
#define DEFINE_CL_AFFINE(T, V, VW, SUFFIX, WIDE)                                     \
    static void cl_affine_##SUFFIX(const T *x, T *y, long p0, long p1, long c, const T *a, \
                                   const T *t, int stream, const T *ahead) {         \
        enum { LINE = 64 / sizeof(T) };                                              \
        const int wide = cl_wide(y, c, sizeof(T), stream);                           \
        for (long p = p0; p < p1; p++) {                                             \
            const T *xr = x + p * c;                                                 \
            T *yr = y + p * c;                                                       \
            long j = 0;                                                              \
            if (wide) CL_AFFINE_VECTORS(T, VW, cl_stream_##WIDE);                    \
            CL_AFFINE_VECTORS(T, V, cl_stream_##SUFFIX);                             \
            for (; j < c; j++) yr[j] = xr[j] * a[j] + t[j];                          \
        }                                                                            \
    }

/* One sample's moments with the team's threads over column blocks (a lone sample). */
#define DEFINE_CL_SAMPLE_MOMENTS(T, V, SUFFIX)                                       \
    static void cl_sample_moments_##SUFFIX(const T *xs, long n, long c, double *mean, \
                                           double *var, int threads) {               \
        enum { CB = CL_U * (sizeof(V) / sizeof(T)) };                                \
        const long blocks = (c + CB - 1) / CB;                                       \
        const int par = n * c >= CL_PAR;                                             \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(par)")    \
        for (long g = 0; g < blocks; g++) {                                          \
            const long j1 = (g + 1) * CB < c ? (g + 1) * CB : c;                     \
            cl_columns_##SUFFIX(xs, n, c, g * CB, j1, mean, var);                    \
        }                                                                            \
    }

/* Samples in parallel when there are at least as many as threads, each in its thread's
 * workspace (WS_STRIDE doubles); otherwise one sample at a time, its column blocks and then
 * its positions shared by the threads. Returns 0, or -1 when the workspace's malloc fails
 * (nothing written). */
#define DEFINE_CL_EVAL(T, V, SUFFIX)                                                 \
    int an_eval_cl_##SUFFIX(const an_head *h, const T *x, T *y, long b, long c, long n, \
                            int threads) {                                           \
        const long stride = WS_STRIDE(h, c);                                         \
        const int per_sample = b >= threads;                                         \
        const int stream = cl_streams(y, b * n * c, c, sizeof(T));                   \
        double *ws = malloc(sizeof(double) * stride * (per_sample ? threads : 1));   \
        if (ws == NULL) return -1;                                                   \
        if (per_sample) {                                                            \
            _Pragma("omp parallel num_threads(threads)")                             \
            {                                                                        \
                const int tid = omp_get_thread_num(), nth = omp_get_num_threads();   \
                const long s0 = b * tid / nth, s1 = b * (tid + 1) / nth;             \
                double *w = ws + tid * stride;                                       \
                for (long s = s0; s < s1; s++) {                                     \
                    const T *xs = x + s * n * c;                                     \
                    cl_columns_##SUFFIX(xs, n, c, 0, c, w, w + c);                   \
                    an_sample_scale_shift_##SUFFIX(h, w, c, n);                      \
                    cl_affine_##SUFFIX(xs, y + s * n * c, 0, n, c, (const T *)w,     \
                                       (const T *)(w + c), stream,                   \
                                       s + 1 < s1 ? xs + n * c : NULL);              \
                }                                                                    \
                cl_fence(stream);                                                    \
            }                                                                        \
            free(ws);                                                                \
            return 0;                                                                \
        }                                                                            \
        for (long s = 0; s < b; s++) {                                               \
            const T *xs = x + s * n * c;                                             \
            T *ys = y + s * n * c;                                                   \
            cl_sample_moments_##SUFFIX(xs, n, c, ws, ws + c, threads);               \
            an_sample_scale_shift_##SUFFIX(h, ws, c, n);                             \
            const T *a = (const T *)ws, *t = (const T *)(ws + c);                    \
            const int par = n * c >= CL_PAR;                                         \
            _Pragma("omp parallel num_threads(threads) if(par)")                     \
            {                                                                        \
                _Pragma("omp for schedule(static)")                                  \
                for (long p = 0; p < n; p += CL_PB)                                  \
                    cl_affine_##SUFFIX(xs, ys, p, p + CL_PB < n ? p + CL_PB : n, c, a, t, \
                                       stream, NULL);                                \
                cl_fence(stream);                                                    \
            }                                                                        \
        }                                                                            \
        free(ws);                                                                    \
        return 0;                                                                    \
    }

/* Moments of every (sample, channel) of a (B, n, C) array into (B, C) arrays of its dtype:
 * samples in parallel where there are enough, else each sample's column blocks. */
#define DEFINE_CL_MOMENTS(T, V, SUFFIX)                                              \
    int an_moments_cl_##SUFFIX(const T *x, long b, long n, long c, T *mean, T *var,  \
                               int threads) {                                        \
        double *ws = malloc(sizeof(double) * 2 * c * (b >= threads ? threads : 1));  \
        if (ws == NULL) return -1;                                                   \
        if (b >= threads) {                                                          \
            _Pragma("omp parallel num_threads(threads)")                             \
            {                                                                        \
                double *w = ws + 2 * c * omp_get_thread_num();                       \
                _Pragma("omp for schedule(static)")                                  \
                for (long s = 0; s < b; s++) {                                       \
                    cl_columns_##SUFFIX(x + s * n * c, n, c, 0, c, w, w + c);        \
                    for (long j = 0; j < c; j++)                                     \
                        mean[s * c + j] = (T)w[j], var[s * c + j] = (T)w[c + j];     \
                }                                                                    \
            }                                                                        \
        } else {                                                                     \
            for (long s = 0; s < b; s++) {                                           \
                cl_sample_moments_##SUFFIX(x + s * n * c, n, c, ws, ws + c, threads); \
                for (long j = 0; j < c; j++)                                         \
                    mean[s * c + j] = (T)ws[j], var[s * c + j] = (T)ws[c + j];       \
            }                                                                        \
        }                                                                            \
        free(ws);                                                                    \
        return 0;                                                                    \
    }

/* sum(g * x) and sum(g) down the CL_U * W columns from j of one (n, C) sample, in the kernel's
 * dtype over CL_PB positions, folded into double. */
#define DEFINE_CL_DOTS_BLOCK(T, V, NAME)                                             \
    static void cl_dots_block_##NAME(const T *g, const T *x, long n, long c, long j, \
                                     T *sgx, T *sg) {                                \
        enum { W = sizeof(V) / sizeof(T), U = CL_U, CB = U * W };                    \
        double dgx[CB], dg[CB];                                                      \
        for (int i = 0; i < CB; i++) dgx[i] = dg[i] = 0.0;                           \
        for (long p0 = 0; p0 < n; p0 += CL_PB) {                                     \
            const long p1 = p0 + CL_PB < n ? p0 + CL_PB : n;                         \
            V agx[U], ag[U];                                                         \
            for (int u = 0; u < U; u++) agx[u] = ag[u] = (V){0};                     \
            for (long p = p0; p < p1; p++)                                           \
                for (int u = 0; u < U; u++) {                                        \
                    V vg, vx;                                                        \
                    memcpy(&vg, g + p * c + j + u * W, sizeof(vg));                  \
                    memcpy(&vx, x + p * c + j + u * W, sizeof(vx));                  \
                    agx[u] += vg * vx;                                               \
                    ag[u] += vg;                                                     \
                }                                                                    \
            for (int i = 0; i < CB; i++) {                                           \
                dgx[i] += (double)agx[i / W][i % W];                                 \
                dg[i] += (double)ag[i / W][i % W];                                   \
            }                                                                        \
        }                                                                            \
        for (int i = 0; i < CB; i++) sgx[j + i] = (T)dgx[i], sg[j + i] = (T)dg[i];   \
    }

/* cl_affine_grad's loop over the channels [j, ...) of position o in vectors of type VEC while
 * one fits, each stored by STORE where `stream`, else plainly. */
#define CL_GRAD_VECTORS(T, VEC, STORE)                                               \
    for (const long n_ = sizeof(VEC) / sizeof(T); j + n_ <= c; j += n_) {           \
        VEC vg, vx, va, vc, vd;                                                      \
        memcpy(&vg, g + o + j, sizeof(vg));                                          \
        memcpy(&vx, x + o + j, sizeof(vx));                                          \
        memcpy(&va, a + j, sizeof(va));                                              \
        memcpy(&vc, cc + j, sizeof(vc));                                             \
        memcpy(&vd, dd + j, sizeof(vd));                                             \
        vg = vg * va + (vx * vc + vd);                                               \
        if (stream)                                                                  \
            STORE(y + o + j, vg);                                                    \
        else                                                                         \
            memcpy(y + o + j, &vg, sizeof(vg));                                      \
    }

/* The training passes. The elementwise ones split the work into (sample, CL_PB positions)
 * pieces over the threads; the row dots take column ranges, as the moments. */
#define DEFINE_CL_TRAIN(T, V, VW, SUFFIX, WIDE)                                      \
    /* y = g * a + (x * cc + dd) over positions [p0, p1) of one sample; `stream` as      \
     * cl_affine's. */                                                               \
    static void cl_affine_grad_##SUFFIX(const T *g, const T *x, T *y, long p0, long p1, \
                                        long c, const T *a, const T *cc, const T *dd, \
                                        int stream) {                                \
        const int wide = cl_wide(y, c, sizeof(T), stream);                           \
        for (long p = p0; p < p1; p++) {                                             \
            const long o = p * c;                                                    \
            long j = 0;                                                              \
            if (wide) CL_GRAD_VECTORS(T, VW, cl_stream_##WIDE);                      \
            CL_GRAD_VECTORS(T, V, cl_stream_##SUFFIX);                               \
            for (; j < c; j++) y[o + j] = g[o + j] * a[j] + (x[o + j] * cc[j] + dd[j]); \
        }                                                                            \
    }                                                                                \
    /* y = x * a + t (g NULL) or y = g * a + (x * t + dd), per (sample, channel) a, t, dd; \
     * outputs of CL_STREAM_MIN_BYTES up written with streaming stores, as evaluation's. */ \
    static void cl_elementwise_##SUFFIX(const T *g, const T *x, const T *a, const T *t, \
                                        const T *dd, T *y, long b, long n, long c,   \
                                        int threads) {                               \
        const long pieces = (n + CL_PB - 1) / CL_PB;                                 \
        const int par = b * n * c >= CL_PAR;                                         \
        const int stream = cl_streams(y, b * n * c, c, sizeof(T));                   \
        _Pragma("omp parallel num_threads(threads) if(par)")                         \
        {                                                                            \
            _Pragma("omp for schedule(static)")                                      \
            for (long k = 0; k < b * pieces; k++) {                                  \
                const long s = k / pieces, p0 = k % pieces * CL_PB;                  \
                const long p1 = p0 + CL_PB < n ? p0 + CL_PB : n, o = s * n * c;      \
                if (g == NULL)                                                       \
                    cl_affine_##SUFFIX(x + o, y + o, p0, p1, c, a + s * c, t + s * c, stream, \
                                       NULL);                                        \
                else                                                                 \
                    cl_affine_grad_##SUFFIX(g + o, x + o, y + o, p0, p1, c, a + s * c, \
                                            t + s * c, dd + s * c, stream);          \
            }                                                                        \
            cl_fence(stream);                                                        \
        }                                                                            \
    }                                                                                \
    void an_affine_cl_##SUFFIX(const T *x, const T *a, const T *t, T *y, long b, long n, \
                               long c, int threads) {                                \
        cl_elementwise_##SUFFIX(NULL, x, a, t, NULL, y, b, n, c, threads);           \
    }                                                                                \
    void an_affine_grad_cl_##SUFFIX(const T *g, const T *x, const T *a, const T *cc, \
                                    const T *dd, T *y, long b, long n, long c, int threads) { \
        cl_elementwise_##SUFFIX(g, x, a, cc, dd, y, b, n, c, threads);               \
    }                                                                                \
    /* Column sums of g * x and g over the positions of one sample, columns [j0, j1): blocks \
     * of wide vectors, then of plain ones, then the rest one by one. */            \
    static void cl_dots_##SUFFIX(const T *g, const T *x, long n, long c, long j0, long j1, \
                                 T *sgx, T *sg) {                                    \
        enum { CB = CL_U * (sizeof(V) / sizeof(T)), CBW = CL_U * (sizeof(VW) / sizeof(T)) }; \
        long j = j0;                                                                 \
        for (; AN_WIDE && j + CBW <= j1; j += CBW) cl_dots_block_##WIDE(g, x, n, c, j, sgx, sg); \
        for (; j + CB <= j1; j += CB) cl_dots_block_##SUFFIX(g, x, n, c, j, sgx, sg); \
        for (; j < j1; j++) {                                                        \
            double dgx = 0.0, dg = 0.0;                                              \
            for (long p = 0; p < n; p++) {                                           \
                dgx += (double)g[p * c + j] * (double)x[p * c + j];                  \
                dg += (double)g[p * c + j];                                          \
            }                                                                        \
            sgx[j] = (T)dgx, sg[j] = (T)dg;                                          \
        }                                                                            \
    }                                                                                \
    void an_row_dots_cl_##SUFFIX(const T *g, const T *x, T *sgx, T *sg, long b, long n, \
                                 long c, int threads) {                              \
        const int par = b * n * c >= CL_PAR;                                         \
        _Pragma("omp parallel num_threads(threads) if(par)")                         \
        {                                                                            \
            const long t = omp_get_thread_num(), nt = omp_get_num_threads();         \
            const long w = sizeof(V) / sizeof(T), vecs = c / w; /* whole vectors */  \
            const long j0 = vecs * t / nt * w, j1 = t + 1 == nt ? c : vecs * (t + 1) / nt * w; \
            for (long s = 0; s < b; s++) { /* each thread a range of columns */     \
                cl_dots_##SUFFIX(g + s * n * c, x + s * n * c, n, c, j0, j1,         \
                                 sgx + s * c, sg + s * c);                           \
            }                                                                        \
        }                                                                            \
    }

#define DEFINE_CL(T, V, VW, SUFFIX, WIDE)    \
    DEFINE_CL_TWO_PASS(T, SUFFIX)            \
    DEFINE_CL_BLOCK(T, V, SUFFIX, SUFFIX)    \
    DEFINE_CL_BLOCK(T, VW, SUFFIX, WIDE)     \
    DEFINE_CL_COLUMNS(T, V, VW, SUFFIX, WIDE) \
    DEFINE_CL_AFFINE(T, V, VW, SUFFIX, WIDE) \
    DEFINE_CL_SAMPLE_MOMENTS(T, V, SUFFIX)   \
    DEFINE_CL_EVAL(T, V, SUFFIX)             \
    DEFINE_CL_MOMENTS(T, V, SUFFIX)          \
    DEFINE_CL_DOTS_BLOCK(T, V, SUFFIX)       \
    DEFINE_CL_DOTS_BLOCK(T, VW, WIDE)        \
    DEFINE_CL_TRAIN(T, V, VW, SUFFIX, WIDE)

DEFINE_CL(float, vf32, vw32, f32, w32)
DEFINE_CL(double, vf64, vw64, f64, w64)
