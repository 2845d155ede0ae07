// cuda_bf16.h for kernels compiled by the CPU emulator: the bf16 types and conversions are in
// tools/kemu/kemu.h, force-included before every kernel source.
#pragma once
#include "../kemu.h"
