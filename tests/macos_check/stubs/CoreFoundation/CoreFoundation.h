// Stand-in for the macOS SDK header (see ../README.md): what metal-cpp uses.
#pragma once
typedef double CFTimeInterval;  // seconds, as in CFDate.h
