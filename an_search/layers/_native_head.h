/* The folded attention head both eval kernels (_native.c, _native_cl.c) take, mirrored by
 * HeadSpec in _native.py, and the per-sample step they share. */
#ifndef AN_NATIVE_HEAD_H
#define AN_NATIVE_HEAD_H

/* Head description: up to two folded linear layers z = (W h) * s + b, ReLU between them,
 * an optional GroupNorm(1, K) after the last, then a gate. */
typedef struct {
    int pool;          /* 0: mean / sqrt(var_unbiased + pool_eps), 1: mean */
    double pool_eps;
    int layers;        /* 1 or 2 */
    long hidden;       /* outputs of layer 1 (K when layers == 1) */
    long k;
    const void *w1;             /* (hidden, C), kernel dtype */
    const double *s1, *b1;      /* (hidden), (hidden) */
    const void *w2;             /* (K, hidden), kernel dtype */
    const double *s2, *b2;      /* (K), (K) */
    int gn;            /* GroupNorm(1, K) on the logits */
    double gn_eps;
    const double *gn_w, *gn_b;
    int gate;          /* 0: hard-sigmoid, 1: sigmoid, 2: softmax */
    const void *mix;   /* folded mixtures, (ceil(C / MIX_BLOCK), K, 2, MIX_BLOCK), kernel dtype */
} an_head;

/* Doubles of one sample's workspace (see sample_scale_shift in _native.c). */
#define WS_STRIDE(h, c) (3 * (c) + (h)->k + 2 * (h)->hidden)

/* From the sample's moments in w (C means, then C biased variances, double): its scale and
 * shift, C values each of the kernel's dtype, at w and w + C. */
void an_sample_scale_shift_f32(const an_head *h, double *w, long c, long n);
void an_sample_scale_shift_f64(const an_head *h, double *w, long c, long n);

#endif
