// Stand-in for the macOS SDK header (see ../README.md): what metal-cpp uses.
#pragma once
typedef double CGFloat;  // 64-bit Apple platforms (CGBase.h)
struct CGSize {
  CGFloat width;
  CGFloat height;
};
typedef struct CGSize CGSize;
