// kemu.cpp -- runs medsa's CUDA kernels (kernels/*.cu) on the CPU, for tests that check the
// kernels' own code (index math, fragment layouts, options) on machines without a GPU.
// The model and what it catches: kemu.h. tests/common/kemu.rs builds one shared library from
// this file and, per kernels/*.cu (and tools/kemu/checks.cu, kernels wrong on purpose for the
// emulator's own test), the kernel source followed by kemu_register.h's entry points
// (one kemu_k_<kernel> per extern "C" kernel); the CUDA backend's emulated device
// (src/backend/cuda/emu.rs) loads it and launches through kemu_launch below, with
// cuLaunchKernel's arguments.
// x86-64 only (the coroutine switch is a few lines of assembly).
#include "kemu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#error "kemu's coroutine switch is written for x86-64"
#endif

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save, switches to `load` and restores the same from there.
extern "C" void kemu_swap(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl kemu_swap
    .hidden kemu_swap
    .type kemu_swap, @function
kemu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kemu_swap, .-kemu_swap
)");

namespace kemu {

namespace {

enum Op { OP_SHFL, OP_REDUCE, OP_MMA, OP_LDSM };
const char* op_name(int op) {
    switch (op) {
        case OP_SHFL: return "a shuffle";
        case OP_REDUCE: return "a warp reduction";
        case OP_MMA: return "mma.sync";
        case OP_LDSM: return "ldmatrix";
    }
    return "?";
}

enum Wait { W_NONE, W_BAR, W_WARP };

struct PendingCopy {
    char* dst;
    const char* src;
    bool valid;
    int group;  // the cp.async group it joins: the issuing thread's `open_group` at issue
};

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr size_t SMEM_MAX = 232448;  // 227 KB: the largest opt-in of sm_90

}  // namespace

// One CUDA thread of the running block: a coroutine with its own stack.
struct Thread {
    uint3 tid;
    int lane = 0, warp = 0;
    void* sp = nullptr;
    char* stack = nullptr;  // usable stack (a guard page below it)
    bool done = false;
    Wait wait = W_NONE;
    std::vector<PendingCopy> pending;
    int open_group = 0;  // groups 0 .. open_group - 1 are committed; open_group collects new copies
};

namespace {

// A lane's operands of a warp collective, and the warp's state while its lanes arrive.
struct Slot {
    int op;
    uint64_t v[10];
};

struct WarpState {
    int arrived = 0, op = -1, need = 32;
    Slot in[32];
    uint64_t out[32][4];
};

alignas(128) thread_local char g_smem[SMEM_MAX + 256];
thread_local std::vector<Thread> g_threads;
thread_local std::vector<WarpState> g_warps;
thread_local void* g_sched_sp = nullptr;
thread_local int g_alive = 0, g_bar_arrived = 0;
thread_local std::string g_error;
thread_local bool g_failed = false;
thread_local bool g_defer_async = false;
thread_local void (*g_kernel)(void**) = nullptr;
thread_local void** g_args = nullptr;

void release_barrier() {
    for (auto& t : g_threads)
        if (t.wait == W_BAR) t.wait = W_NONE;
    g_bar_arrived = 0;
}

void run_copy(const PendingCopy& c) {
    if (c.valid)
        memcpy(c.dst, c.src, 16);
    else
        memset(c.dst, 0, 16);
}

// cp.async.wait_group n: every committed group but the newest n lands; copies not yet
// committed stay pending (as on the hardware, where wait_group ignores them).
void finish_copies(Thread& t, int n) {
    const int upto = t.open_group - n;  // groups < upto complete
    size_t keep = 0;
    for (size_t i = 0; i < t.pending.size(); ++i) {
        if (t.pending[i].group < upto)
            run_copy(t.pending[i]);
        else
            t.pending[keep++] = t.pending[i];
    }
    t.pending.resize(keep);
}

[[noreturn]] void entry() {
    g_kernel(g_args);
    Thread* t = cur;
    ++t->open_group;  // copies never waited for still land (nothing reads them)
    finish_copies(*t, 0);
    t->done = true;
    --g_alive;
    // Exited threads no longer hold a barrier back.
    if (g_bar_arrived > 0 && g_bar_arrived == g_alive) release_barrier();
    kemu_swap(&t->sp, g_sched_sp);
    abort();  // never resumed
}

void yield() { kemu_swap(&cur->sp, g_sched_sp); }

std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

void set_error(const std::string& e) {
    if (!g_failed) {
        g_failed = true;
        g_error = e;
    }
}

void check_smem_range(uint32_t off, uint32_t bytes, uint32_t align, const char* what) {
    if (off % align != 0)
        fail(fmt("%s: shared address %u is not %u-byte aligned", what, off, align).c_str());
    if ((uint64_t)off + bytes > dyn_smem)
        fail(fmt("%s: shared bytes %u..%u past the launch's %u bytes of dynamic shared memory",
                 what, off, off + bytes, dyn_smem)
                 .c_str());
}

uint16_t smem_u16(uint32_t off) {
    uint16_t v;
    memcpy(&v, g_smem + off, 2);
    return v;
}

void compute(WarpState& w) {
    const int n = w.need;
    switch (w.op) {
        case OP_SHFL:
            for (int l = 0; l < n; ++l) {
                const Slot& s = w.in[l];
                const int src = s.v[2] ? (l ^ (int)s.v[1]) : ((int)s.v[1] & 31);
                w.out[l][0] = (src < n) ? w.in[src].v[0] : s.v[0];
            }
            break;
        case OP_REDUCE: {
            int64_t r = (int64_t)w.in[0].v[0];
            const bool mx = w.in[0].v[1] != 0;
            for (int l = 1; l < n; ++l) {
                const int64_t x = (int64_t)w.in[l].v[0];
                r = mx ? std::max(r, x) : std::min(r, x);
            }
            for (int l = 0; l < n; ++l) w.out[l][0] = (uint64_t)r;
            break;
        }
        case OP_MMA: {
            // m16n8k16 row.col, fragments as in kernels/mma.cuh (g = lane/4, t = lane%4).
            float A[16][16], B[16][8], C[16][8];
            auto lo = [](uint64_t u) {
                return __bfloat162float(__nv_bfloat16::from_bits(uint16_t(u & 0xffff)));
            };
            auto hi = [](uint64_t u) {
                return __bfloat162float(__nv_bfloat16::from_bits(uint16_t((u >> 16) & 0xffff)));
            };
            for (int l = 0; l < 32; ++l) {
                const Slot& s = w.in[l];
                const int g = l >> 2, t = l & 3;
                A[g][2 * t] = lo(s.v[0]), A[g][2 * t + 1] = hi(s.v[0]);
                A[g + 8][2 * t] = lo(s.v[1]), A[g + 8][2 * t + 1] = hi(s.v[1]);
                A[g][2 * t + 8] = lo(s.v[2]), A[g][2 * t + 9] = hi(s.v[2]);
                A[g + 8][2 * t + 8] = lo(s.v[3]), A[g + 8][2 * t + 9] = hi(s.v[3]);
                B[2 * t][g] = lo(s.v[4]), B[2 * t + 1][g] = hi(s.v[4]);
                B[2 * t + 8][g] = lo(s.v[5]), B[2 * t + 9][g] = hi(s.v[5]);
                float c[4];
                for (int e = 0; e < 4; ++e) memcpy(&c[e], &s.v[6 + e], 4);
                C[g][2 * t] = c[0], C[g][2 * t + 1] = c[1];
                C[g + 8][2 * t] = c[2], C[g + 8][2 * t + 1] = c[3];
            }
            float D[16][8];
            for (int i = 0; i < 16; ++i)
                for (int j = 0; j < 8; ++j) {
                    double acc = C[i][j];
                    for (int k = 0; k < 16; ++k) acc += (double)A[i][k] * (double)B[k][j];
                    D[i][j] = (float)acc;
                }
            for (int l = 0; l < 32; ++l) {
                const int g = l >> 2, t = l & 3;
                const float d[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t],
                                    D[g + 8][2 * t + 1]};
                for (int e = 0; e < 4; ++e) {
                    uint32_t u;
                    memcpy(&u, &d[e], 4);
                    w.out[l][e] = u;
                }
            }
            break;
        }
        case OP_LDSM: {
            const bool trans = w.in[0].v[1] != 0;
            for (int l = 0; l < 32; ++l)
                if ((w.in[l].v[1] != 0) != trans)
                    fail("ldmatrix: lanes disagree on .trans");
            for (int l = 0; l < 32; ++l)
                check_smem_range((uint32_t)w.in[l].v[0], 16, 16, "ldmatrix row address");
            for (int l = 0; l < 32; ++l) {
                const int g = l >> 2, t = l & 3;
                for (int m = 0; m < 4; ++m) {
                    uint16_t a, b;
                    if (!trans) {  // row g, columns 2t, 2t + 1 of matrix m
                        const uint32_t row = (uint32_t)w.in[8 * m + g].v[0];
                        a = smem_u16(row + 4 * t), b = smem_u16(row + 4 * t + 2);
                    } else {  // rows 2t, 2t + 1, column g
                        a = smem_u16((uint32_t)w.in[8 * m + 2 * t].v[0] + 2 * g);
                        b = smem_u16((uint32_t)w.in[8 * m + 2 * t + 1].v[0] + 2 * g);
                    }
                    w.out[l][m] = (uint32_t)a | ((uint32_t)b << 16);
                }
            }
            break;
        }
    }
}

// One warp-wide collective: every lane deposits `s`, the last to arrive computes for all.
void collective(const Slot& s, unsigned mask, uint64_t out[4]) {
    Thread* t = cur;
    WarpState& w = g_warps[t->warp];
    const unsigned full = w.need == 32 ? 0xffffffffu : ((1u << w.need) - 1u);
    if ((mask & full) != full)
        fail(fmt("%s with lane mask %#x: only whole-warp collectives are emulated",
                 op_name(s.op), mask)
                 .c_str());
    if (w.arrived == 0) {
        w.op = s.op;
    } else if (w.op != s.op) {
        fail(fmt("warp %d diverged: lane %d reached %s while %d lanes wait at %s", t->warp,
                 t->lane, op_name(s.op), w.arrived, op_name(w.op))
                 .c_str());
    }
    w.in[t->lane] = s;
    if (++w.arrived == w.need) {
        compute(w);
        w.arrived = 0;
        for (int l = 0; l < w.need; ++l) g_threads[t->warp * 32 + l].wait = W_NONE;
    } else {
        t->wait = W_WARP;
        yield();
    }
    memcpy(out, w.out[t->lane], sizeof(uint64_t) * 4);
}

std::string deadlock_report() {
    int bar = 0;
    std::string warps;
    for (auto& t : g_threads)
        if (!t.done && t.wait == W_BAR) ++bar;
    for (size_t i = 0; i < g_warps.size(); ++i)
        if (g_warps[i].arrived > 0)
            warps += fmt("; warp %zu: %d of %d lanes at %s", i, g_warps[i].arrived,
                         g_warps[i].need, op_name(g_warps[i].op));
    return fmt("deadlock in block (%u, %u, %u): %d of %d live threads wait at __syncthreads",
               block_idx.x, block_idx.y, block_idx.z, bar, g_alive) +
           warps;
}

// The threads' stacks, each with a PROT_NONE guard page below it; kept between launches and
// unmapped when the host thread exits.
struct Stacks {
    std::vector<char*> v;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    ~Stacks() {
        for (char* s : v) munmap(s - page, STACK_BYTES + page);
    }
};
thread_local Stacks g_stacks;
char* stack_for(size_t i) {
    auto& st = g_stacks;
    while (st.v.size() <= i) {
        char* m = (char*)mmap(nullptr, STACK_BYTES + st.page, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return nullptr;
        mprotect(m, st.page, PROT_NONE);
        st.v.push_back(m + st.page);
    }
    return st.v[i];
}

void init_thread(Thread& t, char* stack) {
    t.stack = stack;
    t.done = false;
    t.wait = W_NONE;
    t.pending.clear();
    t.open_group = 0;
    uintptr_t top = ((uintptr_t)stack + STACK_BYTES) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                                // entry's (never used) return address
    *--sp = (uint64_t)(uintptr_t)&entry;      // popped by kemu_swap's ret
    for (int r = 0; r < 6; ++r) *--sp = 0;    // rbp rbx r12 r13 r14 r15
    *--sp = 0x1f80ull | (0x037full << 32);    // MXCSR, x87 control word: the defaults
    t.sp = sp;
}

// Runs one block; false (g_error set) on a failure.
bool run_block(int order, std::mt19937_64& rng) {
    const size_t n = g_threads.size();
    for (size_t i = 0; i < n; ++i) {
        char* st = stack_for(i);
        if (!st) {
            set_error("cannot map a thread stack");
            return false;
        }
        init_thread(g_threads[i], st);
    }
    for (auto& w : g_warps) w.arrived = 0;
    g_alive = (int)n;
    g_bar_arrived = 0;
    memset(g_smem, 0xff, SMEM_MAX + 256);  // NaN in f32 and bf16: unwritten reads show up
    std::vector<size_t> idx(n);
    for (size_t i = 0; i < n; ++i) idx[i] = order == 1 ? n - 1 - i : i;
    while (g_alive > 0) {
        if (order == 2) std::shuffle(idx.begin(), idx.end(), rng);
        bool ran = false;
        for (size_t i : idx) {
            Thread& t = g_threads[i];
            if (t.done || t.wait != W_NONE) continue;
            cur = &t;
            kemu_swap(&g_sched_sp, t.sp);
            cur = nullptr;
            ran = true;
            if (g_failed) return false;
        }
        if (!ran) {
            set_error(deadlock_report());
            return false;
        }
    }
    return true;
}

}  // namespace

}  // namespace kemu

