"""Hessian machinery shared by the passes: the HVP operator and its estimators (``hessian``), the fast
double backward (``double_backward``) and per-layer Hessian metrics cached on the compile context
(``layer_hessian``)."""
