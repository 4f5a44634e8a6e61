"""GPU implementations: CUDA sources in minikv/kernels_cu loaded as CuPy RawModules, and a
typed Python wrapper per kernel. Imported only on the CUDA backend."""
