// Fused per-row CPU kernels of losskit's "chunked" implementation (built on first use by native.py).
//
// One thread owns a row at a time (at::parallel_for over rows); inside a row every sweep is vectorised with
// ATen's at::vec (AVX2 / AVX-512 with Sleef's exp, chosen when the extension is built). Per row:
//
//   stats:  pass 1  m = max_{i != y} z_i (and its lowest index)             -- the row read from memory once
//           pass 2  d = sum e^{z_i - m}, s = sum e^{z_i - m}(z_i - m),      -- the row again, now cache-hot
//                   a = sum_{i in A, i != y} (z_i - m),  S = sum_{i in A, i != y} z_i
//   grad:   G_j = e^{z_j - shift} (scale + beta (z_j - shift)) + gamma [j in A],  G_y exact  (one sweep)
//   eager:  stats, then the fused-loss coefficients of the row, then its G while the row is hot
//
// Logits are clamped to -2^100 on load (so e * (z - m) is an exact 0 where e = 0, never 0 * -inf), the target
// column never enters m, d, s, a or S, and sums are taken in blocks of 1024 columns whose partial sums are added
// in double, so each lane accumulates at most 64 terms in float (the precision of a pairwise sum). The Python
// side (rowmath.finalize) turns the raw state into every statistic; the eager kernel forms the few closed forms
// its coefficients need (delta, softplus, lse, p_y, 1 - p_y) with the same formulas.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace {

using at::vec::Vectorized;

constexpr double kNegLarge = -1.2676506002282294e30;     // -(2**100): stands in for -inf
constexpr double kNegLargeSum = -6.338253001141147e29;   // -(2**99): below it a sum absorbed a -inf column
constexpr int64_t kBlock = 1024;                          // columns per block of float partial sums

// The rows of a (B, T, V) view (2-D logits arrive as (1, N, V)); the last dimension has stride 1.
template <typename scalar_t>
struct Rows {
  scalar_t* base;
  int64_t t_len, stride_b, stride_t, v;
  scalar_t* row(int64_t r) const { return base + (r / t_len) * stride_b + (r % t_len) * stride_t; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "native kernels need (B, T, V) logits with a unit last stride");
  return {x.data_ptr<scalar_t>(), x.size(1), x.stride(0), x.stride(1), x.size(2)};
}

// One block of a row as acc_t, clamped to -2^100 on load (NaN kept). Returns a pointer to the block: the row
// itself when no conversion is needed (the vector loops then clamp as they load), else `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* block_of(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    (void)buf;
    (void)n;
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = static_cast<acc_t>(src[i]);
      buf[i] = v < static_cast<acc_t>(kNegLarge) ? static_cast<acc_t>(kNegLarge) : v;
    }
    return buf;
  }
}

template <typename acc_t>
inline acc_t clamp_low(acc_t v) {
  return v < static_cast<acc_t>(kNegLarge) ? static_cast<acc_t>(kNegLarge) : v;
}

// The lanes of a vector summed in double.
template <typename acc_t>
inline double hsum(const Vectorized<acc_t>& x) {
  acc_t lanes[Vectorized<acc_t>::size()];
  x.store(lanes);
  double total = 0;
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) total += static_cast<double>(lanes[k]);
  return total;
}

template <typename acc_t>
struct RowState {
  acc_t m;         // reference of the sums: max over non-target columns, 0 when none is finite
  acc_t d, s, a;   // d, s and a = sum_{A, i != y} (z_i - m) - (K - [y in A]) (z_y - m) (the gap numerator)
  acc_t ssum;      // sum_{A, i != y} z_i as the logits are
  acc_t amax_val;  // the largest non-target value (NaN if any), with its lowest index
  int64_t amax_idx;
  acc_t zy;
};

