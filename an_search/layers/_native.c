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
 * its variance (where the one-pass formula could cancel) is redone two-pass in double, mean
 * and variance, while it is still in cache.
 * Threads: OpenMP, the runtime torch already loaded (libgomp.so.1 is shared by soname).
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>

#define BLOCK 512

/* GCC/Clang vector extensions: 32-byte vectors, lowered to whatever the CPU has. */
typedef float vf32 __attribute__((vector_size(32)));
typedef double vf64 __attribute__((vector_size(32)));

/* Pairwise horizontal sums (short dependency chains). */
static inline double hsum_vf32(vf32 v) {
    float a = (v[0] + v[4]) + (v[1] + v[5]), b = (v[2] + v[6]) + (v[3] + v[7]);
    return (double)a + (double)b;
}
static inline double hsum_vf64(vf64 v) { return (v[0] + v[2]) + (v[1] + v[3]); }

#define DEFINE_ROW_MOMENTS(T, V, NAME)                                               \
    static void NAME(const T *p, long n, double *mean, double *var) {                \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        /* shift by a cheap estimate of the mean: four values across the row */      \
        const T s = (T)(((double)p[0] + p[n / 4] + p[n / 2] + p[3 * n / 4]) * 0.25); \
        V vs;                                                                        \
        for (int l = 0; l < W; l++) vs[l] = s;                                       \
        double s1 = 0.0, s2 = 0.0;                                                   \
        for (long i = 0; i < n; i += BLOCK) {                                        \
            long end = i + BLOCK < n ? i + BLOCK : n;                                \
            V a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};                                \
            long j = i;                                                              \
            for (; j + 2 * W <= end; j += 2 * W) {                                   \
                V u, w;                                                              \
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
        double m = s1 * inv_n, v = s2 * inv_n - m * m;                               \
        double mu = (double)s + m;                                                   \
        if (!(v * 4.0 >= m * m) || v < 0.0) { /* cancellation (or NaN): two-pass */  \
            double c = 0.0, t = 0.0;                                                 \
            for (long j = 0; j < n; j++) t += p[j];                                  \
            mu = t * inv_n;                                                          \
            for (long j = 0; j < n; j++) {                                           \
                double d = (double)p[j] - mu;                                        \
                c += d * d;                                                          \
            }                                                                        \
            v = c / n;                                                               \
        }                                                                            \
        *mean = mu;                                                                  \
        *var = v;                                                                    \
    }

DEFINE_ROW_MOMENTS(float, vf32, row_moments_f32)
DEFINE_ROW_MOMENTS(double, vf64, row_moments_f64)

#define DEFINE_MOMENTS(T, SUFFIX)                                                    \
    void an_moments_##SUFFIX(const T *x, long rows, long n, T *mean, T *var,         \
                             int threads) {                                          \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")            \
        for (long r = 0; r < rows; r++) {                                            \
            double m, v;                                                             \
            row_moments_##SUFFIX(x + r * n, n, &m, &v);                              \
            mean[r] = (T)m;                                                          \
            var[r] = (T)v;                                                           \
        }                                                                            \
    }

DEFINE_MOMENTS(float, f32)
DEFINE_MOMENTS(double, f64)

/* Head description: up to two folded linear layers z = (W h) * s + b, ReLU between them,
 * an optional GroupNorm(1, K) after the last, then a gate. */
typedef struct {
    int pool;          /* 0: mean / sqrt(var_unbiased + pool_eps), 1: mean */
    double pool_eps;
    int layers;        /* 1 or 2 */
    long hidden;       /* outputs of layer 1 (K when layers == 1) */
    long k;
    const double *w1, *s1, *b1; /* (hidden, C), (hidden), (hidden) */
    const double *w2, *s2, *b2; /* (K, hidden), (K), (K) */
    int gn;            /* GroupNorm(1, K) on the logits */
    double gn_eps;
    const double *gn_w, *gn_b;
    int gate;          /* 0: hard-sigmoid, 1: sigmoid, 2: softmax */
    const double *mix_a, *mix_t; /* (K, C) folded mixtures */
} an_head;

static void linear(const double *w, const double *s, const double *b, const double *in,
                   long nin, long nout, double *out) {
    for (long o = 0; o < nout; o++) {
        const double *row = w + o * nin;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (long i = 0; i < nin; i++) acc += row[i] * in[i];
        out[o] = acc * s[o] + b[o];
    }
}

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

/* lambda (K) from the per-channel moments of one sample; ws holds hidden + K doubles. */
static void attention(const an_head *h, const double *mean, const double *var, long c,
                      long n, double *pooled, double *ws, double *lam) {
    double bessel = n > 1 ? (double)n / (double)(n - 1) : 1.0;
    const double eps = h->pool_eps;
    if (h->pool == 0)
        for (long i = 0; i < c; i++) pooled[i] = mean[i] / sqrt(var[i] * bessel + eps);
    else
        for (long i = 0; i < c; i++) pooled[i] = mean[i];
    if (h->layers == 1) {
        linear(h->w1, h->s1, h->b1, pooled, c, h->k, lam);
    } else {
        linear(h->w1, h->s1, h->b1, pooled, c, h->hidden, ws);
        for (long i = 0; i < h->hidden; i++) ws[i] = ws[i] > 0.0 ? ws[i] : 0.0;
        linear(h->w2, h->s2, h->b2, ws, h->hidden, h->k, lam);
    }
    gate(h, lam);
}

/* Scale and shift (C each) from lambda and the folded mixtures. */
static void mixture(const an_head *h, const double *lam, long c, double *scale, double *shift) {
    for (long i = 0; i < c; i++) scale[i] = shift[i] = 0.0;
    for (long j = 0; j < h->k; j++) {
        const double l = lam[j], *a = h->mix_a + j * c, *t = h->mix_t + j * c;
        for (long i = 0; i < c; i++) {
            scale[i] += l * a[i];
            shift[i] += l * t[i];
        }
    }
}

/* One sample's workspace w holds 3C + K + hidden doubles: its moments (mean, variance),
 * overwritten by the scale and shift computed from them; pooled; lambda; hidden. */
static void sample_scale_shift(const an_head *h, double *w, long c, long n) {
    double *mean = w, *var = w + c, *pooled = w + 2 * c, *lam = w + 3 * c;
    attention(h, mean, var, c, n, pooled, lam + h->k, lam);
    mixture(h, lam, c, mean, var); /* scale -> w[0, C), shift -> w[C, 2C) */
}

#define DEFINE_ROWS_AFFINE(T, SUFFIX)                                                \
    static void rows_affine_##SUFFIX(const T *x, T *y, long n, double a, double t) { \
        const T a_ = (T)a, t_ = (T)t;                                                \
        for (long j = 0; j < n; j++) y[j] = x[j] * a_ + t_;                          \
    }

