// gluon-bert's CPU kernels: six operations that MXNet 1.9.1's wheel computes slowly on the
// CPU, as an MXNet extension library (include/mxnet/lib_api.h, loaded with
// mx.library.load). gluon_bert/kernels/__init__.py compiles this file on the machine that
// runs it (-march=native) and explains when the model uses it.
//
//   gb_bmm(A, B, transpose_a, transpose_b, alpha)  C[n] = alpha * op(A[n]) op(B[n])
//       A: (N, M, K), or (N, K, M) with transpose_a; B: (N, K, P), or (N, P, K) with
//       transpose_b; C: (N, M, P). The attention products. MXNet's batch_dot calls its
//       OpenBLAS once per matrix, and OpenBLAS is slow on BERT's 64x64 heads; here the
//       batch is shared out among OpenMP threads and each product is one register-blocked
//       AVX-512 (or AVX2) loop.
//   gb_layer_norm(x, gamma, beta, eps)  y = (x - mean) / sqrt(var + eps) * gamma + beta
//       over the last axis of x (any rank), gamma and beta (H,). MXNet's LayerNorm backward
//       reduces the gradients of gamma and beta at about 1 GB/s; here one pass over the rows
//       per thread, partial sums per thread, summed in a fixed order (deterministic for a
//       given number of threads).
//   gb_softmax_ce(logits, labels) -> (loss, logsumexp)  per row of logits (..., V):
//       logsumexp(x) - x[label], the cross-entropy of softmax(x). log_softmax, pick and
//       their backwards pass over the (B * P, V) logits of the MLM head five times (415 MB
//       at the book's batch); this reads them once forward and once backward.
//   gb_dropout(x, p) -> (y, keep)  training-mode dropout. MXNet's draws one Bernoulli
//       variable at a time from a Mersenne twister (20-90 ms a call at the book's batch);
//       this hashes (seed, index), vectorised, with one seed a call from MXNet's seeded
//       generator (mx.random.seed repeats a run), and keeps a byte mask for the backward.
//   gb_attention(q, k, v, valid_lens[, rows], num_heads, alpha, p, query_rows)
//       -> (out, lse, seed)
//       multi-head self-attention on a packed batch (only the real tokens, one sequence
//       after another): each sequence's rows attend to each other, with the dropout of
//       the weights drawn inside. No padding, mask or head transposes: about a third of
//       the padded attention's arithmetic at the book's lengths (section below). With
//       query_rows, only the queries at the packed rows `rows` (the last block, whose
//       heads read a few rows).
//   gb_adam_update(weight, grad, mean, var, lr, beta1, beta2, epsilon, wd, rescale_grad,
//       clip_gradient) -> weight  MXNet's adam_update (mean and var in place), the same
//       float operations in vector intrinsics: the same bits at 4x its speed.
//
// float32 only (lib_api.h has no bfloat16 type): under mixed precision the Python side casts
// the inputs to float32 first, as amp does for MXNet's own batch_dot and LayerNorm.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "mxnet/lib_api.h"
#include "dmlc/strtonum.h"  // dmlc::stof, as MXNet parses float parameters

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

using mxnet::ext::MXTensor;
using mxnet::ext::MXReturnValue;
using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;
using mxnet::ext::OpResource;
typedef std::unordered_map<std::string, std::string> Attrs;
typedef std::vector<std::vector<unsigned int>> Shapes;

static bool flag_attr(const Attrs& attrs, const char* key) {
  auto it = attrs.find(key);
  return it != attrs.end() && (it->second == "True" || it->second == "1" || it->second == "true");
}

static float float_attr(const Attrs& attrs, const char* key, float fallback) {
  auto it = attrs.find(key);
  return it == attrs.end() ? fallback : std::stof(it->second);
}

// A float attribute parsed as MXNet parses its own operators' float parameters (dmlc::stof,
// from the headers the wheel ships), for a kernel whose results must be the bits of an
// MXNet operator given the same arguments: dmlc's parser rounds some decimal strings to a
// neighbouring float of std::stof's (about 1 learning rate in 3,000).
static float mxnet_float_attr(const Attrs& attrs, const char* key, float fallback) {
  auto it = attrs.find(key);
  return it == attrs.end() ? fallback : dmlc::stof(it->second);
}

// Inputs of unknown type (-1, while a graph's types are still being inferred) are float32.
static MXReturnValue all_float32(const char* op, std::vector<int>* in, std::vector<int>* out) {
  for (int& t : *in) {
    if (t == -1) t = mxnet::ext::kFloat32;
    if (t != mxnet::ext::kFloat32) {
      MX_ERROR_MSG << op << ": float32 inputs only (cast them first)";
      return MX_FAIL;
    }
  }
  for (auto& t : *out) t = mxnet::ext::kFloat32;
  return MX_SUCCESS;
}

// -------------------------------------------------------------------- vector helpers