// Pass 1 and pass 2 over one row.
template <typename scalar_t, typename acc_t>
RowState<acc_t> row_state(const scalar_t* row, int64_t v, int64_t y, const float* ind, double num_support,
                          acc_t* buf) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec neg(static_cast<acc_t>(kNegLarge));
  const Vec lane = Vec::arange(static_cast<acc_t>(0), 1);
  RowState<acc_t> st{};
  st.zy = static_cast<acc_t>(row[y]);

  // ---- pass 1: max and its lowest index over the non-target columns (NaN wins, first NaN index) ----------
  // The running max starts at a true -inf, below every clamped value, so each lane keeps the lowest index of
  // its maximum even when all its columns are -inf; the target lane is set to -inf and never wins.
  const Vec ninf(-std::numeric_limits<acc_t>::infinity());
  Vec vmax = ninf;
  Vec vidx(static_cast<acc_t>(-1));
  bool saw_nan = false;
  int64_t first_nan = -1;
  acc_t tail_max = -std::numeric_limits<acc_t>::infinity();
  int64_t tail_idx = -1;
  for (int64_t c0 = 0; c0 < v; c0 += kBlock) {
    const int64_t n = std::min(kBlock, v - c0);
    const acc_t* p = block_of<scalar_t, acc_t>(row + c0, buf, n);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      Vec x = at::vec::maximum(Vec::loadu(p + j), neg);  // NaN-propagating
      const int64_t col = c0 + j;
      if (y >= col && y < col + W) {
        x = Vec::blendv(x, ninf, lane == Vec(static_cast<acc_t>(y - col)));
      }
      if (!saw_nan && x.isnan().zero_mask() != (1 << W) - 1) {
        // a NaN in this vector: the first one (column order) is the argmax, as in torch.argmax
        for (int64_t k = 0; k < W; ++k) {
          const acc_t e = static_cast<acc_t>(p[j + k]);
          if (col + k != y && std::isnan(e)) {
            saw_nan = true;
            first_nan = col + k;
            break;
          }
        }
      }
      const Vec idx = lane + Vec(static_cast<acc_t>(col));
      const Vec gt = x > vmax;  // strict: the lowest index of each lane is kept on ties
      vmax = Vec::blendv(vmax, x, gt);
      vidx = Vec::blendv(vidx, idx, gt);
    }
    for (; j < n; ++j) {
      const int64_t col = c0 + j;
      if (col == y) continue;
      const acc_t x = clamp_low(static_cast<acc_t>(p[j]));
      if (std::isnan(x)) {
        if (!saw_nan) {
          saw_nan = true;
          first_nan = col;
        }
      } else if (x > tail_max) {
        tail_max = x;
        tail_idx = col;
      }
    }
  }
  acc_t lanes_val[W], lanes_idx[W];
  vmax.store(lanes_val);
  vidx.store(lanes_idx);
  acc_t best = tail_max;
  int64_t best_idx = tail_idx;
  for (int64_t k = 0; k < W; ++k) {
    const int64_t i = static_cast<int64_t>(lanes_idx[k]);
    if (i < 0) continue;
    if (lanes_val[k] > best || (lanes_val[k] == best && (best_idx < 0 || i < best_idx))) {
      best = lanes_val[k];
      best_idx = i;
    }
  }
  if (saw_nan) {
    st.amax_val = std::numeric_limits<acc_t>::quiet_NaN();
    st.amax_idx = first_nan;
  } else {
    st.amax_val = best;
    st.amax_idx = best_idx;
  }
  const acc_t m = saw_nan ? std::numeric_limits<acc_t>::quiet_NaN()
                          : (best <= static_cast<acc_t>(kNegLarge) ? static_cast<acc_t>(0) : best);
  st.m = m;

  // ---- pass 2: the sums against m ---------------------------------------------------------------------------
  const Vec vm(m);
  double d = 0, s = 0, a_rel = 0, ssum = 0;
  for (int64_t c0 = 0; c0 < v; c0 += kBlock) {
    const int64_t n = std::min(kBlock, v - c0);
    const acc_t* p = block_of<scalar_t, acc_t>(row + c0, buf, n);
    Vec bd(0), bs(0), ba(0), bsum(0);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const int64_t col = c0 + j;
      Vec x = at::vec::maximum(Vec::loadu(p + j), neg);
      Vec keep = ind ? Vec(0) : Vec(1);
      if (ind) {
        if constexpr (std::is_same_v<acc_t, float>) {
          keep = Vec::loadu(ind + col);
        } else {
          acc_t tmp[W];
          for (int64_t k = 0; k < W; ++k) tmp[k] = static_cast<acc_t>(ind[col + k]);
          keep = Vec::loadu(tmp);
        }
      }
      if (y >= col && y < col + W) {
        const Vec is_y = lane == Vec(static_cast<acc_t>(y - col));
        x = Vec::blendv(x, neg, is_y);
        keep = Vec::blendv(keep, Vec(0), is_y);
      }
      const Vec w = x - vm;
      const Vec e = w.exp();
      bd = bd + e;
      bs = at::vec::fmadd(e, w, bs);
      ba = at::vec::fmadd(w, keep, ba);
      bsum = at::vec::fmadd(x, keep, bsum);
    }
    double td = 0, ts = 0, ta = 0, tsum = 0;
    for (; j < n; ++j) {
      const int64_t col = c0 + j;
      if (col == y) continue;
      const acc_t x = clamp_low(static_cast<acc_t>(p[j]));
      const acc_t w = x - m;
      const acc_t e = std::exp(w);
      const acc_t k = ind ? static_cast<acc_t>(ind[col]) : static_cast<acc_t>(1);
      td += e;
      ts += e * w;
      ta += w * k;
      tsum += x * k;
    }
    d += hsum(bd) + td;
    s += hsum(bs) + ts;
    a_rel += hsum(ba) + ta;
    ssum += hsum(bsum) + tsum;
  }
  const double in_a = ind ? static_cast<double>(ind[y]) : 1.0;
  const double cnt = num_support - in_a;
  double a = a_rel - cnt * (static_cast<double>(st.zy) - static_cast<double>(m));
  if (ssum < kNegLargeSum) a = -std::numeric_limits<double>::infinity();
  st.d = static_cast<acc_t>(d);
  st.s = static_cast<acc_t>(s);
  st.a = static_cast<acc_t>(a);
  st.ssum = static_cast<acc_t>(ssum);
  return st;
}