DEFINE_ROWS_AFFINE(float, f32)
DEFINE_ROWS_AFFINE(double, f64)

/* Samples run in parallel when there are at least as many as threads (each thread writes
 * sample s while it reads sample s + 1); otherwise each sample's rows do. */
#define DEFINE_EVAL(T, SUFFIX)                                                       \
    void an_eval_##SUFFIX(const an_head *h, const T *x, T *y, long b, long c, long n, \
                          double *ws, long ws_stride, int threads) {                 \
        if (b >= threads) {                                                          \
            _Pragma("omp parallel num_threads(threads)")                             \
            {                                                                        \
                int tid = omp_get_thread_num(), nth = omp_get_num_threads();         \
                long s0 = b * tid / nth, s1 = b * (tid + 1) / nth;                   \
                for (long i = 0; s0 < s1 && i < c; i++)                              \
                    row_moments_##SUFFIX(x + (s0 * c + i) * n, n, ws + s0 * ws_stride + i, \
                                         ws + s0 * ws_stride + c + i);               \
                for (long s = s0; s < s1; s++) {                                     \
                    const T *xs = x + s * c * n, *xn = xs + c * n;                   \
                    T *ys = y + s * c * n;                                           \
                    double *w = ws + s * ws_stride, *wn = w + ws_stride;             \
                    sample_scale_shift(h, w, c, n);                                  \
                    for (long i = 0; i < c; i++) {                                   \
                        rows_affine_##SUFFIX(xs + i * n, ys + i * n, n, w[i], w[c + i]); \
                        if (s + 1 < s1)                                              \
                            row_moments_##SUFFIX(xn + i * n, n, wn + i, wn + c + i); \
                    }                                                                \
                }                                                                    \
            }                                                                        \
            return;                                                                  \
        }                                                                            \
        for (long s = 0; s < b; s++) {                                               \
            const T *xs = x + s * c * n;                                             \
            T *ys = y + s * c * n;                                                   \
            double *w = ws + s * ws_stride;                                          \
            _Pragma("omp parallel for schedule(static) num_threads(threads)")        \
            for (long i = 0; i < c; i++)                                             \
                row_moments_##SUFFIX(xs + i * n, n, w + i, w + c + i);               \
            sample_scale_shift(h, w, c, n);                                          \
            _Pragma("omp parallel for schedule(static) num_threads(threads)")        \
            for (long i = 0; i < c; i++)                                             \
                rows_affine_##SUFFIX(xs + i * n, ys + i * n, n, w[i], w[c + i]);     \
        }                                                                            \
    }

