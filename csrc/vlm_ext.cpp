// The compiled extension's operator schemas and their C++ CPU implementations ("CPU twins").
//
// Ops (torch.ops.vlm_ext.*; Python wrappers, references and the logged fallback in vlm_core/kernels/ext.py):
//   packed_metadata(input_ids, seqlens, image_token_id, tokens_per_image) -> (cu_seqlens, position_ids, bidir_group)
//       The packed-batch metadata of vlm_core/data/packing.py from the token stream: cu_seqlens [n+1] int32,
//       position_ids [total] int64 restarting per segment, bidir_group [total] int32 numbering the images
//       1..N_img in stream order (every tokens_per_image consecutive image tokens of a segment are one image).
//   scatter_rows_(dst, rows, src) -> dst       dst[rows[m]] = src[m] (the projector's merge), in place
//   gather_rows(src, rows) -> out               out[m] = src[rows[m]] (its backward)
// The CUDA implementations live in vlm_ext_cuda.cu and are registered only when setup.py compiled it
// (VLM_EXT_WITH_CUDA). Errors in the caller's data raise ValueError (TORCH_CHECK_VALUE).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

namespace vlm_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_packed_metadata_args(const at::Tensor& input_ids,
                                                                         const at::Tensor& seqlens,
                                                                         int64_t tokens_per_image) {
  TORCH_CHECK_VALUE(input_ids.dim() == 1 && input_ids.scalar_type() == at::kLong,
                    "packed_metadata: input_ids must be 1-d int64 (total,), got ", input_ids.sizes(), " ",
                    input_ids.scalar_type());
  TORCH_CHECK_VALUE(seqlens.dim() == 1 && (seqlens.scalar_type() == at::kLong || seqlens.scalar_type() == at::kInt),
                    "packed_metadata: seqlens must be 1-d int32 or int64 (n,), got ", seqlens.sizes(), " ",
                    seqlens.scalar_type());
  TORCH_CHECK_VALUE(seqlens.device() == input_ids.device(), "packed_metadata: seqlens is on ", seqlens.device(),
                    " but input_ids on ", input_ids.device());
  TORCH_CHECK_VALUE(tokens_per_image >= 1, "packed_metadata: tokens_per_image=", tokens_per_image, " must be >= 1");
  TORCH_CHECK_VALUE(input_ids.numel() < (int64_t{1} << 31),
                    "packed_metadata: cu_seqlens is int32, so total must stay below 2**31 tokens, got ",
                    input_ids.numel());
  auto options = input_ids.options();
  return {at::empty({seqlens.numel() + 1}, options.dtype(at::kInt)), at::empty_like(input_ids),
          at::empty({input_ids.numel()}, options.dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_metadata_cpu(const at::Tensor& input_ids_in,
                                                                   const at::Tensor& seqlens_in,
                                                                   int64_t image_token_id, int64_t tokens_per_image) {
  auto [cu_seqlens, position_ids, bidir_group] = check_packed_metadata_args(input_ids_in, seqlens_in, tokens_per_image);
  const at::Tensor input_ids = input_ids_in.contiguous();
  const at::Tensor seqlens = seqlens_in.to(at::kLong).contiguous();
  const int64_t total = input_ids.numel();
  const int64_t segments = seqlens.numel();
  const int64_t* ids = input_ids.data_ptr<int64_t>();
  const int64_t* lengths = seqlens.data_ptr<int64_t>();
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int64_t* positions = position_ids.data_ptr<int64_t>();
  int32_t* groups = bidir_group.data_ptr<int32_t>();

  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK_VALUE(lengths[s] >= 0, "packed_metadata: seqlens has a negative length (seqlens[", s, "]=", lengths[s],
                      ")");
  }
  int64_t end = 0;
  cu[0] = 0;
  for (int64_t s = 0; s < segments; ++s) {
    end += lengths[s];
    TORCH_CHECK_VALUE(end <= total, "packed_metadata: seqlens sum to more than the ", total,
                      " tokens of input_ids (past them at segment ", s, ")");
    cu[s + 1] = static_cast<int32_t>(end);
  }
  TORCH_CHECK_VALUE(end == total, "packed_metadata: seqlens sum to ", end, " but input_ids has ", total, " tokens");

  int64_t image_tokens = 0;  // image tokens before t in the stream
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t start = cu[s], stop = cu[s + 1];
    for (int64_t t = start; t < stop; ++t) {
      positions[t] = t - start;
      if (ids[t] != image_token_id) {
        groups[t] = 0;
        continue;
      }
      const bool run_start = t == start || ids[t - 1] != image_token_id;
      const bool run_end = t + 1 == stop || ids[t + 1] != image_token_id;
      TORCH_CHECK_VALUE(!(run_start && image_tokens % tokens_per_image != 0) &&
                            !(run_end && (image_tokens + 1) % tokens_per_image != 0),
                        "packed_metadata: the run of image tokens (id ", image_token_id, ") around token ", t,
                        " of segment ", s, " is not a whole number of images of tokens_per_image=", tokens_per_image,
                        " tokens; each <image> must expand to exactly that many tokens inside one sample");
      groups[t] = static_cast<int32_t>(image_tokens / tokens_per_image + 1);
      ++image_tokens;
    }
  }
  return {cu_seqlens, position_ids, bidir_group};
}

void check_rows_args(const char* op, const at::Tensor& table, const at::Tensor& rows) {
  TORCH_CHECK_VALUE(table.dim() == 2 && table.is_contiguous(), op, ": the row table must be a contiguous 2-d tensor, got ",
                    table.sizes());
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.scalar_type() == at::kLong, op, ": rows must be 1-d int64, got ",
                    rows.sizes(), " ", rows.scalar_type());
  TORCH_CHECK_VALUE(rows.device() == table.device(), op, ": rows is on ", rows.device(), ", the table on ",
                    table.device());
}

