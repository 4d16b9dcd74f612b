/* sd2's CPU decode kernels (built once per machine by sd2.fastpath; see there): an fp16-weight GEMM for small M
   and a whole Llama decoder layer on top of it (sd2.lean's fp16 path), so a decode step is one call per layer.

   GEMM:

   y[m, n] = sum_k x[m, k] * w[n, k], x and y fp32, w fp16 packed as [N/64][K][64] (columns padded to 64).
   Every output is one fused multiply-add chain over k = 0..K-1 starting from 0, so its bits do not depend on M,
   on how rows are grouped, on the thread that computes it, or on the instruction set: a token verified among
   γ+1 others gets exactly the logits it gets alone (speculative and target-only decoding agree by construction).
   With AVX-512 up to 6 rows share each converted weight tile (at 5 rows, in cache, ≈ 54 GFMA/s on one Zen 4
   core; fbgemm's fp16 kernel ≈ 44), which keeps a verification pass close to a one-token pass; AVX2 + F16C
   does the same 16 columns at a time (without it, the portable code converts each half in software, ≈ 20×
   slower). */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>
#define SD2_SIMD 1
#endif

#define CB 64

#if defined(__AVX512F__)
#define RMAX 6
static inline __attribute__((always_inline)) void tile_r(const float *x, int64_t ldx, const int r,
        const uint16_t *wb, int64_t K, float *y, int64_t ldy, int64_t ncols) {
    __m512 acc[RMAX][4];
    for (int i = 0; i < r; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const uint16_t *wk = wb + k * CB;
        __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wk)));
        __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wk + 16)));
        __m512 w2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wk + 32)));
        __m512 w3 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wk + 48)));
        for (int i = 0; i < r; i++) {
            __m512 xi = _mm512_set1_ps(x[i * ldx + k]);
            acc[i][0] = _mm512_fmadd_ps(xi, w0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(xi, w1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(xi, w2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(xi, w3, acc[i][3]);
        }
    }
    for (int i = 0; i < r; i++) {
        float tmp[CB];
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(tmp + 16 * j, acc[i][j]);
        memcpy(y + i * ldy, tmp, (size_t)ncols * sizeof(float));
    }
}

#elif defined(SD2_SIMD)
/* AVX2 + F16C + FMA (most x86-64 CPUs without AVX-512): 16 columns per pass over k, so up to 6 rows'
   accumulators (12 ymm) and the 2 converted weight vectors stay in the 16 registers. The same chains, so the
   same bits as the AVX-512 and portable code. */
#define RMAX 6
static inline __attribute__((always_inline)) void tile_r(const float *x, int64_t ldx, const int r,
        const uint16_t *wb, int64_t K, float *y, int64_t ldy, int64_t ncols) {
    float tmp[RMAX][CB];
    for (int64_t c = 0; c < ncols; c += 16) {
        __m256 acc[RMAX][2];
        for (int i = 0; i < r; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k++) {
            const uint16_t *wk = wb + k * CB + c;
            __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wk)));
            __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wk + 8)));
            for (int i = 0; i < r; i++) {
                __m256 xi = _mm256_set1_ps(x[i * ldx + k]);
                acc[i][0] = _mm256_fmadd_ps(xi, w0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(xi, w1, acc[i][1]);
            }
        }
        for (int i = 0; i < r; i++) {
            _mm256_storeu_ps(tmp[i] + c, acc[i][0]);
            _mm256_storeu_ps(tmp[i] + c + 8, acc[i][1]);
        }
    }
    for (int i = 0; i < r; i++) memcpy(y + i * ldy, tmp[i], (size_t)ncols * sizeof(float));
}
#endif

#if defined(SD2_SIMD)
static void tile(const float *x, int64_t ldx, int r, const uint16_t *wb, int64_t K, float *y, int64_t ldy,
                 int64_t ncols) {
    switch (r) {  /* constant row counts, so the accumulators stay in registers */
    case 1: tile_r(x, ldx, 1, wb, K, y, ldy, ncols); break;
    case 2: tile_r(x, ldx, 2, wb, K, y, ldy, ncols); break;
    case 3: tile_r(x, ldx, 3, wb, K, y, ldy, ncols); break;
    case 4: tile_r(x, ldx, 4, wb, K, y, ldy, ncols); break;
    case 5: tile_r(x, ldx, 5, wb, K, y, ldy, ncols); break;
    default: tile_r(x, ldx, 6, wb, K, y, ldy, ncols); break;
    }
}
#else
/* Portable (neither AVX-512 nor AVX2 + F16C): the same chains, one row at a time (the compiler vectorises the
   64 columns where it can). */
