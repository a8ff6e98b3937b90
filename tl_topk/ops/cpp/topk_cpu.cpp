// Top-k attention on the CPU: the score block, the selection, the softmax and P V fused per block of
// query rows, and a backward over the saved (query, key) pairs only. Built on first use by
// tl_topk/ops/cpp_backend.py (torch.utils.cpp_extension); the Python side checks every argument.
//
// Layouts (all contiguous, one compute dtype: float or double):
//   q    [b, n_q, h, d]      queries (the kernels apply the score scale)
//   kt   [b, h_kv, d, n_kp]  K transposed, zero-padded to n_kp >= n_k + LANES - 1 keys (a task's vectors
//                            start at its first visible key, so the last one may reach LANES - 1 past n_k)
//   v    [b, n_k, h_kv, dv]
//   k_rows [b, h, n_q] int64 each query row's k (<= kk)
//   index [b, h, n_q, kk]    kept keys (int16 while n_k < 32768, else int32; -1 past a row's kept keys)
//   lse  [b, h, n_q]         log-sum-exp of each row's kept scores (the backward recomputes probabilities)
//   out  [b, n_q, h, dv]
// Query head hh reads K/V head hh / g (g = h / h_kv); K/V are never repeated.
//
// Selection rule (tl_topk.ops.selection): a row keeps its kr largest scores, ties going to the smaller
// key index, masked keys (-inf) never. Keys are streamed in increasing index order, so a key enters only
// when strictly greater than the row's current kr-th value and lands after equal values: the rule holds
// exactly, with no tie pass. A first pass bounds the kr-th value from below (the kr-th largest of the
// maxima of disjoint key classes is at most the kr-th largest score), so almost every key is rejected
// by one vector comparison.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t LANES = 16;

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t l = 0; l < LANES; ++l) acc[l] += a[i + l] * b[i + l];
  T s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int64_t l = 0; l < LANES; ++l) s += acc[l];
  return s;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// A lower bound of the kr-th largest of s[0:n] (-inf when there may be fewer than kr finite scores):
// the kr-th largest of the lane-wise maxima of consecutive groups of `span` vectors.
template <typename T>
T kth_lower_bound(const T* s, int64_t n, int64_t kr, std::vector<T>& maxima) {
  const T ninf = -std::numeric_limits<T>::infinity();
  // About max(4 kr, 32) classes of `span` keys each: class (group, lane) holds keys group * span * LANES
  // + t * LANES + lane for t < span, so the maxima are lane-wise maxima of consecutive vectors.
  int64_t span = std::max<int64_t>(1, n / std::max<int64_t>(4 * kr, 2 * LANES));
  int64_t group = span * LANES;
  int64_t full = n / group;
  maxima.resize(full * LANES);
  for (int64_t gi = 0; gi < full; ++gi) {
    const T* p = s + gi * group;
    T* m = maxima.data() + gi * LANES;
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
      __m512 acc = _mm512_loadu_ps(p);
      for (int64_t t = 1; t < span; ++t) acc = _mm512_max_ps(acc, _mm512_loadu_ps(p + t * LANES));
      _mm512_storeu_ps(m, acc);
      continue;
    }
#endif
    for (int64_t l = 0; l < LANES; ++l) m[l] = p[l];
    for (int64_t t = 1; t < span; ++t)
      for (int64_t l = 0; l < LANES; ++l) m[l] = p[t * LANES + l] > m[l] ? p[t * LANES + l] : m[l];
  }
  for (int64_t j = full * group; j < n; ++j) maxima.push_back(s[j]);  // the tail: each key its own class
  if (static_cast<int64_t>(maxima.size()) < kr) return ninf;
  std::nth_element(maxima.begin(), maxima.begin() + (kr - 1), maxima.end(), std::greater<T>());
  return maxima[kr - 1];
}