// One vector type and its operations for the instruction set this file is compiled for
// (-march=native): AVX-512 or AVX2 with FMA. GB_VEC is 0 without either, and every kernel
// then has a plain loop instead.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define GB_VEC 1
#if defined(__AVX512F__)
// 32 zmm registers: the products' blocks are 6 x 4 vectors (6 x 64, one BERT head wide).
typedef __m512 vec_t;
typedef __mmask16 tail_t;  // which lanes of the last vector are stored
enum { kW = 16, kNV = 4 };
static inline vec_t vzero() { return _mm512_setzero_ps(); }
static inline vec_t vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec_t vset1(float x) { return _mm512_set1_ps(x); }
static inline vec_t vfmadd(vec_t a, vec_t b, vec_t c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec_t vmul(vec_t a, vec_t b) { return _mm512_mul_ps(a, b); }
static inline vec_t vadd(vec_t a, vec_t b) { return _mm512_add_ps(a, b); }
static inline vec_t vsub(vec_t a, vec_t b) { return _mm512_sub_ps(a, b); }
static inline vec_t vmax(vec_t a, vec_t b) { return _mm512_max_ps(a, b); }
static inline vec_t vround(vec_t x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vec_t vpow2i(vec_t n) {  // 2^n for whole n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
static inline float vhsum(vec_t x) { return _mm512_reduce_add_ps(x); }
static inline void vstore(float* p, vec_t x) { _mm512_storeu_ps(p, x); }
static inline tail_t tail_mask(int rest) { return (tail_t)((1u << rest) - 1u); }
static inline void vstore_tail(float* p, tail_t t, vec_t x) { _mm512_mask_storeu_ps(p, t, x); }
#else
// AVX2 (e.g. AMD Zen 2/3, Intel before Skylake-X): 16 ymm registers, so the products'
// blocks are 6 x 2 vectors (6 x 16): 12 accumulators, 2 B vectors and a broadcast.
typedef __m256 vec_t;
typedef __m256i tail_t;
enum { kW = 8, kNV = 2 };
static inline vec_t vzero() { return _mm256_setzero_ps(); }
static inline vec_t vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec_t vset1(float x) { return _mm256_set1_ps(x); }
static inline vec_t vfmadd(vec_t a, vec_t b, vec_t c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec_t vmul(vec_t a, vec_t b) { return _mm256_mul_ps(a, b); }
static inline vec_t vadd(vec_t a, vec_t b) { return _mm256_add_ps(a, b); }
static inline vec_t vsub(vec_t a, vec_t b) { return _mm256_sub_ps(a, b); }
static inline vec_t vmax(vec_t a, vec_t b) { return _mm256_max_ps(a, b); }
static inline vec_t vround(vec_t x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vec_t vpow2i(vec_t n) {  // 2^n for whole n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline float vhsum(vec_t x) {
  float lanes[8];
  _mm256_storeu_ps(lanes, x);
  float s = 0.f;
  for (float v : lanes) s += v;
  return s;
}
static inline void vstore(float* p, vec_t x) { _mm256_storeu_ps(p, x); }
static inline tail_t tail_mask(int rest) {  // lane i stored where i < rest (sign bit set)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline void vstore_tail(float* p, tail_t t, vec_t x) { _mm256_maskstore_ps(p, t, x); }
#endif

// exp(x) for x <= 0 and beyond, lane by lane, as exp_approx (softmax section) computes it.
// Written with intrinsics: GCC's own vectorisation of exp_approx's loops ran at a ninth of
// this speed (200 against 22 ms for the sum over the MLM head's logits, AVX2).
static inline vec_t vexp(vec_t x) {
  x = vmax(x, vset1(-87.0f));
  const vec_t t = vmul(x, vset1(1.44269504f));
  const vec_t n = vround(t);
  const vec_t f = vmul(vsub(t, n), vset1(0.69314718f));
  vec_t p = vset1(1.f / 720);
  p = vfmadd(p, f, vset1(1.f / 120));
  p = vfmadd(p, f, vset1(1.f / 24));
  p = vfmadd(p, f, vset1(1.f / 6));
  p = vfmadd(p, f, vset1(0.5f));
  p = vfmadd(p, f, vset1(1.f));
  p = vfmadd(p, f, vset1(1.f));
  return vmul(p, vpow2i(n));
}
#else
#define GB_VEC 0
#endif

// ------------------------------------------------------------------ batched products

#if GB_VEC

// One MR x (W * NV) block of C = alpha * op(A) Bp. op(A)(i, k) = A[i * a_rs + k * a_cs];
// Bp is op(B) packed K x ldb, row-major, ldb a multiple of W and zero padded, so every load
// is a whole vector; only the last vector's store is masked.
template <int MR, int NV>
static void micro_kernel(const float* A, int64_t a_rs, int64_t a_cs, const float* Bp, int ldb,
                         int K, float* C, int ldc, float alpha, tail_t tail) {
  vec_t acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
  for (int k = 0; k < K; ++k) {
    vec_t b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(Bp + (int64_t)k * ldb + kW * v);
    for (int r = 0; r < MR; ++r) {
      const vec_t a = vset1(A[r * a_rs + k * a_cs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = vfmadd(a, b[v], acc[r][v]);
    }
  }
  const vec_t s = vset1(alpha);
  for (int r = 0; r < MR; ++r) {
    float* row = C + (int64_t)r * ldc;
    for (int v = 0; v < NV - 1; ++v) vstore(row + kW * v, vmul(acc[r][v], s));
    vstore_tail(row + kW * (NV - 1), tail, vmul(acc[r][NV - 1], s));
  }
}

typedef void (*micro_kernel_t)(const float*, int64_t, int64_t, const float*, int, int, float*,
                               int, float, tail_t);
#if defined(__AVX512F__)
#define GB_ROW(mr) {micro_kernel<mr, 1>, micro_kernel<mr, 2>, micro_kernel<mr, 3>, micro_kernel<mr, 4>}
#else
#define GB_ROW(mr) {micro_kernel<mr, 1>, micro_kernel<mr, 2>}
#endif
static const micro_kernel_t kMicroKernels[6][kNV] = {GB_ROW(1), GB_ROW(2), GB_ROW(3),
                                                     GB_ROW(4), GB_ROW(5), GB_ROW(6)};
#undef GB_ROW

// C[n] = alpha * op(A[n]) op(B[n]) for n < N, with op(A) (M, K) and op(B) (K, P).
static void batched_gemm(const float* A, const float* B, float* C, int64_t N, int M, int K,
                         int P, bool ta, bool tb, float alpha) {
  const int ldb = (P + kW - 1) / kW * kW;
  const int64_t a_rs = ta ? 1 : K, a_cs = ta ? M : 1;
#pragma omp parallel
  {
    std::vector<float> pack((size_t)K * ldb, 0.f);  // op(B[n]), zero padded to ldb columns
    float* Bp = pack.data();
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* An = A + n * (int64_t)M * K;
      const float* Bn = B + n * (int64_t)K * P;
      float* Cn = C + n * (int64_t)M * P;
      if (tb) {  // Bn is (P, K): transpose into the pack
        for (int j = 0; j < P; ++j)
          for (int k = 0; k < K; ++k) Bp[(int64_t)k * ldb + j] = Bn[(int64_t)j * K + k];
      } else {
        for (int k = 0; k < K; ++k)
          std::memcpy(Bp + (int64_t)k * ldb, Bn + (int64_t)k * P, sizeof(float) * P);
      }
      for (int j0 = 0; j0 < P; j0 += kW * kNV) {
        const int width = std::min<int>(kW * kNV, P - j0), nv = (width + kW - 1) / kW;
        const int rest = width - kW * (nv - 1);  // 1..W columns in the last vector
        const tail_t tail = tail_mask(rest);
        for (int i0 = 0; i0 < M; i0 += 6) {
          const int mr = std::min(6, M - i0);
          kMicroKernels[mr - 1][nv - 1](An + i0 * a_rs, a_rs, a_cs, Bp + j0, ldb, K,
                                        Cn + (int64_t)i0 * P + j0, P, alpha, tail);
        }
      }
    }
  }
}
#else
// Without AVX2: the same batch split among threads, each product a plain loop that the
// compiler vectorises (i-k-j order: unit stride over j).
static void batched_gemm(const float* A, const float* B, float* C, int64_t N, int M, int K,
                         int P, bool ta, bool tb, float alpha) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* An = A + n * (int64_t)M * K;
    const float* Bn = B + n * (int64_t)K * P;
    float* Cn = C + n * (int64_t)M * P;
    for (int i = 0; i < M; ++i) {
      float* row = Cn + (int64_t)i * P;
      std::fill(row, row + P, 0.f);
      for (int k = 0; k < K; ++k) {
        const float a = alpha * (ta ? An[(int64_t)k * M + i] : An[(int64_t)i * K + k]);
        if (tb) {
          for (int j = 0; j < P; ++j) row[j] += a * Bn[(int64_t)j * K + k];
        } else {
          const float* brow = Bn + (int64_t)k * P;
          for (int j = 0; j < P; ++j) row[j] += a * brow[j];
        }
      }
    }
  }
}
#endif

struct BmmDims {
  int64_t N;
  int M, K, P;
  bool ta, tb;
};

static BmmDims bmm_dims(const Attrs& attrs, const MXTensor& a, const MXTensor& b) {
  BmmDims d;
  d.ta = flag_attr(attrs, "transpose_a");
  d.tb = flag_attr(attrs, "transpose_b");
  d.N = a.shape[0];
  d.M = static_cast<int>(d.ta ? a.shape[2] : a.shape[1]);
  d.K = static_cast<int>(d.ta ? a.shape[1] : a.shape[2]);
  d.P = static_cast<int>(d.tb ? b.shape[1] : b.shape[2]);
  return d;
}

static MXReturnValue bmm_parse(const Attrs&, int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 1;
  return MX_SUCCESS;
}

static MXReturnValue bmm_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  return all_float32("gb_bmm", in, out);
}

static MXReturnValue bmm_shape(const Attrs& attrs, Shapes* in, Shapes* out) {
  const auto& a = (*in)[0];
  const auto& b = (*in)[1];
  if (a.size() != 3 || b.size() != 3 || a[0] != b[0]) {
    MX_ERROR_MSG << "gb_bmm: needs two 3-d inputs with the same batch size";
    return MX_FAIL;
  }
  const bool ta = flag_attr(attrs, "transpose_a"), tb = flag_attr(attrs, "transpose_b");
  const unsigned M = ta ? a[2] : a[1], K = ta ? a[1] : a[2];
  const unsigned Kb = tb ? b[2] : b[1], P = tb ? b[1] : b[2];
  if (K != Kb) {
    MX_ERROR_MSG << "gb_bmm: inner sizes differ (" << K << " and " << Kb << ")";
    return MX_FAIL;
  }
  (*out)[0] = {a[0], M, P};
  return MX_SUCCESS;
}

static MXReturnValue bmm_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource&) {
  MXTensor& a = (*in)[0];
  MXTensor& b = (*in)[1];
  const BmmDims d = bmm_dims(attrs, a, b);
  batched_gemm(a.data<float>(), b.data<float>(), (*out)[0].data<float>(), d.N, d.M, d.K, d.P,
               d.ta, d.tb, float_attr(attrs, "alpha", 1.f));
  return MX_SUCCESS;
}

// inputs: dC, A, B (then C, unused); outputs: dA, dB. With C = alpha op(A) op(B):
// d op(A) = alpha dC op(B)^T and d op(B) = alpha op(A)^T dC, each written in A's and B's
// own layout.
static MXReturnValue bmm_backward(const Attrs& attrs, std::vector<MXTensor>* in,
                                  std::vector<MXTensor>* out, const OpResource&) {
  const float* dC = (*in)[0].data<float>();
  MXTensor& a = (*in)[1];
  MXTensor& b = (*in)[2];
  const BmmDims d = bmm_dims(attrs, a, b);
  const float alpha = float_attr(attrs, "alpha", 1.f);
  const float* A = a.data<float>();
  const float* B = b.data<float>();
  float* dA = (*out)[0].data<float>();
  float* dB = (*out)[1].data<float>();
  if (!d.ta)  // dA (M, K) = dC (M, P) op(B)^T (P, K)
    batched_gemm(dC, B, dA, d.N, d.M, d.P, d.K, false, !d.tb, alpha);
  else        // dA (K, M) = op(B) (K, P) dC^T (P, M)
    batched_gemm(B, dC, dA, d.N, d.K, d.P, d.M, d.tb, true, alpha);
  if (!d.tb)  // dB (K, P) = op(A)^T (K, M) dC (M, P)
    batched_gemm(A, dC, dB, d.N, d.K, d.M, d.P, !d.ta, false, alpha);
  else        // dB (P, K) = dC^T (P, M) op(A) (M, K)
    batched_gemm(dC, A, dB, d.N, d.P, d.M, d.K, true, d.ta, alpha);
  return MX_SUCCESS;
}

REGISTER_OP(gb_bmm)
    .setForward(bmm_forward, "cpu")
    .setBackward(bmm_backward, "cpu")
    .setParseAttrs(bmm_parse)
    .setInferType(bmm_type)
    .setInferShape(bmm_shape);

// ------------------------------------------------------------------------ LayerNorm

static MXReturnValue ln_parse(const Attrs&, int* num_in, int* num_out) {
  *num_in = 3;
  *num_out = 1;
  return MX_SUCCESS;
}

static MXReturnValue ln_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  return all_float32("gb_layer_norm", in, out);
}

static MXReturnValue ln_shape(const Attrs&, Shapes* in, Shapes* out) {
  const auto& x = (*in)[0];
  if (x.empty()) {
    MX_ERROR_MSG << "gb_layer_norm: data needs at least one axis";
    return MX_FAIL;
  }
  const unsigned H = x.back();
  for (int i = 1; i <= 2; ++i) {
    if ((*in)[i].size() != 1 || (*in)[i][0] != H) {
      MX_ERROR_MSG << "gb_layer_norm: gamma and beta must have shape (" << H << ",)";
      return MX_FAIL;
    }
  }
  (*out)[0] = x;
  return MX_SUCCESS;
}

// Mean and 1 / sqrt(variance + eps) of one row, in two passes (no cancellation).
static inline void row_stats(const float* x, int H, float eps, float* mean, float* rstd) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < H; ++j) sum += x[j];
  const float m = sum / H;
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int j = 0; j < H; ++j) {
    const float c = x[j] - m;
    sq += c * c;
  }
  *mean = m;
  *rstd = 1.f / std::sqrt(sq / H + eps);
}

