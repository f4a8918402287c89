/*
 * w4a16_sm90_kernel.h: C API of libw4a16_sm90_kernel.so, the w4a16 GEMM for NVIDIA Hopper (sm_90).
 *
 *   C[m, n] = alpha * sum_k A[m, k] * W[n, k] + bias[n]
 *   W[n, k] = (q[n, k] - z[n, k / g]) * s[n, k / g]        (z = 8 when no zero points are given)
 *
 * A [M, K], C [M, N], scales, zero points [N, K / g] and bias [N] are fp16 (or bf16 in the _bf16
 * entry points), row-major and contiguous, in device memory. B holds the 4-bit codes q in the
 * plain layout: uint8 [N, K / 2], element k of row n in byte n * K / 2 + k / 2, even k in the low
 * nibble (cutlass::uint4b_t order). Accumulation is fp32; alpha and bias are applied in fp32.
 *
 * Group size g: a multiple of 32 that divides K (32, 64, 128, 256, ...), or -1 / 0 / K for one
 * group over all of K. K must be even; any M >= 0 and N >= 1.
 *
 * The kernels are the w4a16 package's Gluon kernels (where they apply: K % 8 == 0, N % 16 == 0,
 * group 32, 64, 128, a multiple of 256 or one group, 16-byte aligned A, C and bias) and its Triton
 * kernels (everything else), compiled ahead of time for sm_90a. The library needs only the CUDA
 * driver (libcuda.so.1, loaded at run time); it links no CUDA library. See docs/capi.md for the
 * weight cache, the workspace rule and the stream rules.
 */
#ifndef W4A16_SM90_KERNEL_H
#define W4A16_SM90_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define W4A16_CAPI_VERSION 3          /* bumped when this header changes (2: config.flags; 3: Gluon kernels, prepared layout) */

/* Status codes returned by the int entry points (0 = success). */
#define W4A16_SUCCESS                   0
#define W4A16_ERROR_INVALID_VALUE       1  /* a NULL pointer, shape, group size, config value ... */
#define W4A16_ERROR_NO_DRIVER           2  /* libcuda.so.1 could not be loaded or initialized */
#define W4A16_ERROR_UNSUPPORTED_DEVICE  3  /* the current device is not sm_90 */
#define W4A16_ERROR_CUDA                4  /* a CUDA driver call failed (see the message) */
#define W4A16_ERROR_OUT_OF_MEMORY       5  /* the weight cache could not allocate */
#define W4A16_ERROR_INSUFFICIENT_BUFFER 6  /* a prepared-weight buffer is too small */
#define W4A16_ERROR_NOT_SUPPORTED       7  /* a kernel variant is not in this build */

/* Activation / output dtypes. */
#define W4A16_DTYPE_FP16 0
#define W4A16_DTYPE_BF16 1

/* Kernel choices for w4a16_gemm_config.kernel. */
#define W4A16_KERNEL_AUTO      0  /* chosen from M (see docs/capi.md) */
#define W4A16_KERNEL_TILE256   1  /* 256x128 tiles, 8 warps, 3 stages: prefill, large M */
#define W4A16_KERNEL_TILE128   2  /* 128x128 tiles, 8 warps, 4 stages (the "128" kernel) */
#define W4A16_KERNEL_SPLITK64  3  /* 64x64 tiles, split-K (the "64" kernel) */
#define W4A16_KERNEL_DECODE    4  /* 16x64 tiles, split-K: M <= 16, memory-bound */
#define W4A16_KERNEL_GLUON_DECODE  5  /* the Gluon decode kernel (M <= 64): TMA ring, register-A wgmma */
#define W4A16_KERNEL_GLUON_PREFILL 6  /* the Gluon prefill kernel (M > 64): warp-specialized, persistent */

/* Layouts of a prepared weight (w4a16_prepared_weight.layout, set by w4a16_sm90_prepare). */
#define W4A16_LAYOUT_TRITON 1  /* layout version 2: the Triton kernels (1..4) */
#define W4A16_LAYOUT_GLUON  2  /* the Gluon layout: the Gluon kernels (5, 6) */

/* Flags for w4a16_gemm_config.flags.
 * W4A16_FLAG_ZEROED_WORKSPACE: the caller zeroed the workspace once (e.g. cudaMemset after
 * allocating it) and leaves it to this library between calls. The split-K tile counters then live
 * in the workspace's first W4A16_COUNTER_REGION_BYTES (after 256-byte alignment), which the
 * kernels leave at zero, and the per-call memset of the counters is skipped. Without the flag
 * the workspace needs no initialisation and may hold other data between calls. */
#define W4A16_FLAG_ZEROED_WORKSPACE 1
#define W4A16_COUNTER_REGION_BYTES  65536

/* Kernel configuration. A NULL pointer, or a struct of zeros, means "default". */
typedef struct w4a16_gemm_config {
    int kernel;       /* W4A16_KERNEL_*; 0 = automatic (the Gluon kernels where they apply) */
    int split_k;      /* split-K kernels: 0 = automatic, else the number of K splits (at most) */
    int flags;        /* W4A16_FLAG_*; 0 = none */
    int reserved[5];  /* must be 0 */
} w4a16_gemm_config;