// Keep the kr largest of s[0:n] (key j at index base + j) under (value desc, index asc) into tv/ti,
// sorted; returns how many were kept (fewer than kr when fewer keys are finite).
template <typename T>
int64_t select_row(const T* s, int64_t n, int64_t kr, int64_t base, T* tv, int32_t* ti, std::vector<T>& scratch) {
  if (kr <= 0 || n <= 0) return 0;
  const T ninf = -std::numeric_limits<T>::infinity();
  T bound = n > 4 * kr ? kth_lower_bound(s, n, kr, scratch) : ninf;
  int64_t cnt = 0;
  T thr = ninf;  // admission: > thr (thr is the kr-th kept value once kr are kept)
  auto consider = [&](T x, int64_t j) {
    if (!(x > thr) || x < bound) return;
    int64_t pos = cnt < kr ? cnt : kr - 1;
    while (pos > 0 && tv[pos - 1] < x) {
      tv[pos] = tv[pos - 1];
      ti[pos] = ti[pos - 1];
      --pos;
    }
    tv[pos] = x;
    ti[pos] = static_cast<int32_t>(base + j);
    if (cnt < kr) ++cnt;
    if (cnt == kr) thr = tv[kr - 1];
  };
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES) {
    // The keys of this vector that can enter: one comparison against max(kr-th kept, bound).
    const T gate = thr > bound ? thr : bound;
    uint32_t hits = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
      hits = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j), _mm512_set1_ps(gate), _CMP_GE_OQ);
    } else
#elif defined(__AVX2__)
    if constexpr (std::is_same<T, float>::value) {
      const __m256 gv = _mm256_set1_ps(gate);
      hits = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j), gv, _CMP_GE_OQ))) |
             (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j + 8), gv, _CMP_GE_OQ))) << 8);
    } else
#endif
    {
      for (int64_t l = 0; l < LANES; ++l) hits |= static_cast<uint32_t>(s[j + l] >= gate) << l;
    }
    while (hits) {  // in index order; `consider` re-checks against the gate as it rises
      const int l = __builtin_ctz(hits);
      hits &= hits - 1;
      consider(s[j + l], j + l);
    }
  }
  for (; j < n; ++j) consider(s[j], j);
  return cnt;
}

struct Geometry {
  int64_t b, n_q, h, d, n_k, h_kv, dv, g, kk, offset, window;  // window < 0: none
  bool causal;
  // Keys [lo, hi) that query position i may see.
  inline void keys(int64_t i, int64_t& lo, int64_t& hi) const {
    hi = causal ? std::min(n_k, i + offset + 1) : n_k;
    lo = (causal && window >= 0) ? std::max<int64_t>(0, i + offset - window + 1) : 0;
    if (hi < lo) hi = lo;
  }
};

// Rows of one task: consecutive rows of a plane (row i * g + j is query i of head hk * g + j).
constexpr int64_t ROWS = 12;

// s[r * ldo + x] = q_r . k_(k0 + x) for r < ROWS, x < kw (rounded up to LANES: kt is padded to a
// padded at least LANES - 1 keys past n_k, so every key is computed by the same vector code in the same
// order, and equal keys give equal scores). q: ROWS x d (rows past the task's end are zeros); kt: d x ldk.
template <typename T>
void score_rows(const T* __restrict q, const T* __restrict kt, int64_t ldk, int64_t d, int64_t k0, int64_t kw,
                T* __restrict s, int64_t ldo) {
  // GCC/Clang vector extensions: one register per accumulator row, whatever the target's vector width.
  typedef T vec __attribute__((vector_size(LANES * sizeof(T))));
  for (int64_t j = 0; j < kw; j += LANES) {
    vec acc[ROWS];
    for (int64_t r = 0; r < ROWS; ++r) acc[r] = vec{} ;
    const T* kc = kt + k0 + j;
    for (int64_t t = 0; t < d; ++t) {
      vec kr;
      __builtin_memcpy(&kr, kc + t * ldk, sizeof(vec));
      for (int64_t r = 0; r < ROWS; ++r) acc[r] += q[r * d + t] * kr;
    }
    for (int64_t r = 0; r < ROWS; ++r) __builtin_memcpy(s + r * ldo + j, &acc[r], sizeof(vec));
  }
}