static MXReturnValue ln_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                std::vector<MXTensor>* out, const OpResource&) {
  MXTensor& xt = (*in)[0];
  const int H = static_cast<int>(xt.shape.back());
  const int64_t rows = xt.size() / H;
  const float* x = xt.data<float>();
  const float* gamma = (*in)[1].data<float>();
  const float* beta = (*in)[2].data<float>();
  float* y = (*out)[0].data<float>();
  const float eps = float_attr(attrs, "eps", 1e-5f);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * H;
    float* yr = y + r * H;
    float m, rs;
    row_stats(xr, H, eps, &m, &rs);
#pragma omp simd
    for (int j = 0; j < H; ++j) yr[j] = (xr[j] - m) * rs * gamma[j] + beta[j];
  }
  return MX_SUCCESS;
}

// inputs: dy, x, gamma, beta (then y, unused); outputs: dx, dgamma, dbeta. With
// xhat = (x - mean) * rstd and g = gamma * dy, per row:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
// and over all rows dgamma = sum(dy * xhat), dbeta = sum(dy). The statistics are recomputed
// from x (one more read of a row that is in cache anyway) instead of being stored.
static MXReturnValue ln_backward(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res) {
  MXTensor& xt = (*in)[1];
  const int H = static_cast<int>(xt.shape.back());
  const int64_t rows = xt.size() / H;
  const float* dy = (*in)[0].data<float>();
  const float* x = xt.data<float>();
  const float* gamma = (*in)[2].data<float>();
  float* dx = (*out)[0].data<float>();
  float* dgamma = (*out)[1].data<float>();
  float* dbeta = (*out)[2].data<float>();
  const float eps = float_attr(attrs, "eps", 1e-5f);
  const int slots = omp_get_max_threads();
  // per thread: H partial sums for dgamma, then H for dbeta; unused slots stay zero
  float* partial = static_cast<float*>(res.alloc_cpu(sizeof(float) * 2 * H * slots));
  std::fill(partial, partial + (size_t)2 * H * slots, 0.f);
#pragma omp parallel num_threads(slots)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* pg = partial + (size_t)2 * H * t;
    float* pb = pg + H;
    const int64_t lo = rows * t / nt, hi = rows * (t + 1) / nt;
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = x + r * H;
      const float* dyr = dy + r * H;
      float* dxr = dx + r * H;
      float m, rs;
      row_stats(xr, H, eps, &m, &rs);
      float mean_g = 0.f, mean_gx = 0.f;
#pragma omp simd reduction(+ : mean_g, mean_gx)
      for (int j = 0; j < H; ++j) {
        const float xhat = (xr[j] - m) * rs, g = gamma[j] * dyr[j];
        mean_g += g;
        mean_gx += g * xhat;
        pg[j] += dyr[j] * xhat;
        pb[j] += dyr[j];
      }
      mean_g /= H;
      mean_gx /= H;
#pragma omp simd
      for (int j = 0; j < H; ++j)
        dxr[j] = rs * (gamma[j] * dyr[j] - mean_g - (xr[j] - m) * rs * mean_gx);
    }
  }
  for (int j = 0; j < H; ++j) {  // the threads' partial sums, in a fixed order
    float sg = 0.f, sb = 0.f;
    for (int t = 0; t < slots; ++t) {
      sg += partial[(size_t)2 * H * t + j];
      sb += partial[(size_t)2 * H * t + H + j];
    }
    dgamma[j] = sg;
    dbeta[j] = sb;
  }
  return MX_SUCCESS;
}

