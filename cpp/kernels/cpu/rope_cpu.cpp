// RoPE of q and k on the CPU (math and layout: qlora/rope.h).
//
// The caller splits the rows (q's, then k's) over threads. A row is Dh contiguous elements; the
// inner loop over the half-row pairs (i, i + half) has no reduction, so it vectorises. In place is
// safe: each pair is read before it is written, by the same iteration.
#include "cpu_elements.h"
#include "qlora/rope.h"

namespace qlora {
namespace {

using namespace cpu_detail;

template <typename E, typename C>
void rotate_row(const typename E::Storage* in, typename E::Storage* out,
                const typename C::Storage* cos, const typename C::Storage* sin, int64_t half,
                bool transpose) {
  if (!transpose) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = E::load(in, i), x2 = E::load(in, i + half);
      const float c1 = C::load(cos, i), c2 = C::load(cos, i + half);
      const float s1 = C::load(sin, i), s2 = C::load(sin, i + half);
      E::store(out, i, x1 * c1 - x2 * s1);
      E::store(out, i + half, x2 * c2 + x1 * s2);
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const float d1 = E::load(in, i), d2 = E::load(in, i + half);
      const float c1 = C::load(cos, i), c2 = C::load(cos, i + half);
      const float s1 = C::load(sin, i), s2 = C::load(sin, i + half);
      E::store(out, i, d1 * c1 + d2 * s2);
      E::store(out, i + half, d2 * c2 - d1 * s1);
    }
  }
}

template <typename E, typename C>
void rope_rows(const RopeArgs& a, int64_t begin, int64_t end) {
  using S = typename E::Storage;
  using CS = typename C::Storage;
  const int64_t T = a.seq, Dh = a.head_dim, half = Dh / 2;
  const int64_t q_rows = a.batch * a.q.heads * T;
  const CS* cos = static_cast<const CS*>(a.cos);
  const CS* sin = static_cast<const CS*>(a.sin);
  for (int64_t row = begin; row < end; ++row) {
    const bool is_q = row < q_rows;
    const RopeOperand& op = is_q ? a.q : a.k;
    int64_t r = is_q ? row : row - q_rows;
    const int64_t t = r % T;
    r /= T;
    const int64_t h = r % op.heads;
    const int64_t b = r / op.heads;
    const S* in = static_cast<const S*>(op.in) + b * op.in_stride_b + h * op.in_stride_h + t * op.in_stride_t;
    S* out = static_cast<S*>(op.out) + b * op.out_stride_b + h * op.out_stride_h + t * op.out_stride_t;
    const int64_t table_row = ((a.cos_batch == 1 ? 0 : b) * T + t) * Dh;
    rotate_row<E, C>(in, out, cos + table_row, sin + table_row, half, a.transpose);
  }
}

}  // namespace

void rope_cpu(const RopeArgs& a, int64_t row_begin, int64_t row_end) {
  dispatch_float(a.type, [&](auto e) {
    using E = decltype(e);
    if (a.table_type == a.type) {
      rope_rows<E, E>(a, row_begin, row_end);
    } else {
      rope_rows<E, F32>(a, row_begin, row_end);
    }
  });
}

}  // namespace qlora