// Saved state per kept (query, key) pair: the key index only, 16-bit while the keys fit (I = int16_t)
// else 32-bit; -1 marks a slot past a row's kept keys. Per row: the log-sum-exp of its kept scores, so
// the backward recomputes each kept probability from one dot product instead of saving it.
template <typename T, typename I>
void forward_impl(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& k_rows,
                  const c10::optional<at::Tensor>& pad, double scale, double softcap, const Geometry& G,
                  at::Tensor& out, I* ip, T* lsep) {
  const T* qp = q.data_ptr<T>();
  const T* ktp = kt.data_ptr<T>();
  const int64_t ldk = kt.size(3);  // n_k rounded up to LANES
  const T* vp = v.data_ptr<T>();
  const int64_t* krp = k_rows.data_ptr<int64_t>();
  const bool* padp = pad.has_value() ? pad->data_ptr<bool>() : nullptr;
  T* op = out.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  const T sc = static_cast<T>(scale);
  const int64_t rows_per_plane = G.n_q * G.g;
  const int64_t tasks_per_plane = (rows_per_plane + ROWS - 1) / ROWS;
  const int64_t n_tasks = G.b * G.h_kv * tasks_per_plane;
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));

  // Tasks are dealt round-robin to the threads: with a causal mask later rows see more keys, and an
  // interleaved deal keeps the threads' shares even. One parallel region, no barrier per task.
  at::parallel_for(0, n_threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tid = t0; tid < t1; ++tid) {
      std::vector<T> sbuf(ROWS * ldk), qbuf(ROWS * G.d), tv(G.kk), e(G.kk), acc(G.dv), scratch;
      std::vector<int32_t> ti(G.kk);
      for (int64_t task = tid; task < n_tasks; task += n_threads) {
        const int64_t plane = task / tasks_per_plane;
        const int64_t r0 = (task % tasks_per_plane) * ROWS, r1 = std::min(rows_per_plane, r0 + ROWS);
        const int64_t bi = plane / G.h_kv, hk = plane % G.h_kv;
        int64_t k_lo, hi0, lo1, k_hi;
        G.keys(r0 / G.g, k_lo, hi0);
        G.keys((r1 - 1) / G.g, lo1, k_hi);
        const int64_t kw = k_hi - k_lo;
        std::fill(qbuf.begin(), qbuf.end(), T(0));
        for (int64_t r = r0; r < r1; ++r) {  // scaled once here: O(rows d), not O(rows keys)
          const T* src = qp + ((bi * G.n_q + r / G.g) * G.h + hk * G.g + r % G.g) * G.d;
          T* dst = qbuf.data() + (r - r0) * G.d;
          for (int64_t x = 0; x < G.d; ++x) dst[x] = src[x] * sc;
        }
        const int64_t ldo = (kw + LANES - 1) / LANES * LANES;
        if (kw > 0) {
          score_rows<T>(qbuf.data(), ktp + plane * G.d * ldk, ldk, G.d, k_lo, kw, sbuf.data(), ldo);
          if (softcap > 0) {
            const T c = static_cast<T>(softcap);
            for (int64_t x = 0; x < (r1 - r0) * ldo; ++x) sbuf[x] = c * std::tanh(sbuf[x] / c);
          }
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t qi = r / G.g, hh = hk * G.g + r % G.g;
          int64_t lo, hi;
          G.keys(qi, lo, hi);
          const int64_t row = (bi * G.h + hh) * G.n_q + qi;  // [b, h, n_q] flat
          const int64_t kr = std::min<int64_t>(krp[row], G.kk);
          int64_t cnt = 0;
          if (hi > lo) {
            T* srow = sbuf.data() + (r - r0) * ldo + (lo - k_lo);
            if (padp) {
              const bool* pr = padp + bi * G.n_k + lo;
              for (int64_t x = 0; x < hi - lo; ++x)
                if (!pr[x]) srow[x] = ninf;
            }
            cnt = select_row<T>(srow, hi - lo, kr, lo, tv.data(), ti.data(), scratch);
          }
          // Softmax over the kept values (sorted: tv[0] is the row max), then P V.
          T sum = 0;
          for (int64_t x = 0; x < cnt; ++x) {
            e[x] = std::exp(tv[x] - tv[0]);
            sum += e[x];
          }
          std::fill(acc.begin(), acc.end(), T(0));
          for (int64_t x = 0; x < cnt; ++x) {
            e[x] /= sum;
            axpy(e[x], vp + ((bi * G.n_k + ti[x]) * G.h_kv + hk) * G.dv, acc.data(), G.dv);
          }
          std::copy(acc.begin(), acc.end(), op + ((bi * G.n_q + qi) * G.h + hh) * G.dv);
          if (ip) {
            I* irow = ip + row * G.kk;
            for (int64_t x = 0; x < G.kk; ++x) irow[x] = x < cnt ? static_cast<I>(ti[x]) : I(-1);
            lsep[row] = cnt > 0 ? tv[0] + std::log(sum) : T(0);
          }
        }
      }
    }
  });
}

