// Exact top-k entries of a factored product A @ B, scanned under a two-level bound. Built on first use by
// tl_embedspace/cpp_scan.py (torch.utils.cpp_extension); the Python side prepares and checks every input.
//
// Each entry is bounded by its first h coordinates in the balanced SVD basis of the product, computed
// exactly, plus Cauchy-Schwarz on the rest (centred on the mean row c):
//   key(i, j) <= f(P_ij) + rt_i * st_j + q_j,   P_ij = a'_i[:h] . b'_j[:h]
// with f the identity (largest), negation (smallest) or |.| (abs), rt_i = |(a'_i - c)[h:]|, st_j = |b'_j[h:]|
// and q_j the mode's tail offset c[h:] . b'_j[h:] plus every rounding allowance (the Python side folds them
// in). Two levels: h = h1 for every listed entry (in registers), then h = H (all stored coordinates) for
// the few that pass; only entries whose second bound reaches the running k-th key are computed from the
// caller's own factors (a dot product accumulated in double) and ranked.
//
// Rows come in scan order (decreasing rho_i = |a'_i - c|), in blocks of BLOCK rows. Before a block a
// thread shrinks its list of candidate columns with the coarser centred bound at the block's largest
// radius, rho_0 * slope_j + intercept_j >= threshold; as rho only falls and the threshold only rises, each
// thread's list only shrinks, and the first block whose list is empty ends the scan for every later block.
// The listed columns are packed panel by panel ([h][PANEL], in cache) and a register-blocked kernel
// computes MR rows x NR columns of P at a time; the bound is evaluated in registers and the product block
// is never written to memory.
//
// Ranking: key desc, then row id asc, then column id asc; each thread keeps its own best k in a heap and
// the threshold is shared (the largest k-th key of any full heap). Entries whose bound equals the
// threshold are still computed, so ties are decided by ids, exactly.
//
// Inputs (T = float or double; all contiguous unless said):
//   ah    [nr_pad, H] T      head coordinates of the rows, scan order, zero rows past nr up to a multiple of MR
//   rt    [2, nr_pad] T      tail radius of each row past h1 and past H coordinates (rounded up), zeros past nr
//   rho   [nr] double        stage-0 radius, scan order (non-increasing)
//   row_ids [nr] int64       the rows' ids in A
//   a     [n, r] T           the caller's A (any strides)
//   bh    [nc, H] T          head coordinates of the columns (local order)
//   st    [2, nc] T, q [2, nc] T   tail norm and folded offset of each column, past h1 and past H (rounded up)
//   slope [nc] double, intercept [nc] double   the stage-0 bound of each column
//   col_ids [nc] int64       the columns' ids in B
//   b     [r, m] T           the caller's B (any strides; column-major makes the exact products contiguous)

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t VBYTES = 64;  // one vector of the kernel: 16 floats or 8 doubles
constexpr int64_t MR = 6;       // rows per register block
constexpr int64_t NV = 2;       // vectors of columns per register block
constexpr int64_t BLOCK = 96;   // rows per scheduled block (a multiple of MR)
constexpr int64_t PANEL = 1024; // columns per packed panel

enum Mode { LARGEST = 0, SMALLEST = 1, ABS = 2 };

struct Cand {
  double key, value;
  int64_t row, col;
};

// a better than b: key desc, row asc, col asc. As the comparator of std heaps, the top is the worst.
inline bool better(const Cand& a, const Cand& b) {
  if (a.key != b.key) return a.key > b.key;
  if (a.row != b.row) return a.row < b.row;
  return a.col < b.col;
}

