/*
 * The Gluon kernels of libw4a16_sm90_kernel.so: the Gluon weight layout, its repack, the choice of
 * config, the launch plans of w4a16/backends/gluon/launch.py (decode) and prefill_launch.py
 * (prefill), and the TMA descriptors the kernels take. Included by w4a16_sm90_kernel.c (one
 * translation unit); the table w4a16_gluon[] and its order come from w4a16/capi/gluon_variants.py.
 */

/* the decode configs whole (SPLIT 0), then K-split (+ G_SPLIT: SPLIT 1), then the prefill configs */
enum { G_DECODE8, G_DECODE16, G_DECODE32, G_DECODE64, G_SPLIT, G_PREFILL64 = 2 * G_SPLIT, G_PREFILL128, G_PREFILL128X128,
       G_NUM_CONFIGS };
#define G_NUM_CLASSES 4
#define G_MAX_SPLITS 16

static const char *const gluon_config_names[G_NUM_CONFIGS] = {
    "decode8",  "decode16",  "decode32",  "decode64",   "decode8k",       "decode16k",
    "decode32k", "decode64k", "prefill-64", "prefill-128", "prefill-128x128"};

/* The group class of the Gluon kernels for (n, k, effective group g), or -1 where they do not
 * apply: x's rows must be a multiple of 16 bytes (TMA: k % 8 == 0), N a multiple of 16 (the
 * cubins' hint), g one of 32, 64, 128, a multiple of 256, or one group over k > 128. */
static int gluon_class(int n, int k, int g) {
    if (k % 8 || n % 16) return -1;
    if (g == 32) return 0;
    if (g == 64) return 1;
    if (g == 128) return 2;
    if (g % 256 == 0 || (g == k && k > 128)) return 3;
    return -1;
}

/* The Gluon layout (w4a16/backends/gluon/layout.py) in one buffer: codes [NB, K_pad / 32, 256],
 * scales^T [G, N], offsets^T [G, N] (zero points only), a zero bias [N]. */
static int make_gluon_layout(int n, int k, int group_size, int dtype, int has_zeros, layout_t *L) {
    int s = make_layout(n, k, group_size, dtype, has_zeros, L);
    if (s) return s;
    int gc = gluon_class(n, k, L->group);
    if (gc < 0) return fail(W4A16_ERROR_NOT_SUPPORTED, "the Gluon kernels need k %% 8 == 0, n %% 16 == 0 and a group "
                            "size of 32, 64, 128, a multiple of 256 or -1; got n=%d k=%d group_size=%d", n, k, group_size);
    L->kind = LAYOUT_GLUON;
    L->gluon_class = gc;
    L->kh = gc == 0 ? 32 : 64;
    L->k_pad = (int)align_up((size_t)k, (size_t)(2 * L->kh));
    L->chunks = L->k_pad / (2 * L->kh);
    L->n_blocks = (int)cdiv(n, 16);
    L->n_src_groups = k / L->group;
    size_t gn = (size_t)L->n_src_groups * n * 2, off = 0;
    L->off_qk = off, off = align_up(off + (size_t)L->n_blocks * L->k_pad * 8, ALIGN);
    L->off_s = off, off = align_up(off + gn, ALIGN);
    if (L->has_zeros) L->off_z = off, off = align_up(off + gn, ALIGN);
    L->off_bias = off, off = align_up(off + (size_t)n * 2, ALIGN);
    L->off_s32 = L->off_z32 = 0;
    L->total = off;
    return W4A16_SUCCESS;
}

