/*
 * test_w4a16_sm90: runs libw4a16_sm90_kernel.so on the current GPU (device 0) and checks it.
 *
 * The original's example (M=1024, N=4096, K=4096, group 128, 4 MB workspace, no zero points, no
 * bias, alpha 1, default config, default stream) and more shapes: M = 1 and 16, zero points,
 * bias, groups 32 / 64 / 256 / per-channel, bf16, ragged shapes, the explicit prepare path, no
 * workspace. Each output is poisoned with NaN first; every element must be written and finite,
 * and sampled rows (all columns) are compared with a CPU fp32 reference (relative Frobenius
 * error <= 2e-3 for fp16, 1e-2 for bf16). Prints a table with the time per call (CUDA events)
 * and PASS/FAIL; exits 1 on any failure.
 *
 *   ./test_w4a16_sm90 [--iters N] [--quick]
 *
 * The CUDA driver is loaded at run time (no libcuda to link), like the library does.
 */
#define _GNU_SOURCE
#include <cuda.h>
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "w4a16_sm90_kernel.h"

static struct {
    CUresult (*Init)(unsigned);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*DeviceGetName)(char *, int, CUdevice);
    CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*CtxSetCurrent)(CUcontext);
    CUresult (*CtxSynchronize)(void);
    CUresult (*MemAlloc)(CUdeviceptr *, size_t);
    CUresult (*MemFree)(CUdeviceptr);
    CUresult (*MemcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*MemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*MemsetD16)(CUdeviceptr, unsigned short, size_t);
    CUresult (*MemsetD8)(CUdeviceptr, unsigned char, size_t);
    CUresult (*StreamCreate)(CUstream *, unsigned);
    CUresult (*EventCreate)(CUevent *, unsigned);
    CUresult (*EventRecord)(CUevent, CUstream);
    CUresult (*EventSynchronize)(CUevent);
    CUresult (*EventElapsedTime)(float *, CUevent, CUevent);
} cu;

#define CHECK(call)                                                                  \
    do {                                                                             \
        CUresult r_ = (call);                                                        \
        if (r_ != CUDA_SUCCESS) {                                                    \
            fprintf(stderr, "%s:%d: %s failed: CUDA error %d\n", __FILE__, __LINE__, #call, (int)r_); \
            exit(2);                                                                 \
        }                                                                            \
    } while (0)

static void load_driver(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h) {
        fprintf(stderr, "dlopen(libcuda.so.1) failed: %s\n", dlerror());
        exit(2);
    }
    struct { void **slot; const char *name; } syms[] = {
        {(void **)&cu.Init, "cuInit"}, {(void **)&cu.DeviceGet, "cuDeviceGet"},
        {(void **)&cu.DeviceGetName, "cuDeviceGetName"},
        {(void **)&cu.DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"},
        {(void **)&cu.CtxSetCurrent, "cuCtxSetCurrent"}, {(void **)&cu.CtxSynchronize, "cuCtxSynchronize"},
        {(void **)&cu.MemAlloc, "cuMemAlloc_v2"}, {(void **)&cu.MemFree, "cuMemFree_v2"},
        {(void **)&cu.MemcpyHtoD, "cuMemcpyHtoD_v2"}, {(void **)&cu.MemcpyDtoH, "cuMemcpyDtoH_v2"},
        {(void **)&cu.MemsetD16, "cuMemsetD16_v2"}, {(void **)&cu.MemsetD8, "cuMemsetD8_v2"},
        {(void **)&cu.StreamCreate, "cuStreamCreate"},
        {(void **)&cu.EventCreate, "cuEventCreate"}, {(void **)&cu.EventRecord, "cuEventRecord"},
        {(void **)&cu.EventSynchronize, "cuEventSynchronize"},
        {(void **)&cu.EventElapsedTime, "cuEventElapsedTime"},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++)
        if (!(*syms[i].slot = dlsym(h, syms[i].name)) &&
            !(syms[i].slot == (void **)&cu.EventElapsedTime && (*syms[i].slot = dlsym(h, "cuEventElapsedTime_v2")))) {
            fprintf(stderr, "libcuda.so.1 lacks %s\n", syms[i].name);
            exit(2);
        }
}

/* ---- 16-bit floats (round to nearest even) ---- */
static uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, mant = x & 0x7fffff;
    int exp = (int)((x >> 23) & 0xff) - 127 + 15;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        int shift = 14 - exp;
        uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)exp << 10) | (mant >> 13), rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}
