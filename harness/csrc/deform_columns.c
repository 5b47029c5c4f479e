/* Bilinear deformable columns on channels-last data, forward and backward.
 *
 * Compiled at first use by harness/native.py (plain C and OpenMP, no Python or torch headers) and
 * called through ctypes on tensors' data pointers. Layouts, all contiguous:
 *   x      [N, H, W, C]      input, channels last
 *   pos    [N, L, G, K, 2]   absolute sampling position (y, x) of pixel p, offset group g, tap k
 *   mask   [N, L, G, K]      DCNv2 modulation, or NULL
 *   cols   [N, L, K, C]      columns: row (n, p) holds K*C values, tap-major, so that
 *                            cols.view(N*L, K*C) @ weight.permute(0, 2, 3, 1).reshape(O, K*C).T
 *                            is the convolution
 * Sampling follows torchvision's kernel: a position with y < -1, y >= H, x < -1 or x >= W reads 0
 * and has zero gradient; otherwise corners floor(.) and floor(.) + 1 are read, those outside the
 * image as 0. (torchvision reads 0 at exactly y = -1 too, which the corner weights give anyway, but
 * its offset gradient there is the one-sided difference, so -1 counts as inside here.) Channels are
 * the innermost loop, so every gather, scatter and dot product is a contiguous vector loop over C.
 */
#ifndef T
#include <math.h>
#include <stdint.h>
#include <string.h>

#define T float
#define FLOOR floorf
#define NAME(base) base##_f32
#include __FILE__
#undef T
#undef FLOOR
#undef NAME
#define T double
#define FLOOR floor
#define NAME(base) base##_f64
#include __FILE__
#undef T
#undef FLOOR
#undef NAME

#else  /* the kernels, included once per element type T */

typedef struct {
    int64_t off[4];  /* element offset of each corner in one image of x, or -1 outside the image */
    T w[4];          /* bilinear weights of the corners (y0,x0), (y0,x1), (y1,x0), (y1,x1) */
    T lh, lw;        /* fractional parts of y and x */
    int inside;      /* 0: the sample reads zero and has zero gradient */
} NAME(corners_t);

/* In the element type, like torchvision's kernel, so that fp32 results round the same way. */
static inline NAME(corners_t) NAME(corners_of)(T y, T x, int64_t H, int64_t W, int64_t C) {
    NAME(corners_t) r;
    r.inside = !(y < (T)-1 || y >= (T)H || x < (T)-1 || x >= (T)W);
    if (!r.inside) return r;
    const T yf = FLOOR(y), xf = FLOOR(x);
    const int64_t y0 = (int64_t)yf, x0 = (int64_t)xf, y1 = y0 + 1, x1 = x0 + 1;
    r.lh = y - yf;
    r.lw = x - xf;
    const T hh = (T)1 - r.lh, hw = (T)1 - r.lw;
    r.w[0] = hh * hw; r.w[1] = hh * r.lw; r.w[2] = r.lh * hw; r.w[3] = r.lh * r.lw;
    r.off[0] = (y0 >= 0 && x0 >= 0) ? (y0 * W + x0) * C : -1;
    r.off[1] = (y0 >= 0 && x1 <= W - 1) ? (y0 * W + x1) * C : -1;
    r.off[2] = (y1 <= H - 1 && x0 >= 0) ? (y1 * W + x0) * C : -1;
    r.off[3] = (y1 <= H - 1 && x1 <= W - 1) ? (y1 * W + x1) * C : -1;
    return r;
}

void NAME(deform_columns_forward)(
    const T *x, const T *pos, const T *mask, T *cols,
    int64_t N, int64_t H, int64_t W, int64_t C, int64_t L, int64_t G, int64_t K, int threads)
{
    const int64_t cg = C / G;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < N * L; ++row) {
        const T *img = x + (row / L) * H * W * C;
        for (int64_t k = 0; k < K; ++k) {
            for (int64_t g = 0; g < G; ++g) {
                const int64_t at = (row * G + g) * K + k;
                T *restrict o = cols + (row * K + k) * C + g * cg;
                const NAME(corners_t) q = NAME(corners_of)(pos[2 * at], pos[2 * at + 1], H, W, C);
                if (!q.inside) {
                    memset(o, 0, sizeof(T) * cg);
                    continue;
                }
                const T scale = mask ? mask[at] : (T)1;
                T w[4];
                const T *src[4];
                for (int j = 0; j < 4; ++j) {
                    w[j] = q.off[j] >= 0 ? scale * q.w[j] : (T)0;
                    src[j] = img + (q.off[j] >= 0 ? q.off[j] : 0) + g * cg;
                }
                const T *restrict s0 = src[0], *restrict s1 = src[1], *restrict s2 = src[2], *restrict s3 = src[3];
#pragma omp simd
                for (int64_t c = 0; c < cg; ++c)
                    o[c] = w[0] * s0[c] + w[1] * s1[c] + w[2] * s2[c] + w[3] * s3[c];
            }
        }
    }
}