/* Enqueues the repack of plain weights into the Gluon layout at `dst` on `stream`. */
static int repack_gluon(ctx_state *cs, const layout_t *L, const uint8_t *B, const void *scales, const void *zeros,
                        CUdeviceptr dst, CUstream stream) {
    CUdeviceptr b = (CUdeviceptr)B, qk = dst + L->off_qk;
    int n = L->n, k = L->k, chunks = L->chunks, G = L->n_src_groups;
    void *null = NULL;
    void *pc[] = {&b, &qk, &n, &k, &chunks, &null, &null};
    int s = launch(cs, L->kh == 32 ? W4A16_GEN_REPACK_GLUON_CODES_H32 : W4A16_GEN_REPACK_GLUON_CODES_H64,
                   (unsigned)L->n_blocks, (unsigned)chunks, stream, pc);
    if (s) return s;
    static const int idx[2][2] = {{W4A16_GEN_REPACK_GLUON_PARAMS_FP16, W4A16_GEN_REPACK_GLUON_PARAMS_FP16_Z},
                                  {W4A16_GEN_REPACK_GLUON_PARAMS_BF16, W4A16_GEN_REPACK_GLUON_PARAMS_BF16_Z}};
    CUdeviceptr sp = (CUdeviceptr)scales, zp = zeros ? (CUdeviceptr)zeros : sp;
    CUdeviceptr st = dst + L->off_s, ot = L->has_zeros ? dst + L->off_z : st;
    void *pp[] = {&sp, &zp, &st, &ot, &n, &G, &n, &null, &null};
    s = launch(cs, idx[L->dtype][L->has_zeros], (unsigned)G, (unsigned)cdiv(n, W4A16_GEN_GLUON_PARAMS_BLOCK), stream,
               pp);
    if (s) return s;
    CU(drv.MemsetD8Async(dst + L->off_bias, 0, (size_t)n * 2, stream), "cuMemsetD8Async");
    return W4A16_SUCCESS;
}

static int gluon_index(int config, const layout_t *L) {
    return ((config * G_NUM_CLASSES + L->gluon_class) * 2 + L->dtype) * 2 + L->has_zeros;
}

/* The config for M tokens: the decode kernel's token tile up to 64, else a prefill tile: 64-token
 * tiles where even they make at most one wave, else 128 x 256 (_128) or 128 x 128 (_64). */
static int gluon_config(int entry_64, int forced, int m, int n, int sms) {
    if (forced == W4A16_KERNEL_GLUON_DECODE || (forced == 0 && m <= 64))
        return m <= 8 ? G_DECODE8 : m <= 16 ? G_DECODE16 : m <= 32 ? G_DECODE32 : G_DECODE64;
    if (cdiv(n, 128) * cdiv(m, 64) <= sms) return G_PREFILL64;
    return entry_64 ? G_PREFILL128 : G_PREFILL128X128;
}

/* K splits of the decode grid (launch.auto_splits): waves of `slots` programs, each costing its
 * stages, two more for fill and epilogue, and `split_cost` for a partial tile when split. */
static int auto_splits(long long n_tiles, int n_stages, long long slots, double split_cost) {
    int best = 1;
    double best_t = -1;
    for (int s = 1; s <= G_MAX_SPLITS; s++) {
        int sps = (int)cdiv(n_stages, s);
        if (s > 1 && sps < 2) break;
        int s_eff = (int)cdiv(n_stages, sps);
        double t = (double)cdiv(n_tiles * s_eff, slots) * (sps + 2 + (s_eff > 1 ? split_cost : 0.0));
        if (best_t < 0 || t < best_t) best = s_eff, best_t = t;
    }
    return best;
}

/* Tile counters owned by the library: per context one pool of COUNTER_STREAMS slots of
 * STREAM_COUNTER_SLOTS int32, zeroed once when the pool is made (outside any stream capture), and
 * left at zero by every kernel that uses them, so a K-split launch needs no memset (the package's
 * launcher keeps its counters the same way). Each stream gets a slot of its own on first use, also
 * while it captures a graph (no allocation then), so launches on other streams never share them;
 * past COUNTER_STREAMS streams, or where no pool could be made, the workspace's counters are zeroed
 * per launch. A graph replayed on another stream while its capture stream runs the same weights'
 * GEMMs would share a slot: do not. */
#define STREAM_COUNTER_SLOTS 16384
#define COUNTER_STREAMS 64
typedef struct counter_pool {
    struct counter_pool *next;
    CUcontext ctx;
    CUdeviceptr buf;
    int used;
    CUstream stream[COUNTER_STREAMS];
} counter_pool;
static counter_pool *counter_pools;   /* guarded by cache_lock */