#define RMAX 1
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else {  /* subnormal half: normalise */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void tile(const float *x, int64_t ldx, int r, const uint16_t *wb, int64_t K, float *y, int64_t ldy,
                 int64_t ncols) {
    (void)ldx; (void)r; (void)ldy;
    float acc[CB] = {0};
    for (int64_t k = 0; k < K; k++) {
        float xk = x[k];
        for (int j = 0; j < CB; j++) acc[j] = fmaf(xk, half_to_float(wb[k * CB + j]), acc[j]);
    }
    memcpy(y, acc, (size_t)ncols * sizeof(float));
}
#endif

/* 1 when the GEMM runs vectorised (AVX-512, or AVX2 + F16C + FMA); 0 for the portable code, which converts fp16 in
   software and loses to fp32 GEMMs: `auto` then picks an fp32 path. */
int sd2_simd(void) {
#if defined(SD2_SIMD)
    return 1;
#else
    return 0;
#endif
}

/* Rows [0, M) of y for column blocks [b0, b1). */
void sd2_f16_gemm(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int64_t b0,
                  int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const uint16_t *wb = w + b * K * CB;
        int64_t ncols = N - b * CB < CB ? N - b * CB : CB;
        for (int64_t m = 0; m < M; m += RMAX) {
            int r = M - m < RMAX ? (int)(M - m) : RMAX;
            tile(x + m * K, K, r, wb, K, y + m * N + b * CB, N, ncols);
        }
    }
}

#define PAR_MACS (1 << 18)  /* below this, one thread: an OpenMP fork costs a few µs */

/* The whole GEMM, column blocks split between nt threads (each output computed whole by one thread). */
void sd2_f16_gemm_mt(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int nt) {
    int64_t blocks = (N + CB - 1) / CB;
    #pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && M * K * N >= PAR_MACS)
    for (int64_t b = 0; b < blocks; b++) sd2_f16_gemm(x, M, K, w, N, y, b, b + 1);
}

/* ---- a Llama decoder layer (RMSNorm, rotary, GQA attention over a KV cache, SwiGLU) ----
   Every row is computed on its own in a fixed order (sums in 16 lanes, then a fixed tree), so a token's
   result does not depend on the other tokens of the call either. */

typedef struct {
    int64_t hidden, n_heads, n_kv, head_dim, inter;
    float eps;
    const float *ln1, *ln2;                     /* [hidden] */
    const uint16_t *qkv, *o, *gate_up, *down;   /* packed: [(nq+2nkv)·hd × hidden], [hidden × nq·hd],
                                                   [2·inter × hidden], [hidden × inter] */
} sd2_layer;

/* e^x, branch-free so loops over it vectorise (libm's expf is a call per element: at 5 verified tokens the
   SwiGLU alone needed ~230k of them per forward). Cephes' polynomial on [-ln2/2, ln2/2], ~1 ulp; x clamped to
   the range where the result is a normal float or +-saturates. */
static inline float sd2_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    union { float f; int32_t i; } u;
    u.i = ((int32_t)n + 127) << 23;
    return p * u.f;
}

static float lane_sum(float acc[16]) {
    for (int s = 8; s; s >>= 1)
        for (int l = 0; l < s; l++) acc[l] += acc[l + s];
    return acc[0];
}

static float dot(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) acc[l] = fmaf(a[k + l], b[k + l], acc[l]);
    for (int l = 0; k + l < n; l++) acc[l] = fmaf(a[k + l], b[k + l], acc[l]);
    return lane_sum(acc);
}

static void rms_rows(const float *x, int64_t t, int64_t n, const float *w, float eps, float *out) {
    for (int64_t i = 0; i < t; i++) {
        const float *xi = x + i * n;
        float inv = 1.0f / sqrtf(dot(xi, xi, n) / (float)n + eps);
        for (int64_t k = 0; k < n; k++) out[i * n + k] = w[k] * (xi[k] * inv);
    }
}

/* Scores [0, n) → unnormalised exp(s - max) in place; returns 1 / their sum (the outputs are scaled once at the
   end). Both attention variants below use it, so their probabilities are the same bits. */
static inline float softmax(float *sc, int64_t n) {
    float mx = -INFINITY, lanes[16] = {0};
    for (int64_t j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    for (int64_t j = 0; j < n; j++) sc[j] = sd2_exp(sc[j] - mx);
    for (int64_t j = 0; j < n; j++) lanes[j & 15] += sc[j];
    return 1.0f / lane_sum(lanes);
}

/* One query (one token, one head) over keys [0, n), 64 keys a block: the one-token decode step, whose heads are
   spread over the threads. The same chains, in the same order, as attend() below: identical bits. */
static inline __attribute__((always_inline)) void attend_row(const float *q, const float *kg, const float *vg,
        int64_t n, int64_t cap, const int64_t hd, float scale, float *sc, float *out) {
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
        float s[64] = {0};
        for (int64_t d = 0; d < hd; d++) {
            const float qd = q[d], *kd = kg + d * cap + j0;
            for (int l = 0; l < 64; l++) s[l] = fmaf(qd, kd[l], s[l]);
        }
        int64_t nb = n - j0 < 64 ? n - j0 : 64;
        for (int64_t l = 0; l < nb; l++) sc[j0 + l] = s[l] * scale;
    }
    float o[512], inv = softmax(sc, n);
    for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float p = sc[j], *vj = vg + j * hd;
        for (int64_t d = 0; d < hd; d++) o[d] = fmaf(p, vj[d], o[d]);
    }
    for (int64_t d = 0; d < hd; d++) out[d] = o[d] * inv;
}

