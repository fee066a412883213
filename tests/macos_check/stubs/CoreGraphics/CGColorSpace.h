// Stand-in for the macOS SDK header (see ../README.md): what metal-cpp uses.
#pragma once
typedef struct CGColorSpace* CGColorSpaceRef;  // opaque, as in the SDK
