"""The one compiled part of the package: the ring buffer's C sample callback.

Everything else is in pyproject.toml; setuptools reads ext_modules only here.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sidecar.kernel._ringbatch",
            sources=["sidecar/kernel/_ringbatch.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