static int make_counter_pool(ctx_state *cs, CUstream stream, counter_pool **out) {
    CUstreamCaptureStatus capturing = CU_STREAM_CAPTURE_STATUS_NONE;
    CUresult r = drv.StreamIsCapturing(stream, &capturing);
    if (r != CUDA_SUCCESS || capturing != CU_STREAM_CAPTURE_STATUS_NONE)
        return fail(W4A16_ERROR_NOT_SUPPORTED, "no tile counter pool is made while a stream captures");
    size_t n = (size_t)COUNTER_STREAMS * STREAM_COUNTER_SLOTS;
    CUdeviceptr d = 0;
    counter_pool *p = NULL;
    int s = W4A16_SUCCESS;
    if ((r = drv.MemAlloc(&d, n * 4)) != CUDA_SUCCESS) s = cuda_fail(r, "allocating tile counters (cuMemAlloc)");
    if (!s && (r = drv.MemsetD32(d, 0, n)) != CUDA_SUCCESS) s = cuda_fail(r, "cuMemsetD32 (tile counters)");
    if (!s && !(p = calloc(1, sizeof *p))) s = fail(W4A16_ERROR_OUT_OF_MEMORY, "host allocation failed");
    if (s) {
        if (d) drv.MemFree(d);
        return s;
    }
    p->next = counter_pools, p->ctx = cs->ctx, p->buf = d;
    counter_pools = p;
    *out = p;
    return W4A16_SUCCESS;
}

/* This (context, stream)'s tile counters, or a status when it has none (the caller falls back). */
static int stream_counters(ctx_state *cs, CUstream stream, CUdeviceptr *out) {
    pthread_mutex_lock(&cache_lock);
    counter_pool *p = counter_pools;
    while (p && p->ctx != cs->ctx) p = p->next;
    int s = p ? W4A16_SUCCESS : make_counter_pool(cs, stream, &p);
    if (!s) {
        int i = 0;
        while (i < p->used && p->stream[i] != stream) i++;
        if (i == p->used && p->used < COUNTER_STREAMS) p->stream[p->used++] = stream;
        if (i < p->used)
            *out = p->buf + (CUdeviceptr)i * STREAM_COUNTER_SLOTS * 4;
        else
            s = fail(W4A16_ERROR_NOT_SUPPORTED, "more than %d streams use the library's tile counters", COUNTER_STREAMS);
    }
    pthread_mutex_unlock(&cache_lock);
    return s;
}

/* Frees the library's tile counters (w4a16_sm90_cache_clear: no GEMM in flight). Holds cache_lock. */
static void free_stream_counters(void) {
    while (counter_pools) {
        counter_pool *p = counter_pools;
        counter_pools = p->next;
        drv.MemFree(p->buf);
        free(p);
    }
}

typedef struct {
    int variant;          /* index into w4a16_gluon (cubin W4A16_GEN_GLUON_FIRST + variant) */
    int decode;
    int n_tiles, n_stages, splits, sps;   /* decode: tiles, stages, K ranges and stages per range */
    int n_tm, rows;                       /* prefill: token tiles per launch, rows per launch */
    int zeroed;           /* the caller's zeroed region holds the counters */
    int own_counters;     /* the library's counters of the stream (stream_counters) */
    size_t part_bytes, need;
} gluon_plan_t;