REGISTER_OP(gb_layer_norm)
    .setForward(ln_forward, "cpu")
    .setBackward(ln_backward, "cpu")
    .setParseAttrs(ln_parse)
    .setInferType(ln_type)
    .setInferShape(ln_shape);

// ------------------------------------------------------------- softmax cross-entropy

// exp(x) for x <= 0 and beyond, as 2^n * 2^f with |f| <= 1/2: a degree-6 polynomial
// (relative error below 2e-7); `vexp` above is the same for whole vectors, and this one
// does the rows' tails (and everything without AVX2). Underflows to about 1e-38 below -87.
static inline float exp_approx(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504f;  // x / ln 2
  // round to nearest by the 1.5 * 2^23 trick (|t| < 2^22 here): std::nearbyint is a call
  // that stops GCC vectorising the loops around it unless -fno-trapping-math is given
  const float n = (t + 12582912.f) - 12582912.f;
  const float f = (t - n) * 0.69314718f;  // in [-ln2 / 2, ln2 / 2]
  float p = 1.f / 720;
  p = p * f + 1.f / 120;
  p = p * f + 1.f / 24;
  p = p * f + 1.f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The largest element of a row. (GCC vectorises `omp simd reduction(max)` here into a loop
// at a quarter of this one's speed: 85 against 18 ms over the MLM head's logits.)
static inline float row_max(const float* x, int64_t n) {
  float m = -INFINITY;
  int64_t j = 0;
#if GB_VEC
  vec_t a = vset1(-INFINITY), b = a, c = a, d = a;
  for (; j + 4 * kW <= n; j += 4 * kW) {
    a = vmax(a, vload(x + j));
    b = vmax(b, vload(x + j + kW));
    c = vmax(c, vload(x + j + 2 * kW));
    d = vmax(d, vload(x + j + 3 * kW));
  }
  float lanes[kW];
  vstore(lanes, vmax(vmax(a, b), vmax(c, d)));
  for (float v : lanes) m = std::max(m, v);
#endif
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// sum of exp(x[j] - shift) over a row
static inline float row_sum_exp(const float* x, int64_t n, float shift) {
  float sum = 0.f;
  int64_t j = 0;
#if GB_VEC
  const vec_t s = vset1(shift);
  vec_t a = vzero(), b = vzero();  // two chains, so that the adds overlap
  for (; j + 2 * kW <= n; j += 2 * kW) {
    a = vadd(a, vexp(vsub(vload(x + j), s)));
    b = vadd(b, vexp(vsub(vload(x + j + kW), s)));
  }
  sum = vhsum(vadd(a, b));
#endif
  for (; j < n; ++j) sum += exp_approx(x[j] - shift);
  return sum;
}

// y[j] = exp(x[j] - shift) * g over a row
static inline void row_exp_scaled(const float* x, float* y, int64_t n, float shift, float g) {
  int64_t j = 0;
#if GB_VEC
  const vec_t s = vset1(shift), gv = vset1(g);
  for (; j + kW <= n; j += kW) vstore(y + j, vmul(vexp(vsub(vload(x + j), s)), gv));
#endif
  for (; j < n; ++j) y[j] = exp_approx(x[j] - shift) * g;
}

static int64_t label_at(const MXTensor& labels, int64_t r, int64_t V) {
  int64_t c;
  switch (labels.dtype) {
    case mxnet::ext::kInt32: c = static_cast<const int32_t*>(labels.data_ptr)[r]; break;
    case mxnet::ext::kInt64: c = static_cast<const int64_t*>(labels.data_ptr)[r]; break;
    default: c = static_cast<int64_t>(static_cast<const float*>(labels.data_ptr)[r]);
  }
  return std::min(std::max(c, (int64_t)0), V - 1);  // clipped, as pick(mode='clip') does
}

static MXReturnValue ce_parse(const Attrs&, int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 2;
  return MX_SUCCESS;
}

static MXReturnValue ce_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  int& logits = (*in)[0];
  int& labels = (*in)[1];
  if (logits == -1) logits = mxnet::ext::kFloat32;
  if (labels == -1) labels = mxnet::ext::kFloat32;
  if (logits != mxnet::ext::kFloat32 ||
      (labels != mxnet::ext::kFloat32 && labels != mxnet::ext::kInt32 &&
       labels != mxnet::ext::kInt64)) {
    MX_ERROR_MSG << "gb_softmax_ce: float32 logits and float32 or integer labels only";
    return MX_FAIL;
  }
  (*out)[0] = (*out)[1] = mxnet::ext::kFloat32;
  return MX_SUCCESS;
}

static MXReturnValue ce_shape(const Attrs&, Shapes* in, Shapes* out) {
  const auto& x = (*in)[0];
  const auto& y = (*in)[1];
  if (x.size() < 2 || y.size() != x.size() - 1 || !std::equal(y.begin(), y.end(), x.begin())) {
    MX_ERROR_MSG << "gb_softmax_ce: logits (..., V) need labels of shape (...)";
    return MX_FAIL;
  }
  (*out)[0] = (*out)[1] = y;
  return MX_SUCCESS;
}

// outputs: the loss per row, logsumexp(x) - x[label], and logsumexp(x) for the backward
static MXReturnValue ce_forward(const Attrs&, std::vector<MXTensor>* in,
                                std::vector<MXTensor>* out, const OpResource&) {
  MXTensor& xt = (*in)[0];
  const int64_t V = xt.shape.back(), rows = xt.size() / V;
  const float* x = xt.data<float>();
  float* loss = (*out)[0].data<float>();
  float* lse = (*out)[1].data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * V;
    const float m = row_max(xr, V);
    lse[r] = m + std::log(row_sum_exp(xr, V, m));
    loss[r] = lse[r] - xr[label_at((*in)[1], r, V)];
  }
  return MX_SUCCESS;
}

// inputs: dloss, dlse, logits, labels, loss, lse; outputs: dlogits, dlabels (zeros).
// dlogits = softmax(x) * (dloss + dlse) - onehot(label) * dloss, row by row.
static MXReturnValue ce_backward(const Attrs&, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource&) {
  const float* dloss = (*in)[0].data<float>();
  const float* dlse = (*in)[1].data<float>();
  MXTensor& xt = (*in)[2];
  const int64_t V = xt.shape.back(), rows = xt.size() / V;
  const float* x = xt.data<float>();
  const float* lse = (*in)[5].data<float>();
  float* dx = (*out)[0].data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * V;
    float* dxr = dx + r * V;
    const float l = lse[r], g = dloss[r] + dlse[r];
    row_exp_scaled(xr, dxr, V, l, g);
    dxr[label_at((*in)[3], r, V)] -= dloss[r];
  }
  MXTensor& dlabels = (*out)[1];
  std::memset(dlabels.data_ptr, 0, dlabels.size() * (dlabels.dtype == mxnet::ext::kInt64 ? 8 : 4));
  return MX_SUCCESS;
}

REGISTER_OP(gb_softmax_ce)
    .setForward(ce_forward, "cpu")
    .setBackward(ce_backward, "cpu")
    .setParseAttrs(ce_parse)
    .setInferType(ce_type)
    .setInferShape(ce_shape);

// ---------------------------------------------------------------------------- dropout

// A 32-bit hash of (seed, i) (the "lowbias32" mixer): a counter-based stream, so every
// element's draw depends only on the seed and its index, not on how the threads split the
// work, and the loop vectorises.
static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

static MXReturnValue dropout_parse(const Attrs&, int* num_in, int* num_out) {
  *num_in = 1;
  *num_out = 2;
  return MX_SUCCESS;
}

