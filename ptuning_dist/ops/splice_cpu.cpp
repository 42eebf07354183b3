// CPU kernels of ptuning::splice (see splice.py): one memcpy / memset / cast per position row,
// parallel over positions; the table gradient is parallel over columns and sums positions in
// increasing b * S + s order, so its bits do not depend on the thread count or the layout.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

namespace {

// Output row of position p = b * S + s: p itself ([B,S,H]) or s * B + b ([S,B,H]).
inline int64_t out_row(int64_t p, int64_t B, int64_t S, bool seq_first) {
  return seq_first ? (p % S) * B + p / S : p;
}

template <typename slot_t>
void check_slots(const slot_t* slot, int64_t P, int64_t M) {
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(slot[p] < M, "splice: slot ", int64_t(slot[p]), " >= table rows ", M);
}

// The output, from a small cache of this op's freed outputs when it is large. Why: torch's CPU
// allocator hands a multi-MiB tensor fresh mmap'd pages that the kernel faults in 4 KiB at a time;
// measured here, faulting in a 64 MiB output took ~20 ms of the op's ~27 ms (the copy itself ~3 ms).
// Training asks for the same size every micro-batch, and the previous output is freed by then
// (after its backward), so reusing it skips the faults: what CUDA's caching allocator does on GPUs.
// Cost: up to kKeep freed outputs stay resident between calls. (Transparent huge pages were tried
// first: as fast when 2 MiB pages are free, but 1.6x slower than plain pages when the kernel had to
// compact memory for them, which happened within one benchmark run.)
constexpr size_t kCacheFrom = size_t(4) << 20;  // smaller outputs: torch::empty
constexpr size_t kKeep = 4;
bool g_cache_on = true;  // set_output_cache(false): ptuning_dist/debug.py, for measuring the cache

struct OutputCache {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free;  // (capacity in bytes, buffer)
};

OutputCache& cache() {
  static auto* c = new OutputCache();  // never destroyed: deleters may run at interpreter exit
  return *c;
}

void release(void* buf, size_t bytes) {
  auto& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.free.size() < kKeep) {
      c.free.emplace_back(bytes, buf);
      return;
    }
  }
  std::free(buf);
}

torch::Tensor empty_output(at::IntArrayRef sizes, const torch::TensorOptions& opts) {
  int64_t numel = 1;
  for (auto n : sizes) numel *= n;
  const size_t bytes = size_t(numel) * opts.dtype().itemsize();
  if (bytes < kCacheFrom || !g_cache_on) return torch::empty(sizes, opts);
  // dynamic padding changes the size every step: take the smallest cached buffer that holds this
  // output and wastes at most half of itself; buffers are allocated in 1 MiB steps
  void* buf = nullptr;
  size_t cap = 0;
  {
    auto& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    auto best = c.free.end();
    for (auto it = c.free.begin(); it != c.free.end(); ++it)
      if (it->first >= bytes && it->first <= 2 * bytes && (best == c.free.end() || it->first < best->first)) best = it;
    if (best != c.free.end()) {
      cap = best->first;
      buf = best->second;
      c.free.erase(best);
    } else if (c.free.size() == kKeep) {  // none fits: make room for this size
      std::free(c.free.front().second);
      c.free.erase(c.free.begin());
    }
  }
  if (buf == nullptr) {
    cap = (bytes + (size_t(1) << 20) - 1) >> 20 << 20;
    if (posix_memalign(&buf, 64, cap) != 0) return torch::empty(sizes, opts);
  }
  return torch::from_blob(buf, sizes, [buf, cap](void*) { release(buf, cap); }, opts);
}

}  // namespace