/* A weight repacked into the kernels' private layout by w4a16_sm90_prepare (caller-owned). */
typedef struct w4a16_prepared_weight {
    void *data;        /* device buffer of at least w4a16_sm90_prepared_size() bytes */
    size_t bytes;
    int n, k, group_size, dtype, has_zeros;
    int layout;        /* W4A16_LAYOUT_*: the Gluon layout where the Gluon kernels apply, else TRITON */
    int reserved[2];
} w4a16_prepared_weight;

/* ---- The original's entry points (fp16). They return nothing: on error they set the thread's
 * last error (w4a16_get_last_error) and print one line to stderr. If occupancy is not NULL they
 * only store the chosen kernel's resident blocks per SM there and launch nothing. ---- */
void w4a16_sm90_gemm_128(const void *A, const uint8_t *B, const void *weight_scales,
                         const void *weight_zero_points, const void *biases, float alpha, void *C,
                         int m, int n, int k, int group_size, const w4a16_gemm_config *gemm_config,
                         char *workspace, size_t workspace_bytes, void *stream, int *occupancy);
void w4a16_sm90_gemm_64(const void *A, const uint8_t *B, const void *weight_scales,
                        const void *weight_zero_points, const void *biases, float alpha, void *C,
                        int m, int n, int k, int group_size, const w4a16_gemm_config *gemm_config,
                        char *workspace, size_t workspace_bytes, void *stream, int *occupancy);

/* The same, returning a W4A16_* status. */
int w4a16_sm90_gemm_128_ex(const void *A, const uint8_t *B, const void *weight_scales,
                           const void *weight_zero_points, const void *biases, float alpha, void *C,
                           int m, int n, int k, int group_size, const w4a16_gemm_config *gemm_config,
                           char *workspace, size_t workspace_bytes, void *stream, int *occupancy);
int w4a16_sm90_gemm_64_ex(const void *A, const uint8_t *B, const void *weight_scales,
                          const void *weight_zero_points, const void *biases, float alpha, void *C,
                          int m, int n, int k, int group_size, const w4a16_gemm_config *gemm_config,
                          char *workspace, size_t workspace_bytes, void *stream, int *occupancy);

/* bf16 activations, scales, zero points, bias and output. */
int w4a16_sm90_gemm_128_bf16(const void *A, const uint8_t *B, const void *weight_scales,
                             const void *weight_zero_points, const void *biases, float alpha, void *C,
                             int m, int n, int k, int group_size, const w4a16_gemm_config *gemm_config,
                             char *workspace, size_t workspace_bytes, void *stream, int *occupancy);
int w4a16_sm90_gemm_64_bf16(const void *A, const uint8_t *B, const void *weight_scales,
                            const void *weight_zero_points, const void *biases, float alpha, void *C,
                            int m, int n, int k, int group_size, const w4a16_gemm_config *gemm_config,
                            char *workspace, size_t workspace_bytes, void *stream, int *occupancy);

/* Workspace (bytes) that lets w4a16_sm90_gemm_128's choice (or the kernel gemm_config forces;
 * for _64 at M > 64 pass W4A16_KERNEL_SPLITK64) run its preferred split-K for this shape on the
 * current device (132 SMs assumed without one). Less is legal (fewer splits, or a tile kernel
 * that needs none), NULL / 0 too. */
size_t w4a16_sm90_workspace_size(int m, int n, int k, int group_size, const w4a16_gemm_config *gemm_config);

/* ---- Explicit repack (no hidden state): the caller keeps the prepared buffer. ---- */
size_t w4a16_sm90_prepared_size(int n, int k, int group_size, int has_zeros);
/* Fills *out (out->data and out->bytes set by the caller) and enqueues the repack on stream. */
int w4a16_sm90_prepare(const uint8_t *B, const void *weight_scales, const void *weight_zero_points,
                       int n, int k, int group_size, int dtype, void *stream, w4a16_prepared_weight *out);
int w4a16_sm90_gemm_prepared(const void *A, const w4a16_prepared_weight *W, const void *biases, float alpha,
                             void *C, int m, const w4a16_gemm_config *gemm_config, char *workspace,
                             size_t workspace_bytes, void *stream, int *occupancy);

/* ---- The weight cache of the plain-layout entry points (keyed by context, B, scales, zero
 * points, n, k, group size and dtype). Call with no GEMM in flight that uses the weights. ---- */
void w4a16_sm90_cache_clear(void);
int w4a16_sm90_cache_forget(const uint8_t *B);   /* drops the entries of B; returns how many */
size_t w4a16_sm90_cache_bytes(void);

/* ---- Errors, version, introspection ---- */
int w4a16_get_last_error(void);                  /* this thread's last status, then reset to 0 */
int w4a16_peek_last_error(void);                 /* the same without resetting */
const char *w4a16_last_error_message(void);      /* this thread's last error, in words */
const char *w4a16_status_string(int status);
const char *w4a16_sm90_last_kernel(void);        /* this thread's last launched kernel, in words */
int w4a16_version(void);                         /* 10000 * major + 100 * minor + patch */
int w4a16_capi_version(void);                    /* W4A16_CAPI_VERSION the library was built with */
const char *w4a16_version_string(void);

#ifdef __cplusplus
}
#endif
#endif /* W4A16_SM90_KERNEL_H */