/* Plans a Gluon launch, or says (W4A16_ERROR_NOT_SUPPORTED) why the Gluon kernels do not run it. */
static int make_gluon_plan(int entry_64, const w4a16_gemm_config *cfg, const layout_t *L, int m, int sms,
                           size_t ws_bytes, gluon_plan_t *p) {
    int forced = cfg ? cfg->kernel : 0, split_k = cfg ? cfg->split_k : 0;
    memset(p, 0, sizeof *p);
    if (L->kind != LAYOUT_GLUON) return fail(W4A16_ERROR_NOT_SUPPORTED, "the weight is not in the Gluon layout");
    if (forced && forced != W4A16_KERNEL_GLUON_DECODE && forced != W4A16_KERNEL_GLUON_PREFILL)
        return fail(W4A16_ERROR_NOT_SUPPORTED, "gemm_config->kernel %d is a Triton kernel", forced);
    if (forced == W4A16_KERNEL_GLUON_DECODE && m > 64)
        return fail(W4A16_ERROR_INVALID_VALUE, "m: expected <= 64 for W4A16_KERNEL_GLUON_DECODE, got %d", m);
    if (forced == W4A16_KERNEL_GLUON_PREFILL && m <= 64)
        return fail(W4A16_ERROR_INVALID_VALUE, "m: expected > 64 for W4A16_KERNEL_GLUON_PREFILL, got %d", m);
    int config = gluon_config(entry_64, forced, m, L->n, sms);
    p->variant = gluon_index(config, L);
    if (!w4a16_cubins[W4A16_GEN_GLUON_FIRST + p->variant].begin)
        return fail(W4A16_ERROR_NOT_SUPPORTED, "the Gluon kernel %s is not in this build",
                    w4a16_cubins[W4A16_GEN_GLUON_FIRST + p->variant].name);
    const w4a16_gluon_info *g = &w4a16_gluon[p->variant];
    p->decode = g->kind == 0;
    if (!p->decode) {
        /* prefill: one launch per block of rows keeping m * n below 2**31 (32-bit output offsets) */
        p->rows = (int)(INT32_LIMIT / L->n < m ? INT32_LIMIT / L->n : m);
        p->n_stages = (int)cdiv(L->k, g->ks);
        return W4A16_SUCCESS;
    }
    p->n_tiles = (int)cdiv(L->n, g->tile_n);
    p->n_stages = (int)cdiv(L->k, g->ks);
    int zeroed = cfg && (cfg->flags & W4A16_FLAG_ZEROED_WORKSPACE);
    int splits = split_k > 0 ? split_k
                             : auto_splits(p->n_tiles, p->n_stages, (long long)sms * g->resident, 16.0 * g->mt / g->ks);
    for (;; splits--) {
        if (splits > p->n_stages) splits = p->n_stages;
        if (splits < 1) splits = 1;
        p->sps = (int)cdiv(p->n_stages, splits);
        p->splits = (int)cdiv(p->n_stages, p->sps);
        p->zeroed = p->splits > 1 && zeroed;
        if (p->splits == 1) {
            p->part_bytes = p->need = 0;
            break;
        }
        if (p->zeroed && p->n_tiles > COUNTER_SLOTS) p->zeroed = 0;
        p->own_counters = !p->zeroed && p->n_tiles <= STREAM_COUNTER_SLOTS;
        p->part_bytes = align_up((size_t)p->splits * m * L->n * 4, ALIGN);
        p->need = ALIGN + p->part_bytes + (p->zeroed ? (size_t)W4A16_COUNTER_REGION_BYTES
                                                     : p->own_counters ? 0 : (size_t)p->n_tiles * 4);
        if (p->need <= ws_bytes) break;
    }
    if (p->splits > 1) {   /* the K-split build of the config */
        p->variant = gluon_index(config + G_SPLIT, L);
        if (!w4a16_cubins[W4A16_GEN_GLUON_FIRST + p->variant].begin)
            return fail(W4A16_ERROR_NOT_SUPPORTED, "the Gluon kernel %s is not in this build",
                        w4a16_cubins[W4A16_GEN_GLUON_FIRST + p->variant].name);
    }
    return W4A16_SUCCESS;
}

