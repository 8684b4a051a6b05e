/* Two CPU kernels of the top-k SAE training step (see cpu_kernels.py, which compiles and calls them).
 *
 * topk_relu     the k largest entries of each row of pre + bias, ReLU'd, latents ascending;
 * sparse_outer  out[j] = sum of weights[e] * rows[tokens[e]] over the entries e with latents[e] == j, and
 *               optionally the dot product of each such row with a row of a second matrix.
 *
 * Both are deterministic: every output element is computed by one thread in a fixed order. float32 only.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* Restore the min-heap (values hv, latents hi, size k) below position pos. */
static void sift_down(float *hv, int64_t *hi, int64_t k, int64_t pos) {
    float v = hv[pos];
    int64_t ix = hi[pos];
    for (;;) {
        int64_t c = 2 * pos + 1;
        if (c >= k) break;
        if (c + 1 < k && hv[c + 1] < hv[c]) c++;
        if (!(hv[c] < v)) break;
        hv[pos] = hv[c];
        hi[pos] = hi[c];
        pos = c;
    }
    hv[pos] = v;
    hi[pos] = ix;
}

/* max of p[j] + b[j] over j < len; NaNs are skipped (the candidate scan catches them). */
static float block_max(const float *p, const float *b, int64_t len) {
    float m = -__builtin_inff();
    int64_t j = 0;
#if defined(__AVX2__)
    __m256 acc = _mm256_set1_ps(m);
    for (; j + 8 <= len; j += 8)
        acc = _mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(b + j)), acc);
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
#endif
    for (; j < len; j++) {
        float t = p[j] + b[j];
        m = t > m ? t : m;
    }
    return m;
}

/* Entries of row p + b that are not below m (NaN included), appended to (cv, ci); returns their count. */
static int64_t candidates(const float *p, const float *b, int64_t w, float m, float *cv, int64_t *ci) {
    int64_t c = 0, j = 0;
#if defined(__AVX2__)
    __m256 mv = _mm256_set1_ps(m);
    for (; j + 8 <= w; j += 8) {
        __m256 t = _mm256_add_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(b + j));
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(t, mv, _CMP_NLT_UQ));
        if (mask) {
            float lanes[8];
            _mm256_storeu_ps(lanes, t);
            for (; mask; mask &= mask - 1) {
                int l = __builtin_ctz(mask);
                cv[c] = lanes[l];
                ci[c++] = j + l;
            }
        }
    }
#endif
    for (; j < w; j++) {
        float t = p[j] + b[j];
        if (!(t < m)) {
            cv[c] = t;
            ci[c++] = j;
        }
    }
    return c;
}

/* For each of the n rows of pre (n, w) plus bias (w): the k largest values, ReLU'd, into values (n, k) and
 * their latents, ascending, into indices (n, k). Requires 1 <= k <= w. Scratch: `threads` x (w + k) floats in
 * scratch_v and as many int64 in scratch_i; thread t takes the t-th contiguous share of the rows.
 *
 * Split the row into blocks of floor(w / k) entries: there are at least k blocks, so the smallest block
 * maximum m is a lower bound of the k-th largest value. One vectorised pass finds m, a second collects the
 * entries >= m (a few k for an SAE's pre-activations), and a k-heap picks the top k of those. A row
 * holding a NaN gets NaN values at k consecutive latents from its first NaN's (or the last k), so the
 * loss turns NaN and training stops loudly. */
void topk_relu(const float *pre, const float *bias, int64_t n, int64_t w, int64_t k, float *values,
               int64_t *indices, float *scratch_v, int64_t *scratch_i, int threads) {
    int64_t block = w / k;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        float *cv = scratch_v + t * (w + k), *hv = cv + w;
        int64_t *ci = scratch_i + t * (w + k), *hi = ci + w;
        for (int64_t r = n * t / threads; r < n * (t + 1) / threads; r++) {
            const float *p = pre + r * w;
            float m = __builtin_inff();
            for (int64_t s = 0; s < w; s += block) {
                float bm = block_max(p + s, bias + s, s + block <= w ? block : w - s);
                m = bm < m ? bm : m;
            }
            int64_t c = candidates(p, bias, w, m, cv, ci);
            int64_t nan = -1;
            for (int64_t q = 0; q < c && nan < 0; q++)
                if (cv[q] != cv[q]) nan = ci[q];
            float *vr = values + r * k;
            int64_t *ir = indices + r * k;
            if (nan >= 0) { /* NaN values at k consecutive latents that include the (first) NaN's */
                int64_t first = nan < w - k ? nan : w - k;
                for (int64_t q = 0; q < k; q++) {
                    vr[q] = __builtin_nanf("");
                    ir[q] = first + q;
                }
                continue;
            }
            memcpy(hv, cv, sizeof(float) * (size_t)k);
            memcpy(hi, ci, sizeof(int64_t) * (size_t)k);
            for (int64_t q = k / 2 - 1; q >= 0; q--) sift_down(hv, hi, k, q);
            for (int64_t q = k; q < c; q++)
                if (cv[q] > hv[0]) {
                    hv[0] = cv[q];
                    hi[0] = ci[q];
                    sift_down(hv, hi, k, 0);
                }
            for (int64_t a = 1; a < k; a++) { /* insertion sort by latent */
                float v = hv[a];
                int64_t ix = hi[a], b = a - 1;
                for (; b >= 0 && hi[b] > ix; b--) {
                    hv[b + 1] = hv[b];
                    hi[b + 1] = hi[b];
                }
                hv[b + 1] = v;
                hi[b + 1] = ix;
            }
            for (int64_t q = 0; q < k; q++) {
                vr[q] = hv[q] > 0 ? hv[q] : 0.0f;
                ir[q] = hi[q];
            }
        }
    }
}

/* out (width, d) = sum over the e entries of weights[e] * rows[tokens[e]] added into row latents[e]; and if
 * dot_with (width, d) is given, dots[e] = <rows[tokens[e]], dot_with[latents[e]]> from the same gathered row.
 * A counting sort groups the entries by latent (stable, so each latent's entries keep their input order);
 * then each thread owns whole output rows, so no two threads write the same row and the sums are
 * deterministic. Latents with no entry get a zero row. Scratch: start (width + 1, zeroed), cursor (width),
 * order (e). */
void sparse_outer(const int64_t *latents, const int64_t *tokens, const float *weights, int64_t e,
                  const float *rows, int64_t d, int64_t width, float *out, const float *dot_with, float *dots,
                  int64_t *start, int64_t *cursor, int64_t *order, int threads) {
    for (int64_t i = 0; i < e; i++) start[latents[i] + 1]++;
    for (int64_t j = 0; j < width; j++) start[j + 1] += start[j];
    memcpy(cursor, start, sizeof(int64_t) * (size_t)width);
    for (int64_t i = 0; i < e; i++) order[cursor[latents[i]]++] = i;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 64)
    for (int64_t j = 0; j < width; j++) {
        float *o = out + j * d;
        const float *v = dot_with ? dot_with + j * d : NULL;
        memset(o, 0, sizeof(float) * (size_t)d);
        for (int64_t s = start[j]; s < start[j + 1]; s++) {
            const float *x = rows + tokens[order[s]] * d;
            float a = weights[order[s]];
            if (v) {
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t c = 0; c < d; c++) {
                    o[c] += a * x[c];
                    dot += x[c] * v[c];
                }
                dots[order[s]] = dot;
            } else {
#pragma omp simd
                for (int64_t c = 0; c < d; c++) o[c] += a * x[c];
            }
        }
    }
}