static MXReturnValue dropout_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  int& x = (*in)[0];
  if (x == -1) x = mxnet::ext::kFloat32;
  if (x != mxnet::ext::kFloat32) {
    MX_ERROR_MSG << "gb_dropout: float32 inputs only (cast them first)";
    return MX_FAIL;
  }
  (*out)[0] = mxnet::ext::kFloat32;
  (*out)[1] = mxnet::ext::kUint8;
  return MX_SUCCESS;
}

static MXReturnValue dropout_shape(const Attrs&, Shapes* in, Shapes* out) {
  (*out)[0] = (*out)[1] = (*in)[0];
  return MX_SUCCESS;
}

// outputs: y = x * keep / (1 - p), and keep (uint8, 1 where the element is kept)
static MXReturnValue dropout_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                     std::vector<MXTensor>* out, const OpResource& res) {
  const float p = float_attr(attrs, "p", 0.5f);
  if (!(p >= 0.f && p < 1.f)) {
    MX_ERROR_MSG << "gb_dropout: p must be in [0, 1), got " << p;
    return MX_FAIL;
  }
  MXTensor& xt = (*in)[0];
  const int64_t n = xt.size();
  const float* x = xt.data<float>();
  float* y = (*out)[0].data<float>();
  uint8_t* keep = static_cast<uint8_t*>((*out)[1].data_ptr);
  // one draw from MXNet's seeded generator per call: mx.random.seed makes runs repeatable
  const uint32_t seed = (*res.get_cpu_rand_states())();
  const uint32_t threshold = static_cast<uint32_t>(static_cast<double>(p) * 4294967296.0);
  const float scale = 1.f / (1.f - p);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = mix32(seed ^ mix32(static_cast<uint32_t>(i) + 0x9e3779b9U *
                                          static_cast<uint32_t>(i >> 32)));
    const uint8_t k = h >= threshold;
    keep[i] = k;
    y[i] = x[i] * (scale * k);  // branch-free, so that AVX2 vectorises it too
  }
  return MX_SUCCESS;
}

// inputs: dy, dkeep (unused), x, y, keep; outputs: dx = dy * keep / (1 - p)
static MXReturnValue dropout_backward(const Attrs& attrs, std::vector<MXTensor>* in,
                                      std::vector<MXTensor>* out, const OpResource&) {
  const float scale = 1.f / (1.f - float_attr(attrs, "p", 0.5f));
  MXTensor& dyt = (*in)[0];
  const int64_t n = dyt.size();
  const float* dy = dyt.data<float>();
  const uint8_t* keep = static_cast<const uint8_t*>((*in)[4].data_ptr);
  float* dx = (*out)[0].data<float>();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * (scale * keep[i]);
  return MX_SUCCESS;
}

REGISTER_OP(gb_dropout)
    .setForward(dropout_forward, "cpu")
    .setBackward(dropout_backward, "cpu")
    .setParseAttrs(dropout_parse)
    .setInferType(dropout_type)
    .setInferShape(dropout_shape);

// ------------------------------------------------------------------------------ Adam

// gb_adam_update(weight, grad, mean, var; lr, beta1, beta2, epsilon, wd, rescale_grad,
// clip_gradient) -> the new weight (call it with out=weight); mean and var are updated in
// place. MXNet's adam_update, element by element in the same float operations:
//   g = grad * rescale_grad + weight * wd, clipped to +-clip_gradient when that is >= 0
//   mean = beta1 * mean + (1 - beta1) * g;  var = beta2 * var + (1 - beta2) * g * g
//   weight = weight - lr * mean / (sqrt(var) + epsilon)
// so the same bits (no fused multiply-adds: each product and sum rounds as MXNet's do),
// eight lanes at a time: 2.6 ms for bert.small's token embedding (5.2 M floats), where
// MXNet's loop takes 11.3 (experiments/RESULTS.md, sixth round).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
static MXReturnValue adam_parse(const Attrs&, int* num_in, int* num_out) {
  *num_in = 4;
  *num_out = 1;
  return MX_SUCCESS;
}

static MXReturnValue adam_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  return all_float32("gb_adam_update", in, out);
}

static MXReturnValue adam_shape(const Attrs&, Shapes* in, Shapes* out) {
  for (int i = 1; i < 4; ++i)
    if ((*in)[i] != (*in)[0]) {
      MX_ERROR_MSG << "gb_adam_update: weight, grad, mean and var must have one shape";
      return MX_FAIL;
    }
  (*out)[0] = (*in)[0];
  return MX_SUCCESS;
}

static MXReturnValue adam_mutate(const Attrs&, std::vector<int>* inputs) {
  inputs->push_back(2);  // mean
  inputs->push_back(3);  // var
  return MX_SUCCESS;
}

static MXReturnValue adam_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                  std::vector<MXTensor>* out, const OpResource&) {
  // parsed as adam_update parses them: the same floats, so the same bits
  const float lr = mxnet_float_attr(attrs, "lr", 0.f), wd = mxnet_float_attr(attrs, "wd", 0.f);
  const float beta1 = mxnet_float_attr(attrs, "beta1", 0.9f);
  const float beta2 = mxnet_float_attr(attrs, "beta2", 0.999f);
  const float eps = mxnet_float_attr(attrs, "epsilon", 1e-8f);
  const float rescale = mxnet_float_attr(attrs, "rescale_grad", 1.f);
  const float clip = mxnet_float_attr(attrs, "clip_gradient", -1.f);
  const float c1 = 1.f - beta1, c2 = 1.f - beta2;
  const int64_t n = (*in)[0].size();
  const float* w = (*in)[0].data<float>();
  const float* grad = (*in)[1].data<float>();
  float* mean = (*in)[2].data<float>();
  float* var = (*in)[3].data<float>();
  float* wout = (*out)[0].data<float>();  // may be w itself: each element read, then written
  const auto scalar = [&](int64_t i) {
    float g = grad[i] * rescale + w[i] * wd;
    if (clip >= 0.f) g = g > clip ? clip : (g < -clip ? -clip : g);
    mean[i] = beta1 * mean[i] + c1 * g;
    var[i] = beta2 * var[i] + c2 * g * g;
    wout[i] = w[i] - lr * mean[i] / (std::sqrt(var[i]) + eps);
  };
#if defined(__AVX2__)
  const int64_t nv = n / 8 * 8;
  const __m256 vr = _mm256_set1_ps(rescale), vwd = _mm256_set1_ps(wd);
  const __m256 vb1 = _mm256_set1_ps(beta1), vb2 = _mm256_set1_ps(beta2);
  const __m256 vc1 = _mm256_set1_ps(c1), vc2 = _mm256_set1_ps(c2);
  const __m256 vlr = _mm256_set1_ps(lr), veps = _mm256_set1_ps(eps);
  const __m256 vclip = _mm256_set1_ps(clip), vnclip = _mm256_set1_ps(-clip);
  const bool clipped = clip >= 0.f;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < nv; i += 8) {
    const __m256 wi = _mm256_loadu_ps(w + i);
    __m256 g = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(grad + i), vr),
                             _mm256_mul_ps(wi, vwd));
    if (clipped) g = _mm256_max_ps(_mm256_min_ps(g, vclip), vnclip);
    const __m256 m = _mm256_add_ps(_mm256_mul_ps(vb1, _mm256_loadu_ps(mean + i)),
                                   _mm256_mul_ps(vc1, g));
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(vb2, _mm256_loadu_ps(var + i)),
                                   _mm256_mul_ps(_mm256_mul_ps(vc2, g), g));
    _mm256_storeu_ps(mean + i, m);
    _mm256_storeu_ps(var + i, v);
    const __m256 step = _mm256_div_ps(_mm256_mul_ps(vlr, m),
                                      _mm256_add_ps(_mm256_sqrt_ps(v), veps));
    _mm256_storeu_ps(wout + i, _mm256_sub_ps(wi, step));
  }
  for (int64_t i = nv; i < n; ++i) scalar(i);