// Coefficients of one row's gradient in the shifted form of the grad sweep.
template <typename acc_t>
struct RowGrad {
  acc_t shift, scale, beta, gamma, g_target;
};

// G for one row: out_j = e^{z_j - shift}(scale + beta (z_j - shift)) + gamma [j in A], out_y = g_target.
// `out` may be the row itself (in place): every vector is read before it is written.
template <typename scalar_t, typename acc_t>
void row_grad(const scalar_t* row, scalar_t* out, int64_t v, int64_t y, const float* ind, const RowGrad<acc_t>& g,
              bool has_beta, bool has_gamma, acc_t* buf, acc_t* gbuf) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec neg(static_cast<acc_t>(kNegLarge)), vshift(g.shift), vscale(g.scale), vbeta(g.beta), vgamma(g.gamma);
  for (int64_t c0 = 0; c0 < v; c0 += kBlock) {
    const int64_t n = std::min(kBlock, v - c0);
    const acc_t* p = block_of<scalar_t, acc_t>(row + c0, buf, n);
    acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + c0) : gbuf;
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const Vec w = at::vec::maximum(Vec::loadu(p + j), neg) - vshift;
      Vec gv = w.exp() * (has_beta ? at::vec::fmadd(vbeta, w, vscale) : vscale);
      if (has_gamma) {
        Vec keep(1);
        if (ind) {
          if constexpr (std::is_same_v<acc_t, float>) {
            keep = Vec::loadu(ind + c0 + j);
          } else {
            acc_t tmp[W];
            for (int64_t k = 0; k < W; ++k) tmp[k] = static_cast<acc_t>(ind[c0 + j + k]);
            keep = Vec::loadu(tmp);
          }
        }
        gv = at::vec::fmadd(vgamma, keep, gv);
      }
      gv.store(dst + j);
    }
    for (; j < n; ++j) {
      const acc_t w = clamp_low(static_cast<acc_t>(p[j])) - g.shift;
      acc_t gv = std::exp(w) * (has_beta ? g.scale + g.beta * w : g.scale);
      if (has_gamma) gv += g.gamma * (ind ? static_cast<acc_t>(ind[c0 + j]) : static_cast<acc_t>(1));
      dst[j] = gv;
    }
    if (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t k = 0; k < n; ++k) out[c0 + k] = static_cast<scalar_t>(gbuf[k]);
    }
  }
  out[y] = static_cast<scalar_t>(g.g_target);
}

template <typename acc_t>
inline acc_t softplus(acc_t x) {
  return std::max(x, static_cast<acc_t>(0)) + std::log1p(std::exp(-std::abs(x)));
}

int64_t grain_rows(int64_t v) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(v, 1)); }