/* Attention for up to QB queries that read the same kv head (GQA heads of a group and the rows verified
   together; verification and prefill): each key and value is loaded once for all of them, which keeps a
   verification pass over γ+1 tokens close to a one-token pass. Query r sees keys [0, n[r]) (causal: up to itself). Every score is one chain over
   the head dimensions and every output one chain over the keys in order, so a query's result does not depend
   on which queries share the call. Keys are dimension-major and cap a multiple of 64 (blocks of 32 keys may read
   past n but never past the cache). */
#define QB 6
#define KB 32
static inline __attribute__((always_inline)) void attend_qb(const int qb, const float *const *q, const int64_t *n,
        int nr, const float *kg, const float *vg, int64_t cap, int64_t hd, float scale, float *sc, float *const *out) {
    int64_t nmax = 0, nmin = n[0];
    for (int r = 0; r < nr; r++) {
        nmax = n[r] > nmax ? n[r] : nmax;
        nmin = n[r] < nmin ? n[r] : nmin;
    }
    const float *qr[QB];
    for (int r = 0; r < qb; r++) qr[r] = q[r < nr ? r : 0];  /* spare lanes recompute query 0, never stored */
    for (int64_t j0 = 0; j0 < nmax; j0 += KB) {
        float s[QB][KB] = {{0}};
        for (int64_t d = 0; d < hd; d++) {
            const float *kd = kg + d * cap + j0;
            #pragma GCC unroll 8
            for (int r = 0; r < qb; r++) {
                const float qd = qr[r][d];
                #pragma GCC unroll 32
                for (int l = 0; l < KB; l++) s[r][l] = fmaf(qd, kd[l], s[r][l]);
            }
        }
        for (int r = 0; r < nr; r++)
            for (int l = 0; l < KB; l++) sc[r * cap + j0 + l] = s[r][l] * scale;
    }
    float inv[QB];
    for (int r = 0; r < nr; r++) inv[r] = softmax(sc + r * cap, n[r]);
    for (int64_t c = 0; c < hd; c += 16) {  /* 16 output dimensions at a time, all queries */
        float o[QB][16] = {{0}};
        for (int64_t j = 0; j < nmin; j++) {  /* keys every query sees */
            const float *vj = vg + j * hd + c;
            #pragma GCC unroll 8
            for (int r = 0; r < qb; r++) {
                const float pr = sc[(r < nr ? r : 0) * cap + j];
                #pragma GCC unroll 16
                for (int l = 0; l < 16; l++) o[r][l] = fmaf(pr, vj[l], o[r][l]);
            }
        }
        for (int r = 0; r < nr; r++) {  /* then each query's own tail, the chain continuing in order */
            for (int64_t j = nmin; j < n[r]; j++) {
                const float pr = sc[r * cap + j], *vj = vg + j * hd + c;
                for (int l = 0; l < 16; l++) o[r][l] = fmaf(pr, vj[l], o[r][l]);
            }
            for (int l = 0; l < 16 && c + l < hd; l++) out[r][c + l] = o[r][l] * inv[r];
        }
    }
}

static void attend(const float *const *q, const int64_t *n, int nr, const float *kg, const float *vg, int64_t cap,
                   int64_t hd, float scale, float *sc /* [QB][cap] */, float *const *out) {
    if (nr <= 3)
        attend_qb(3, q, n, nr, kg, vg, cap, hd, scale, sc, out);
    else
        attend_qb(QB, q, n, nr, kg, vg, cap, hd, scale, sc, out);
}

static void rope(float *v, const float *cos, const float *sin, int64_t hd) {
    int64_t half = hd / 2;
    float tmp[512];
    for (int64_t d = 0; d < half; d++) tmp[d] = v[d] * cos[d] - v[d + half] * sin[d];
    for (int64_t d = half; d < hd; d++) tmp[d] = v[d] * cos[d] + v[d - half] * sin[d];
    memcpy(v, tmp, (size_t)hd * sizeof(float));
}

/* x [t, hidden] in place: x += attn(rms(x)); x += mlp(rms(x)). The new tokens sit at positions
   [start, start + t) of the caches k [n_kv, hd, cap] (dimension-major, cap a multiple of 64) and
   v [n_kv, cap, hd]; cos/sin
   [positions, hd]; scratch as sd2_layer_scratch. */