#else
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) scalar(i);
#endif
  return MX_SUCCESS;
}
#pragma GCC pop_options

REGISTER_OP(gb_adam_update)
    .setForward(adam_forward, "cpu")
    .setParseAttrs(adam_parse)
    .setInferType(adam_type)
    .setInferShape(adam_shape)
    .setMutateInputs(adam_mutate);

// ------------------------------------------------------------- packed self-attention

// gb_attention(q, k, v, valid_lens[, rows], num_heads, alpha, p, query_rows)
//   -> (out, lse, seed)
// Multi-head self-attention on a packed batch (gluon_bert/data/packing.py): q, k, v (T, H)
// hold the real tokens of B sequences one after another (example b's valid_lens[b] rows,
// in order; rows past their sum are padding). Each sequence attends to itself only, so
// there is no length mask and no arithmetic on padding: sum(L_b^2) instead of B * L^2,
// about a third at the book's lengths, and no head transposes (heads are column slices).
//   out[i, head] = dropout(softmax(alpha * q_i k^T)) v   over the rows of i's sequence
//   lse (T, h): the softmax's log-sum-exp, kept for the backward, which recomputes the
//   probabilities from it (as FlashAttention does) instead of storing (B, h, L, L);
//   seed (1,): the dropout draw's seed; the backward regenerates the same mask from it.
// With query_rows=True a fifth input rows (R,) gives the packed row of each of R queries,
// q is (R, H) (the queries at those rows, in any order, repeats allowed), and out (R, H),
// lse (R, h) are theirs: keys and values are still every row of each query's sequence.
// The last encoder block uses it, where the heads read <cls> and the predicted rows only.

// out[0 .. n) = (acc ? out : 0) + sum_{c < K} a[c] * B[c * ldb + 0 .. n), n a multiple of
// the vector width, B's rows readable to n: a row of a times a matrix, with the n sums in
// registers (up to 8 vectors at a time).
#if GB_VEC
template <int NV>
static inline void rowmat_block(const float* a, int K, const float* B, int64_t ldb, float* out,
                                bool acc) {
  vec_t s[NV];
  for (int v = 0; v < NV; ++v) s[v] = acc ? vload(out + v * kW) : vzero();
  for (int c = 0; c < K; ++c) {
    const vec_t x = vset1(a[c]);
    const float* b = B + c * ldb;
    for (int v = 0; v < NV; ++v) s[v] = vfmadd(x, vload(b + v * kW), s[v]);
  }
  for (int v = 0; v < NV; ++v) vstore(out + v * kW, s[v]);
}
#endif

static void rowmat(const float* a, int K, const float* B, int64_t ldb, int n, float* out,
                   bool acc) {
#if GB_VEC
  int j = 0;
  for (; n - j >= 8 * kW; j += 8 * kW) rowmat_block<8>(a, K, B + j, ldb, out + j, acc);
  switch ((n - j) / kW) {
    case 7: rowmat_block<7>(a, K, B + j, ldb, out + j, acc); break;
    case 6: rowmat_block<6>(a, K, B + j, ldb, out + j, acc); break;
    case 5: rowmat_block<5>(a, K, B + j, ldb, out + j, acc); break;
    case 4: rowmat_block<4>(a, K, B + j, ldb, out + j, acc); break;
    case 3: rowmat_block<3>(a, K, B + j, ldb, out + j, acc); break;
    case 2: rowmat_block<2>(a, K, B + j, ldb, out + j, acc); break;
    case 1: rowmat_block<1>(a, K, B + j, ldb, out + j, acc); break;
    default: break;
  }
#else
  if (!acc) std::fill(out, out + n, 0.f);
  for (int c = 0; c < K; ++c) {
    const float x = a[c];
    const float* b = B + c * ldb;
    for (int j = 0; j < n; ++j) out[j] += x * b[j];
  }
#endif
}

#if GB_VEC
static const int kLanes = kW;
#else
static const int kLanes = 8;
#endif
static inline int round_lanes(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

struct AttnDims {
  int64_t T, B;  // T: rows of k and v
  int H, h, d;
  float alpha, p;
  uint32_t threshold;  // the dropout: an element is kept where its hash is >= threshold
  float scale;         // and then scaled by 1 / (1 - p)
};

// The dropout of the attention weights: the counter-based hash of gb_dropout, keyed by the
// query's packed row, the head and the key's place k in the sequence (L < 2^16):
//   i = ((row * h + head) << 16) + k,  hash = mix32(seed ^ mix32(lo32(i) + 0x9e3779b9 hi32(i)))
// and the weight is kept (times 1 / (1 - p)) where hash >= threshold.
// keep_scales writes that factor for keys k = 0 .. n) of one query row and head into ks (n
// rounded up to 8 lanes; past n anything), eight at a time with AVX2 integer arithmetic
// (the scalar hash was about a third of the forward's own time). lo32(i) = lo32(base) + k
// without a carry (base's low 16 bits are 0), hi32(i) = hi32(base).
static void keep_scales(const AttnDims& a, uint32_t seed, int64_t row, int head, int n,
                        float* ks) {
  const uint64_t base = (static_cast<uint64_t>(row) * a.h + head) << 16;
  const uint32_t x0 = static_cast<uint32_t>(base) +
                      0x9e3779b9U * static_cast<uint32_t>(base >> 32);  // + k
  int k = 0;
#if defined(__AVX2__)
  const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vseed = _mm256_set1_epi32(static_cast<int>(seed));
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(a.threshold));
  const __m256 scale = _mm256_set1_ps(a.scale);
  const auto mix = [](__m256i x) {  // mix32, lane by lane
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  };
  for (; k < n; k += 8) {
    const __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(x0 + k)), step);
    const __m256i h = mix(_mm256_xor_si256(vseed, mix(x)));
    // h >= threshold, unsigned: max(h, threshold) == h
    const __m256i kept = _mm256_cmpeq_epi32(_mm256_max_epu32(h, thr), h);
    _mm256_storeu_ps(ks + k, _mm256_and_ps(_mm256_castsi256_ps(kept), scale));
  }
#endif
  for (; k < n; ++k) ks[k] = mix32(seed ^ mix32(x0 + k)) >= a.threshold ? a.scale : 0.f;
}