// ---- what kemu.h declares ----------------------------------------------------------------
namespace kemu {
thread_local Thread* cur = nullptr;
thread_local uint3 block_idx;
thread_local dim3 grid_dim, block_dim;
thread_local unsigned dyn_smem = 0;

const uint3& thread_idx() { return cur->tid; }

void fail(const char* what) {
    set_error(fmt("block (%u, %u, %u), thread %u: %s", block_idx.x, block_idx.y, block_idx.z,
                  cur ? cur->tid.x : 0u, what));
    if (!cur) abort();
    Thread* t = cur;
    t->done = true;
    --g_alive;
    kemu_swap(&t->sp, g_sched_sp);
    abort();  // never resumed: the launch is abandoned
}

void syncthreads() {
    Thread* t = cur;
    if (++g_bar_arrived == g_alive) {
        release_barrier();
    } else {
        t->wait = W_BAR;
        yield();
    }
}

uint64_t shfl(uint64_t v, int lane_or_mask, bool xor_mode, unsigned mask) {
    Slot s{OP_SHFL, {v, (uint64_t)(unsigned)lane_or_mask, xor_mode ? 1u : 0u}};
    uint64_t out[4];
    collective(s, mask, out);
    return out[0];
}

int64_t reduce(int64_t v, bool is_max, unsigned mask) {
    Slot s{OP_REDUCE, {(uint64_t)v, is_max ? 1u : 0u}};
    uint64_t out[4];
    collective(s, mask, out);
    return (int64_t)out[0];
}

void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    Slot s{OP_MMA, {a[0], a[1], a[2], a[3], b0, b1}};
    for (int e = 0; e < 4; ++e) {
        uint32_t u;
        memcpy(&u, &c[e], 4);
        s.v[6 + e] = u;
    }
    uint64_t out[4];
    collective(s, 0xffffffffu, out);
    for (int e = 0; e < 4; ++e) {
        const uint32_t u = (uint32_t)out[e];
        memcpy(&c[e], &u, 4);
    }
}