/* grad_x [N, H, W, C] must be zeroed (or NULL); grad_pos [N, L, G, K, 2] and grad_mask [N, L, G, K]
 * are overwritten (or NULL). Each thread takes whole images, so every scatter stays in its own. */
void NAME(deform_columns_backward)(
    const T *x, const T *pos, const T *mask, const T *dcols, T *grad_x, T *grad_pos, T *grad_mask,
    int64_t N, int64_t H, int64_t W, int64_t C, int64_t L, int64_t G, int64_t K, int threads)
{
    const int64_t cg = C / G;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        const T *img = x + n * H * W * C;
        T *gimg = grad_x ? grad_x + n * H * W * C : 0;
        for (int64_t p = 0; p < L; ++p) {
            const int64_t row = n * L + p;
            for (int64_t k = 0; k < K; ++k) {
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t at = (row * G + g) * K + k;
                    const T *restrict d = dcols + (row * K + k) * C + g * cg;
                    const NAME(corners_t) q = NAME(corners_of)(pos[2 * at], pos[2 * at + 1], H, W, C);
                    if (!q.inside) {
                        if (grad_pos) grad_pos[2 * at] = grad_pos[2 * at + 1] = 0;
                        if (grad_mask) grad_mask[at] = 0;
                        continue;
                    }
                    const T scale = mask ? mask[at] : (T)1;
                    if (gimg) {
                        for (int j = 0; j < 4; ++j) {
                            if (q.off[j] < 0) continue;
                            const T wj = scale * q.w[j];
                            T *restrict dst = gimg + q.off[j] + g * cg;
#pragma omp simd
                            for (int64_t c = 0; c < cg; ++c) dst[c] += wj * d[c];
                        }
                    }
                    if (grad_pos || grad_mask) {
                        /* corners outside the image read 0: their pointer is valid, their factor 0 */
                        const T m0 = q.off[0] >= 0, m1 = q.off[1] >= 0, m2 = q.off[2] >= 0, m3 = q.off[3] >= 0;
                        const int64_t base = g * cg;
                        const T *restrict s0 = img + (q.off[0] >= 0 ? q.off[0] : 0) + base;
                        const T *restrict s1 = img + (q.off[1] >= 0 ? q.off[1] : 0) + base;
                        const T *restrict s2 = img + (q.off[2] >= 0 ? q.off[2] : 0) + base;
                        const T *restrict s3 = img + (q.off[3] >= 0 ? q.off[3] : 0) + base;
                        const T lh = q.lh, lw = q.lw, hh = (T)1 - q.lh, hw = (T)1 - q.lw;
                        T sy = 0, sx = 0, sv = 0;
                        if (cg >= 32) {  /* a vector reduction only pays for its final horizontal sums here */
#pragma omp simd reduction(+:sy, sx, sv)
                            for (int64_t c = 0; c < cg; ++c) {
                                const T a = m0 * s0[c], b = m1 * s1[c], e = m2 * s2[c], f = m3 * s3[c];
                                sy += d[c] * (hw * (e - a) + lw * (f - b));
                                sx += d[c] * (hh * (b - a) + lh * (f - e));
                                sv += d[c] * (hh * hw * a + hh * lw * b + lh * hw * e + lh * lw * f);
                            }
                        } else {
                            for (int64_t c = 0; c < cg; ++c) {
                                const T a = m0 * s0[c], b = m1 * s1[c], e = m2 * s2[c], f = m3 * s3[c];
                                sy += d[c] * (hw * (e - a) + lw * (f - b));
                                sx += d[c] * (hh * (b - a) + lh * (f - e));
                                sv += d[c] * (hh * hw * a + hh * lw * b + lh * hw * e + lh * lw * f);
                            }
                        }
                        if (grad_pos) {
                            grad_pos[2 * at] = scale * sy;
                            grad_pos[2 * at + 1] = scale * sx;
                        }
                        if (grad_mask) grad_mask[at] = sv;
                    }
                }
            }
        }
    }
}

#endif
