"""The input-curvature vulnerability study (Sharma et al.): which samples fail on analog hardware, and
routing them to digital. It sits above lowering and evaluation.

- ``estimator``: per-sample input loss curvature (Eq. 1) and a Hutchinson trace of the input Hessian;
- ``failures``: the non-ideality profiles, curvature deciles and analog-only failure rates;
- ``routing``: label-free risk scores, ``RiskRouted`` and the routing curve;
- ``study``: ``vulnerability_study``, all of the above in one call (``hetcomp curvature``);
- ``plots``: its figures (failure rate by decile, routing curve).
"""
