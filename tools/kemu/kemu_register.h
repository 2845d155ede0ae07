// kemu_register.h -- the emulator's entry point of one kernel: KEMU_REGISTER(k) defines
// extern "C" void kemu_k_<k>(void** params), which calls kernel k with the arguments params[i]
// points at (cuLaunchKernel's convention). Included after a kernel source by the per-file
// wrappers that tests/common/kemu.rs generates.
#pragma once
#include <stddef.h>

#include <type_traits>
#include <utility>

namespace kemu {
template <typename... A, size_t... I>
void call_with(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(a[I])...);
}
template <typename... A>
void call(void (*f)(A...), void** a) {
    call_with(f, a, std::index_sequence_for<A...>{});
}
}  // namespace kemu

#define KEMU_REGISTER(k) \
    extern "C" __attribute__((visibility("default"))) void kemu_k_##k(void** a) { kemu::call(k, a); }
