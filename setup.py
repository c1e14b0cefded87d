from setuptools import setup

# The native part: cffi builds aiote._native from native/ (see native/build.py).
setup(cffi_modules=["native/build.py:ffibuilder"])
