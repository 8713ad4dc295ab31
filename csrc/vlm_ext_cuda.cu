// CUDA implementations of the ops declared in vlm_ext.cpp (registered for the CUDA dispatch key).
//
// Compiled by setup.py where torch is a CUDA build and nvcc is found (it then defines
// VLM_EXT_WITH_CUDA for both files), and compile-checked without a GPU by scripts/cuda_build_check.py.
// Same contracts and errors as the CPU twins; tests compare both with the Python references in
// vlm_core/kernels/ext.py (the CUDA cases skip without a GPU).
//
// packed_metadata: cu_seqlens and the running count of image tokens are inclusive scans (at::cumsum);
// one thread per token then finds its segment by binary search over cu_seqlens, writes its position,
// checks that its image run is a whole number of images, and writes its image id. A malformed run
// records the first bad token with atomicMin; the host reads that one number (one sync) to raise.
// scatter_rows_/gather_rows copy whole rows, so they move bytes, whatever the dtype (as the CPU twins'
// memcpy does): each thread copies one vector of the widest size (16, 8, 4, 2 or 1 bytes) that divides the
// row's bytes and both base addresses, so bf16 rows of a 16-byte multiple move as 128-bit loads and stores
// (LDG.E.128/STG.E.128) instead of 2-byte ones. A block is a tile of rows x vectors (threadIdx.y picks the
// row, threadIdx.x the vector), so no thread divides a flat index; the grid strides over rows past
// CUDA's 65,535 limit on gridDim.y. A row index out of range is a device-side assert (as in PyTorch's own
// index kernels; checking on the host would sync per call).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS, cuSPARSE and cuSOLVER headers.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace vlm_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_packed_metadata_args(const at::Tensor& input_ids,
                                                                         const at::Tensor& seqlens,
                                                                         int64_t tokens_per_image);
void check_rows_args(const char* op, const at::Tensor& table, const at::Tensor& rows);

namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t work) { return (work + kThreads - 1) / kThreads; }

__global__ void packed_metadata_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ bounds,
                                       int64_t segments, const int64_t* __restrict__ image_count, int64_t total,
                                       int64_t image_token_id, int64_t tokens_per_image,
                                       int64_t* __restrict__ positions, int32_t* __restrict__ groups,
                                       unsigned long long* __restrict__ first_error) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total) return;
  // bounds = [0, cu_1, ..., cu_n]; the segment of t is the last s with bounds[s] <= t, s < n (empty
  // segments repeat a bound, and the last of equal bounds is the one that contains t).
  int64_t lo = 0, hi = segments - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (bounds[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int64_t start = bounds[lo], stop = bounds[lo + 1];
  positions[t] = t - start;
  if (ids[t] != image_token_id) {
    groups[t] = 0;
    return;
  }
  const int64_t before = image_count[t] - 1;  // image tokens before t in the stream
  const bool run_start = t == start || ids[t - 1] != image_token_id;
  const bool run_end = t + 1 == stop || ids[t + 1] != image_token_id;
  if ((run_start && before % tokens_per_image != 0) || (run_end && (before + 1) % tokens_per_image != 0)) {
    atomicMin(first_error, static_cast<unsigned long long>(t));
  }
  groups[t] = static_cast<int32_t>(before / tokens_per_image + 1);
}

// Row rows[m] of the table and row m of the dense buffer, vecs_per_row vectors each: gather copies
// table -> dense, scatter dense -> table.
template <typename VecT, bool kScatter>
__global__ void copy_rows_kernel(const VecT* __restrict__ from, VecT* __restrict__ to,
                                 const int64_t* __restrict__ rows, int64_t count, int64_t vecs_per_row,
                                 int64_t table_rows) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= vecs_per_row) return;
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; m < count; m += row_stride) {
    const int64_t row = rows[m];
    CUDA_KERNEL_ASSERT(row >= 0 && row < table_rows);
    const int64_t table_at = row * vecs_per_row + v, dense_at = m * vecs_per_row + v;
    to[kScatter ? table_at : dense_at] = from[kScatter ? dense_at : table_at];
  }
}

// The widest access (bytes) that divides the row's bytes and the addresses of both buffers.
int vector_bytes(int64_t row_bytes, const void* a, const void* b) {
  const auto misalignment = static_cast<uint64_t>(row_bytes) | reinterpret_cast<uintptr_t>(a) |
                            reinterpret_cast<uintptr_t>(b);
  for (int bytes = 16; bytes > 1; bytes /= 2) {
    if (misalignment % bytes == 0) return bytes;
  }
  return 1;
}