void ldsm_x4(uint32_t r[4], uint32_t addr, bool trans) {
    Slot s{OP_LDSM, {addr, trans ? 1u : 0u}};
    uint64_t out[4];
    collective(s, 0xffffffffu, out);
    for (int m = 0; m < 4; ++m) r[m] = (uint32_t)out[m];
}

void cp_async16(uint32_t dst, const void* src, bool valid) {
    check_smem_range(dst, 16, 16, "cp.async destination");
    if (((uintptr_t)src & 15) != 0) fail("cp.async: global source not 16-byte aligned");
    const PendingCopy c{g_smem + dst, (const char*)src, valid, cur->open_group};
    if (g_defer_async)
        cur->pending.push_back(c);
    else
        run_copy(c);
}

void cp_async_commit() { ++cur->open_group; }

void cp_async_wait_group(int n) {
    if (n < 0) fail("cp.async.wait_group: negative count");
    finish_copies(*cur, n);
}

uint32_t smem_offset(const void* p) {
    const char* c = (const char*)p;
    if (c < g_smem || c > g_smem + dyn_smem)
        fail("__cvta_generic_to_shared: not an address in the dynamic shared memory");
    return (uint32_t)(c - g_smem);
}

float4* dyn_smem_f4() { return reinterpret_cast<float4*>(g_smem); }
}  // namespace kemu