inline void atomic_max(std::atomic<double>& x, double v) {
  double cur = x.load(std::memory_order_relaxed);
  while (v > cur && !x.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

// The largest T not above x (a threshold compared in T must not prune what the double threshold keeps).
template <typename T>
inline T round_down(double x) {
  T t = static_cast<T>(x);
  if (static_cast<double>(t) > x) t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  return t;
}

// A[i, :] . B[:, j] accumulated in double.
template <typename T>
inline double exact_dot(const T* a, int64_t sa, const T* b, int64_t sb, int64_t r) {
  if (sa == 1 && sb == 1) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t t = 0;
    for (; t + 8 <= r; t += 8)
      for (int l = 0; l < 8; ++l) acc[l] += static_cast<double>(a[t + l]) * static_cast<double>(b[t + l]);
    double s = 0;
    for (; t < r; ++t) s += static_cast<double>(a[t]) * static_cast<double>(b[t]);
    for (int l = 0; l < 8; ++l) s += acc[l];
    return s;
  }
  double s = 0;
  for (int64_t t = 0; t < r; ++t) s += static_cast<double>(a[t * sa]) * static_cast<double>(b[t * sb]);
  return s;
}

// Bit l set where lane l of x is >= g.
template <typename T, typename V>
inline uint32_t ge_mask(const V& x, T g) {
  constexpr int64_t L = VBYTES / sizeof(T);
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    __m512 v;
    __builtin_memcpy(&v, &x, sizeof(v));
    return _mm512_cmp_ps_mask(v, _mm512_set1_ps(g), _CMP_GE_OQ);
  } else {
    __m512d v;
    __builtin_memcpy(&v, &x, sizeof(v));
    return _mm512_cmp_pd_mask(v, _mm512_set1_pd(g), _CMP_GE_OQ);
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    __m256 lo, hi;
    __builtin_memcpy(&lo, &x, 32);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&x) + 32, 32);
    const __m256 gv = _mm256_set1_ps(g);
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(lo, gv, _CMP_GE_OQ))) |
           (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(hi, gv, _CMP_GE_OQ))) << 8);
  }
#endif
  uint32_t bits = 0;
  for (int64_t l = 0; l < L; ++l) bits |= static_cast<uint32_t>(x[l] >= g) << l;
  return bits;
}

struct Shared {
  std::atomic<double> threshold;
  std::atomic<int64_t> next_block{0};
  std::atomic<int64_t> stop_block;  // blocks at or past this one have no candidate column
};

template <typename T>
struct Scan {
  typedef T vec __attribute__((vector_size(VBYTES)));
  static constexpr int64_t L = VBYTES / sizeof(T);
  static constexpr int64_t NR = NV * L;

  // inputs
  const T *ah, *rt, *bh, *st, *q, *a, *b;
  const double *rho, *slope, *intercept;
  const int64_t *row_ids, *col_ids;
  int64_t nr, nc, nr_pad, h, H, r, sa0, sa1, sb0, sb1, k, mode;
  bool exclude_diagonal;
  Shared* shared;

  // per-thread results
  struct Local {
    std::vector<Cand> heap;
    std::vector<int32_t> cols;  // candidate columns (local ids), shrinking
    std::vector<T> panel, pst, pq;
    std::vector<int32_t> pcol;
    int64_t bounded = 0, refined = 0, exact = 0, rows_end = 0;
    double own = -std::numeric_limits<double>::infinity();  // the heap's k-th key once full
  };

  double threshold(const Local& lc) const {
    const double g = shared->threshold.load(std::memory_order_relaxed);
    return lc.own > g ? lc.own : g;
  }

  // An entry whose first bound passed: its second bound from all H coordinates, then its exact value.
  void offer(Local& lc, int64_t i, int64_t jl, T p1, double g) {
    const int64_t row = row_ids[i], col = col_ids[jl];
    if (exclude_diagonal && row == col) return;
    if (H > h) {
      ++lc.refined;
      const T* ar = ah + i * H;
      const T* br = bh + jl * H;
      T p = p1;
      for (int64_t t = h; t < H; ++t) p += ar[t] * br[t];
      if (mode == SMALLEST) p = -p;
      else if (mode == ABS) p = std::fabs(p);
      const T bound = p + rt[nr_pad + i] * st[nc + jl] + q[nc + jl];
      if (!(bound >= round_down<T>(g))) return;
    }
    ++lc.exact;
    const double v = exact_dot<T>(a + row * sa0, sa1, b + col * sb1, sb0, r);
    const double key = mode == LARGEST ? v : (mode == SMALLEST ? -v : std::fabs(v));
    const Cand c{key, v, row, col};
    auto& hp = lc.heap;
    if (static_cast<int64_t>(hp.size()) < k) {
      hp.push_back(c);
      std::push_heap(hp.begin(), hp.end(), better);
    } else if (better(c, hp.front())) {
      std::pop_heap(hp.begin(), hp.end(), better);
      hp.back() = c;
      std::push_heap(hp.begin(), hp.end(), better);
    } else {
      return;
    }
    if (static_cast<int64_t>(hp.size()) == k && hp.front().key > lc.own) {
      lc.own = hp.front().key;
      atomic_max(shared->threshold, lc.own);
    }
  }

