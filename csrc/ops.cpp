// Op schemas (defined once, here) and the CPU implementations' registration. Fake kernels and
// autograd are attached from Python (atp_ops/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"

namespace {

// _C.set_validation(bool) and _C.validation() -> bool: the switch of checks.h.
PyObject* py_set_validation(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  atp::set_validation(on != 0);
  Py_RETURN_NONE;
}
PyObject* py_validation(PyObject*, PyObject*) { return PyBool_FromLong(atp::validation_enabled()); }

PyMethodDef methods[] = {
    {"set_validation", py_set_validation, METH_O, "Turn the value checks (one host sync each) on or off."},
    {"validation", py_validation, METH_NOARGS, "Whether the value checks run."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// An importable module, so `import atp_ops._C` loads the library and runs the registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "atp_ops kernels (registered as torch.ops.atp_ops)",
                            -1, methods};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(atp_ops, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_bias, bool causal, float scale)"
        " -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v,"
        " Tensor? key_bias, Tensor out, Tensor lse, bool causal, float scale, bool deterministic,"
        " Tensor? grad_bias=None) -> (Tensor dq, Tensor dk, Tensor dv, Tensor d_key_bias)");
  m.def("key_mask_bias(Tensor q, Tensor k, Tensor v, Tensor? key_bias, Tensor key_mask) -> Tensor");
  m.def("scores(Tensor q, Tensor k, Tensor lse, Tensor? key_bias, Tensor w_self, Tensor w_cross,"
        " bool causal, float scale) -> (Tensor s_self, Tensor s_cross)");
  m.def("soft_mask_fwd(Tensor s_red, Tensor s_spatial, Tensor theta_r, Tensor theta_s,"
        " float temperature, Tensor? prev_bias, bool hard) -> Tensor");
  m.def("soft_mask_bwd(Tensor grad, Tensor s_red, Tensor s_spatial, Tensor theta_r,"
        " Tensor theta_s, float temperature)"
        " -> (Tensor d_s_red, Tensor d_s_spatial, Tensor d_theta_r, Tensor d_theta_s)");
}

TORCH_LIBRARY_IMPL(atp_ops, CPU, m) {
  m.impl("attention_fwd", &atp::attention_fwd_cpu);
  m.impl("attention_bwd", &atp::attention_bwd_cpu);
  m.impl("key_mask_bias", &atp::key_mask_bias);
  m.impl("scores", &atp::scores_cpu);
  m.impl("soft_mask_fwd", &atp::soft_mask_fwd_cpu);
  m.impl("soft_mask_bwd", &atp::soft_mask_bwd_cpu);
}