// Runs `kernel` (a kemu_k_<name> entry of kemu_register.h; `name` is for messages) over
// grid x block with `smem` bytes of dynamic shared memory; `params` as for cuLaunchKernel
// (params[i] points at argument i). order: 0 threads in index order, 1 in
// reverse, 2 shuffled at every round (seed). defer_async != 0: cp.async copies land at the
// wait instead of at the issue. 0 on success; otherwise 1 and a message in err.
extern "C" __attribute__((visibility("default"))) int kemu_launch(
    void (*kernel)(void**), const char* name, const unsigned grid[3], const unsigned block[3], unsigned smem,
    void** params, int order, int defer_async, uint64_t seed, char* err, size_t errlen) {
    using namespace kemu;
    auto give = [&](const std::string& e) {
        snprintf(err, errlen, "%s: %s", name, e.c_str());
        return 1;
    };
    const size_t nthreads = (size_t)block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024) return give("block size must be 1..1024 threads");
    if (smem > SMEM_MAX) return give(fmt("%u bytes of dynamic shared memory > %zu", smem, SMEM_MAX));
    grid_dim = {grid[0], grid[1], grid[2]};
    block_dim = {block[0], block[1], block[2]};
    dyn_smem = smem;
    g_kernel = kernel;
    g_args = params;
    g_failed = false;
    g_error.clear();
    g_defer_async = defer_async != 0;
    g_threads.assign(nthreads, Thread{});
    for (size_t i = 0; i < nthreads; ++i) {
        Thread& t = g_threads[i];
        t.tid = {unsigned(i % block[0]), unsigned(i / block[0] % block[1]),
                 unsigned(i / ((size_t)block[0] * block[1]))};
        t.lane = int(i % 32);
        t.warp = int(i / 32);
    }
    g_warps.assign((nthreads + 31) / 32, WarpState{});
    for (size_t w = 0; w < g_warps.size(); ++w)
        g_warps[w].need = (int)std::min<size_t>(32, nthreads - 32 * w);
    std::mt19937_64 rng(seed);
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) {
                block_idx = {x, y, z};
                if (!run_block(order, rng)) return give(g_error);
            }
    return 0;
}