static float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, x;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    if (exp == 31) x = sign | 0x7f800000 | (mant << 13);
    else x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    memcpy(&f, &x, 4);
    return f;
}
static uint16_t f2b(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}
static float b2f(uint16_t b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next_u32() & 0xffffff) / 16777216.0f; }

typedef enum { ENTRY_128, ENTRY_64, ENTRY_PREPARED } entry_kind;

typedef struct {
    const char *name;
    int bf16;
    entry_kind entry;
    int m, n, k, group;
    int zeros, bias;
    float alpha;
    size_t ws_bytes;
    int big;   /* skipped with --quick */
    int flags; /* w4a16_gemm_config.flags (W4A16_FLAG_ZEROED_WORKSPACE: zeroed once, three calls first) */
} test_case;

static const test_case CASES[] = {
    {"original example", 0, ENTRY_128, 1024, 4096, 4096, 128, 0, 0, 1.0f, 4 << 20, 0, 0},
    {"decode M=1", 0, ENTRY_128, 1, 4096, 4096, 128, 0, 0, 1.0f, 4 << 20, 0, 0},
    {"decode M=16 (_64)", 0, ENTRY_64, 16, 4096, 4096, 128, 0, 0, 1.0f, 4 << 20, 0, 0},
    {"zeros+bias M=16", 0, ENTRY_128, 16, 4096, 4096, 128, 1, 1, 1.0f, 4 << 20, 0, 0},
    {"g=64 zeros+bias M=64", 0, ENTRY_128, 64, 4096, 4096, 64, 1, 1, 1.0f, 4 << 20, 0, 0},
    {"g=64 M=1024 (_64)", 0, ENTRY_64, 1024, 4096, 4096, 64, 0, 1, 1.0f, 4 << 20, 1, 0},
    {"g=32 bias M=200", 0, ENTRY_128, 200, 2048, 4096, 32, 0, 1, 0.5f, 4 << 20, 0, 0},
    {"g=256 zeros M=4096", 0, ENTRY_128, 4096, 4096, 4096, 256, 1, 0, 1.0f, 4 << 20, 1, 0},
    {"per-channel zeros M=5", 0, ENTRY_128, 5, 1024, 4096, -1, 1, 1, 1.0f, 4 << 20, 0, 0},
    {"bf16 M=1024 zeros+bias", 1, ENTRY_128, 1024, 4096, 4096, 128, 1, 1, 1.0f, 4 << 20, 1, 0},
    {"bf16 decode M=1 g=64", 1, ENTRY_64, 1, 4096, 4096, 64, 0, 0, 1.0f, 4 << 20, 0, 0},
    {"ragged M=37 N=200 K=1376 g=32", 0, ENTRY_128, 37, 200, 1376, 32, 1, 1, 1.0f, 4 << 20, 0, 0},
    {"ragged bf16 M=3 N=72 K=576 g=64", 1, ENTRY_128, 3, 72, 576, 64, 1, 1, 2.0f, 4 << 20, 0, 0},
    {"per-channel odd K M=9", 0, ENTRY_128, 9, 136, 1000, -1, 0, 1, 1.0f, 4 << 20, 0, 0},
    {"prepared M=16 zeros", 0, ENTRY_PREPARED, 16, 4096, 4096, 128, 1, 1, 1.0f, 4 << 20, 0, 0},
    {"no workspace M=16", 0, ENTRY_128, 16, 4096, 4096, 128, 0, 1, 1.0f, 0, 0, 0},
    {"decode M=1, zeroed workspace", 0, ENTRY_128, 1, 4096, 4096, 128, 0, 1, 1.0f, 4 << 20, 0, W4A16_FLAG_ZEROED_WORKSPACE},
    {"M=16 (_64), zeroed workspace", 0, ENTRY_64, 16, 4096, 4096, 128, 1, 0, 1.0f, 4 << 20, 0, W4A16_FLAG_ZEROED_WORKSPACE},
};