template <typename T>
const T* opt_ptr(const torch::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

// The eight per-row outputs of a stats sweep: m, d, s, a, S, max value, its index, z_y.
struct StateOut {
  torch::Tensor m, d, s, a, ssum, amax_val, amax_idx, zy;
  StateOut(const torch::Tensor& logits, const torch::Tensor& target) {
    const int64_t n = target.numel();
    auto opts = target.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    m = torch::empty({n}, opts), d = torch::empty({n}, opts), s = torch::empty({n}, opts);
    a = torch::empty({n}, opts), ssum = torch::empty({n}, opts), amax_val = torch::empty({n}, opts);
    zy = torch::empty({n}, opts), amax_idx = torch::empty({n}, target.options());
  }
  std::vector<torch::Tensor> tensors() const { return {m, d, s, a, ssum, amax_val, amax_idx, zy}; }
};

// Raw pointers into a StateOut for one dtype; `put` stores a row's state, `clear` an ignored row's zeros.
template <typename acc_t>
struct StateRows {
  acc_t *m, *d, *s, *a, *ssum, *amax_val, *zy;
  int64_t* amax_idx;
  explicit StateRows(StateOut& o)
      : m(o.m.data_ptr<acc_t>()), d(o.d.data_ptr<acc_t>()), s(o.s.data_ptr<acc_t>()), a(o.a.data_ptr<acc_t>()),
        ssum(o.ssum.data_ptr<acc_t>()), amax_val(o.amax_val.data_ptr<acc_t>()), zy(o.zy.data_ptr<acc_t>()),
        amax_idx(o.amax_idx.data_ptr<int64_t>()) {}
  void put(int64_t r, const RowState<acc_t>& st) const {
    m[r] = st.m, d[r] = st.d, s[r] = st.s, a[r] = st.a, ssum[r] = st.ssum, amax_val[r] = st.amax_val;
    amax_idx[r] = st.amax_idx, zy[r] = st.zy;
  }
  void clear(int64_t r) const {
    m[r] = d[r] = s[r] = a[r] = ssum[r] = amax_val[r] = zy[r] = 0;
    amax_idx[r] = 0;
  }
};

// ---------------------------------------------------------------------------------------------------------------

// stats(logits (B,T,V), target (n,) int64 clamped, valid (n,) bool, ind (V,) float32 or empty, K) -> 8 tensors
std::vector<torch::Tensor> stats(torch::Tensor logits, torch::Tensor target, torch::Tensor valid, torch::Tensor ind,
                                 double num_support) {
  const int64_t n = target.numel();
  StateOut out(logits, target);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "losskit_stats", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto rows = rows_of<scalar_t>(logits);
    const int64_t* tgt = target.data_ptr<int64_t>();
    const bool* ok = valid.data_ptr<bool>();
    const float* indp = opt_ptr<float>(ind);
    const StateRows<acc_t> put(out);
    at::parallel_for(0, n, grain_rows(rows.v), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(kBlock);
      for (int64_t r = r0; r < r1; ++r) {
        if (!ok[r]) {  // never read: an ignored row may hold anything; its statistics are masked to 0
          put.clear(r);
          continue;
        }
        put.put(r, row_state<scalar_t, acc_t>(rows.row(r), rows.v, tgt[r], indp, num_support, buf.data()));
      }
    });
  });
  return out.tensors();
}

// grad(logits, out, target, valid, shift, scale, beta|empty, gamma|empty, g_target, ind|empty): G into out.
void grad(torch::Tensor logits, torch::Tensor out, torch::Tensor target, torch::Tensor valid, torch::Tensor shift,
          torch::Tensor scale, torch::Tensor beta, torch::Tensor gamma, torch::Tensor g_target, torch::Tensor ind) {
  const int64_t n = target.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "losskit_grad", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto rows = rows_of<scalar_t>(logits);
    const auto outs = rows_of<scalar_t>(out);
    const int64_t* tgt = target.data_ptr<int64_t>();
    const bool* ok = valid.data_ptr<bool>();
    const float* indp = opt_ptr<float>(ind);
    const acc_t *psh = shift.data_ptr<acc_t>(), *psc = scale.data_ptr<acc_t>(), *pgt = g_target.data_ptr<acc_t>();
    const acc_t* pb = opt_ptr<acc_t>(beta);
    const acc_t* pg = opt_ptr<acc_t>(gamma);
    at::parallel_for(0, n, grain_rows(rows.v), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(kBlock), gbuf(kBlock);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* dst = outs.row(r);
        if (!ok[r]) {
          std::fill(dst, dst + rows.v, static_cast<scalar_t>(0));
          continue;
        }
        const RowGrad<acc_t> g{psh[r], psc[r], pb ? pb[r] : acc_t(0), pg ? pg[r] : acc_t(0), pgt[r]};
        row_grad<scalar_t, acc_t>(rows.row(r), dst, rows.v, tgt[r], indp, g, pb != nullptr, pg != nullptr, buf.data(),
                                  gbuf.data());
      }
    });
  });
}