template <typename T, typename I>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out,
                   const I* ip, const T* lsep, double scale, double softcap, const Geometry& G, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const int64_t rows_per_plane = G.n_q * G.g;
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows_per_plane));
  const int64_t width = G.d + G.dv;
  // Thread 0 scatter-adds into dK, dV themselves, every other thread into its own [n_k, d + dv] plane
  // buffer; the buffers are added in thread order once per plane (no atomics: deterministic sums).
  std::vector<std::vector<T>> acc(n_threads - 1, std::vector<T>(G.n_k * width));
  const T sc = static_cast<T>(scale), cap = static_cast<T>(softcap);
  for (int64_t plane = 0; plane < G.b * G.h_kv; ++plane) {
    const int64_t bi = plane / G.h_kv, hk = plane % G.h_kv;
    at::parallel_for(0, n_threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t tid = t0; tid < t1; ++tid) {
        T* a = tid > 0 ? acc[tid - 1].data() : nullptr;
        if (a) std::fill(a, a + G.n_k * width, T(0));
        std::vector<T> p(G.kk), dp(G.kk), slope(G.kk), dqr(G.d);
        const int64_t r0 = rows_per_plane * tid / n_threads, r1 = rows_per_plane * (tid + 1) / n_threads;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t qi = r / G.g, hh = hk * G.g + r % G.g;
          const int64_t row = (bi * G.h + hh) * G.n_q + qi;
          const I* irow = ip + row * G.kk;
          const T* go = gp + ((bi * G.n_q + qi) * G.h + hh) * G.dv;
          const T* qr = qp + ((bi * G.n_q + qi) * G.h + hh) * G.d;
          int64_t cnt = 0;
          while (cnt < G.kk && irow[cnt] >= 0) ++cnt;
          T t = 0;
          for (int64_t x = 0; x < cnt; ++x) {  // the kept probabilities, recomputed
            const int64_t key = irow[x];
            T s = dot(qr, kp + ((bi * G.n_k + key) * G.h_kv + hk) * G.d, G.d) * sc;
            slope[x] = T(1);
            if (cap > 0) {
              const T u = std::tanh(s / cap);
              s = cap * u;
              slope[x] = T(1) - u * u;
            }
            p[x] = std::exp(s - lsep[row]);
            dp[x] = dot(vp + ((bi * G.n_k + key) * G.h_kv + hk) * G.dv, go, G.dv);
            t += p[x] * dp[x];
          }
          std::fill(dqr.begin(), dqr.end(), T(0));
          for (int64_t x = 0; x < cnt; ++x) {
            const T ds = p[x] * (dp[x] - t) * slope[x];
            const int64_t key = irow[x];
            const int64_t at_k = (bi * G.n_k + key) * G.h_kv + hk;
            axpy(ds, kp + at_k * G.d, dqr.data(), G.d);
            if (a) {
              axpy(ds * sc, qr, a + key * width, G.d);
              axpy(p[x], go, a + key * width + G.d, G.dv);
            } else {
              axpy(ds * sc, qr, dkp + at_k * G.d, G.d);
              axpy(p[x], go, dvp + at_k * G.dv, G.dv);
            }
          }
          T* dqo = dqp + ((bi * G.n_q + qi) * G.h + hh) * G.d;
          for (int64_t x = 0; x < G.d; ++x) dqo[x] = dqr[x] * sc;
        }
      }
    });
    if (n_threads > 1) {
      at::parallel_for(0, G.n_k, 256, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          T* dko = dkp + ((bi * G.n_k + j) * G.h_kv + hk) * G.d;
          T* dvo = dvp + ((bi * G.n_k + j) * G.h_kv + hk) * G.dv;
          for (int64_t t = 0; t + 1 < n_threads; ++t) {
            const T* a = acc[t].data() + j * width;
            for (int64_t x = 0; x < G.d; ++x) dko[x] += a[x];
            for (int64_t x = 0; x < G.dv; ++x) dvo[x] += a[G.d + x];
          }
        }
      });
    }
  }
}