static double now_flops(const test_case *c) { return 2.0 * c->m * c->n * c->k; }

/* Returns 1 on PASS. */
static int run_case(const test_case *c, int iters, CUstream stream) {
    int m = c->m, n = c->n, k = c->k, g = c->group > 0 ? c->group : k, G = k / g;
    uint16_t (*to16)(float) = c->bf16 ? f2b : f2h;
    float (*from16)(uint16_t) = c->bf16 ? b2f : h2f;
    size_t nx = (size_t)m * k, ny = (size_t)m * n, nq = (size_t)n * k / 2, ns = (size_t)n * G;
    uint16_t *x = malloc(nx * 2), *s = malloc(ns * 2), *z = malloc(ns * 2), *b = malloc(n * 2), *y = malloc(ny * 2);
    uint8_t *q = malloc(nq);
    for (size_t i = 0; i < nx; i++) x[i] = to16(uniform(-1, 1));
    for (size_t i = 0; i < nq; i++) q[i] = (uint8_t)next_u32();
    for (size_t i = 0; i < ns; i++) s[i] = to16(uniform(0.002f, 0.012f));
    for (size_t i = 0; i < ns; i++) z[i] = to16(uniform(0, 15));
    for (int i = 0; i < n; i++) b[i] = to16(uniform(-0.5f, 0.5f));

    CUdeviceptr dx, dq, ds, dz, db, dy, dws = 0, dprep = 0;
    CHECK(cu.MemAlloc(&dx, nx * 2 + 16));
    CHECK(cu.MemAlloc(&dq, nq));
    CHECK(cu.MemAlloc(&ds, ns * 2));
    CHECK(cu.MemAlloc(&dz, ns * 2));
    CHECK(cu.MemAlloc(&db, (size_t)n * 2));
    CHECK(cu.MemAlloc(&dy, ny * 2 + 16));
    CHECK(cu.MemcpyHtoD(dx, x, nx * 2));
    CHECK(cu.MemcpyHtoD(dq, q, nq));
    CHECK(cu.MemcpyHtoD(ds, s, ns * 2));
    CHECK(cu.MemcpyHtoD(dz, z, ns * 2));
    CHECK(cu.MemcpyHtoD(db, b, (size_t)n * 2));
    if (c->ws_bytes) CHECK(cu.MemAlloc(&dws, c->ws_bytes));
    if (c->ws_bytes && c->flags) CHECK(cu.MemsetD8(dws, 0, c->ws_bytes)); /* zeroed once, by the caller */
    w4a16_gemm_config cfg = {W4A16_KERNEL_AUTO, 0, c->flags, {0, 0, 0, 0, 0}};
    CHECK(cu.MemsetD16(dy, 0xffff, ny)); /* NaN in fp16 and bf16 */

    const void *zp = c->zeros ? (const void *)dz : NULL, *bp = c->bias ? (const void *)db : NULL;
    w4a16_prepared_weight pw;
    memset(&pw, 0, sizeof pw);
    if (c->entry == ENTRY_PREPARED) {
        pw.bytes = w4a16_sm90_prepared_size(n, k, c->group, c->zeros);
        CHECK(cu.MemAlloc(&dprep, pw.bytes));
        pw.data = (void *)dprep;
        int st = w4a16_sm90_prepare((const uint8_t *)dq, (const void *)ds, zp, n, k, c->group, c->bf16, stream, &pw);
        if (st) fprintf(stderr, "prepare: %s: %s\n", w4a16_status_string(st), w4a16_last_error_message());
    }
    int status = 0;
#define CALL()                                                                                                    \
    do {                                                                                                          \
        if (c->entry == ENTRY_PREPARED)                                                                          \
            status = w4a16_sm90_gemm_prepared((void *)dx, &pw, bp, c->alpha, (void *)dy, m, NULL, (char *)dws,   \
                                              c->ws_bytes, stream, NULL);                                         \
        else if (c->bf16)                                                                                         \
            status = (c->entry == ENTRY_64 ? w4a16_sm90_gemm_64_bf16 : w4a16_sm90_gemm_128_bf16)(               \
                (void *)dx, (const uint8_t *)dq, (void *)ds, zp, bp, c->alpha, (void *)dy, m, n, k, c->group,    \
                &cfg, (char *)dws, c->ws_bytes, stream, NULL);                                                    \
        else if (c->entry == ENTRY_64) {                                                                          \
            w4a16_sm90_gemm_64((void *)dx, (const uint8_t *)dq, (void *)ds, zp, bp, c->alpha, (void *)dy, m, n, \
                               k, c->group, &cfg, (char *)dws, c->ws_bytes, stream, NULL);                        \
            status = w4a16_get_last_error();                                                                      \
        } else {                                                                                                  \
            w4a16_sm90_gemm_128((void *)dx, (const uint8_t *)dq, (void *)ds, zp, bp, c->alpha, (void *)dy, m,   \
                                n, k, c->group, &cfg, (char *)dws, c->ws_bytes, stream, NULL);                    \
            status = w4a16_get_last_error();                                                                      \
        }                                                                                                         \
    } while (0)
    if (c->flags) { /* the checked call is the fourth: the counters the earlier ones left must be zero */
        for (int i = 0; i < 3; i++) CALL();
        CHECK(cu.MemsetD16(dy, 0xffff, ny));
    }
    CALL();
    char kernel[160];
    snprintf(kernel, sizeof kernel, "%s", w4a16_sm90_last_kernel());
    CHECK(cu.CtxSynchronize());
    CHECK(cu.MemcpyDtoH(y, dy, ny * 2));

    /* Every element written and finite; sampled rows against the CPU reference. */
    size_t bad = 0;
    for (size_t i = 0; i < ny; i++)
        if (!isfinite(from16(y[i]))) bad++;
    float *w = malloc((size_t)n * k * sizeof(float));
    for (int r = 0; r < n; r++)
        for (int kk = 0; kk < k; kk++) {
            int code = (q[(size_t)r * (k / 2) + kk / 2] >> ((kk & 1) * 4)) & 15;
            size_t gi = (size_t)r * G + kk / g;
            float zero = c->zeros ? from16(z[gi]) : 8.0f;
            w[(size_t)r * k + kk] = ((float)code - zero) * from16(s[gi]);
        }
    int step = m <= 64 ? 1 : m / 24;
    double num = 0, den = 0;
    float *xr = malloc((size_t)k * sizeof(float));
    for (int t = 0;; t++) {
        int i = t * step < m ? t * step : m - 1;
        for (int kk = 0; kk < k; kk++) xr[kk] = from16(x[(size_t)i * k + kk]);
        for (int j = 0; j < n; j++) {
            const float *wr = w + (size_t)j * k;
            float acc = 0;
            for (int kk = 0; kk < k; kk++) acc += xr[kk] * wr[kk];
            float ref = c->alpha * acc + (c->bias ? from16(b[j]) : 0.0f);
            double d = (double)from16(y[(size_t)i * n + j]) - (double)ref;
            num += d * d, den += (double)ref * ref;
        }
        if (i == m - 1) break;
    }
    double err = sqrt(num / (den > 0 ? den : 1e-30));
    double tol = c->bf16 ? 1e-2 : 2e-3;
    int pass = status == 0 && bad == 0 && err <= tol;

    /* Timing: back-to-back calls on the stream, CUDA events around them. */
    float ms = 0;
    if (status == 0 && iters > 0) {
        CUevent e0, e1;
        CHECK(cu.EventCreate(&e0, 0));
        CHECK(cu.EventCreate(&e1, 0));
        for (int i = 0; i < 3; i++) CALL();
        CHECK(cu.EventRecord(e0, stream));
        for (int i = 0; i < iters; i++) CALL();
        CHECK(cu.EventRecord(e1, stream));
        CHECK(cu.EventSynchronize(e1));
        CHECK(cu.EventElapsedTime(&ms, e0, e1));
        ms /= iters;
    }
    double us = ms * 1000.0;
    printf("%-32s %-4s %5d %5d %5d %4d %-5s %-4s %-8s %-30s %9.1f %8.1f %9.2e  %s\n", c->name,
           c->bf16 ? "bf16" : "fp16", m, n, k, c->group, c->zeros ? "yes" : "no", c->bias ? "yes" : "no",
           c->entry == ENTRY_PREPARED ? "prepared" : (c->entry == ENTRY_64 ? "_64" : "_128"), kernel, us,
           us > 0 ? now_flops(c) / (us * 1e6) : 0.0, err, pass ? "PASS" : "FAIL");
    if (!pass)
        printf("    status %d (%s: %s), %zu of %zu outputs not finite, rel err %.3e (tol %.0e)\n", status,
               w4a16_status_string(status), w4a16_last_error_message(), bad, ny, err, tol);
    fflush(stdout);
    cu.MemFree(dx), cu.MemFree(dq), cu.MemFree(ds), cu.MemFree(dz), cu.MemFree(db), cu.MemFree(dy);
    if (dws) cu.MemFree(dws);
    if (dprep) cu.MemFree(dprep);
    w4a16_sm90_cache_forget((const uint8_t *)dq);
    free(x), free(s), free(z), free(b), free(y), free(q), free(w), free(xr);
    return pass;
}

