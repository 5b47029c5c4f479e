/* Bilinear deformable columns on channels-last data, forward and backward.
 *
 * Compiled at first use by harness/kernels/native.py (plain C and OpenMP, no Python or torch headers) and
 * called through ctypes on tensors' data pointers. Layouts, all contiguous:
 *   x      [N, H, W, C]      input, channels last, contiguous
 *   cols   [N, L, K, C]      columns, contiguous: row (n, p) of the L = Ho*Wo output pixels holds K*C
 *                            values, tap-major, so that
 *                            cols.view(N*L, K*C) @ weight.permute(0, 2, 3, 1).reshape(O, K*C).T
 *                            is the convolution
 *   offset [N, 2*G*K, Ho, Wo] torchvision's layout, any strides: channel 2*(g*K + k) is the dy of
 *                            offset group g, tap k = i*KW + j, the next one its dx
 *   mask   [N, G*K, Ho, Wo]  DCNv2 modulation, any strides, or NULL
 * Tap k of output pixel (oy, ox) samples y = oy*sh - ph + i*dh + dy, x = ox*sw - pw + j*dw + dx,
 * formed here in the element type (one rounding, as base + offset in PyTorch would be), so the
 * offset is read where the predictor wrote it: no position tensor, no layout copies.
 * Sampling follows torchvision's kernel: a position with y < -1, y >= H, x < -1 or x >= W reads 0
 * and has zero gradient; otherwise corners floor(.) and floor(.) + 1 are read, those outside the
 * image as 0. (torchvision reads 0 at exactly y = -1 too, which the corner weights give anyway, but
 * its offset gradient there is the one-sided difference, so -1 counts as inside here.) Channels are
 * the innermost loop, so every gather, scatter and dot product is a contiguous vector loop over C.
 */
#ifndef T
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Shape, geometry and the strides (in elements) of the offset, the mask and their gradients;
 * mirrored by harness.kernels.native.Geometry. */
typedef struct {
    int64_t n, h, w, c, ho, wo, groups, kh, kw, sh, sw, ph, pw, dh, dw;
    int64_t offset[4], mask[4], grad_offset[4], grad_mask[4];  /* strides of dims N, channel, y, x */
} geometry_t;

/* Offsets, masks and their gradients move through a per-thread tile of TILE output pixels,
 * channel-major ([channel][pixel]: contiguous vector loops on both sides of each copy). Reading them
 * in place instead, one pixel at a time, walks 2*G*K planes at once: their stride, a multiple of 4 KiB
 * at the usual sizes, maps every plane to the same L1 set, and measured slower than the copy it saved. */
#define TILE 64

/* Element index in a strided [N, channels, Ho, Wo] tensor of channel 0 at each of `count` output
 * pixels from `row` (= n*L + p); returns whether they are evenly spaced, stride[3] apart (all in one
 * image, rows not padded: NCHW and channels-last tensors), so that a tile's copies can be plain loops. */
static int tile_index(const int64_t *stride, const geometry_t *geo, int64_t row, int64_t count, int64_t *where) {
    const int64_t L = geo->ho * geo->wo;
    int64_t n = row / L, oy = row % L / geo->wo, ox = row % L % geo->wo;  /* then counted, not divided */
    for (int64_t i = 0; i < count; ++i) {
        where[i] = n * stride[0] + oy * stride[2] + ox * stride[3];
        if (++ox == geo->wo) {
            ox = 0;
            if (++oy == geo->ho) {
                oy = 0;
                ++n;
            }
        }
    }
    return stride[2] == geo->wo * stride[3] && row / L == (row + count - 1) / L;
}

/* Called by every thread of a parallel region with its own buffer: whether all of them got theirs
 * (a barrier). The same answer on every thread, so a work-shared loop can be skipped as a whole. */
static int all_allocated(const void *mine, int *failed) {
    if (!mine) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int any;
#pragma omp atomic read
    any = *failed;
    return !any;
}

/* What one sample's backward computes; each combination gets its own inlined loop. */
enum { GRAD_X = 1, GRAD_POS = 2, GRAD_VALUE = 4, COLUMNS = 8 };

/* A shuffle of two vectors by constant indices: __builtin_shufflevector in clang and GCC 12 on, the
 * older __builtin_shuffle with an index vector before (GCC 11 is still common). */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (NAME(index16)){__VA_ARGS__})
#endif

/* REGISTER16: 16 elements of T are one vector register, so that code in 16-lane GCC vector types
 * compiles to plain register arithmetic: fp32 with AVX-512. Elsewhere GCC splits such vectors, badly
 * (fp32 on AVX2: the fused kernel 35x and the backward 5x slower than without them; fp64 on AVX-512:
 * the backward 2x slower), so those builds keep the plain loops.
 * FUSED_LANES: the fused convolution's vector width in floats, one register (16 with AVX-512, 8 with
 * AVX2 and FMA), or 0: no fused kernel (and fp64 has none). */
#define T float
#define INDEX int32_t
#define FLOOR floorf
#define NAME(base) base##_f32
#ifdef __AVX512F__
#define REGISTER16 1
#define FUSED_LANES 16
#else
#define REGISTER16 0
#if defined(__AVX2__) && defined(__FMA__)
#define FUSED_LANES 8
#else
#define FUSED_LANES 0
#endif
#endif
#include __FILE__
#undef REGISTER16
#undef FUSED_LANES
#undef T
#undef INDEX
#undef FLOOR
#undef NAME
#define T double
#define INDEX int64_t
#define FLOOR floor
#define NAME(base) base##_f64
#define REGISTER16 0
#define FUSED_LANES 0
#include __FILE__
#undef REGISTER16
#undef FUSED_LANES
#undef T
#undef INDEX
#undef FLOOR
#undef NAME

#else  /* the kernels, included once per element type T */

#if REGISTER16
typedef T NAME(vec16) __attribute__((vector_size(16 * sizeof(T))));
typedef INDEX NAME(index16) __attribute__((vector_size(16 * sizeof(T))));  /* for SHUFFLE before GCC 12 */