at::Tensor& scatter_rows_cpu(at::Tensor& dst, const at::Tensor& rows_in, const at::Tensor& src) {
  check_rows_args("scatter_rows_", dst, rows_in);
  TORCH_CHECK_VALUE(src.dim() == 2 && src.size(0) == rows_in.numel() && src.size(1) == dst.size(1),
                    "scatter_rows_: src must be (", rows_in.numel(), ", ", dst.size(1), "), got ", src.sizes());
  TORCH_CHECK_VALUE(src.scalar_type() == dst.scalar_type(), "scatter_rows_: src is ", src.scalar_type(), ", dst ",
                    dst.scalar_type());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor source = src.contiguous();
  const int64_t count = rows.numel(), width = dst.size(1), total = dst.size(0);
  const int64_t bytes = width * dst.element_size();
  const int64_t* index = rows.data_ptr<int64_t>();
  for (int64_t m = 0; m < count; ++m) {
    TORCH_CHECK_VALUE(index[m] >= 0 && index[m] < total, "scatter_rows_: rows[", m, "]=", index[m],
                      " is outside [0, ", total, ")");
  }
  char* out = static_cast<char*>(dst.data_ptr());
  const char* in = static_cast<const char*>(source.data_ptr());
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) std::memcpy(out + index[m] * bytes, in + m * bytes, bytes);
  });
  return dst;
}

at::Tensor gather_rows_cpu(const at::Tensor& src_in, const at::Tensor& rows_in) {
  const at::Tensor src = src_in.contiguous();
  check_rows_args("gather_rows", src, rows_in);
  const at::Tensor rows = rows_in.contiguous();
  const int64_t count = rows.numel(), width = src.size(1), total = src.size(0);
  at::Tensor out = at::empty({count, width}, src.options());
  const int64_t bytes = width * src.element_size();
  const int64_t* index = rows.data_ptr<int64_t>();
  for (int64_t m = 0; m < count; ++m) {
    TORCH_CHECK_VALUE(index[m] >= 0 && index[m] < total, "gather_rows: rows[", m, "]=", index[m], " is outside [0, ",
                      total, ")");
  }
  const char* in = static_cast<const char*>(src.data_ptr());
  char* result = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) std::memcpy(result + m * bytes, in + index[m] * bytes, bytes);
  });
  return out;
}

}  // namespace vlm_ext

TORCH_LIBRARY(vlm_ext, m) {
  m.def("packed_metadata(Tensor input_ids, Tensor seqlens, int image_token_id, int tokens_per_image) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("scatter_rows_(Tensor(a!) dst, Tensor rows, Tensor src) -> Tensor(a!)");
  m.def("gather_rows(Tensor src, Tensor rows) -> Tensor");
  // Which parts were compiled: the Python side reports it (ext.extension_status).
  m.def("has_cuda() -> bool", []() -> bool {
#ifdef VLM_EXT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

TORCH_LIBRARY_IMPL(vlm_ext, CPU, m) {
  m.impl("packed_metadata", &vlm_ext::packed_metadata_cpu);
  m.impl("scatter_rows_", &vlm_ext::scatter_rows_cpu);
  m.impl("gather_rows", &vlm_ext::gather_rows_cpu);
}

// A Python module too, so that setup.py's vlm_core._ext is importable; the ops are registered when the
// shared library loads (torch.ops.load_library or this import).
static PyModuleDef vlm_ext_module = {PyModuleDef_HEAD_INIT, "_ext", "vlm_core compiled ops (torch.ops.vlm_ext)", -1,
                                     nullptr};
PyMODINIT_FUNC PyInit__ext(void) { return PyModule_Create(&vlm_ext_module); }