static int encode_map(CUtensorMap *map, const w4a16_tma_meta *d, CUdeviceptr base, const uint64_t *shape,
                      const uint64_t *strides) {
    /* shape and strides (elements) outermost first, as the kernel sees them; the driver wants them
     * innermost first, strides in bytes without the innermost one */
    cuuint64_t dim[3], stride[2];
    cuuint32_t box[3], estride[3] = {1, 1, 1};
    int r = d->rank;
    for (int i = 0; i < r; i++) dim[r - 1 - i] = shape[i], box[r - 1 - i] = d->box[i];
    for (int i = 0; i + 1 < r; i++) stride[r - 2 - i] = strides[i] * (uint64_t)d->elem_size;
    CU(drv.TensorMapEncodeTiled(map, (CUtensorMapDataType)d->elem_type, (cuuint32_t)r, (void *)base, dim, stride, box,
                                estride, CU_TENSOR_MAP_INTERLEAVE_NONE, (CUtensorMapSwizzle)d->swizzle,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
       "cuTensorMapEncodeTiled");
    return W4A16_SUCCESS;
}

/* One descriptor argument as the kernel takes it: the map, then its shape (u32) and strides (u64). */
typedef struct {
    CUtensorMap map;
    uint32_t shape[3];
    uint64_t strides[3];
} desc_arg;

static int make_desc(desc_arg *a, const w4a16_tma_meta *d, CUdeviceptr base, const uint64_t *shape,
                     const uint64_t *strides) {
    for (int i = 0; i < d->rank; i++) a->shape[i] = (uint32_t)shape[i], a->strides[i] = strides[i];
    return encode_map(&a->map, d, base, shape, strides);
}

static int push_desc(void **params, int at, desc_arg *a, int rank) {
    params[at++] = &a->map;
    for (int i = 0; i < rank; i++) params[at++] = &a->shape[i];
    for (int i = 0; i < rank; i++) params[at++] = &a->strides[i];
    return at;
}

static int launch_ex(ctx_state *cs, int idx, unsigned gx, unsigned gy, int pdl, CUstream stream, void **params) {
    CUfunction f;
    int s = get_function(cs, idx, &f);
    if (s) return s;
    const w4a16_cubin *c = &w4a16_cubins[idx];
    CUlaunchAttribute attr[1];
    CUlaunchConfig lc;
    memset(&lc, 0, sizeof lc);
    lc.gridDimX = gx, lc.gridDimY = gy, lc.gridDimZ = 1;
    lc.blockDimX = 32 * c->num_warps, lc.blockDimY = 1, lc.blockDimZ = 1;
    lc.sharedMemBytes = c->shared, lc.hStream = stream;
    if (pdl) {
        memset(attr, 0, sizeof attr);
        attr[0].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr[0].value.programmaticStreamSerializationAllowed = 1;
        lc.attrs = attr, lc.numAttrs = 1;
    }
    CU(drv.LaunchKernelEx(&lc, f, params, NULL), "cuLaunchKernelEx");
    return W4A16_SUCCESS;
}

/* The Gluon kernels read A through TMA and were compiled for 16-byte aligned C and bias. */
static int gluon_pointers(const call_t *c) {
    if (aligned16(c->A) && aligned16(c->C) && (!c->bias || aligned16(c->bias))) return W4A16_SUCCESS;
    return fail(W4A16_ERROR_INVALID_VALUE, "A, C, biases: expected 16-byte aligned pointers for the Gluon kernels, got "
                "%p, %p, %p", c->A, c->C, c->bias);
}

/* Runs the GEMM with the Gluon kernel `p` plans on a weight in the Gluon layout at W. */
static int run_gluon(ctx_state *cs, const call_t *c, const layout_t *L, CUdeviceptr W, const gluon_plan_t *p) {
    int idx = W4A16_GEN_GLUON_FIRST + p->variant;
    const w4a16_gluon_info *g = &w4a16_gluon[p->variant];
    if (c->occupancy) {
        CUfunction f;
        int s = get_function(cs, idx, &f);
        if (s) return s;
        CU(drv.Occupancy(c->occupancy, f, 32 * w4a16_cubins[idx].num_warps, w4a16_cubins[idx].shared),
           "cuOccupancyMaxActiveBlocksPerMultiprocessor");
        return ok();
    }
    int n = L->n, k = L->k, group = L->group, G = L->n_src_groups, s;
    desc_arg dc, dx, ds, dz;
    uint64_t c_shape[3] = {(uint64_t)L->n_blocks, (uint64_t)L->k_pad / 32, 256}, c_str[3] = {(uint64_t)L->k_pad * 8, 256, 1};
    uint64_t s_shape[2] = {(uint64_t)G, (uint64_t)n}, s_str[2] = {(uint64_t)n, 1};
    if ((s = make_desc(&dc, &g->desc[0], W + L->off_qk, c_shape, c_str)) ||
        (s = make_desc(&ds, &g->desc[2], W + L->off_s, s_shape, s_str)) ||
        (s = make_desc(&dz, &g->desc[3], W + (L->has_zeros ? L->off_z : L->off_s), s_shape, s_str)))
        return s;
    CUdeviceptr bias = c->bias ? (CUdeviceptr)c->bias : W + L->off_bias;
    CUdeviceptr part = W, counters = W;   /* any valid address where the plan needs none */
    int own = p->own_counters;
    if (p->splits > 1 && p->zeroed) {
        counters = (CUdeviceptr)align_up((uintptr_t)c->ws, ALIGN);
        part = counters + W4A16_COUNTER_REGION_BYTES;
    } else if (p->splits > 1) {
        part = (CUdeviceptr)align_up((uintptr_t)c->ws, ALIGN);
        counters = part + p->part_bytes;
        if (p->own_counters && stream_counters(cs, c->stream, &counters)) {
            /* none could be made now (e.g. cuMemAlloc during a stream capture): the workspace's, zeroed per launch */
            if (c->ws_bytes < ALIGN + p->part_bytes + (size_t)p->n_tiles * 4) return t_status;
            counters = part + p->part_bytes;
            own = 0;
        }
    }
    float alpha = c->alpha;
    void *null = NULL;
    int rows = p->decode ? c->m : p->rows;
    for (int m0 = 0; m0 < c->m; m0 += rows) {
        int mb = c->m - m0 < rows ? c->m - m0 : rows;
        CUdeviceptr x = (CUdeviceptr)c->A + (size_t)m0 * k * 2, y = (CUdeviceptr)c->C + (size_t)m0 * n * 2;
        uint64_t x_shape[2] = {(uint64_t)mb, (uint64_t)k}, x_str[2] = {(uint64_t)k, 1};
        if ((s = make_desc(&dx, &g->desc[1], x, x_shape, x_str))) return s;
        void *params[40];
        int at = 0;
        at = push_desc(params, at, &dc, 3);
        at = push_desc(params, at, &dx, 2);
        at = push_desc(params, at, &ds, 2);
        at = push_desc(params, at, &dz, 2);
        params[at++] = &y, params[at++] = &bias, params[at++] = &part, params[at++] = &counters;
        params[at++] = &mb, params[at++] = &n, params[at++] = &group;
        unsigned gx, gy;
        int n_stages = p->n_stages, sps = p->sps, n_tn = 0, n_tm = 0, one = 1;
        if (p->decode) {
            params[at++] = &n_stages, params[at++] = &sps;
            gx = (unsigned)p->n_tiles, gy = (unsigned)p->splits;
            if (p->splits > 1 && !p->zeroed && !own)
                CU(drv.MemsetD32Async(counters, 0, (size_t)p->n_tiles, c->stream), "cuMemsetD32Async (tile counters)");
        } else {
            n_tn = (int)cdiv(n, g->tile_n), n_tm = (int)cdiv(mb, g->mt);
            long long tiles = (long long)n_tn * n_tm;
            params[at++] = &n_stages, params[at++] = &n_tn, params[at++] = &n_tm, params[at++] = &one,
            params[at++] = &n_stages;
            gx = (unsigned)(tiles < cs->sm_count ? tiles : cs->sm_count), gy = 1;
        }
        params[at++] = &alpha, params[at++] = &null, params[at++] = &null;
        if ((s = launch_ex(cs, idx, gx, gy, g->pdl, c->stream, params))) return s;
        t_last_variant = idx, t_last_grid = (int)gx, t_last_splits = (int)gy;
    }
    return ok();
}
