// Stand-in for the macOS SDK header (see ../README.md): what metal-cpp uses.
#pragma once
typedef struct __IOSurface* IOSurfaceRef;  // opaque, as in the SDK