static MXReturnValue attn_parse(const Attrs& attrs, int* num_in, int* num_out) {
  *num_in = flag_attr(attrs, "query_rows") ? 5 : 4;
  *num_out = 3;
  const float p = float_attr(attrs, "p", 0.f);
  if (!(p >= 0.f && p < 1.f)) {
    MX_ERROR_MSG << "gb_attention: p must be in [0, 1), got " << p;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

static MXReturnValue attn_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  for (int& t : *in) {
    if (t == -1) t = mxnet::ext::kFloat32;
    if (t != mxnet::ext::kFloat32) {
      MX_ERROR_MSG << "gb_attention: float32 inputs only (cast them first)";
      return MX_FAIL;
    }
  }
  (*out)[0] = (*out)[1] = mxnet::ext::kFloat32;
  (*out)[2] = mxnet::ext::kInt32;
  return MX_SUCCESS;
}

static MXReturnValue attn_shape(const Attrs& attrs, Shapes* in, Shapes* out) {
  const auto& q = (*in)[0];
  const auto& k = (*in)[1];
  const int h = static_cast<int>(float_attr(attrs, "num_heads", 0.f));
  const bool sub = flag_attr(attrs, "query_rows");
  if (q.size() != 2 || k.size() != 2 || k[1] != q[1] || (*in)[2] != k ||
      (!sub && k[0] != q[0]) || (sub && (*in)[4] != std::vector<unsigned>{q[0]}) ||
      (*in)[3].size() != 1 || h < 1 || q[1] % h) {
    MX_ERROR_MSG << "gb_attention: q, k, v (T, H) with H divisible by num_heads, and "
                    "valid_lens (B,); with query_rows, q (R, H) and rows (R,)";
    return MX_FAIL;
  }
  (*out)[0] = q;
  (*out)[1] = {q[0], static_cast<unsigned>(h)};
  (*out)[2] = {1};
  return MX_SUCCESS;
}

static AttnDims attn_dims(const Attrs& attrs, const MXTensor& k, const MXTensor& lens) {
  AttnDims a;
  a.T = k.shape[0];
  a.H = static_cast<int>(k.shape[1]);
  a.B = lens.shape[0];
  a.h = static_cast<int>(float_attr(attrs, "num_heads", 1.f));
  a.d = a.H / a.h;
  a.alpha = float_attr(attrs, "alpha", 1.f);
  a.p = float_attr(attrs, "p", 0.f);
  a.threshold = static_cast<uint32_t>(static_cast<double>(a.p) * 4294967296.0);
  a.scale = 1.f / (1.f - a.p);
  return a;
}

// Each sequence's first packed row: starts[b] = sum of valid_lens before b; starts[B] is
// the number of real rows. An error (false, with the message) when a length is out of
// range or they do not fit in the T rows.
static bool sequence_starts(MXTensor& lens, int64_t T, std::vector<int64_t>* starts) {
  const float* l = lens.data<float>();
  const int64_t B = lens.shape[0];
  starts->assign(B + 1, 0);
  bool ok = true;
  for (int64_t b = 0; b < B && ok; ++b) {
    const int64_t n = static_cast<int64_t>(l[b]);
    ok = n >= 0 && n < 65536;  // the dropout's counter has 16 bits for a key
    (*starts)[b + 1] = (*starts)[b] + n;
  }
  if (!ok || (*starts)[B] > T) {
    MX_ERROR_MSG << "gb_attention: valid_lens must be in [0, 65536) and add up to at most "
                 << T << " (the rows of q)";
    return false;
  }
  return true;
}

// Each sequence's queries: the rows of q whose query is in sequence b are
// order[qstart[b] .. qstart[b + 1]), and their packed rows (keys' numbering) are given by
// `rows` (R,), or are those rows themselves (self-attention: q's rows are k's rows, and
// R = starts[B]). An error (false, with the message) for a row past the real ones.
static bool query_lists(const std::vector<int64_t>& starts, MXTensor* rows,
                        std::vector<int64_t>* qstart, std::vector<int64_t>* order) {
  const int64_t B = static_cast<int64_t>(starts.size()) - 1;
  if (rows == nullptr) {
    *qstart = starts;
    order->resize(starts[B]);
    for (int64_t i = 0; i < starts[B]; ++i) (*order)[i] = i;
    return true;
  }
  const float* r = rows->data<float>();
  const int64_t R = rows->shape[0];
  std::vector<int64_t> seq(R);
  qstart->assign(B + 1, 0);
  for (int64_t i = 0; i < R; ++i) {
    const int64_t row = static_cast<int64_t>(r[i]);
    if (!(r[i] >= 0.f) || row >= starts[B]) {
      MX_ERROR_MSG << "gb_attention: rows must name real rows, in [0, " << starts[B]
                   << "); got " << r[i];
      return false;
    }
    // the sequence that holds this row: the last start <= row
    seq[i] = std::upper_bound(starts.begin(), starts.end(), row) - starts.begin() - 1;
    ++(*qstart)[seq[i] + 1];
  }
  for (int64_t b = 0; b < B; ++b) (*qstart)[b + 1] += (*qstart)[b];
  std::vector<int64_t> fill(qstart->begin(), qstart->end() - 1);
  order->resize(R);
  for (int64_t i = 0; i < R; ++i) (*order)[fill[seq[i]]++] = i;  // stable: in row order
  return true;
}

// Row i's probabilities over its L keys: s (Lp,) holds the scores q_i k^T on entry and
// softmax(alpha * s) on exit (0 past L); returns the log-sum-exp.
static float softmax_row(float* s, int L, int Lp, float alpha) {
  for (int k = 0; k < L; ++k) s[k] *= alpha;
  const float m = row_max(s, L);
  const float lse = m + std::log(row_sum_exp(s, L, m));
  row_exp_scaled(s, s, L, lse, 1.f);
  std::fill(s + L, s + Lp, 0.f);
  return lse;
}

static MXReturnValue attn_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                  std::vector<MXTensor>* out, const OpResource& res) {
  const AttnDims a = attn_dims(attrs, (*in)[1], (*in)[3]);
  const bool sub = in->size() == 5;
  std::vector<int64_t> starts, qstart, order;
  if (!sequence_starts((*in)[3], a.T, &starts) ||
      !query_lists(starts, sub ? &(*in)[4] : nullptr, &qstart, &order))
    return MX_FAIL;
  const float* q = (*in)[0].data<float>();
  const float* k = (*in)[1].data<float>();
  const float* v = (*in)[2].data<float>();
  float* o = (*out)[0].data<float>();
  float* lse = (*out)[1].data<float>();
  int32_t* seed_out = static_cast<int32_t*>((*out)[2].data_ptr);
  const uint32_t seed = a.p > 0.f ? (*res.get_cpu_rand_states())() : 0u;
  std::memcpy(seed_out, &seed, sizeof seed);
  // rows of q that are no query (padding of a packed batch): zeros
  const int64_t Tq = (*in)[0].shape[0], answered = qstart[a.B];
  std::memset(o + answered * a.H, 0, (Tq - answered) * a.H * sizeof(float));
  std::memset(lse + answered * a.h, 0, (Tq - answered) * a.h * sizeof(float));
  const int dp = round_lanes(a.d);
#pragma omp parallel
  {
    std::vector<float> kt, vb, s, ob(dp), ks;
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < a.B * a.h; ++task) {
      const int64_t b = task / a.h;
      const int head = static_cast<int>(task % a.h);
      const int64_t r0 = starts[b];
      const int L = static_cast<int>(starts[b + 1] - r0), Lp = round_lanes(L);
      const int64_t m = qstart[b + 1] - qstart[b];
      if (L == 0 || m == 0) continue;
      // K^T (d, Lp) and V (L, dp) of this sequence and head, zero padded
      kt.assign(static_cast<size_t>(a.d) * Lp, 0.f);
      vb.assign(static_cast<size_t>(L) * dp, 0.f);
      s.resize(Lp);
      ks.resize(Lp + 8);
      for (int j = 0; j < L; ++j) {
        const float* kr = k + (r0 + j) * a.H + head * a.d;
        const float* vr = v + (r0 + j) * a.H + head * a.d;
        for (int c = 0; c < a.d; ++c) kt[c * Lp + j] = kr[c];
        std::memcpy(&vb[static_cast<size_t>(j) * dp], vr, a.d * sizeof(float));
      }
      for (int64_t i = 0; i < m; ++i) {
        const int64_t row = order[qstart[b] + i];  // the query's row of q
        rowmat(q + row * a.H + head * a.d, a.d, kt.data(), Lp, Lp, s.data(), false);
        lse[row * a.h + head] = softmax_row(s.data(), L, Lp, a.alpha);
        if (a.p > 0.f) {
          keep_scales(a, seed, row, head, L, ks.data());
          for (int j = 0; j < L; ++j) s[j] *= ks[j];
        }
        rowmat(s.data(), L, vb.data(), dp, dp, ob.data(), false);
        std::memcpy(o + row * a.H + head * a.d, ob.data(), a.d * sizeof(float));
      }
    }
  }
  return MX_SUCCESS;
}