static inline __attribute__((always_inline)) NAME(vec16) NAME(load16)(const T *p) {
    NAME(vec16) v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void NAME(store16)(T *p, const NAME(vec16) *v) { memcpy(p, v, sizeof *v); }

/* dst[j * dst_stride + i] = src[i * src_stride + j] for a 16 x 16 block, in vector registers: at each
 * scale b = 8, 4, 2, 1 rows r and r + b swap their off-diagonal b x b blocks (a two-vector shuffle
 * each), which transposes the whole block. 4-6x faster than the element loop, which GCC leaves scalar. */
static inline __attribute__((always_inline)) void NAME(transpose16)(const T *src, int64_t src_stride, T *dst,
                                                                    int64_t dst_stride) {
    NAME(vec16) r[16];
    for (int i = 0; i < 16; ++i) r[i] = NAME(load16)(src + i * src_stride);
#define SWAP_BLOCKS(b, ...)                                                                     \
    for (int i = 0; i < 16; ++i)                                                                \
        if (!(i & b)) {                                                                         \
            const NAME(vec16) top = r[i], bottom = r[i + b];                                    \
            r[i] = SHUFFLE(top, bottom, __VA_ARGS__);                                           \
            r[i + b] = SHUFFLE(top, bottom, SHIFTED_##b);                                       \
        }
#define SHIFTED_8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define SHIFTED_4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define SHIFTED_2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define SHIFTED_1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
    SWAP_BLOCKS(8, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
    SWAP_BLOCKS(4, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
    SWAP_BLOCKS(2, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
    SWAP_BLOCKS(1, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
#undef SWAP_BLOCKS
#undef SHIFTED_8
#undef SHIFTED_4
#undef SHIFTED_2
#undef SHIFTED_1
    for (int i = 0; i < 16; ++i) NAME(store16)(dst + i * dst_stride, &r[i]);
}
#endif

/* tile[ch][i] = src[n, ch, oy, ox] at each pixel i of a tile (see TILE); even: tile_index's answer.
 * Evenly spaced pixels are copied with the source's inner dimension innermost: memcpy per channel for
 * NCHW, a transpose of contiguous pixel rows for channels-last (as the offset predictor writes its
 * output; a gather per element there was 5-14 % of the kernel), in 16 x 16 register blocks with
 * AVX-512 (18 or 27 predictor channels: one block and a remainder of 2 or 11 rows). */
static void NAME(load_tile)(const T *src, const int64_t *stride, const int64_t *where, int even, int64_t count,
                            int64_t channels, T *restrict tile) {
    const int64_t s1 = stride[1], s3 = stride[3];
    if (even && s3 == 1) {
        for (int64_t ch = 0; ch < channels; ++ch) memcpy(tile + ch * count, src + where[0] + ch * s1, sizeof(T) * count);
    } else if (even && s1 < s3) {
        const T *restrict from = src + where[0];
        int64_t done = 0;
#if REGISTER16
        if (s1 == 1) {  /* channels-last: 16 x 16 blocks in registers, the rest below */
            done = count / 16 * 16;
            for (int64_t ch = 0; ch + 16 <= channels; ch += 16)
                for (int64_t i = 0; i < done; i += 16) NAME(transpose16)(from + i * s3 + ch, s3, tile + ch * count + i, count);
            for (int64_t ch = channels / 16 * 16; ch < channels; ++ch)
                for (int64_t i = 0; i < done; ++i) tile[ch * count + i] = from[i * s3 + ch];
        }
#endif
        for (int64_t i = done; i < count; ++i)
            for (int64_t ch = 0; ch < channels; ++ch) tile[ch * count + i] = from[i * s3 + ch * s1];
    } else {
        for (int64_t ch = 0; ch < channels; ++ch)
            for (int64_t i = 0; i < count; ++i) tile[ch * count + i] = src[ch * s1 + where[i]];
    }
}

static void NAME(store_tile)(T *dst, const int64_t *stride, const int64_t *where, int even, int64_t count,
                             int64_t channels, const T *restrict tile) {
    const int64_t s1 = stride[1], s3 = stride[3];
    if (even && s3 == 1) {
        for (int64_t ch = 0; ch < channels; ++ch) memcpy(dst + where[0] + ch * s1, tile + ch * count, sizeof(T) * count);
    } else if (even && s1 < s3) {
        T *restrict to = dst + where[0];
        int64_t done = 0;
#if REGISTER16
        if (s1 == 1) {
            done = count / 16 * 16;
            for (int64_t ch = 0; ch + 16 <= channels; ch += 16)
                for (int64_t i = 0; i < done; i += 16) NAME(transpose16)(tile + ch * count + i, count, to + i * s3 + ch, s3);
            for (int64_t ch = channels / 16 * 16; ch < channels; ++ch)
                for (int64_t i = 0; i < done; ++i) to[i * s3 + ch] = tile[ch * count + i];
        }
#endif
        for (int64_t i = done; i < count; ++i)
            for (int64_t ch = 0; ch < channels; ++ch) to[i * s3 + ch * s1] = tile[ch * count + i];
    } else {
        for (int64_t ch = 0; ch < channels; ++ch)
            for (int64_t i = 0; i < count; ++i) dst[ch * s1 + where[i]] = tile[ch * count + i];
    }
}

/* pos[2*ch][i], pos[2*ch + 1][i] = y, x of sample ch = g*K + k (tap k of offset group g) at output
 * pixel row0 + i, in the offset's own channel order: its undeformed position plus its offset. The
 * undeformed parts are whole numbers, exact in T, so this is the one rounding of
 * (T)(oy*sh - ph + i*dh) + dy. */
static void NAME(tile_positions)(const T *offset, const geometry_t *geo, int64_t row0, int64_t count,
                                 int64_t *where, T *restrict pos) {
    const int64_t L = geo->ho * geo->wo, K = geo->kh * geo->kw;
    T by[TILE], bx[TILE];
    const int even = tile_index(geo->offset, geo, row0, count, where);
    NAME(load_tile)(offset, geo->offset, where, even, count, 2 * geo->groups * K, pos);
    int64_t oy = (row0 % L) / geo->wo, ox = (row0 % L) % geo->wo;
    for (int64_t i = 0; i < count; ++i) {
        by[i] = (T)(oy * geo->sh - geo->ph);
        bx[i] = (T)(ox * geo->sw - geo->pw);
        if (++ox == geo->wo) {
            ox = 0;
            if (++oy == geo->ho) oy = 0;
        }
    }
    for (int64_t g = 0; g < geo->groups; ++g)
        for (int64_t ki = 0; ki < geo->kh; ++ki)
            for (int64_t kj = 0; kj < geo->kw; ++kj) {
                const int64_t ch = g * K + ki * geo->kw + kj;
                const T ty = (T)(ki * geo->dh), tx = (T)(kj * geo->dw);
                T *restrict py = pos + 2 * ch * count, *restrict px = py + count;
                for (int64_t i = 0; i < count; ++i) {
                    py[i] = (by[i] + ty) + py[i];
                    px[i] = (bx[i] + tx) + px[i];
                }
            }
}

/* A tile's positions, and its mask values (scales[ch][i]) when there is a mask. */
static void NAME(load_pixels)(const T *offset, const T *mask, const geometry_t *geo, int64_t row0, int64_t count,
                              int64_t *where, T *pos, T *scales) {
    NAME(tile_positions)(offset, geo, row0, count, where, pos);
    if (mask) {
        const int even = tile_index(geo->mask, geo, row0, count, where);
        NAME(load_tile)(mask, geo->mask, where, even, count, geo->groups * geo->kh * geo->kw, scales);
    }
}

/* The corners of a tile's samples (`samples` channels of `count` pixels, positions as tile_positions
 * writes them), in loops the compiler vectorises across pixels (a scalar function per sample, with its
 * branches, cost a third of the forward). Sample s = ch*count + i. off[4*s + j]: the element
 * offset in its image of corner j = (y0,x0), (y0,x1), (y1,x0), (y1,x1) of sample s, or -1 for a
 * corner outside the image (all four for a sample outside); w[4*s + j]: its bilinear weight times the
 * sample's scale, 0 where off is -1; lh, lw: the fractional parts of y and x. Computed in the element
 * type, like torchvision's kernel, so that fp32 results round the same way. Offsets are int32: the
 * caller checks that an image has fewer than 2^31 elements. */
static void NAME(tile_corners)(const T *restrict pos, const T *restrict scales, int64_t samples, int64_t count,
                               int64_t H, int64_t W, int64_t C, int32_t *restrict off, T *restrict w,
                               T *restrict lh_out, T *restrict lw_out) {
    const T Hf = (T)H, Wf = (T)W;
    const int32_t wc = (int32_t)(W * C), c = (int32_t)C;
    for (int64_t ch = 0; ch < samples; ++ch)
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
        const int64_t s = ch * count + i;
        const T y = pos[2 * ch * count + i], x = pos[(2 * ch + 1) * count + i];
        /* every condition a 0/1 factor of type T: with mixed int and float masks GCC does not vectorise */
        const T in = (y >= (T)-1 ? (T)1 : (T)0) * (y < Hf ? (T)1 : (T)0)
                   * (x >= (T)-1 ? (T)1 : (T)0) * (x < Wf ? (T)1 : (T)0);
        const T yc = in != (T)0 ? y : (T)0, xc = in != (T)0 ? x : (T)0;  /* finite: the conversions below */
        const T yf = FLOOR(yc), xf = FLOOR(xc);
        const T lh = yc - yf, lw = xc - xf, hh = (T)1 - lh, hw = (T)1 - lw;
        /* inside, y0 >= -1 and x0 >= -1, so y1 and x1 need only their upper bound */
        const T top = in * (yf >= (T)0 ? (T)1 : (T)0), bottom = in * (yf + (T)1 <= Hf - (T)1 ? (T)1 : (T)0);
        const T left = xf >= (T)0 ? (T)1 : (T)0, right = xf + (T)1 <= Wf - (T)1 ? (T)1 : (T)0, sc = scales[s];
        const int32_t at = (int32_t)yf * wc + (int32_t)xf * c;
        const T k0 = top * left, k1 = top * right, k2 = bottom * left, k3 = bottom * right;
        off[4 * s + 0] = k0 != (T)0 ? at : -1;
        off[4 * s + 1] = k1 != (T)0 ? at + c : -1;
        off[4 * s + 2] = k2 != (T)0 ? at + wc : -1;
        off[4 * s + 3] = k3 != (T)0 ? at + wc + c : -1;
        w[4 * s + 0] = sc * (k0 * (hh * hw));
        w[4 * s + 1] = sc * (k1 * (hh * lw));
        w[4 * s + 2] = sc * (k2 * (lh * hw));
        w[4 * s + 3] = sc * (k3 * (lh * lw));
        lh_out[s] = lh;
        lw_out[s] = lw;
    }
}

/* A thread's tile buffers, in one malloc: positions (2S), mask values (S, all 1 without a mask),
 * corner weights (4S), fractional parts (2S), a zero row, and for backward the positions' and mask's
 * gradients (3S) and 4 scratch rows; then the corner offsets (4S int32). S = TILE * G*K samples.
 * base is NULL when the allocation failed. */
typedef struct {
    T *base, *pos, *scales, *wt, *lh, *lw, *zeros, *grad_pos, *grad_scales, *scratch;
    int32_t *off;
} NAME(tile_t);

static NAME(tile_t) NAME(tile_alloc)(int64_t GK, int64_t cg, int grads, int ones) {
    const int64_t S = TILE * GK;
    NAME(tile_t) b = {0};
    T *p = malloc(sizeof(T) * (9 * S + cg + (grads ? 3 * S + 4 * cg : 0)) + sizeof(int32_t) * 4 * S);
    if (!p) return b;
    b.base = b.pos = p;
    b.scales = p + 2 * S;
    b.wt = b.scales + S;
    b.lh = b.wt + 4 * S;
    b.lw = b.lh + S;
    b.zeros = b.lw + S;
    T *next = b.zeros + cg;
    if (grads) {
        b.grad_pos = next;
        b.grad_scales = b.grad_pos + 2 * S;
        b.scratch = b.grad_scales + S;
        next = b.scratch + 4 * cg;
    }
    b.off = (int32_t *)next;
    memset(b.zeros, 0, sizeof(T) * cg);
    if (ones)
        for (int64_t s = 0; s < S; ++s) b.scales[s] = 1;
    return b;
}

static inline __attribute__((always_inline)) void NAME(sample_forward)(const T *const *src, const T *w, T *restrict o,
                                                                       int64_t cg) {
    const T *restrict s0 = src[0], *restrict s1 = src[1], *restrict s2 = src[2], *restrict s3 = src[3];
#pragma omp simd
    for (int64_t c = 0; c < cg; ++c) o[c] = w[0] * s0[c] + w[1] * s1[c] + w[2] * s2[c] + w[3] * s3[c];
}

/* The columns of a tile's `count` output pixels from row0 (corners in tb, from tile_corners), as rows
 * of ld elements from dst: row i holds K*C values, tap-major. */
static void NAME(forward_tile)(const T *x, const geometry_t *geo, const NAME(tile_t) *tb, int64_t row0, int64_t count,
                               T *dst, int64_t ld) {
    const int64_t H = geo->h, W = geo->w, C = geo->c, G = geo->groups, K = geo->kh * geo->kw;
    const int64_t L = geo->ho * geo->wo, cg = C / G;
    for (int64_t i = 0; i < count; ++i) {
        const T *img = x + (row0 + i) / L * H * W * C;
        for (int64_t k = 0; k < K; ++k) {
            for (int64_t g = 0; g < G; ++g) {
                const int64_t at = (g * K + k) * count + i;
                T *restrict o = dst + i * ld + k * C + g * cg;
                T w[4];
                const T *src[4];
                for (int j = 0; j < 4; ++j) {
                    const int32_t q = tb->off[4 * at + j];
                    w[j] = tb->wt[4 * at + j];
                    src[j] = q >= 0 ? img + q + g * cg : tb->zeros;
                }
                /* 3 (RGB) and 16 channels: loops of constant length, fully unrolled */
                if (cg == 3) NAME(sample_forward)(src, w, o, 3);
                else if (cg == 16) NAME(sample_forward)(src, w, o, 16);
                else NAME(sample_forward)(src, w, o, cg);
            }
        }
    }
}

/* Returns 0, or 1 when a thread's tile buffer could not be allocated (nothing is written then). */
int NAME(deform_columns_forward)(const T *x, const T *offset, const T *mask, T *cols, const geometry_t *geo,
                                 int threads)
{
    const int64_t H = geo->h, W = geo->w, C = geo->c, G = geo->groups, K = geo->kh * geo->kw;
    const int64_t L = geo->ho * geo->wo, cg = C / G, GK = G * K, rows = geo->n * L;
    const int64_t tiles = (rows + TILE - 1) / TILE;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const NAME(tile_t) tb = NAME(tile_alloc)(GK, cg, 0, !mask);
        int64_t where[TILE];
        const int64_t work = all_allocated(tb.base, &failed) ? tiles : 0;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < work; ++t) {
            const int64_t row0 = t * TILE, count = row0 + TILE <= rows ? TILE : rows - row0;
            NAME(load_pixels)(offset, mask, geo, row0, count, where, tb.pos, tb.scales);
            NAME(tile_corners)(tb.pos, tb.scales, GK, count, H, W, C, tb.off, tb.wt, tb.lh, tb.lw);
            NAME(forward_tile)(x, geo, &tb, row0, count, cols + row0 * K * C, K * C);
        }
        free(tb.base);
    }
    return failed;
}

/* One sample's backward over its channel vector. s0..s3: the corners' values (a zero row for a
 * corner outside the image); g0..g3: where their gradients go (a scratch row outside), weights
 * v0..v3 (scale times the bilinear weight, 0 outside). sums: dL/dy, dL/dx (GRAD_POS) and dL/dvalue
 * (GRAD_VALUE, for the mask), before the mask's scale. col (COLUMNS): where the sample's column
 * values go; it may be d itself (each channel's d is read before its column value is written).
 * Multiples of 16 channels go to sample_backward_blocks below. Otherwise, at 32 or more channels one
 * vector loop does it all; below that, a vector loop per corner and a scalar reduction measured faster
 * (1.2-1.3x at 3 channels): the horizontal sums of a vector reduction then cost more than the few
 * products they save. */
static inline __attribute__((always_inline)) void NAME(sample_backward)(
    const T *restrict s0, const T *restrict s1, const T *restrict s2, const T *restrict s3,
    T *restrict g0, T *restrict g1, T *restrict g2, T *restrict g3, const T *d, T *col,
    const T v0, const T v1, const T v2, const T v3, const T lh, const T lw, int64_t cg, const int what,
    T *sums)
{
    const T hh = (T)1 - lh, hw = (T)1 - lw;
    const T w0 = hh * hw, w1 = hh * lw, w2 = lh * hw, w3 = lh * lw;
    T sy = 0, sx = 0, sv = 0;
    if (cg >= 32) {
#pragma omp simd reduction(+:sy, sx, sv)
        for (int64_t c = 0; c < cg; ++c) {
            const T dc = d[c];
            if (what & GRAD_X) {
                g0[c] += v0 * dc;
                g1[c] += v1 * dc;
                g2[c] += v2 * dc;
                g3[c] += v3 * dc;
            }
            const T a = s0[c], b = s1[c], e = s2[c], f = s3[c];
            if (what & GRAD_POS) {
                sy += dc * (hw * (e - a) + lw * (f - b));
                sx += dc * (hh * (b - a) + lh * (f - e));
            }
            if (what & GRAD_VALUE) sv += dc * (w0 * a + w1 * b + w2 * e + w3 * f);
            if (what & COLUMNS) col[c] = v0 * a + v1 * b + v2 * e + v3 * f;
        }
    } else {
        if (what & GRAD_X) {
            T *const g[4] = {g0, g1, g2, g3};
            const T v[4] = {v0, v1, v2, v3};
            for (int j = 0; j < 4; ++j) {
                T *restrict dst = g[j];
#pragma omp simd
                for (int64_t c = 0; c < cg; ++c) dst[c] += v[j] * d[c];
            }
        }
        if (what & (GRAD_POS | GRAD_VALUE)) {
            for (int64_t c = 0; c < cg; ++c) {
                const T dc = d[c], a = s0[c], b = s1[c], e = s2[c], f = s3[c];
                if (what & GRAD_POS) {
                    sy += dc * (hw * (e - a) + lw * (f - b));
                    sx += dc * (hh * (b - a) + lh * (f - e));
                }
                if (what & GRAD_VALUE) sv += dc * (w0 * a + w1 * b + w2 * e + w3 * f);
            }
        }
        if (what & COLUMNS) {  /* last: col may be d */
#pragma omp simd
            for (int64_t c = 0; c < cg; ++c) col[c] = v0 * s0[c] + v1 * s1[c] + v2 * s2[c] + v3 * s3[c];
        }
    }
    sums[0] = sy; sums[1] = sx; sums[2] = sv;
}

#if REGISTER16
/* sample_backward for a multiple of 16 channels, in blocks of 16 in GCC vector types (REGISTER16: AVX-512
 * registers): whole-vector scatter and column store, the sums kept as vectors and
 * reduced once per sample by halving shuffles. Against sample_backward's loops: 16 channels 1.1x,
 * 32 channels 1.1-1.25x faster (the backward kernel alone, with and without the input's gradient). */

/* (sum of a, sum of b) by halving: [a0..7 | b0..7] + [a8..15 | b8..15], then within each half */
static inline __attribute__((always_inline)) void NAME(sum16_pair)(const NAME(vec16) *pa, const NAME(vec16) *pb, T *sa,
                                                                    T *sb) {
    const NAME(vec16) a = *pa, b = *pb;
    NAME(vec16) u = SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
                  + SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    u += SHUFFLE(u, u, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    u += SHUFFLE(u, u, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    u += SHUFFLE(u, u, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    *sa = u[0];
    *sb = u[8];
}

static inline __attribute__((always_inline)) void NAME(sample_backward_blocks)(
    const T *restrict s0, const T *restrict s1, const T *restrict s2, const T *restrict s3,
    T *restrict g0, T *restrict g1, T *restrict g2, T *restrict g3, const T *d, T *col,
    const T v0, const T v1, const T v2, const T v3, const T lh, const T lw, int64_t cg, const int what, T *sums)
{
    const T hh = (T)1 - lh, hw = (T)1 - lw;
    const T w0 = hh * hw, w1 = hh * lw, w2 = lh * hw, w3 = lh * lw;
    NAME(vec16) ty = {0}, tx = {0}, tv = {0};  /* set by the first block */
    for (int64_t c = 0; c < cg; c += 16) {  /* cg: a multiple of 16 */
        const NAME(vec16) dc = NAME(load16)(d + c);
        if (what & GRAD_X) {
            NAME(vec16) sum;
            sum = NAME(load16)(g0 + c) + v0 * dc;
            NAME(store16)(g0 + c, &sum);
            sum = NAME(load16)(g1 + c) + v1 * dc;
            NAME(store16)(g1 + c, &sum);
            sum = NAME(load16)(g2 + c) + v2 * dc;
            NAME(store16)(g2 + c, &sum);
            sum = NAME(load16)(g3 + c) + v3 * dc;
            NAME(store16)(g3 + c, &sum);
        }
        const NAME(vec16) a = NAME(load16)(s0 + c), b = NAME(load16)(s1 + c);
        const NAME(vec16) e = NAME(load16)(s2 + c), f = NAME(load16)(s3 + c);
        if (what & COLUMNS) {
            const NAME(vec16) value = v0 * a + v1 * b + v2 * e + v3 * f;
            NAME(store16)(col + c, &value);
        }
        /* the first block starts the sums (adding it to zeros would cost an add: -0 + 0 is not -0) */
        const NAME(vec16) py = dc * (hw * (e - a) + lw * (f - b)), px = dc * (hh * (b - a) + lh * (f - e));
        const NAME(vec16) pv = dc * (w0 * a + w1 * b + w2 * e + w3 * f);
        if (what & GRAD_POS) {
            ty = c ? ty + py : py;
            tx = c ? tx + px : px;
        }
        if (what & GRAD_VALUE) tv = c ? tv + pv : pv;
    }
    T sy = 0, sx = 0, sv = 0, unused;
    if (what & GRAD_POS) NAME(sum16_pair)(&ty, &tx, &sy, &sx);
    if (what & GRAD_VALUE) NAME(sum16_pair)(&tv, &tv, &sv, &unused);
    sums[0] = sy; sums[1] = sx; sums[2] = sv;
}
#endif

/* What a tile's samples read and write in backward_tile. */
typedef struct {
    const T *img, *dcols, *wt, *lh, *lw, *scales, *zeros;
    T *gimg, *scratch, *cols, *grad_pos, *grad_scales;
    const int32_t *off;
    int64_t row0, count, K, G, C;
    int64_t first, ld;  /* dcols and cols hold rows first.. at ld elements each (K*C, or padded) */
} NAME(tile_backward_t);

/* The backward of every sample of a tile, in one loop with constant flags and (at 3 and 16 channels)
 * a constant channel count, so that no flag or length is tested per sample. */
static inline __attribute__((always_inline)) void NAME(backward_tile)(const NAME(tile_backward_t) *t,
                                                                      const int what, const int64_t cg) {
    const int64_t count = t->count, K = t->K;
    for (int64_t i = 0; i < count; ++i)
        for (int64_t k = 0; k < K; ++k)
            for (int64_t g = 0; g < t->G; ++g) {
                const int64_t at = (g * K + k) * count + i, ch = g * K + k, base = g * cg;
                const int64_t at_cols = (t->row0 - t->first + i) * t->ld + k * t->C + base;
                const T *s[4];
                T *gx[4];
                for (int j = 0; j < 4; ++j) {
                    const int32_t q = t->off[4 * at + j];
                    s[j] = q >= 0 ? t->img + q + base : t->zeros;
                    gx[j] = (what & GRAD_X) && q >= 0 ? t->gimg + q + base : t->scratch + j * cg;
                }
                const T *v = t->wt + 4 * at, *d = t->dcols + at_cols;
                T *col = (what & COLUMNS) ? t->cols + at_cols : 0;
                T sums[3] = {0, 0, 0};
#if REGISTER16
                if (cg % 16 == 0)
                    NAME(sample_backward_blocks)(s[0], s[1], s[2], s[3], gx[0], gx[1], gx[2], gx[3], d, col, v[0],
                                                 v[1], v[2], v[3], t->lh[at], t->lw[at], cg, what, sums);
                else
#endif
                    NAME(sample_backward)(s[0], s[1], s[2], s[3], gx[0], gx[1], gx[2], gx[3], d, col, v[0], v[1],
                                          v[2], v[3], t->lh[at], t->lw[at], cg, what, sums);
                if (what & GRAD_POS) {
                    t->grad_pos[2 * ch * count + i] = t->scales[at] * sums[0];
                    t->grad_pos[(2 * ch + 1) * count + i] = t->scales[at] * sums[1];
                }
                if (what & GRAD_VALUE) t->grad_scales[at] = sums[2];
            }
}

/* A tile's offset and mask gradients (as backward_tile left them in tb) to grad_offset and grad_mask,
 * each where given. */
static void NAME(store_gradients)(T *grad_offset, T *grad_mask, const geometry_t *geo, const NAME(tile_t) *tb,
                                  int64_t row0, int64_t count, int64_t *where) {
    const int64_t GK = geo->groups * geo->kh * geo->kw;
    if (grad_offset) {
        const int even = tile_index(geo->grad_offset, geo, row0, count, where);
        NAME(store_tile)(grad_offset, geo->grad_offset, where, even, count, 2 * GK, tb->grad_pos);
    }
    if (grad_mask) {
        const int even = tile_index(geo->grad_mask, geo, row0, count, where);
        NAME(store_tile)(grad_mask, geo->grad_mask, where, even, count, GK, tb->grad_scales);
    }
}

/* backward_tile with the flags `what` and the channel count made constants: one loop per combination,
 * and for 3 (RGB) and 16 channels loops of constant length (fully unrolled, no vector remainder). */
static void NAME(backward_tile_any)(const NAME(tile_backward_t) *given, const int what, const int64_t cg) {
    const NAME(tile_backward_t) tile = *given;  /* constant over the tile, to the compiler too */
#define TILE_BACKWARD(flags) (cg == 3 ? NAME(backward_tile)(&tile, flags, 3) : cg == 16 \
                              ? NAME(backward_tile)(&tile, flags, 16) : cg == 32 \
                              ? NAME(backward_tile)(&tile, flags, 32) : NAME(backward_tile)(&tile, flags, cg))
    switch (what) {
        case GRAD_X: TILE_BACKWARD(GRAD_X); break;
        case GRAD_POS: TILE_BACKWARD(GRAD_POS); break;
        case GRAD_X | GRAD_POS: TILE_BACKWARD(GRAD_X | GRAD_POS); break;
        case GRAD_VALUE: TILE_BACKWARD(GRAD_VALUE); break;
        case GRAD_X | GRAD_VALUE: TILE_BACKWARD(GRAD_X | GRAD_VALUE); break;
        case GRAD_POS | GRAD_VALUE: TILE_BACKWARD(GRAD_POS | GRAD_VALUE); break;
        case GRAD_X | GRAD_POS | GRAD_VALUE: TILE_BACKWARD(GRAD_X | GRAD_POS | GRAD_VALUE); break;
        case COLUMNS: TILE_BACKWARD(COLUMNS); break;
        case GRAD_X | COLUMNS: TILE_BACKWARD(GRAD_X | COLUMNS); break;
        case GRAD_POS | COLUMNS: TILE_BACKWARD(GRAD_POS | COLUMNS); break;
        case GRAD_X | GRAD_POS | COLUMNS: TILE_BACKWARD(GRAD_X | GRAD_POS | COLUMNS); break;
        case GRAD_VALUE | COLUMNS: TILE_BACKWARD(GRAD_VALUE | COLUMNS); break;
        case GRAD_X | GRAD_VALUE | COLUMNS: TILE_BACKWARD(GRAD_X | GRAD_VALUE | COLUMNS); break;
        case GRAD_POS | GRAD_VALUE | COLUMNS: TILE_BACKWARD(GRAD_POS | GRAD_VALUE | COLUMNS); break;
        case GRAD_X | GRAD_POS | GRAD_VALUE | COLUMNS: TILE_BACKWARD(GRAD_X | GRAD_POS | GRAD_VALUE | COLUMNS); break;
        default: break;
    }
#undef TILE_BACKWARD
}

/* grad_x [N, H, W, C] is overwritten (or NULL); grad_offset and grad_mask (offset's and mask's shapes,
 * strides in geo) are overwritten (or NULL); so is cols (dcols' shape, or dcols itself), with the
 * columns that the forward writes: the backward reads every sample's corners anyway, and a separate
 * forward pass for the weight's gradient would compute them all again. In place over dcols, a chunk of
 * the batch needs one column-sized buffer instead of two. Each thread takes whole images, so every
 * scatter stays in its own. Returns 0, or 1 when a thread's tile buffer could not be allocated
 * (nothing is written then). */
int NAME(deform_columns_backward)(
    const T *x, const T *offset, const T *mask, const T *dcols, T *cols, T *grad_x, T *grad_offset,
    T *grad_mask, const geometry_t *geo, int threads)
{
    const int64_t H = geo->h, W = geo->w, C = geo->c, G = geo->groups, K = geo->kh * geo->kw;
    const int64_t L = geo->ho * geo->wo, cg = C / G, GK = G * K;
    const int what = (grad_x ? GRAD_X : 0) | (grad_offset ? GRAD_POS : 0) | (grad_mask ? GRAD_VALUE : 0)
                   | (cols ? COLUMNS : 0);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const NAME(tile_t) tb = NAME(tile_alloc)(GK, cg, 1, !mask);
        int64_t where[TILE];
        NAME(tile_backward_t) t = {.dcols = dcols, .wt = tb.wt, .lh = tb.lh, .lw = tb.lw, .scales = tb.scales,
                                   .zeros = tb.zeros, .scratch = tb.scratch, .cols = cols, .grad_pos = tb.grad_pos,
                                   .grad_scales = tb.grad_scales, .off = tb.off, .K = K, .G = G, .C = C,
                                   .first = 0, .ld = K * C};
        const int64_t work = all_allocated(tb.base, &failed) ? geo->n : 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < work; ++n) {
            t.img = x + n * H * W * C;
            t.gimg = grad_x ? grad_x + n * H * W * C : 0;
            if (t.gimg) memset(t.gimg, 0, sizeof(T) * H * W * C);  /* here, not before: this image then stays in cache */
            for (int64_t p0 = 0; p0 < L; p0 += TILE) {
                t.row0 = n * L + p0;
                t.count = p0 + TILE <= L ? TILE : L - p0;
                NAME(load_pixels)(offset, mask, geo, t.row0, t.count, where, tb.pos, tb.scales);
                NAME(tile_corners)(tb.pos, tb.scales, GK, t.count, H, W, C, tb.off, tb.wt, tb.lh, tb.lw);
                NAME(backward_tile_any)(&t, what, cg);
                NAME(store_gradients)(grad_offset, grad_mask, geo, &tb, t.row0, t.count, where);
            }
        }
        free(tb.base);
    }
    return failed;
}

/* The fused kernel's vector width in floats (0: none in this build), for harness.kernels.native.status(). */
int NAME(fused_lanes)(void) { return FUSED_LANES; }

#if FUSED_LANES
/* The fused deformable convolution: each thread samples a tile of TILE output pixels into its own
 * column buffer (TILE rows of KCp = K*C rounded up to 16 values, in L2) and multiplies it there, so the
 * columns never go through memory. Split into a sampling kernel and oneDNN products over chunked
 * columns, the three products cost 1.7x conv2d at 64 px with 32 channels: they read and write
 * 9x the input's size. The products here are register-blocked loops over vectors of FUSED_LANES
 * floats (one register: 16 with AVX-512, 8 with AVX2). */
typedef T NAME(vecf) __attribute__((vector_size(FUSED_LANES * sizeof(T))));

static inline __attribute__((always_inline)) NAME(vecf) NAME(loadf)(const T *p) {
    NAME(vecf) v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void NAME(storef)(T *p, const NAME(vecf) *v) { memcpy(p, v, sizeof *v); }

/* c[r][j] = bias[j] (or 0) + sum over d of a[r][d] * b[d][j], for r < rows <= R and j < V vectors, rows
 * at lda, ldb and ldc elements; R and V are constants after inlining, so the R*V accumulators live in
 * registers. Rows past `rows` read row 0 and are not stored. */
static inline __attribute__((always_inline)) void NAME(gemm_block)(
    const T *a, int64_t lda, int64_t rows, const T *b, int64_t ldb, int64_t depth, T *c, int64_t ldc,
    const T *bias, const int R, const int V)
{
    NAME(vecf) acc[16][2];
    const T *ar[16];
    for (int r = 0; r < R; ++r) {
        ar[r] = a + (r < rows ? r : 0) * lda;
        for (int v = 0; v < V; ++v) acc[r][v] = bias ? NAME(loadf)(bias + FUSED_LANES * v) : (NAME(vecf)){0};
    }
    for (int64_t d = 0; d < depth; ++d) {
        NAME(vecf) bv[2];
        for (int v = 0; v < V; ++v) bv[v] = NAME(loadf)(b + d * ldb + FUSED_LANES * v);
        for (int r = 0; r < R; ++r) {
            const T s = ar[r][d];
            for (int v = 0; v < V; ++v) acc[r][v] += s * bv[v];
        }
    }
    for (int r = 0; r < R; ++r)
        if (r < rows)
            for (int v = 0; v < V; ++v) NAME(storef)(c + r * ldc + FUSED_LANES * v, &acc[r][v]);
}

/* The rows of one gemm_nn block, for `cols` (= V * FUSED_LANES) columns at j. */
static inline __attribute__((always_inline)) void NAME(gemm_nn_columns)(
    const T *a, int64_t lda, int64_t m, const T *b, int64_t ldb, int64_t depth, T *c, int64_t ldc, const T *bias,
    int64_t j, const int R, const int V)
{
    for (int64_t i = 0; i < m; i += R)
        NAME(gemm_block)(a + i * lda, lda, m - i < R ? m - i : R, b + j, ldb, depth, c + i * ldc + j, ldc,
                         bias ? bias + j : 0, R, V);
}

/* c [m, n] = a [m, depth] @ b [depth, n] (+ bias [n]); n a multiple of 16, rows at lda, ldb, ldc. */
static void NAME(gemm_nn)(const T *a, int64_t lda, int64_t m, const T *b, int64_t ldb, int64_t depth, T *c,
                          int64_t ldc, int64_t n, const T *bias) {
    int64_t j = 0;
#if FUSED_LANES == 16
    for (; j + 32 <= n; j += 32) NAME(gemm_nn_columns)(a, lda, m, b, ldb, depth, c, ldc, bias, j, 8, 2);
    /* 16 columns left: 8 rows too (16 rows measured 177 against 229 GFLOP/s: their 16 row pointers do
     * not fit in registers) */
    if (j < n) NAME(gemm_nn_columns)(a, lda, m, b, ldb, depth, c, ldc, bias, j, 8, 1);
#else  /* 16 registers: 6 x 2 accumulators */
    for (; j < n; j += 16) NAME(gemm_nn_columns)(a, lda, m, b, ldb, depth, c, ldc, bias, j, 6, 2);
#endif
}

/* c[r][j] += sum over p < m of a[p][r] * b[p][j], for r < R and j < V vectors (c's rows at ldc). */
static inline __attribute__((always_inline)) void NAME(gemm_tn_block)(
    const T *a, int64_t lda, int64_t m, const T *b, int64_t ldb, T *c, int64_t ldc, const int R, const int V)
{
    NAME(vecf) acc[16][2];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = NAME(loadf)(c + r * ldc + FUSED_LANES * v);
    for (int64_t p = 0; p < m; ++p) {
        NAME(vecf) bv[2];
        for (int v = 0; v < V; ++v) bv[v] = NAME(loadf)(b + p * ldb + FUSED_LANES * v);
        for (int r = 0; r < R; ++r) {
            const T s = a[p * lda + r];
            for (int v = 0; v < V; ++v) acc[r][v] += s * bv[v];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) NAME(storef)(c + r * ldc + FUSED_LANES * v, &acc[r][v]);
}

/* c [k, n] += a[:, :k].T @ b, a [m, lda] and b [m, n]; k a multiple of 16, n of 16. */
static void NAME(gemm_tn)(const T *a, int64_t lda, int64_t m, int64_t k, const T *b, int64_t ldb, T *c,
                          int64_t ldc, int64_t n) {
    int64_t j = 0;
#if FUSED_LANES == 16
    for (; j + 32 <= n; j += 32)
        for (int64_t r = 0; r < k; r += 8) NAME(gemm_tn_block)(a + r, lda, m, b + j, ldb, c + r * ldc + j, ldc, 8, 2);
    if (j < n)
        for (int64_t r = 0; r < k; r += 16) NAME(gemm_tn_block)(a + r, lda, m, b + j, ldb, c + r * ldc + j, ldc, 16, 1);
#else  /* 16 registers: 6 x 2 accumulators (4 x 2 measured 86 against 136 GFLOP/s), pairs of rows left */
    for (; j < n; j += 16) {
        int64_t r = 0;
        for (; r + 6 <= k; r += 6) NAME(gemm_tn_block)(a + r, lda, m, b + j, ldb, c + r * ldc + j, ldc, 6, 2);
        for (; r < k; r += 2) NAME(gemm_tn_block)(a + r, lda, m, b + j, ldb, c + r * ldc + j, ldc, 2, 2);
    }
#endif
}

/* out [N*L, O] (channels-last rows) = the deformable convolution of x [N, H, W, C] with
 * weight_t [KCp, O] (row k*C + c: tap k, channel c; rows from K*C on zero) plus bias [O] (or NULL).
 * O a multiple of 16. Returns 0, or 1 when a thread's buffers could not be allocated. */
int NAME(deform_conv_forward)(const T *x, const T *offset, const T *mask, const T *weight_t, const T *bias,
                              T *out, int64_t out_channels, const geometry_t *geo, int threads) {
    const int64_t C = geo->c, G = geo->groups, K = geo->kh * geo->kw, GK = G * K, cg = C / G;
    const int64_t kc = K * C, ld = (kc + 15) / 16 * 16, rows = geo->n * geo->ho * geo->wo;
    const int64_t tiles = (rows + TILE - 1) / TILE;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const NAME(tile_t) tb = NAME(tile_alloc)(GK, cg, 0, !mask);
        T *cols = calloc(TILE * ld, sizeof(T));  /* zeros past K*C stay zero */
        int64_t where[TILE];
        const int64_t work = all_allocated(tb.base && cols ? cols : 0, &failed) ? tiles : 0;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < work; ++t) {
            const int64_t row0 = t * TILE, count = row0 + TILE <= rows ? TILE : rows - row0;
            NAME(load_pixels)(offset, mask, geo, row0, count, where, tb.pos, tb.scales);
            NAME(tile_corners)(tb.pos, tb.scales, GK, count, geo->h, geo->w, C, tb.off, tb.wt, tb.lh, tb.lw);
            NAME(forward_tile)(x, geo, &tb, row0, count, cols, ld);
            NAME(gemm_nn)(cols, ld, count, weight_t, out_channels, kc, out + row0 * out_channels, out_channels,
                          out_channels, bias);
        }
        free(cols);
        free(tb.base);
    }
    return failed;
}

/* The fused convolution's backward. grad_out [N*L, O] rows (channels last); weight [O, KCp] (row o:
 * tap-major K*C values, then zeros). grad_x, grad_offset, grad_mask as in deform_columns_backward
 * (overwritten, or NULL); grad_weight [threads, KCp, O] (or NULL): each thread zeroes its own slice and
 * adds its images' weight gradient to it (slices of threads the team did not get are zeroed after);
 * sum_transposed then adds them up. Per tile: the column gradient (grad_out's rows times the weights),
 * the sampling backward, which writes the columns over it, and the weight gradient from those columns,
 * all in the thread's buffer. */
int NAME(deform_conv_backward)(const T *x, const T *offset, const T *mask, const T *weight, const T *grad_out,
                               T *grad_x, T *grad_offset, T *grad_mask, T *grad_weight, int64_t out_channels,
                               const geometry_t *geo, int threads) {
    const int64_t H = geo->h, W = geo->w, C = geo->c, G = geo->groups, K = geo->kh * geo->kw;
    const int64_t L = geo->ho * geo->wo, cg = C / G, GK = G * K, O = out_channels;
    const int64_t kc = K * C, ld = (kc + 15) / 16 * 16;
    const int grads = (grad_x ? GRAD_X : 0) | (grad_offset ? GRAD_POS : 0) | (grad_mask ? GRAD_VALUE : 0);
    const int what = grads | (grad_weight ? COLUMNS : 0);
    int failed = 0, team = threads;
#pragma omp parallel num_threads(threads)
    {
        const NAME(tile_t) tb = NAME(tile_alloc)(GK, cg, 1, !mask);
        T *cols = calloc(TILE * ld, sizeof(T));
        T *gw = grad_weight ? grad_weight + (int64_t)omp_get_thread_num() * ld * O : 0;
        if (gw) memset(gw, 0, sizeof(T) * ld * O);  /* by its thread: in parallel, and first touched there */
#pragma omp master
        team = omp_get_num_threads();
        int64_t where[TILE];
        NAME(tile_backward_t) t = {.dcols = cols, .wt = tb.wt, .lh = tb.lh, .lw = tb.lw, .scales = tb.scales,
                                   .zeros = tb.zeros, .scratch = tb.scratch, .cols = cols, .grad_pos = tb.grad_pos,
                                   .grad_scales = tb.grad_scales, .off = tb.off, .K = K, .G = G, .C = C, .ld = ld};
        const int64_t work = all_allocated(tb.base && cols ? cols : 0, &failed) && what ? geo->n : 0;
        /* static: the same images add into the same thread's slice on every call, so the weight's gradient
         * is summed in one order and a run repeats bit for bit (dynamic scheduling varied its last bits) */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < work; ++n) {
            t.img = x + n * H * W * C;
            t.gimg = grad_x ? grad_x + n * H * W * C : 0;
            if (t.gimg) memset(t.gimg, 0, sizeof(T) * H * W * C);
            for (int64_t p0 = 0; p0 < L; p0 += TILE) {
                t.row0 = t.first = n * L + p0;
                t.count = p0 + TILE <= L ? TILE : L - p0;
                const T *go = grad_out + t.row0 * O;
                NAME(load_pixels)(offset, mask, geo, t.row0, t.count, where, tb.pos, tb.scales);
                NAME(tile_corners)(tb.pos, tb.scales, GK, t.count, H, W, C, tb.off, tb.wt, tb.lh, tb.lw);
                if (grads) {
                    NAME(gemm_nn)(go, O, t.count, weight, ld, O, cols, ld, ld, 0);
                    NAME(backward_tile_any)(&t, what, cg);
                } else {  /* the weight's gradient alone: only the columns */
                    NAME(forward_tile)(x, geo, &tb, t.row0, t.count, cols, ld);
                }
                if (gw) NAME(gemm_tn)(cols, ld, t.count, ld, go, O, gw, O, O);
                NAME(store_gradients)(grad_offset, grad_mask, geo, &tb, t.row0, t.count, where);
            }
        }
        free(cols);
        free(tb.base);
    }
    if (grad_weight && team < threads) memset(grad_weight + team * ld * O, 0, sizeof(T) * (threads - team) * ld * O);
    return failed;
}

/* out [O, kc] (the weight's channels-last layout) = the sum of `count` slices [ld, O] of grad_weight (the
 * fused backward's per-thread weight gradients), transposed, in 16 x 16 blocks held in registers and L1.
 * One pass instead of a sum and a transposing copy; the slices are added in their order, so the result
 * does not depend on the threads' timing. */
void NAME(sum_transposed)(const T *slices, int64_t count, int64_t ld, int64_t O, int64_t kc, T *out, int threads) {
    const int64_t kb = (kc + 15) / 16, ob = (O + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < kb * ob; ++b) {
        const int64_t k0 = b / ob * 16, o0 = b % ob * 16;
        const int64_t kn = kc - k0 < 16 ? kc - k0 : 16, on = O - o0 < 16 ? O - o0 : 16;
        T block[16][16];
        for (int64_t k = 0; k < kn; ++k)
            for (int64_t o = 0; o < on; ++o) block[k][o] = slices[(k0 + k) * O + o0 + o];
        for (int64_t t = 1; t < count; ++t) {
            const T *slice = slices + t * ld * O;
            for (int64_t k = 0; k < kn; ++k)
                for (int64_t o = 0; o < on; ++o) block[k][o] += slice[(k0 + k) * O + o0 + o];
        }
        for (int64_t o = 0; o < on; ++o)
            for (int64_t k = 0; k < kn; ++k) out[(o0 + o) * kc + k0 + k] = block[k][o];
    }
}
#endif


/* dst [N, H + 2*py, W + 2*px, C] = src [N, C, H, W] zero-padded by (py, px) on every side, channels
 * last. torch's copy walks C planes at once, which at H*W a multiple of 1024 all map to the same cache
 * sets (0.9 ms for 4 MiB, 20x a plain copy); this one moves blocks of 16 channels x 16 pixels of a row. */
void NAME(to_channels_last)(const T *src, T *dst, int64_t N, int64_t C, int64_t H, int64_t W, int64_t py,
                            int64_t px, int threads) {
    const int64_t B = 16, cb = (C + B - 1) / B, xb = (W + B - 1) / B, Wp = W + 2 * px, Hp = H + 2 * py;
#pragma omp parallel num_threads(threads)
    {
        if (py || px) {  /* the zero border: whole rows above and below, px pixels left and right */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < N * Hp; ++r) {
                T *row = dst + r * Wp * C;
                const int64_t y = r % Hp;
                if (y < py || y >= py + H) {
                    memset(row, 0, sizeof(T) * Wp * C);
                } else {
                    memset(row, 0, sizeof(T) * px * C);
                    memset(row + (px + W) * C, 0, sizeof(T) * px * C);
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t block = 0; block < N * H * cb * xb; ++block) {
            const int64_t n = block / (H * cb * xb), y = block / (cb * xb) % H;
            const int64_t c0 = block / xb % cb * B, x0 = block % xb * B;
            const int64_t c1 = c0 + B < C ? c0 + B : C, x1 = x0 + B < W ? x0 + B : W;
            const T *in = src + (n * C * H + y) * W;
            T *out = dst + ((n * Hp + y + py) * Wp + px) * C;
#if REGISTER16
            if (c1 - c0 == B && x1 - x0 == B) {
                NAME(transpose16)(in + c0 * H * W + x0, H * W, out + x0 * C + c0, C);
                continue;
            }
#endif
            for (int64_t x = x0; x < x1; ++x)
                for (int64_t c = c0; c < c1; ++c) out[x * C + c] = in[c * H * W + x];
        }
    }
}

/* dst [N, C, H, W] = the interior of src [N, H + 2*py, W + 2*px, C] (src's padding dropped): the reverse
 * of to_channels_last, for a gradient going back to an NCHW input, in the same 16 x 16 blocks. */
void NAME(from_channels_last)(const T *src, T *dst, int64_t N, int64_t C, int64_t H, int64_t W, int64_t py,
                              int64_t px, int threads) {
    const int64_t B = 16, cb = (C + B - 1) / B, xb = (W + B - 1) / B, Wp = W + 2 * px, Hp = H + 2 * py;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < N * H * cb * xb; ++block) {
        const int64_t n = block / (H * cb * xb), y = block / (cb * xb) % H;
        const int64_t c0 = block / xb % cb * B, x0 = block % xb * B;
        const int64_t c1 = c0 + B < C ? c0 + B : C, x1 = x0 + B < W ? x0 + B : W;
        const T *in = src + ((n * Hp + y + py) * Wp + px) * C;
        T *out = dst + (n * C * H + y) * W;
#if REGISTER16
        if (c1 - c0 == B && x1 - x0 == B) {
            NAME(transpose16)(in + x0 * C + c0, C, out + c0 * H * W + x0, H * W);
            continue;
        }
#endif
        for (int64_t c = c0; c < c1; ++c)
            for (int64_t x = x0; x < x1; ++x) out[c * H * W + x] = in[x * C + c];
    }
}

#endif
