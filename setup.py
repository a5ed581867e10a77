"""The one native part (issue 15): socket() of socket-mode containers answered
outside the GIL. Optional: when it cannot be built (no compiler or Python
headers) the install goes on and the agent uses its Python path, saying so."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sockgraft._answer", ["src/sockgraft/_answer.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers",
                                                 "-Wno-cast-function-type"])])