// inputs: dout, dlse, dseed (unused), q, k, v, valid_lens[, rows], out, lse, seed;
// outputs: dq, dk, dv, dvalid_lens[, drows] (zeros). Per sequence and head, with
// P = softmax(alpha S) recomputed from lse, D the dropout's keep / (1 - p), Pd = P * D:
//   dV = Pd^T dO,  dP = (dO V^T) * D,  dS = alpha P * (dP - rowsum(P * dP)),
//   dQ = dS K,  dK = dS^T Q.
static MXReturnValue attn_backward(const Attrs& attrs, std::vector<MXTensor>* in,
                                   std::vector<MXTensor>* out, const OpResource&) {
  const bool sub = in->size() == 11;
  const AttnDims a = attn_dims(attrs, (*in)[4], (*in)[6]);
  std::vector<int64_t> starts, qstart, order;
  if (!sequence_starts((*in)[6], a.T, &starts) ||
      !query_lists(starts, sub ? &(*in)[7] : nullptr, &qstart, &order))
    return MX_FAIL;
  const int at = sub ? 8 : 7;  // the forward's outputs: out, lse, seed
  const float* dout = (*in)[0].data<float>();
  const float* q = (*in)[3].data<float>();
  const float* k = (*in)[4].data<float>();
  const float* v = (*in)[5].data<float>();
  const float* lse = (*in)[at + 1].data<float>();
  uint32_t seed;
  std::memcpy(&seed, (*in)[at + 2].data_ptr, sizeof seed);
  float* dq = (*out)[0].data<float>();
  float* dk = (*out)[1].data<float>();
  float* dv = (*out)[2].data<float>();
  const int64_t Tq = (*in)[3].shape[0], answered = qstart[a.B], real = starts[a.B];
  std::memset(dq + answered * a.H, 0, (Tq - answered) * a.H * sizeof(float));
  for (float* g : {dk, dv}) std::memset(g + real * a.H, 0, (a.T - real) * a.H * sizeof(float));
  const int dp = round_lanes(a.d);
#pragma omp parallel
  {
    // kt, vt (d, Lp); kb (L, dp); qb, dob (m, dp); pdt, dst (L, m) transposed as they
    // fill; s, dpd (Lp,) one row; g (dp,) one row of a gradient
    std::vector<float> kt, vt, qb, kb, dob, pdt, dst, s, dpd, g(dp), ks;
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < a.B * a.h; ++task) {
      const int64_t b = task / a.h;
      const int head = static_cast<int>(task % a.h);
      const int64_t r0 = starts[b];
      const int L = static_cast<int>(starts[b + 1] - r0), Lp = round_lanes(L);
      const int m = static_cast<int>(qstart[b + 1] - qstart[b]);
      if (L == 0) continue;
      if (m == 0) {  // no query in this sequence: its keys and values get no gradient
        for (int j = 0; j < L; ++j) {
          std::memset(dk + (r0 + j) * a.H + head * a.d, 0, a.d * sizeof(float));
          std::memset(dv + (r0 + j) * a.H + head * a.d, 0, a.d * sizeof(float));
        }
        continue;
      }
      const size_t dl = static_cast<size_t>(a.d) * Lp;
      kt.assign(dl, 0.f);
      vt.assign(dl, 0.f);
      kb.assign(static_cast<size_t>(L) * dp, 0.f);
      qb.assign(static_cast<size_t>(m) * dp, 0.f);
      dob.assign(static_cast<size_t>(m) * dp, 0.f);
      pdt.assign(static_cast<size_t>(L) * m, 0.f);
      dst.assign(static_cast<size_t>(L) * m, 0.f);
      s.resize(Lp);
      dpd.resize(Lp);
      ks.assign(Lp + 8, 1.f);  // no dropout: every weight kept, scale 1
      for (int j = 0; j < L; ++j) {
        const int64_t off = (r0 + j) * a.H + head * a.d;
        for (int c = 0; c < a.d; ++c) {
          kt[c * Lp + j] = k[off + c];
          vt[c * Lp + j] = v[off + c];
        }
        std::memcpy(&kb[static_cast<size_t>(j) * dp], k + off, a.d * sizeof(float));
      }
      for (int i = 0; i < m; ++i) {
        const int64_t off = order[qstart[b] + i] * a.H + head * a.d;
        std::memcpy(&qb[static_cast<size_t>(i) * dp], q + off, a.d * sizeof(float));
        std::memcpy(&dob[static_cast<size_t>(i) * dp], dout + off, a.d * sizeof(float));
      }
      for (int i = 0; i < m; ++i) {
        const int64_t row = order[qstart[b] + i];  // the query's row of q
        // P_i again, from the forward's log-sum-exp
        rowmat(&qb[static_cast<size_t>(i) * dp], a.d, kt.data(), Lp, Lp, s.data(), false);
        for (int j = 0; j < L; ++j) s[j] *= a.alpha;
        row_exp_scaled(s.data(), s.data(), L, lse[row * a.h + head], 1.f);
        // dP_i = (dO_i V^T) * D_i; Pd_i = P_i * D_i (its transpose kept for dV)
        rowmat(&dob[static_cast<size_t>(i) * dp], a.d, vt.data(), Lp, Lp, dpd.data(), false);
        if (a.p > 0.f) keep_scales(a, seed, row, head, L, ks.data());
        float dot = 0.f;
        for (int j = 0; j < L; ++j) {
          const float keep = ks[j];
          dpd[j] *= keep;
          pdt[static_cast<size_t>(j) * m + i] = s[j] * keep;
          dot += s[j] * dpd[j];
        }
        // dS_i = alpha P_i (dP_i - P_i . dP_i), zero past L
        for (int j = 0; j < L; ++j) {
          const float ds = a.alpha * s[j] * (dpd[j] - dot);
          dpd[j] = ds;
          dst[static_cast<size_t>(j) * m + i] = ds;
        }
        std::fill(dpd.begin() + L, dpd.end(), 0.f);
        rowmat(dpd.data(), L, kb.data(), dp, dp, g.data(), false);     // dQ_i = dS_i K
        std::memcpy(dq + row * a.H + head * a.d, g.data(), a.d * sizeof(float));
      }
      for (int j = 0; j < L; ++j) {
        const int64_t off = (r0 + j) * a.H + head * a.d;
        rowmat(&pdt[static_cast<size_t>(j) * m], m, dob.data(), dp, dp, g.data(), false);
        std::memcpy(dv + off, g.data(), a.d * sizeof(float));          // dV_j = Pd^T_j dO
        rowmat(&dst[static_cast<size_t>(j) * m], m, qb.data(), dp, dp, g.data(), false);
        std::memcpy(dk + off, g.data(), a.d * sizeof(float));          // dK_j = dS^T_j Q
      }
    }
  }
  for (size_t i = 3; i < out->size(); ++i) {  // lengths and rows: indices, no gradient
    MXTensor& t = (*out)[i];
    std::memset(t.data_ptr, 0, t.size() * sizeof(float));
  }
  return MX_SUCCESS;
}

REGISTER_OP(gb_attention)
    .setForward(attn_forward, "cpu")
    .setBackward(attn_backward, "cpu")
    .setParseAttrs(attn_parse)
    .setInferType(attn_type)
    .setInferShape(attn_shape);

MXReturnValue initialize(int version) {
  // lib_api.h's version 11 is MXNet 1.9's; MXNet passes its own version, e.g. 10901
  if (version < 10900) {
    MX_ERROR_MSG << "gluon-bert's kernels need MXNet 1.9 or newer, this is " << version;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}
