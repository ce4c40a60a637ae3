// Python bindings of dymu_kernels._C (pybind11). TORCH_EXTENSION_NAME is set
// by torch.utils.cpp_extension (setup.py) and by CMakeLists.txt.
// torch/csrc/utils/pybind.h gives pybind11 its at::Tensor caster (what
// torch/extension.h includes for it), without the C++ frontend that
// torch/extension.h also brings in (torch/all.h): half the compile time.
#include <torch/csrc/utils/pybind.h>

#include "dymu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dymu_kernels C++ ops (CPU)";
  m.def("segment_mean", &dymu::segment_mean_cpu, "Segment mean of src [B, G, N, F] by index [B, N] (-1 = skip)",
        pybind11::arg("src"), pybind11::arg("index"), pybind11::arg("num_segments"));
  m.def("merge_tokens", &dymu::merge_tokens_cpu,
        "Apply A->B merges to a merge state; returns (x, size, lengths, pos_map)", pybind11::arg("x"),
        pybind11::arg("size"), pybind11::arg("lengths"), pybind11::arg("pos_map"), pybind11::arg("node_idx"),
        pybind11::arg("merge_mask"), pybind11::arg("node_max"), pybind11::arg("cls_token"));
  m.def("vtu_attention", &dymu::vtu_attention_cpu, "VTU attention over the full positions, re-merged per unique token",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("merge_map"), pybind11::arg("cos"),
        pybind11::arg("sin"), pybind11::arg("scale"), pybind11::arg("causal"));
  m.def("vtu_decode_attention", &dymu::vtu_decode_attention_cpu,
        "VTU decode attention of the T newest positions over a per-unique-token KV cache", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("merge_map"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("scale"));
}