template <bool kScatter, typename VecT>
void launch_copy_rows(const void* from, void* to, const int64_t* rows, int64_t count, int64_t row_bytes,
                      int64_t table_rows) {
  const int64_t vecs_per_row = row_bytes / static_cast<int64_t>(sizeof(VecT));
  // x covers a row's vectors (a whole warp at least), y fills the block with rows.
  const int64_t x = std::min<int64_t>(kThreads, (vecs_per_row + 31) / 32 * 32);
  const dim3 block(static_cast<unsigned>(x), static_cast<unsigned>(kThreads / x));
  const int64_t row_blocks = std::min<int64_t>((count + block.y - 1) / block.y, 65535);
  const dim3 grid(static_cast<unsigned>((vecs_per_row + x - 1) / x), static_cast<unsigned>(row_blocks));
  copy_rows_kernel<VecT, kScatter><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const VecT*>(from), static_cast<VecT*>(to), rows, count, vecs_per_row, table_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Copies row rows[m] of a contiguous (table_rows, row_bytes) table to or from row m of a dense buffer.
template <bool kScatter>
void copy_rows(const void* from, void* to, const int64_t* rows, int64_t count, int64_t row_bytes,
               int64_t table_rows) {
  switch (vector_bytes(row_bytes, from, to)) {
    case 16: return launch_copy_rows<kScatter, uint4>(from, to, rows, count, row_bytes, table_rows);
    case 8: return launch_copy_rows<kScatter, uint2>(from, to, rows, count, row_bytes, table_rows);
    case 4: return launch_copy_rows<kScatter, uint32_t>(from, to, rows, count, row_bytes, table_rows);
    case 2: return launch_copy_rows<kScatter, uint16_t>(from, to, rows, count, row_bytes, table_rows);
    default: return launch_copy_rows<kScatter, uint8_t>(from, to, rows, count, row_bytes, table_rows);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_metadata_cuda(const at::Tensor& input_ids_in,
                                                                    const at::Tensor& seqlens_in,
                                                                    int64_t image_token_id, int64_t tokens_per_image) {
  auto [cu_seqlens, position_ids, bidir_group] = check_packed_metadata_args(input_ids_in, seqlens_in, tokens_per_image);
  const c10::cuda::CUDAGuard guard(input_ids_in.device());
  const at::Tensor input_ids = input_ids_in.contiguous();
  const at::Tensor seqlens = seqlens_in.to(at::kLong).contiguous();
  const int64_t total = input_ids.numel();
  const int64_t segments = seqlens.numel();
  // One sync reads min(seqlens) and their sum: the checks the CPU twin makes while scanning.
  const at::Tensor bounds = at::cat({at::zeros({1}, seqlens.options()), at::cumsum(seqlens, 0)});
  if (segments > 0) {
    const auto summary = at::stack({seqlens.min(), bounds[segments]}).cpu();
    const int64_t shortest = summary[0].item<int64_t>(), sum = summary[1].item<int64_t>();
    TORCH_CHECK_VALUE(shortest >= 0, "packed_metadata: seqlens has a negative length (", shortest, ")");
    TORCH_CHECK_VALUE(sum == total, "packed_metadata: seqlens sum to ", sum, " but input_ids has ", total, " tokens");
  } else {
    TORCH_CHECK_VALUE(total == 0, "packed_metadata: no segments but input_ids has ", total, " tokens");
  }
  cu_seqlens.copy_(bounds);
  if (total == 0) return {cu_seqlens, position_ids, bidir_group};
  const at::Tensor image_count = at::cumsum(input_ids == image_token_id, 0);  // int64, inclusive
  at::Tensor first_error = at::full({1}, total, input_ids.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  packed_metadata_kernel<<<blocks_for(total), kThreads, 0, stream>>>(
      input_ids.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(), segments, image_count.data_ptr<int64_t>(), total,
      image_token_id, tokens_per_image, position_ids.data_ptr<int64_t>(), bidir_group.data_ptr<int32_t>(),
      reinterpret_cast<unsigned long long*>(first_error.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t bad = first_error.item<int64_t>();
  TORCH_CHECK_VALUE(bad == total, "packed_metadata: the run of image tokens (id ", image_token_id, ") around token ",
                    bad, " is not a whole number of images of tokens_per_image=", tokens_per_image,
                    " tokens; each <image> must expand to exactly that many tokens inside one sample");
  return {cu_seqlens, position_ids, bidir_group};
}

at::Tensor& scatter_rows_cuda(at::Tensor& dst, const at::Tensor& rows_in, const at::Tensor& src_in) {
  check_rows_args("scatter_rows_", dst, rows_in);
  TORCH_CHECK_VALUE(src_in.dim() == 2 && src_in.size(0) == rows_in.numel() && src_in.size(1) == dst.size(1),
                    "scatter_rows_: src must be (", rows_in.numel(), ", ", dst.size(1), "), got ", src_in.sizes());
  TORCH_CHECK_VALUE(src_in.scalar_type() == dst.scalar_type(), "scatter_rows_: src is ", src_in.scalar_type(),
                    ", dst ", dst.scalar_type());
  const c10::cuda::CUDAGuard guard(dst.device());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor src = src_in.contiguous();
  const int64_t count = rows.numel(), row_bytes = dst.size(1) * dst.element_size();
  if (count == 0 || row_bytes == 0) return dst;
  copy_rows</*kScatter=*/true>(src.data_ptr(), dst.data_ptr(), rows.data_ptr<int64_t>(), count, row_bytes,
                               dst.size(0));
  return dst;
}

at::Tensor gather_rows_cuda(const at::Tensor& src_in, const at::Tensor& rows_in) {
  const at::Tensor src = src_in.contiguous();
  check_rows_args("gather_rows", src, rows_in);
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor rows = rows_in.contiguous();
  const int64_t count = rows.numel(), row_bytes = src.size(1) * src.element_size();
  at::Tensor out = at::empty({count, src.size(1)}, src.options());
  if (count == 0 || row_bytes == 0) return out;
  copy_rows</*kScatter=*/false>(src.data_ptr(), out.data_ptr(), rows.data_ptr<int64_t>(), count, row_bytes,
                                src.size(0));
  return out;
}

}  // namespace vlm_ext

TORCH_LIBRARY_IMPL(vlm_ext, CUDA, m) {
  m.impl("packed_metadata", &vlm_ext::packed_metadata_cuda);
  m.impl("scatter_rows_", &vlm_ext::scatter_rows_cuda);
  m.impl("gather_rows", &vlm_ext::gather_rows_cuda);
}
