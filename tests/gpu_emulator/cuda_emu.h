// cuda_emu.h: just enough of CUDA C to run this project's kernels on the CPU, for tests.
//
// A kernel file is compiled by the host g++ with this header in front (see __init__.py,
// which also rewrites every `T*` of the source into a bounds-checked emu::ptr<T>).
// A launch runs the grid one block at a time. Inside a block:
//   * kernels without __syncthreads: every thread is a plain function call, in order;
//   * kernels with __syncthreads: every thread is a coroutine with its own stack
//     (switched by a 10-instruction emu_swap, x86-64). __syncthreads() saves the thread
//     and switches back to the scheduler; when every live thread of the block waits at
//     the barrier the scheduler resumes them all. A thread that exits while others wait is a
//     divergent barrier (an error here, a hang or garbage on a GPU).
// Threads (and blocks) may be visited forward, reversed or shuffled: a kernel whose
// result depends on that order has a race.
// Errors (out-of-bounds index, divergent barrier) are recorded, not thrown: the
// first one is reported to Python after the launch.
#pragma once
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>
#include <xmmintrin.h>

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
typedef dim3 uint3;
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static const int warpSize = 32;

#define __global__
#define __device__ static inline
#define __host__
#define __forceinline__
#define __noinline__
// Shared memory: one static copy for the block being run (blocks run one after another),
// gathered in the ELF section emu_shared, which is filled with 0xff bytes (NaN, or -1) before
// every block: a read of shared memory no thread of the block wrote shows up as NaN.
#define __shared__ __attribute__((section("emu_shared"))) static
#define __constant__ static
#define __launch_bounds__(...)
#define __syncthreads() emu::syncthreads()

extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

