"""Linux-side checks that the Mac build of mlx_flash._ext compiles and links.

See crosscheck.py (compile as CMake does on Apple, resolve `mlx::` symbols
against the macOS wheel's libmlx.dylib) and darwin_headers.py (where the
macOS C headers come from).
"""