/* Errors come back as codes and messages. */
static int check_errors(void) {
    int fails = 0;
    int st = w4a16_sm90_gemm_128_ex((void *)16, (const uint8_t *)16, (void *)16, NULL, NULL, 1.0f, (void *)16, 4,
                                    256, 256, 48, NULL, NULL, 0, NULL, NULL);
    if (st != W4A16_ERROR_INVALID_VALUE || !strstr(w4a16_last_error_message(), "group_size")) fails++;
    printf("error check: group_size 48 -> %d (%s): %s\n", st, w4a16_status_string(st), w4a16_last_error_message());
    w4a16_sm90_gemm_64(NULL, NULL, NULL, NULL, NULL, 1.0f, NULL, 4, 256, 255, 128, NULL, NULL, 0, NULL, NULL);
    st = w4a16_get_last_error();
    if (st != W4A16_ERROR_INVALID_VALUE || w4a16_peek_last_error() != 0) fails++;
    printf("error check: odd k on the void entry point -> last error %d (%s)\n", st, w4a16_status_string(st));
    w4a16_gemm_config bad = {W4A16_KERNEL_DECODE, 0, 0, {1, 0, 0, 0, 0}};
    size_t ws = w4a16_sm90_workspace_size(1, 4096, 4096, 128, &bad);
    printf("error check: reserved config field -> workspace_size %zu\n", ws);
    if (ws != 0) fails++;
    return fails;
}