DEFINE_EVAL(float, f32)
DEFINE_EVAL(double, f64)

/* Per-row affine maps of a (rows, n) array, per-row coefficients (threads over rows):
 * an_affine_*:      y = x * a[r] + t[r]
 * an_affine_grad_*: y = g * a[r] + x * c[r] + d[r]   (AN's input gradient, one pass)
 * an_row_dots_*:    sgx[r] = sum(g * x), sg[r] = sum(g)   (gradients of a and t) */
#define DEFINE_ROWWISE(T, V, SUFFIX)                                                 \
    void an_affine_##SUFFIX(const T *x, const T *a, const T *t, T *y, long rows,     \
                            long n, int threads) {                                   \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")            \
        for (long r = 0; r < rows; r++)                                              \
            rows_affine_##SUFFIX(x + r * n, y + r * n, n, a[r], t[r]);               \
    }                                                                                \
    void an_affine_grad_##SUFFIX(const T *g, const T *x, const T *a, const T *c,     \
                                 const T *d, T *y, long rows, long n, int threads) { \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")            \
        for (long r = 0; r < rows; r++) {                                            \
            const T a_ = a[r], c_ = c[r], d_ = d[r];                                 \
            const T *gr = g + r * n, *xr = x + r * n;                                \
            T *dst = y + r * n;                                                      \
            for (long j = 0; j < n; j++) dst[j] = gr[j] * a_ + xr[j] * c_ + d_;      \
        }                                                                            \
    }                                                                                \
    void an_row_dots_##SUFFIX(const T *g, const T *x, T *sgx, T *sg, long rows,      \
                              long n, int threads) {                                 \
        enum { W = sizeof(V) / sizeof(T) };                                          \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")            \
        for (long r = 0; r < rows; r++) {                                            \
            const T *gr = g + r * n, *xr = x + r * n;                                \
            double s1 = 0.0, s2 = 0.0;                                               \
            for (long i = 0; i < n; i += BLOCK) {                                    \
                long end = i + BLOCK < n ? i + BLOCK : n, j = i;                     \
                V a1 = {0}, a2 = {0};                                                \
                for (; j + W <= end; j += W) {                                       \
                    V u, w;                                                          \
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