  // The rows [i0, i0 + MR) against the packed panel's strips (the mode a template argument, so that
  // the bound's evaluation has no branch).
  void rows_block(Local& lc, int64_t i0, int64_t np) {
    if (mode == SMALLEST) rows_block_mode<SMALLEST>(lc, i0, np);
    else if (mode == ABS) rows_block_mode<ABS>(lc, i0, np);
    else rows_block_mode<LARGEST>(lc, i0, np);
  }

  template <int M>
  void rows_block_mode(Local& lc, int64_t i0, int64_t np) {
    T at[MR];
    for (int64_t x = 0; x < MR; ++x) at[x] = rt[i0 + x];
    const T* arow = ah + i0 * H;
    const int64_t valid = std::min<int64_t>(MR, nr - i0);
    T g = round_down<T>(threshold(lc));
    for (int64_t s = 0; s < np; s += NR) {
      vec acc[MR][NV];
      for (int64_t x = 0; x < MR; ++x)
        for (int64_t v = 0; v < NV; ++v) acc[x][v] = vec{};
      const T* bp = lc.panel.data() + s;
      for (int64_t t = 0; t < h; ++t) {
        vec bv[NV];
        for (int64_t v = 0; v < NV; ++v) __builtin_memcpy(&bv[v], bp + t * PANEL + v * L, sizeof(vec));
        for (int64_t x = 0; x < MR; ++x) {
          const T av = arow[x * H + t];
          for (int64_t v = 0; v < NV; ++v) acc[x][v] += av * bv[v];
        }
      }
      for (int64_t v = 0; v < NV; ++v) {
        vec sv, qv;
        __builtin_memcpy(&sv, lc.pst.data() + s + v * L, sizeof(vec));
        __builtin_memcpy(&qv, lc.pq.data() + s + v * L, sizeof(vec));
        vec bound[MR];
        vec mx;
        for (int64_t x = 0; x < MR; ++x) {
          vec p = acc[x][v];
          if constexpr (M == SMALLEST) p = -p;
          else if constexpr (M == ABS) p = p < 0 ? -p : p;
          bound[x] = p + at[x] * sv + qv;
          mx = x == 0 ? bound[x] : (bound[x] > mx ? bound[x] : mx);
        }
        if (!ge_mask<T>(mx, g)) continue;
        for (int64_t x = 0; x < valid; ++x) {
          uint32_t hits = ge_mask<T>(bound[x], g);
          while (hits) {
            const int l = __builtin_ctz(hits);
            hits &= hits - 1;
            const int64_t pos = s + v * L + l;
            if (pos >= np || !(bound[x][l] >= g)) continue;  // g may have risen since the mask was taken
            offer(lc, i0 + x, lc.pcol[pos], acc[x][v][l], threshold(lc));
            g = round_down<T>(threshold(lc));
          }
        }
      }
    }
    lc.bounded += valid * np;
  }