namespace emu {

static long long static_shared_bytes() { return __start_emu_shared ? __stop_emu_shared - __start_emu_shared : 0; }

struct Error { int code; char msg[600]; };
static Error g_err = {0, ""};

static void fail(int code, const char* what)
{
    if (g_err.code) return;          // keep the first error
    g_err.code = code;
    snprintf(g_err.msg, sizeof g_err.msg, "%s (block (%u,%u,%u), thread (%u,%u,%u))", what,
             blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
}

// A device pointer that knows the extent of its buffer: p[i] outside [0, n) is reported.
template <class T> struct ptr {
    T* base; long long n, off; const char* name;
    ptr() : base(nullptr), n(0), off(0), name("null") {}
    ptr(T* b, long long n_, const char* nm) : base(b), n(n_), off(0), name(nm) {}
    template <class U, size_t N> ptr(U (&arr)[N]) : base(arr), n((long long)N), off(0), name("__shared__ array") {}
    template <class U> ptr(const ptr<U>& o) : base(o.base), n(o.n), off(o.off), name(o.name) {}
    T& operator[](long long i) const {
        long long k = off + i;
        if (k < 0 || k >= n) {
            char buf[300];
            snprintf(buf, sizeof buf, "out-of-bounds access: element %lld of `%s`, which holds %lld", k, name, n);
            fail(1, buf);
            static typename std::remove_const<T>::type dummy[8];
            return dummy[0];
        }
        return base[k];
    }
    T& operator*() const { return (*this)[0]; }
    ptr operator+(long long d) const { ptr r = *this; r.off += d; return r; }
    ptr operator-(long long d) const { ptr r = *this; r.off -= d; return r; }
    ptr& operator+=(long long d) { off += d; return *this; }
    ptr& operator++() { ++off; return *this; }
};

// ---- threads of one block ----------------------------------------------------------
// A coroutine switch is emu_swap(&save_sp, load_sp): push the callee-saved registers, store
// the stack pointer, load the other one, pop, return into the other coroutine (~5 ns, no
// system call). x86-64 System V only.
#if !defined(__x86_64__)
#error "the CUDA emulator's coroutine switch (emu_swap) is written for x86-64"
#endif
extern "C" void emu_swap(void** save_sp, void* load_sp);
__asm__(".text\n.p2align 4\n.type emu_swap, @function\nemu_swap:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
        ".size emu_swap, .-emu_swap\n");

enum { NOT_STARTED = 0, AT_BARRIER = 1, DONE = 2, RUNNING = 3 };
struct Thread { void* sp; int state; };
static bool g_coroutines = false;              // set at launch when the source has __syncthreads
static std::vector<Thread> g_thr;
struct alignas(64) StackChunk { char bytes[64]; };
static std::vector<StackChunk> g_stacks;       // 64-byte aligned stack memory for the coroutines
static const size_t STACK = 64 * 1029;        // 64 KiB + 5 cache lines: stacks fall in different cache sets
static void* g_sched_sp = nullptr;
static int g_cur = 0;
static const std::function<void()>* g_body = nullptr;

static void thread_entry()
{
    (*g_body)();
    g_thr[g_cur].state = DONE;
    void* dead;
    emu_swap(&dead, g_sched_sp);               // never resumed
    __builtin_unreachable();
}

// A fresh thread's stack, laid out as emu_swap left it: six saved registers, then the
// "return address" thread_entry, then a dummy slot so that thread_entry starts with the
// stack alignment of a called function (rsp = 8 mod 16).
static void* fresh_stack(int t)
{
    char* top = g_stacks[0].bytes + (size_t)(t + 1) * STACK;            // 16-byte aligned
    void** sp = (void**)top;
    *--sp = nullptr;                                                    // dummy return slot
    *--sp = (void*)&thread_entry;
    for (int r = 0; r < 6; ++r) *--sp = nullptr;                        // rbp rbx r12-r15
    return sp;
}

static void syncthreads()
{
    if (!g_coroutines) { fail(3, "__syncthreads in a kernel compiled without barrier support"); return; }
    g_thr[g_cur].state = AT_BARRIER;
    emu_swap(&g_thr[g_cur].sp, g_sched_sp);    // back to the scheduler; resumed here after the barrier
    g_thr[g_cur].state = RUNNING;
}

static inline void set_thread(int t)
{
    if (blockDim.y == 1 && blockDim.z == 1) { threadIdx.x = t; threadIdx.y = threadIdx.z = 0; return; }
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

// order: 0 forward, 1 reversed, 2 shuffled (a new permutation every round and block)
static void permute(std::vector<int>& perm, int order, unsigned long long& state)
{
    int n = (int)perm.size();
    for (int i = 0; i < n; ++i) perm[i] = order == 1 ? n - 1 - i : i;
    if (order == 2)
        for (int i = n - 1; i > 0; --i) {
            state = state * 6364136223846793005ULL + 1442695040888963407ULL;
            int j = (int)((state >> 33) % (unsigned long long)(i + 1));
            int tmp = perm[i]; perm[i] = perm[j]; perm[j] = tmp;
        }
}

static void run_block_coroutines(int nthreads, int order, unsigned long long& rng)
{
    static std::vector<int> perm;
    if ((int)g_thr.size() < nthreads) g_thr.resize(nthreads);
    if (g_stacks.size() * sizeof(StackChunk) < (size_t)nthreads * STACK)
        g_stacks.resize((size_t)nthreads * STACK / sizeof(StackChunk));
    for (int t = 0; t < nthreads; ++t) { g_thr[t].state = NOT_STARTED; g_thr[t].sp = fresh_stack(t); }
    perm.assign(nthreads, 0);
    for (;;) {                                         // one round: every live thread to its next barrier
        permute(perm, order, rng);
        for (int k = 0; k < nthreads; ++k) {
            int t = perm[k];
            if (g_thr[t].state == DONE) continue;
            g_cur = t;
            set_thread(t);
            g_thr[t].state = RUNNING;
            emu_swap(&g_sched_sp, g_thr[t].sp);            // runs thread t until its barrier or its end
        }
        int waiting = 0, done = 0;
        for (int t = 0; t < nthreads; ++t) {
            if (g_thr[t].state == AT_BARRIER) ++waiting;
            else if (g_thr[t].state == DONE) ++done;
        }
        if (waiting == 0) return;                          // every thread finished
        if (done > 0) {
            char buf[200];
            snprintf(buf, sizeof buf, "divergent __syncthreads: %d threads wait at a barrier that %d exited threads "
                     "never reach", waiting, done);
            fail(2, buf);
            return;                                        // the waiting threads are abandoned
        }
    }
}

// cfg: grid x y z, block x y z, order, shuffle seed, ftz (flush float subnormals to zero, as CuPy's -ftz=true)
static int launch(const long long* cfg, bool coroutines, const std::function<void()>& body)
{
    g_err.code = 0; g_err.msg[0] = 0;
    gridDim.x = (unsigned)cfg[0]; gridDim.y = (unsigned)cfg[1]; gridDim.z = (unsigned)cfg[2];
    blockDim.x = (unsigned)cfg[3]; blockDim.y = (unsigned)cfg[4]; blockDim.z = (unsigned)cfg[5];
    int order = (int)cfg[6];
    unsigned long long rng = (unsigned long long)cfg[7] * 2654435761ULL + 1;
    unsigned int csr = _mm_getcsr();
    if (cfg[8]) _mm_setcsr(csr | 0x8040);                  // FTZ | DAZ
    g_coroutines = coroutines;
    g_body = &body;
    long long nblocks = (long long)gridDim.x * gridDim.y * gridDim.z;
    int nthreads = (int)(blockDim.x * blockDim.y * blockDim.z);
    std::vector<int> perm(nthreads);
    std::vector<long long> blocks;                         // the block order, when shuffled
    if (order == 2) {
        blocks.resize(nblocks);
        for (long long i = 0; i < nblocks; ++i) blocks[i] = i;
        for (long long i = nblocks - 1; i > 0; --i) {
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            long long j = (long long)((rng >> 33) % (unsigned long long)(i + 1));
            long long tmp = blocks[i]; blocks[i] = blocks[j]; blocks[j] = tmp;
        }
    }
    for (long long i = 0; i < nblocks && !g_err.code; ++i) {
        long long b = order == 1 ? nblocks - 1 - i : (order == 2 ? blocks[i] : i);
        blockIdx.x = (unsigned)(b % gridDim.x);
        blockIdx.y = (unsigned)((b / gridDim.x) % gridDim.y);
        blockIdx.z = (unsigned)(b / ((long long)gridDim.x * gridDim.y));
        if (__start_emu_shared) memset(__start_emu_shared, 0xff, (size_t)static_shared_bytes());
        if (coroutines) {
            run_block_coroutines(nthreads, order, rng);
        } else {
            if (order == 0) {
                for (int k = 0; k < nthreads; ++k) { set_thread(k); body(); }
            } else {
                permute(perm, order, rng);
                for (int k = 0; k < nthreads; ++k) { set_thread(perm[k]); body(); }
            }
        }
    }
    _mm_setcsr(csr);
    return g_err.code;
}

}  // namespace emu

extern "C" const char* emu_error_message() { return emu::g_err.msg; }
extern "C" long long emu_static_shared_bytes() { return emu::static_shared_bytes(); }

// ---- device math as CUDA names it (host versions) ----------------------------------
using std::exp; using std::sqrt; using std::log; using std::fabs; using std::fma;
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
// __expf, __logf: glibc declares them already (the same functions as expf, logf)
// The _rn intrinsics round each operation on its own: never contracted into an FMA
// (the volatile store keeps g++ from fusing them, as nvcc does not fuse them either).
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
static inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
static inline double __dadd_rn(double a, double b) { volatile double r = a + b; return r; }
static inline double __dsub_rn(double a, double b) { volatile double r = a - b; return r; }
static inline double __ddiv_rn(double a, double b) { volatile double r = a / b; return r; }
static inline float __frcp_rn(float a) { volatile float r = 1.0f / a; return r; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline double min(double a, double b) { return std::fmin(a, b); }
static inline double max(double a, double b) { return std::fmax(a, b); }
// One host thread runs the whole grid and switches only at barriers, so a plain add is atomic here.
template <class T> static inline T atomicAdd(T* address, T v) { T old = *address; *address = old + v; return old; }
template <class T> static inline T atomicMax(T* address, T v) { T old = *address; *address = old > v ? old : v; return old; }
template <class T> static inline T __ldg(const T* p) { return *p; }