void sd2_layer_forward(const sd2_layer *L, float *x, int64_t t, int64_t start, float *kc, float *vc, int64_t cap,
                       const float *cos, const float *sin, float *scratch, int nt) {
    const int64_t H = L->hidden, nq = L->n_heads, nkv = L->n_kv, hd = L->head_dim, I = L->inter;
    const int64_t nqkv = (nq + 2 * nkv) * hd, end = start + t, group = nq / nkv;
    float *h = scratch, *qkv = h + t * H, *att = qkv + t * nqkv, *gu = att + t * nq * hd, *act = gu + t * 2 * I,
          *tmp = act + t * I, *scores = tmp + t * H;
    const float scale = 1.0f / sqrtf((float)hd);

    rms_rows(x, t, H, L->ln1, L->eps, h);
    sd2_f16_gemm_mt(h, t, H, L->qkv, nqkv, qkv, nt);
    for (int64_t i = 0; i < t; i++) {
        float *row = qkv + i * nqkv;
        const float *c = cos + (start + i) * hd, *s = sin + (start + i) * hd;
        for (int64_t j = 0; j < nq + nkv; j++) rope(row + j * hd, c, s, hd);
        for (int64_t g = 0; g < nkv; g++) {
            for (int64_t d = 0; d < hd; d++) kc[(g * hd + d) * cap + start + i] = row[(nq + g) * hd + d];
            memcpy(vc + (g * cap + start + i) * hd, row + (nq + nkv + g) * hd, (size_t)hd * sizeof(float));
        }
    }
    if (t == 1) {  /* decode: one query per head, the heads over the threads */
        #pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && end >= 64)
        for (int64_t hq = 0; hq < nq; hq++) {
            const float *q = qkv + hq * hd, *kg = kc + (hq / group) * hd * cap, *vg = vc + (hq / group) * cap * hd;
            float *sc = scores + (int64_t)omp_get_thread_num() * QB * cap;  /* per thread */
            if (hd == 64)
                attend_row(q, kg, vg, start + 1, cap, 64, scale, sc, att + hq * hd);
            else
                attend_row(q, kg, vg, start + 1, cap, hd, scale, sc, att + hq * hd);
        }
    } else {
        const int64_t per_kv = t * group, chunks = (per_kv + QB - 1) / QB;  /* queries of one kv head, in chunks */
        #pragma omp parallel for num_threads(nt) schedule(static) collapse(2) if (nt > 1 && t * end >= 64)
        for (int64_t g = 0; g < nkv; g++) {
            for (int64_t ch = 0; ch < chunks; ch++) {
                const float *q[QB];
                float *out[QB];
                int64_t n[QB] = {0};
                int nr = 0;
                for (int64_t r = ch * QB; r < per_kv && nr < QB; r++, nr++) {  /* row r / group, its head */
                    int64_t i = r / group, hq = g * group + r % group;
                    q[nr] = qkv + i * nqkv + hq * hd;
                    out[nr] = att + (i * nq + hq) * hd;
                    n[nr] = start + i + 1;
                }
                attend(q, n, nr, kc + g * hd * cap, vc + g * cap * hd, cap, hd, scale,
                       scores + (int64_t)omp_get_thread_num() * QB * cap, out);
            }
        }
    }
    sd2_f16_gemm_mt(att, t, nq * hd, L->o, H, tmp, nt);
    for (int64_t k = 0; k < t * H; k++) x[k] += tmp[k];
    rms_rows(x, t, H, L->ln2, L->eps, h);
    sd2_f16_gemm_mt(h, t, H, L->gate_up, 2 * I, gu, nt);
    for (int64_t i = 0; i < t; i++)
        for (int64_t j = 0; j < I; j++) {
            float g = gu[i * 2 * I + j];
            act[i * I + j] = g / (1.0f + sd2_exp(-g)) * gu[i * 2 * I + I + j];
        }
    sd2_f16_gemm_mt(act, t, I, L->down, H, tmp, nt);
    for (int64_t k = 0; k < t * H; k++) x[k] += tmp[k];
}

/* The final norm, the same per-row code as the layers'. */
void sd2_rms(const float *x, int64_t t, int64_t n, const float *w, float eps, float *out) {
    rms_rows(x, t, n, w, eps, out);
}

/* Floats of scratch sd2_layer_forward needs for t new tokens, a cache of cap positions and nt threads. */
int64_t sd2_layer_scratch(const sd2_layer *L, int64_t t, int64_t cap, int nt) {
    int64_t nqkv = (L->n_heads + 2 * L->n_kv) * L->head_dim;
    return t * (2 * L->hidden + nqkv + L->n_heads * L->head_dim + 3 * L->inter) + (int64_t)nt * QB * cap;
}