// Row p of the output: its vocabulary row, zeros, or its prompt row (cast to the weight's dtype),
// then, with a position table, + pos[pos_offset + s] (with per-token positions tok_pos: + pos[tok_pos[p]])
// computed in fp32 and rounded once, as torch adds two tensors of the weight's dtype (so the result is
// bit-equal to lookup, insert, then add).
torch::Tensor splice_fwd(torch::Tensor ids, torch::Tensor slot, torch::Tensor weight, int64_t vocab_start,
                         torch::Tensor table, bool write_prompt, bool seq_first, torch::Tensor pos,
                         int64_t pos_offset, torch::Tensor tok_pos) {
  const int64_t B = ids.size(0), S = ids.size(1), P = B * S;
  const int64_t V = weight.size(0), H = weight.size(1), M = table.size(0);
  const bool has_pos = pos.numel() > 0, per_token = has_pos && tok_pos.numel() > 0;
  TORCH_CHECK(!has_pos || (pos.scalar_type() == weight.scalar_type() && pos.size(1) == H &&
                           (per_token || pos.size(0) >= pos_offset + S)), "splice: bad position table");
  TORCH_CHECK(!per_token || (tok_pos.numel() == P && tok_pos.scalar_type() == at::kLong),
              "splice: per-token positions must be int64 with one per id");
  const int64_t* tp = per_token ? tok_pos.data_ptr<int64_t>() : nullptr;
  if (per_token)
    for (int64_t p = 0; p < P; ++p)
      TORCH_CHECK(tp[p] >= 0 && tp[p] < pos.size(0), "splice: position ", tp[p], " outside the table");
  auto out = seq_first ? empty_output({S, B, H}, weight.options()) : empty_output({B, S, H}, weight.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* tab = table.data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(slot.scalar_type(), "splice_fwd_slot", [&] {
    const index_t* sl = slot.data_ptr<index_t>();
    check_slots(sl, P, M);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "splice_fwd", [&] {
      const scalar_t* w = weight.data_ptr<scalar_t>();
      const scalar_t* pe = has_pos ? pos.data_ptr<scalar_t>() : nullptr;
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
      at::parallel_for(0, P, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t p = lo; p < hi; ++p) {
          scalar_t* dst = o + out_row(p, B, S, seq_first) * H;
          const int64_t s = sl[p];
          const int64_t v = id[p] - vocab_start;
          const bool prompt = s >= 0, local = !prompt && v >= 0 && v < V;
          if (has_pos) {  // one pass: (row or zero) + position
            const scalar_t* q = pe + (per_token ? tp[p] : pos_offset + p % S) * H;
            if (prompt && write_prompt) {
              const float* src = tab + s * H;
              for (int64_t h = 0; h < H; ++h)
                dst[h] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(src[h])) +
                                               static_cast<float>(q[h]));
            } else if (local) {
              const scalar_t* src = w + v * H;
              for (int64_t h = 0; h < H; ++h)
                dst[h] = static_cast<scalar_t>(static_cast<float>(src[h]) + static_cast<float>(q[h]));
            } else {  // 0 + q, not a copy of q: -0.0 becomes +0.0 as in torch
              for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(0.0f + static_cast<float>(q[h]));
            }
          } else if (prompt) {
            if (!write_prompt) {
              std::memset(dst, 0, H * sizeof(scalar_t));
            } else if (std::is_same<scalar_t, float>::value) {
              std::memcpy(dst, tab + s * H, H * sizeof(float));
            } else {
              const float* src = tab + s * H;
              for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(src[h]);
            }
          } else if (local) {
            std::memcpy(dst, w + v * H, H * sizeof(scalar_t));
          } else {
            std::memset(dst, 0, H * sizeof(scalar_t));
          }
        }
      });
    });
  });
  return out;
}

torch::Tensor splice_bwd(torch::Tensor grad, torch::Tensor slot, int64_t M, bool seq_first) {
  const int64_t B = slot.size(0), S = slot.size(1), P = B * S, H = grad.size(-1);
  auto gt = torch::zeros({M, H}, grad.options().dtype(torch::kFloat));
  float* g = gt.data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(slot.scalar_type(), "splice_bwd_slot", [&] {
    const index_t* sl = slot.data_ptr<index_t>();
    check_slots(sl, P, M);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "splice_bwd", [&] {
      const scalar_t* go = grad.data_ptr<scalar_t>();
      // each thread owns a column range; within it positions are summed in increasing order
      at::parallel_for(0, H, 256, [&](int64_t h0, int64_t h1) {
        for (int64_t p = 0; p < P; ++p) {
          const int64_t s = sl[p];
          if (s < 0) continue;
          const scalar_t* src = go + out_row(p, B, S, seq_first) * H;
          float* dst = g + s * H;
          for (int64_t h = h0; h < h1; ++h) dst[h] += static_cast<float>(src[h]);
        }
      });
    });
  });
  return gt;
}

void set_output_cache(bool on) { g_cache_on = on; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_output_cache", &set_output_cache, "reuse freed large outputs (default on)");
  m.def("splice_fwd", &splice_fwd, "ptuning splice forward (CPU)");
  m.def("splice_bwd", &splice_bwd, "ptuning splice table gradient (CPU)");
}
