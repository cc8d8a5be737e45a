"""The ``sa3`` command line, one of the two front ends: ``sa3 [generate] ...`` (:mod:`.generate`), the
terminal display, the model picker, and the tools ``download``, ``doctor``, ``info``, ``convert``
(:mod:`.tools`). The entry point that routes to it is :mod:`sa3_mlx.commands`.
"""