Geometry geometry(const at::Tensor& q, const at::Tensor& v, int64_t kk, bool causal, int64_t window) {
  Geometry G;
  G.b = q.size(0); G.n_q = q.size(1); G.h = q.size(2); G.d = q.size(3);
  G.n_k = v.size(1); G.h_kv = v.size(2); G.dv = v.size(3);
  G.g = G.h / G.h_kv; G.kk = kk; G.offset = G.n_k - G.n_q; G.window = window; G.causal = causal;
  return G;
}

}  // namespace

// Returns (out, index, lse): index [b, h, n_q, kk] int16 when n_k < 32768 else int32, lse [b, h, n_q];
// both empty unless `save`.
std::vector<at::Tensor> topk_forward(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v,
                                     const at::Tensor& k_rows, int64_t kk, bool causal, int64_t window,
                                     const c10::optional<at::Tensor>& pad, double scale, double softcap, bool save) {
  Geometry G = geometry(q, v, kk, causal, window);
  auto out = at::empty({G.b, G.n_q, G.h, G.dv}, q.options());
  const bool narrow = G.n_k < 32768;
  at::Tensor index, lse;
  if (save) {
    index = at::empty({G.b, G.h, G.n_q, kk}, q.options().dtype(narrow ? at::kShort : at::kInt));
    lse = at::empty({G.b, G.h, G.n_q}, q.options());
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "tl_topk_cpu_forward", [&] {
    scalar_t* l = save ? lse.data_ptr<scalar_t>() : nullptr;
    if (narrow)
      forward_impl<scalar_t, int16_t>(q, kt, v, k_rows, pad, scale, softcap, G, out,
                                      save ? index.data_ptr<int16_t>() : nullptr, l);
    else
      forward_impl<scalar_t, int32_t>(q, kt, v, k_rows, pad, scale, softcap, G, out,
                                      save ? index.data_ptr<int32_t>() : nullptr, l);
  });
  return {out, index, lse};
}

// Returns (dq, dk, dv).
std::vector<at::Tensor> topk_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& grad_out, const at::Tensor& index, const at::Tensor& lse,
                                      double scale, double softcap) {
  Geometry G = geometry(q, v, index.size(3), true, -1);
  auto dq = at::empty_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "tl_topk_cpu_backward", [&] {
    const scalar_t* l = lse.data_ptr<scalar_t>();
    if (index.scalar_type() == at::kShort)
      backward_impl<scalar_t, int16_t>(q, k, v, grad_out, index.data_ptr<int16_t>(), l, scale, softcap, G, dq, dk, dv);
    else
      backward_impl<scalar_t, int32_t>(q, k, v, grad_out, index.data_ptr<int32_t>(), l, scale, softcap, G, dq, dk, dv);
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &topk_forward, "top-k attention forward (CPU)");
  m.def("backward", &topk_backward, "top-k attention backward over the saved pairs (CPU)");
  m.attr("LANES") = LANES;  // keys per vector: the padding kt needs
}
