"""A merge method's math, independent of backend and of checkpoints.

``registry`` (what each method is and takes), ``recipe`` (the arguments of one merge, validated),
``mixup`` (M³ ratios), ``philox`` (the DARE stream), ``select`` (exact trim thresholds),
``kernel_params`` (the numbers every backend's kernels receive) and ``reference`` (the float64
oracle the kernels are tested against).
"""
