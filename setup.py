"""The compiled parts of the package: the ring reader, the record decoder, the JSON lines.

Everything else is in pyproject.toml; setuptools reads ext_modules only here.
The decoder includes the contract header (bpf/include/events.h), so that it
reads records through the very structs the kernel programs write.
"""

from pathlib import Path

from setuptools import Extension, setup

CONTRACT = Path(__file__).resolve().parent / "bpf" / "include"
FLAGS = ["-O2", "-Wall", "-Wextra"]

setup(
    ext_modules=[
        Extension(
            "sidecar.kernel._ringbatch",
            sources=["sidecar/kernel/_ringbatch.c"],
            extra_compile_args=FLAGS,
        ),
        Extension(
            "sidecar.kernel._records",
            sources=["sidecar/kernel/_records.c"],
            include_dirs=[str(CONTRACT)],
            depends=[str(CONTRACT / "events.h")],
            extra_compile_args=FLAGS,
        ),
        Extension(
            "sidecar.events._jsonline",
            sources=["sidecar/events/_jsonline.c"],
            extra_compile_args=FLAGS,
        ),
    ]
)