  void block(Local& lc, int64_t blk) {
    const int64_t i0 = blk * BLOCK, i1 = std::min(nr, i0 + BLOCK);
    const double r0 = rho[i0];
    const double thr = threshold(lc);
    // shrink the column list with the centred bound at the block's largest radius
    auto& cols = lc.cols;
    size_t w = 0;
    for (size_t x = 0; x < cols.size(); ++x) {
      const int32_t j = cols[x];
      if (r0 * slope[j] + intercept[j] >= thr) cols[w++] = j;
    }
    cols.resize(w);
    if (cols.empty()) {
      int64_t cur = shared->stop_block.load(std::memory_order_relaxed);
      while (blk < cur && !shared->stop_block.compare_exchange_weak(cur, blk, std::memory_order_relaxed)) {
      }
      return;
    }
    lc.rows_end = std::max(lc.rows_end, i1);
    const T ninf = -std::numeric_limits<T>::infinity();
    for (size_t p0 = 0; p0 < cols.size(); p0 += PANEL) {
      const int64_t np = std::min<int64_t>(PANEL, cols.size() - p0);
      const int64_t npad = (np + NR - 1) / NR * NR;
      for (int64_t x = 0; x < npad; ++x) {
        if (x < np) {
          const int32_t j = cols[p0 + x];
          const T* src = bh + static_cast<int64_t>(j) * H;
          for (int64_t t = 0; t < h; ++t) lc.panel[t * PANEL + x] = src[t];
          lc.pst[x] = st[j];
          lc.pq[x] = q[j];
          lc.pcol[x] = j;
        } else {  // padding: a bound of -inf never reaches the threshold
          for (int64_t t = 0; t < h; ++t) lc.panel[t * PANEL + x] = T(0);
          lc.pst[x] = T(0);
          lc.pq[x] = ninf;
          lc.pcol[x] = -1;
        }
      }
      for (int64_t i = i0; i < i1; i += MR) rows_block(lc, i, np);
    }
  }

  void run(std::vector<Local>& locals) {
    const int64_t n_blocks = (nr + BLOCK - 1) / BLOCK;
    const int64_t n_threads = static_cast<int64_t>(locals.size());
    at::parallel_for(0, n_threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t tid = t0; tid < t1; ++tid) {
        Local& lc = locals[tid];
        lc.cols.resize(nc);
        for (int64_t j = 0; j < nc; ++j) lc.cols[j] = static_cast<int32_t>(j);
        lc.panel.assign(std::max<int64_t>(h, 1) * PANEL, T(0));
        lc.pst.assign(PANEL, T(0));
        lc.pq.assign(PANEL, T(0));
        lc.pcol.assign(PANEL, -1);
        lc.heap.reserve(k);
        for (;;) {
          const int64_t blk = shared->next_block.fetch_add(1, std::memory_order_relaxed);
          if (blk >= n_blocks || blk >= shared->stop_block.load(std::memory_order_relaxed)) break;
          block(lc, blk);
        }
      }
    });
  }
};