int main(int argc, char **argv) {
    int iters = 20, quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else {
            fprintf(stderr, "usage: %s [--iters N] [--quick]\n", argv[0]);
            return 2;
        }
    }
    load_driver();
    CHECK(cu.Init(0));
    CUdevice dev;
    CUcontext ctx;
    char name[256];
    CHECK(cu.DeviceGet(&dev, 0));
    CHECK(cu.DeviceGetName(name, sizeof name, dev));
    CHECK(cu.DevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cu.CtxSetCurrent(ctx));
    printf("%s\ndevice: %s; header C API %d, library C API %d\n", w4a16_version_string(), name, W4A16_CAPI_VERSION,
           w4a16_capi_version());
    printf("workspace for M=16, N=K=4096, g=128: %zu bytes\n\n", w4a16_sm90_workspace_size(16, 4096, 4096, 128, NULL));
    printf("%-32s %-4s %5s %5s %5s %4s %-5s %-4s %-8s %-30s %9s %8s %9s  %s\n", "case", "type", "M", "N", "K", "g",
           "zeros", "bias", "entry", "kernel", "us/call", "TFLOP/s", "rel_err", "result");
    int failed = 0, total = 0;
    CUstream stream = NULL; /* the original's example runs on the default stream */
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
        if (quick && CASES[i].big) continue;
        total++;
        failed += !run_case(&CASES[i], iters, i == 0 ? NULL : stream);
    }
    int ef = check_errors();
    failed += ef;
    printf("\n%d of %d cases passed%s; weight cache now %zu bytes\n", total - (failed - ef), total,
           ef ? ", error checks FAILED" : "", w4a16_sm90_cache_bytes());
    return failed ? 1 : 0;
}