// fused_eager(logits, out, target, valid, coef, eps_t|empty, eps_over_kt|empty, target_in_at|empty, z_loss, ind,
// K): the stats of every row (as `stats`), and G of the fused loss written into out while each row is hot:
//   j != y: G_j = c[(1 + 2 lam lse) p_j - (eps/K_t)[j in A]]   (with A_t = A; the target column is set after)
//   j == y: G_y = c[eps - (1 - p_y) + 2 lam lse p_y - (eps/K_t)[y in A_t]]
std::vector<torch::Tensor> fused_eager(torch::Tensor logits, torch::Tensor out, torch::Tensor target,
                                       torch::Tensor valid, torch::Tensor coef, torch::Tensor eps_t,
                                       torch::Tensor eps_over_kt, torch::Tensor target_in_at, double z_loss,
                                       torch::Tensor ind, double num_support) {
  const int64_t n = target.numel();
  StateOut state(logits, target);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "losskit_fused_eager", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto rows = rows_of<scalar_t>(logits);
    const auto outs = rows_of<scalar_t>(out);
    const int64_t* tgt = target.data_ptr<int64_t>();
    const bool* ok = valid.data_ptr<bool>();
    const float* indp = opt_ptr<float>(ind);
    const acc_t* pc = coef.data_ptr<acc_t>();
    const acc_t* pe = opt_ptr<acc_t>(eps_t);
    const acc_t* pek = opt_ptr<acc_t>(eps_over_kt);
    const acc_t* pat = opt_ptr<acc_t>(target_in_at);
    const StateRows<acc_t> put(state);
    const acc_t lam = static_cast<acc_t>(z_loss);
    at::parallel_for(0, n, grain_rows(rows.v), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(kBlock), gbuf(kBlock);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* dst = outs.row(r);
        if (!ok[r]) {
          put.clear(r);
          std::fill(dst, dst + rows.v, static_cast<scalar_t>(0));
          continue;
        }
        const scalar_t* src = rows.row(r);
        const int64_t y = tgt[r];
        const auto st = row_state<scalar_t, acc_t>(src, rows.v, y, indp, num_support, buf.data());
        put.put(r, st);
        // closed forms of the row (rowmath.finalize): delta = -((m - z_y) + ln d), lse, p_y, 1 - p_y
        const acc_t log_d = std::log(st.d);
        const acc_t delta = -((st.m - st.zy) + log_d);
        const acc_t sp_pos = softplus(delta), sp_neg = softplus(-delta);
        const acc_t lse = std::max(st.m + log_d, st.zy) + std::log1p(std::exp(-std::abs(delta)));
        const acc_t p_y = std::exp(-sp_neg), om = std::exp(-sp_pos);
        const acc_t c = pc[r];
        const acc_t zl = lam == 0 ? acc_t(1) : acc_t(1) + acc_t(2) * lam * lse;
        acc_t g_target = -om;
        if (lam != 0) g_target += acc_t(2) * lam * lse * p_y;
        acc_t gamma = 0;
        const bool smooth = pe != nullptr;
        if (smooth) {
          g_target += pe[r] - pek[r] * pat[r];
          gamma = -c * pek[r];
        }
        // p_j = e^{z_j - m} (1 - p_y) / d, so G_j = e^{z_j - m} c zl (1 - p_y) / d + gamma [j in A]
        const acc_t scale = st.d > 0 ? c * zl * om / st.d : acc_t(0);
        const RowGrad<acc_t> g{st.m, scale, acc_t(0), gamma, c * g_target};
        row_grad<scalar_t, acc_t>(src, dst, rows.v, y, indp, g, false, smooth, buf.data(), gbuf.data());
      }
    });
  });
  return state.tensors();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("stats", &stats, "per-row streaming state of the logits (pass 1 and 2)");
  module.def("grad", &grad, "write G = e^{z - shift}(scale + beta (z - shift)) + gamma [A] with G_y exact");
  module.def("fused_eager", &fused_eager, "stats and the fused-loss gradient in one sweep per row");
}