std::vector<at::Tensor> scan(const at::Tensor& ah, const at::Tensor& rt, const at::Tensor& rho,
                             const at::Tensor& row_ids, const at::Tensor& a, const at::Tensor& bh,
                             const at::Tensor& st, const at::Tensor& q, const at::Tensor& slope,
                             const at::Tensor& intercept, const at::Tensor& col_ids, const at::Tensor& b,
                             int64_t h1, int64_t k, int64_t mode, bool exclude_diagonal, double threshold) {
  const int64_t nr = rho.size(0), nc = slope.size(0);
  TORCH_CHECK(k > 0 && nr > 0 && nc > 0, "bounded_scan: empty problem");
  TORCH_CHECK(ah.size(0) % MR == 0 && ah.size(0) >= nr, "bounded_scan: ah rows must be padded to a multiple of MR");
  TORCH_CHECK(nc < (int64_t(1) << 31), "bounded_scan: too many columns");
  TORCH_CHECK(h1 >= 0 && h1 <= ah.size(1) && bh.size(1) == ah.size(1), "bounded_scan: h1 past the stored coordinates");
  TORCH_CHECK(rt.size(0) == 2 && st.size(0) == 2 && q.size(0) == 2, "bounded_scan: rt, st, q need two levels");
  Shared shared;
  shared.threshold.store(threshold);
  shared.stop_block.store(std::numeric_limits<int64_t>::max());
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (nr + BLOCK - 1) / BLOCK));
  std::vector<Cand> all;
  int64_t bounded = 0, refined = 0, exact = 0, rows_end = 0;
  AT_DISPATCH_FLOATING_TYPES(ah.scalar_type(), "bounded_scan", [&] {
    Scan<scalar_t> sc;
    sc.ah = ah.data_ptr<scalar_t>();
    sc.rt = rt.data_ptr<scalar_t>();
    sc.bh = bh.data_ptr<scalar_t>();
    sc.st = st.data_ptr<scalar_t>();
    sc.q = q.data_ptr<scalar_t>();
    sc.a = a.data_ptr<scalar_t>();
    sc.b = b.data_ptr<scalar_t>();
    sc.rho = rho.data_ptr<double>();
    sc.slope = slope.data_ptr<double>();
    sc.intercept = intercept.data_ptr<double>();
    sc.row_ids = row_ids.data_ptr<int64_t>();
    sc.col_ids = col_ids.data_ptr<int64_t>();
    sc.nr = nr;
    sc.nc = nc;
    sc.h = h1;
    sc.H = ah.size(1);
    sc.nr_pad = ah.size(0);
    sc.r = a.size(1);
    sc.sa0 = a.stride(0);
    sc.sa1 = a.stride(1);
    sc.sb0 = b.stride(0);
    sc.sb1 = b.stride(1);
    sc.k = k;
    sc.mode = mode;
    sc.exclude_diagonal = exclude_diagonal;
    sc.shared = &shared;
    std::vector<typename Scan<scalar_t>::Local> locals(n_threads);
    sc.run(locals);
    for (auto& lc : locals) {
      all.insert(all.end(), lc.heap.begin(), lc.heap.end());
      bounded += lc.bounded;
      refined += lc.refined;
      exact += lc.exact;
      rows_end = std::max(rows_end, lc.rows_end);
    }
  });
  const int64_t n = static_cast<int64_t>(all.size());
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor keys = at::empty({n}, opts), values = at::empty({n}, opts);
  at::Tensor rows = at::empty({n}, opts.dtype(at::kLong)), cols = at::empty({n}, opts.dtype(at::kLong));
  for (int64_t x = 0; x < n; ++x) {
    keys.data_ptr<double>()[x] = all[x].key;
    values.data_ptr<double>()[x] = all[x].value;
    rows.data_ptr<int64_t>()[x] = all[x].row;
    cols.data_ptr<int64_t>()[x] = all[x].col;
  }
  at::Tensor stats = at::tensor({bounded, refined, exact, rows_end}, opts.dtype(at::kLong));
  return {keys, values, rows, cols, stats};
}

// x[:n] = x[perm] in place, row by row along the permutation's cycles (one row of scratch, no copy of x).
void permute_rows_(at::Tensor& x, const at::Tensor& perm) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && perm.dim() == 1 && perm.size(0) <= x.size(0),
              "permute_rows_: x [n, d] contiguous and perm [<= n]");
  const int64_t n = perm.size(0), row = x.size(1) * x.element_size();
  const int64_t* p = perm.data_ptr<int64_t>();
  char* base = static_cast<char*>(x.data_ptr());
  std::vector<char> done(n, 0), tmp(row);
  for (int64_t start = 0; start < n; ++start) {
    if (done[start]) continue;
    std::memcpy(tmp.data(), base + start * row, row);
    int64_t i = start;
    for (;;) {
      done[i] = 1;
      const int64_t src = p[i];
      TORCH_CHECK(src >= 0 && src < n, "permute_rows_: perm is not a permutation");
      if (src == start) {
        std::memcpy(base + i * row, tmp.data(), row);
        break;
      }
      std::memcpy(base + i * row, base + src * row, row);
      i = src;
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan", &scan, "exact top-k of a factored product under the two-level bound (CPU)");
  m.def("permute_rows_", &permute_rows_, "x[:n] = x[perm] in place");
  m.attr("MR") = MR;
  m.attr("BLOCK") = BLOCK;
}
