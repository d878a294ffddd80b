// W4A16 on tensor cores with the weights as the MMA's A operand ("swap AB"), for decode batches M <= 64.
//
// Compiled at run time by NVRTC (torch.cuda._compile_kernel), so no CUDA toolkit is needed where it runs;
// no headers either: bf16 arithmetic, loads and the MMA are inline PTX (sm_80 and newer).
//
// Weight layout ("mma", int32 [N/16, K/64, 32, 4]): one 16-byte vector per lane per (16-row tile, 64-deep
// K chunk), so a warp reads 512 contiguous bytes with one load.  Word kt of lane (g = lane/4, t = lane%4)
// holds that lane's A fragment of K-step kt of mma.m16n8k16: nibble r is the weight at
//   row  = g + 8 * (r & 1)
//   k    = chunk * 64 + 16 t + 4 kt + slot,   slot = 2 * ((r >> 1) & 1) + (r >> 2)
// so (w >> 4i) & 0x000F000F puts nibbles i and i + 4 into the two halves of A register i.  The K order
// inside a chunk is permuted the same way for the activations, which makes a lane's B fragments for the
// whole chunk the 16 contiguous activations x[m, chunk*64 + 16t ...]: two 16-byte loads per 8 rows.
//
// De-quantization per pair of weights: one shift, one LOP3 (0x4300 | q is the bf16 128 + q) and an exact
// bf16x2 subtraction of 128 + zero.  The scale multiplies either the fp32 MMA result once per chunk (small
// M) or each bf16x2 pair, w = bf16((q - z) * s), the reference de-quantization's values (larger M).
// Products accumulate in fp32 in the tensor cores.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

struct __align__(16) U4 { u32 x, y, z, w; };

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ U4 load_stream(const U4* p) {  // weights: read once, keep out of L1
    U4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ U4 load_cached(const U4* p) {  // activations: re-read by every block
    U4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma16816_zero(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
}

__device__ __forceinline__ float bf16_to_float(u16 h) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)h) << 16));
    return f;
}

__device__ __forceinline__ u16 float_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u32 word_of(const U4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

#define BF16X2_ONE 0x3F803F80u
#define BF16X2_NEG_ONE 0xBF80BF80u
#define BF16X2_NEG_ZERO 0x80008000u
#define BF16X2_128 0x43004300u

__device__ __forceinline__ u32 and_or(u32 a, u32 mask, u32 bits) {  // (a & mask) | bits in ONE instruction
    u32 d;  // (two immediates would not fit one LOP3, so ptxas would emit two)
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
    return d;
}

// A tile's group parameters for rows g and g + 8, from its 16 scales and then 16 zero points in shared
// memory, as bf16x2 pairs: {s} and {128 + z} (what dequant_fragment subtracts).
struct GroupParams { u32 s_lo, s_hi, z_lo, z_hi; };

__device__ __forceinline__ GroupParams group_params(const u16* p, int g) {
    const u32 s0 = p[g], s1 = p[g + 8];
    return {s0 * 0x10001u, s1 * 0x10001u, fma2((u32)p[16 + g] * 0x10001u, BF16X2_ONE, BF16X2_128),
            fma2((u32)p[24 + g] * 0x10001u, BF16X2_ONE, BF16X2_128)};
}

// The A fragments of one K step of one 16-row tile: q - z (exact small integers) for the lane's 8
// weights, from z_lo / z_hi = {128 + z, 128 + z} of rows g / g + 8.  With SCALE, also times s_lo / s_hi:
// (q - z) * s rounded once to bf16, the reference de-quantization's values.
template <bool SCALE>
__device__ __forceinline__ void dequant_fragment(u32 word, u32 z_lo, u32 z_hi, u32 s_lo, u32 s_hi, u32 (&a)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 v = and_or(word >> (4 * i), 0x000F000Fu, BF16X2_128);  // 128 + q, two at once
        const u32 d = fma2((i & 1) ? z_hi : z_lo, BF16X2_NEG_ONE, v);   // q - z, exact
        a[i] = SCALE ? fma2(d, (i & 1) ? s_hi : s_lo, BF16X2_NEG_ZERO) : d;
    }
}

// C fragment: c0, c1 = (n = g, m = 2t, 2t + 1); c2, c3 = (n = g + 8, same m)
template <int MT>
__device__ __forceinline__ void store_tile(const float (&acc)[MT][4], void* out, int split, int M, int N, int tile,
                                           int g, int t, int out_fp32) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = mt * 8 + 2 * t + (i & 1);
            const int n = tile * 16 + g + 8 * (i >> 1);
            if (m < M) {
                const u64 at = ((u64)split * M + m) * N + n;
                if (out_fp32) reinterpret_cast<float*>(out)[at] = acc[mt][i];
                else reinterpret_cast<u16*>(out)[at] = float_to_bf16(acc[mt][i]);
            }
        }
}

// A warp's accumulators: TN weight tiles x MT activation tiles x one C fragment each.
template <int TN, int MT>
__device__ __forceinline__ void zero_acc(float (&acc)[TN][MT][4]) {
#pragma unroll
    for (int tn = 0; tn < TN; ++tn)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[tn][mt][i] = 0.f;
}

// Store a warp's TN tiles (tile0, tile0 + stride, ...); tiles past N were computed but are never stored.
template <int TN, int MT>
__device__ __forceinline__ void store_tiles(const float (&acc)[TN][MT][4], void* out, int split, int M, int N,
                                            int tile0, int stride, int n_tiles, int g, int t, int out_fp32) {
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        if (tile0 + stride * tn >= n_tiles) break;
        store_tile<MT>(acc[tn], out, split, M, N, tile0 + stride * tn, g, t, out_fp32);
    }
}

// ---- decode-step fusions around the batch <= 8 GEMV kernels (w4a16_gemv, bf16_gemv) ----------------------
// A decode step at batch 1 is 8 kernels per layer of a few microseconds each, and each pays a fixed cost
// of launch, ramp-up and tail; the two RMSNorms, the residual adds and SiLU * up are therefore folded into
// the GEMVs around them (6 kernels per layer instead of 8 with gemv_fusion=norm, 5 with all, fused.py):
//   PRO_NORM      the GEMV multiplies rmsnorm(x) * gamma.  The product is linear in x, so each lane
//                 multiplies the activations it loads by gamma (bf16(x * gamma), one rounding) and sums
//                 their squares on the way; the block adds up the sums at the end and scales its fp32
//                 results by rstd = 1 / sqrt(mean(x^2) + eps).  No pass over x before the weights stream
//                 (a first version computed rstd up front, HF's rounding exactly, and was slower than the
//                 unfused kernels on an H200).  Rounding differs from HF's bf16(gamma * bf16(x * rstd)) by
//                 one bf16 rounding of the activations, like any reordering.
//   EPI_RESIDUAL  out = bf16(resid + bf16(product)), PyTorch's rounding: the residual add after wo and w2
//                 (warp 0 loads its resid values before the main loop, off the tail).
//   EPI_SILU      w13's rows are interleaved by 8 (tile i = gate rows 8i..8i+7, then up rows 8i..8i+7), so
//                 a lane holds gate and up of the same output: out = bf16(bf16(silu(gate)) * up), N / 2 wide.
// Prologue and epilogues need the whole K in one block: they are only used with one split.
#define PRO_NONE 0
#define PRO_NORM 1
#define EPI_SPLITS 0
#define EPI_RESIDUAL 1
#define EPI_SILU 2

__device__ __forceinline__ float lo_of(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_of(u32 w) { return __uint_as_float(w & 0xFFFF0000u); }

// v = bf16(v * gamma) pairwise (the product of two bf16 is exact in fp32: fma2 with -0 rounds it once),
// and ss += the squares of the original v.
__device__ __forceinline__ void gamma_u4(U4& v, const U4& gamma, float& ss) {
    u32* w = &v.x;
    const u32* gw = &gamma.x;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        ss = __fmaf_rn(lo_of(w[i]), lo_of(w[i]), ss);
        ss = __fmaf_rn(hi_of(w[i]), hi_of(w[i]), ss);
        w[i] = fma2(w[i], gw[i], BF16X2_NEG_ZERO);
    }
}

// PRO_NORM's end: ss is each lane's sum of squares of row g over the K it loaded (lanes of the same g
// split k by t, warps split the chunks); the block's rstd of rows m = 2t, 2t + 1 scales warp 0's results.
// red: 8 * WK floats of shared memory; every warp calls it, before sum_into_warp0 (whose barrier publishes
// red) or, with one warp, alone.
__device__ __forceinline__ void publish_sumsq(float ss, float* red, int warp, int lane) {
    ss += __shfl_xor_sync(0xFFFFFFFFu, ss, 1);
    ss += __shfl_xor_sync(0xFFFFFFFFu, ss, 2);
    if ((lane & 3) == 0) red[warp * 8 + (lane >> 2)] = ss;
}

template <int WK, int TN>
__device__ __forceinline__ void scale_by_rstd(float (&acc)[TN][1][4], const float* red, int K, float eps, int M,
                                              int t) {
    if (WK == 1) __syncwarp();
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int m = imin(2 * t + j, M - 1);
        float s = 0.f;
        for (int w = 0; w < WK; ++w) s += red[w * 8 + m];
        const float rstd = rsqrtf(s / (float)K + eps);
#pragma unroll
        for (int tn = 0; tn < TN; ++tn) {
            acc[tn][0][j] *= rstd;
            acc[tn][0][2 + j] *= rstd;
        }
    }
}

// EPI_RESIDUAL's resid values of this lane's outputs (rows g, g + 8 of each tile; m = 2t, 2t + 1).
template <int TN>
__device__ __forceinline__ void load_resid(const u16* __restrict__ resid, int M, int N, int tile0, int n_tiles,
                                           int g, int t, u16 (&rv)[TN][2][2]) {
#pragma unroll
    for (int tn = 0; tn < TN; ++tn)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int m = 2 * t + j;
                rv[tn][h][j] = (tile0 + tn < n_tiles && m < M) ? resid[(u64)m * N + (tile0 + tn) * 16 + g + 8 * h] : 0;
            }
}

__device__ __forceinline__ u16 add_bf16(u16 a, float b) {  // bf16(a + bf16(b)), as PyTorch adds two bf16
    return float_to_bf16(bf16_to_float(a) + bf16_to_float(float_to_bf16(b)));
}

__device__ __forceinline__ u16 silu_mul(float gate, float up) {  // bf16(bf16(silu(g)) * u), g, u rounded first
    const float g = bf16_to_float(float_to_bf16(gate));
    const float s = bf16_to_float(float_to_bf16(g / (1.f + expf(-g))));
    return float_to_bf16(s * bf16_to_float(float_to_bf16(up)));
}

// The GEMV kernels' store: split-K partials (EPI_SPLITS), or, with one split, the fused epilogues above
// into bf16 out [M, N] (EPI_RESIDUAL, with load_resid's values) or [M, N / 2] (EPI_SILU).
template <int EPI, int TN>
__device__ __forceinline__ void store_gemv(const float (&acc)[TN][1][4], void* out, const u16 (&rv)[TN][2][2],
                                           int split, int M, int N, int tile0, int n_tiles, int g, int t,
                                           int out_fp32) {
    if (EPI == EPI_SPLITS) {
        store_tiles(acc, out, split, M, N, tile0, 1, n_tiles, g, t, out_fp32);
        return;
    }
    u16* o = reinterpret_cast<u16*>(out);
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        const int tile = tile0 + tn;
        if (tile >= n_tiles) break;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int m = 2 * t + j;
            if (m >= M) continue;
            if (EPI == EPI_RESIDUAL) {
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    o[(u64)m * N + tile * 16 + g + 8 * h] = add_bf16(rv[tn][h][j], acc[tn][0][2 * h + j]);
            } else {
                o[(u64)m * (N / 2) + tile * 8 + g] = silu_mul(acc[tn][0][j], acc[tn][0][2 + j]);
            }
        }
    }
}

__device__ __forceinline__ void cp_async16(u32 smem_addr, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr), "l"(src));
}

__device__ __forceinline__ void cp_async16_zfill(u32 smem_addr, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async4(u32 smem_addr, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(smem_addr), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Warps 1.. of a block that split K between them hand their PER_WARP accumulators (``mine``, fully unrolled
// indices: they stay in registers) to warp 0 through shared memory ``red`` (the finished cp.async ring);
// returns whether the calling warp now holds the block's sums (warp 0).
template <int WK, int PER_WARP>
__device__ __forceinline__ bool sum_into_warp0(float* mine, float* red, int warp, int lane) {
    if (WK == 1) return true;
    __syncthreads();  // every warp is done with the ring
    if (warp > 0) {
#pragma unroll
        for (int j = 0; j < PER_WARP / 32; ++j) red[((warp - 1) * PER_WARP / 32 + j) * 32 + lane] = mine[j];
    }
    __syncthreads();
    if (warp > 0) return false;
    for (int w2 = 0; w2 < WK - 1; ++w2)
#pragma unroll
        for (int j = 0; j < PER_WARP / 32; ++j) mine[j] += red[(w2 * PER_WARP / 32 + j) * 32 + lane];
    return true;
}

// out[split, m, n] = sum over this split's K chunks of x[m, k] * W[n, k].
// MT: 8-row activation tiles (M <= 8 MT); TN: 16-row weight tiles per warp; WK: warps per block, which
// split the block's chunks between them and add up in shared memory at the end; U: chunks per batch;
// S: pipeline stages.  Each warp streams its weights, scales and zero points through a private S-stage
// ring in shared memory with cp.async, keeping S - 1 batches in flight without holding them in
// registers.  A lane reads back only the weight vector it copied itself; scales and zero points cross
// lanes, hence the warp barrier.  Activations come from L1/L2 (small, shared by all blocks), or, with XS
// (for larger M, where every warp re-reading them from L2 costs more than the weights), the warps of a
// block take different tiles over the same chunks and the block stages the activations in the same ring
// (cp.async, block barrier).
// A warp spends ~100 instructions per 512 bytes of weights, so the loop is written to keep that count down
// (though halving it, in w4a16_gemv below, gained only 6% at batch 1 on an H200: there a fixed ~3 us of
// start-up and tail per launch and under one wave of blocks weigh more than instruction issue):
// chunk -> group is a shift (group_shift = log2(group_size / 64)), addresses are base + constant offsets,
// and for small M the scale is applied once per chunk to the fp32 MMA result (POST_SCALE) instead of to
// every weight pair.
template <int MT, int TN, int WK, int U, int S, bool XS>
__global__ void __launch_bounds__(32 * WK) w4a16_mma(
        const u16* __restrict__ x, const U4* __restrict__ qw, const u16* __restrict__ scales,
        const u16* __restrict__ zeros, void* __restrict__ out, int M, int N, int K, int group_shift,
        int chunks_per_split, int out_fp32) {
    constexpr bool POST_SCALE = MT <= 2;  // 4 fp32 FMAs per (tile, 8 rows, chunk) vs 16 HMUL2 per (tile, chunk)
    constexpr int PER_WARP = TN * MT * 4 * 32;  // accumulators per warp, for the final reduction
    constexpr int W_STAGE = U * TN * 32;        // U4 per stage per warp
    constexpr int S_STAGE = U * TN * 16;        // u32 per stage per warp
    constexpr int X_ROW = 72;                   // bf16 per shared activation row: 64 + 8 pad (no bank conflicts)
    constexpr int X_STAGE = XS ? U * MT * 8 * X_ROW : 0;  // bf16 per stage (whole block)
    constexpr int RING_BYTES = WK * S * (W_STAGE * 16 + S_STAGE * 4) + S * X_STAGE * 2;
    constexpr int RED_BYTES = XS ? 0 : (WK - 1) * PER_WARP * 4;
    constexpr int STEP = XS ? U : WK * U;  // chunks between a warp's consecutive batches
    __shared__ __align__(16) unsigned char smem[RING_BYTES > RED_BYTES ? RING_BYTES : RED_BYTES];
    U4* wq = reinterpret_cast<U4*>(smem);                                // [warp][stage][u][tn][lane]
    u32* sz = reinterpret_cast<u32*>(smem + WK * S * W_STAGE * 16);     // [warp][stage][u][tn][16]
    u16* xs = reinterpret_cast<u16*>(smem + WK * S * (W_STAGE * 16 + S_STAGE * 4));  // [stage][u][row][X_ROW]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 6, n_tiles = N >> 4;
    const int nt0 = (XS ? blockIdx.x * WK + warp : blockIdx.x) * TN;  // XS: warps split N, else K
    const int split = blockIdx.y;
    const int c_begin = split * chunks_per_split;
    const int c_end = imin(c_begin + chunks_per_split, n_chunks);
    const int first = XS ? c_begin : c_begin + warp;  // this warp's chunks: first + STEP / U * j
    const int n_batches = c_end > first ? (c_end - first + STEP - 1) / STEP : 0;

    // per-tile sources at this warp's first chunk (tiles past N are clamped: computed, never stored)
    const U4* wsrc[TN];
    const u16* ssrc[TN];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        const int tile = imin(nt0 + tn, n_tiles - 1);
        wsrc[tn] = qw + ((u64)tile * n_chunks + first) * 32 + lane;
        ssrc[tn] = (lane < 8 ? scales : zeros) + tile * 16 + 2 * (lane & 7);  // lanes 0-15: one pair each
    }
    const u32 wdst = smem_addr(wq + warp * S * W_STAGE + lane);
    const u32 sdst = smem_addr(sz + warp * S * S_STAGE + (lane & 15));
    const U4* wown = wq + warp * S * W_STAGE + lane;
    const u16* sown = reinterpret_cast<const u16*>(sz + warp * S * S_STAGE);
    const u16* xrow[MT];  // row mt * 8 + g, this lane's 16 k of each chunk
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) xrow[mt] = x + (u64)imin(mt * 8 + g, M - 1) * K + 16 * t;

    float acc[TN][MT][4];
    zero_acc(acc);

    constexpr int CSTRIDE = XS ? 1 : WK;  // chunks between u and u + 1 within a batch
    auto issue = [&](int batch, int stage) {  // always commits a group (empty past the end): waits count right
        if (batch < n_batches) {
            const int cb = first + batch * STEP;
            if (XS) {  // the block's activations for this batch: U chunks x MT*8 rows x 8 pieces of 16 bytes
                for (int p = threadIdx.x; p < U * MT * 64; p += WK * 32) {
                    const int u = p / (MT * 64), row = (p >> 3) % (MT * 8), piece = p & 7;
                    const int c = imin(cb + u, c_end - 1);
                    const u16* src = x + (u64)imin(row, M - 1) * K + (c << 6) + piece * 8;
                    cp_async16_zfill(smem_addr(xs + ((stage * U + u) * MT * 8 + row) * X_ROW + piece * 8), src,
                                     row < M ? 16 : 0);  // rows past M: zeros
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = cb + u * CSTRIDE;
                if (c < c_end) {
                    const u64 sz_off = (u64)(c >> group_shift) * N;
#pragma unroll
                    for (int tn = 0; tn < TN; ++tn) {
                        cp_async16(wdst + (stage * W_STAGE + (u * TN + tn) * 32) * 16, wsrc[tn] + (batch * STEP + u * CSTRIDE) * 32);
                        if (lane < 16) cp_async4(sdst + (stage * S_STAGE + (u * TN + tn) * 16) * 4, ssrc[tn] + sz_off);
                    }
                }
            }
        }
        cp_async_commit();
    };

#pragma unroll
    for (int b = 0; b < S - 1; ++b) issue(b, b);
    int stage = 0, next_stage = S - 1;
    for (int b = 0; b < n_batches; ++b) {
        cp_async_wait<S - 2>();  // batch b has landed (this thread's copies) ...
        if (XS) __syncthreads();  // ... and every thread's; also: everyone is done reading batch b - 1
        else __syncwarp();
        issue(b + S - 1, next_stage);  // into the stage batch b - 1 used
        const int cb = first + b * STEP;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = cb + u * CSTRIDE;
            if (c >= c_end) break;
            U4 xv[MT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const U4* src = reinterpret_cast<const U4*>(xrow[mt] + (c << 6));
                if (XS) {
                    const U4* sh = reinterpret_cast<const U4*>(xs + ((stage * U + u) * MT * 8 + mt * 8 + g) * X_ROW + 16 * t);
                    xv[mt][0] = sh[0];
                    xv[mt][1] = sh[1];
                } else if (mt * 8 + g < M) {
                    xv[mt][0] = load_cached(src);
                    xv[mt][1] = load_cached(src + 1);
                } else {
                    xv[mt][0].x = xv[mt][0].y = xv[mt][0].z = xv[mt][0].w = 0u;
                    xv[mt][1] = xv[mt][0];
                }
            }
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
                const U4 wv = wown[stage * W_STAGE + (u * TN + tn) * 32];
                const u16* p = sown + (stage * S_STAGE + (u * TN + tn) * 16) * 2;  // 16 scales, 16 zeros
                const GroupParams gp = group_params(p, g);
                float part[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) part[mt][i] = 0.f;
#pragma unroll
                for (int kt = 0; kt < 4; ++kt) {
                    u32 a[4];
                    dequant_fragment<!POST_SCALE>(word_of(wv, kt), gp.z_lo, gp.z_hi, gp.s_lo, gp.s_hi, a);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        const U4& xq = xv[mt][kt >> 1];
                        mma16816(POST_SCALE ? part[mt] : acc[tn][mt], a[0], a[1], a[2], a[3],
                                 (kt & 1) ? xq.z : xq.x, (kt & 1) ? xq.w : xq.y);
                    }
                }
                if (POST_SCALE) {
                    const float f0 = bf16_to_float((u16)gp.s_lo), f1 = bf16_to_float((u16)gp.s_hi);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        acc[tn][mt][0] += f0 * part[mt][0];
                        acc[tn][mt][1] += f0 * part[mt][1];
                        acc[tn][mt][2] += f1 * part[mt][2];
                        acc[tn][mt][3] += f1 * part[mt][3];
                    }
                }
            }
        }
        stage = stage + 1 == S ? 0 : stage + 1;
        next_stage = next_stage + 1 == S ? 0 : next_stage + 1;
    }
    cp_async_wait<0>();

    if (!XS && !sum_into_warp0<WK, PER_WARP>(&acc[0][0][0], reinterpret_cast<float*>(smem), warp, lane)) return;
    store_tiles(acc, out, split, M, N, nt0, 1, n_tiles, g, t, out_fp32);
}

// Batch 1..8 (decode at small batch): the same fragments and MMA, with the zero point folded out of the
// weights so that de-quantization is one shift and one LOP3 per pair of weights.
// The MMA multiplies the raw 128 + q (what the LOP3 makes) and a second MMA with all-ones weights sums the
// activations, so per group and row  sum (q - z) x = sum (128 + q) x - (128 + z) sum x,  and the scale
// and zero point are applied once per group to the fp32 sums:  acc += s * (part - (128 + z) * xsum).
// That drops w4a16_mma's bf16 subtraction per pair (a third of the de-quantization) and its per-chunk
// scale set-up; the ones-MMA costs 4 MMAs per chunk per warp, shared by the warp's TN tiles.  (Both sums
// are exact products accumulated in fp32; the subtraction loses a few fp32 ulps of the 128 x sum |x|
// term, far below bf16's resolution of the result.)
// Weights, scales and zero points stream through a private S-stage cp.async ring per warp, as in
// w4a16_mma; the activations are loaded into registers one batch ahead.  A batch is U quantization
// groups of CPG 64-deep chunks (CPG a template parameter, so the group flush is placed at compile time).
// Activation rows past M read row M - 1: their products land in output columns that are never stored.
// Warps of a block split the split's groups batch by batch and add up through shared memory at the end.
template <int B>
struct GemvX { U4 v[B][2]; };  // one batch of activations: chunk, 16-byte half of the lane's 16 k

// PRO and EPI: the decode-step fusions above (gamma, resid and eps_bits, the fp32 eps's bits, serve them).
template <int TN, int U, int WK, int S, int CPG, int PRO, int EPI>
__global__ void __launch_bounds__(32 * WK) w4a16_gemv(
        const u16* __restrict__ x, const U4* __restrict__ qw, const u16* __restrict__ scales,
        const u16* __restrict__ zeros, void* __restrict__ out, int M, int N, int K, int /* group_shift: CPG */,
        int chunks_per_split, int out_fp32, const u16* __restrict__ gamma, const u16* __restrict__ resid,
        int eps_bits) {
    constexpr int B = U * CPG;                 // chunks per batch
    constexpr int W_STAGE = B * TN * 32;       // U4 per stage per warp
    constexpr int P_STAGE = U * TN * 16;       // u32 per stage per warp: 16 scales, then 16 zero points
    constexpr int RING = WK * S * (W_STAGE * 16 + P_STAGE * 4);
    constexpr int PER_WARP = TN * 4 * 32;      // accumulators per warp, for the final reduction
    constexpr int RED = (WK - 1) * PER_WARP * 4;
    __shared__ __align__(16) unsigned char smem[RING > RED ? RING : RED];
    __shared__ float sumsq_smem[PRO == PRO_NORM ? 8 * WK : 1];  // rows' sums of squares per warp
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 6, n_tiles = N >> 4;
    const int nt0 = blockIdx.x * TN;
    const int g_begin = blockIdx.y * (chunks_per_split / CPG);
    const int g_end = imin(g_begin + chunks_per_split / CPG, n_chunks / CPG);
    const int batches = (g_end - g_begin + U - 1) / U;  // of the whole block
    const int n_batches = batches > warp ? (batches - warp + WK - 1) / WK : 0;
    const int first = g_begin + warp * U;  // this warp's first group; then every WK * U groups

    const U4* wsrc[TN];
    const u16* psrc[TN];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        const int tile = imin(nt0 + tn, n_tiles - 1);  // tiles past N: computed, never stored
        wsrc[tn] = qw + ((u64)tile * n_chunks + (u64)first * CPG) * 32 + lane;
        psrc[tn] = (lane < 8 ? scales : zeros) + (u64)first * N + tile * 16 + 2 * (lane & 7);  // lanes 0-15
    }
    const u16* xsrc = x + (u64)imin(g, M - 1) * K + (u64)first * CPG * 64 + 16 * t;
    const u16* gsrc = gamma + (u64)first * CPG * 64 + 16 * t;  // PRO_NORM: gamma at the same k
    float ss = 0.f;  // PRO_NORM: sum of squares of row g over the activations this lane loads
    u16 rv[TN][2][2];  // EPI_RESIDUAL: warp 0's resid values, loaded now, used at the store
    if (EPI == EPI_RESIDUAL && warp == 0) load_resid(resid, M, N, nt0, n_tiles, g, t, rv);
    const u64 w_step = (u64)WK * B * 32, p_step = (u64)WK * U * N, x_step = (u64)WK * B * 64;
    U4* ring_w = reinterpret_cast<U4*>(smem) + warp * S * W_STAGE;
    u32* ring_p = reinterpret_cast<u32*>(smem + WK * S * W_STAGE * 16) + warp * S * P_STAGE;
    const u32 wdst = smem_addr(ring_w + lane), pdst = smem_addr(ring_p + (lane & 15));

    auto issue = [&](int batch, int stage) {  // always commits a group (empty past the end): waits count right
        if (batch < n_batches) {
            const int g0 = first + batch * WK * U;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (g0 + u < g_end) {
#pragma unroll
                    for (int tn = 0; tn < TN; ++tn) {
#pragma unroll
                        for (int cc = 0; cc < CPG; ++cc) {
                            const int c = u * CPG + cc;
                            cp_async16(wdst + (stage * W_STAGE + (c * TN + tn) * 32) * 16, wsrc[tn] + c * 32);
                        }
                        if (lane < 16) cp_async4(pdst + (stage * P_STAGE + (u * TN + tn) * 16) * 4, psrc[tn] + u * N);
                    }
                }
            }
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
                wsrc[tn] += w_step;
                psrc[tn] += p_step;
            }
        }
        cp_async_commit();
    };
    auto load_x = [&](GemvX<B>& xb, int batch) {
        if (batch >= n_batches) return;
        const int g0 = first + batch * WK * U;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (g0 + u < g_end) {
#pragma unroll
                for (int cc = 0; cc < CPG; ++cc) {
                    const U4* src = reinterpret_cast<const U4*>(xsrc + (u * CPG + cc) * 64);
                    xb.v[u * CPG + cc][0] = load_cached(src);
                    xb.v[u * CPG + cc][1] = load_cached(src + 1);
                    if (PRO == PRO_NORM) {
                        const U4* gs = reinterpret_cast<const U4*>(gsrc + (u * CPG + cc) * 64);
                        gamma_u4(xb.v[u * CPG + cc][0], load_cached(gs), ss);
                        gamma_u4(xb.v[u * CPG + cc][1], load_cached(gs + 1), ss);
                    }
                }
            }
        }
        xsrc += x_step;
        gsrc += x_step;
    };

    float acc[TN][1][4];
    zero_acc(acc);

    auto compute = [&](const GemvX<B>& xb, int batch, int stage) {
        const int g0 = first + batch * WK * U;
        const U4* wv = ring_w + stage * W_STAGE + lane;
        const u16* pv = reinterpret_cast<const u16*>(ring_p + stage * P_STAGE);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (g0 + u >= g_end) break;
            // With one tile per warp its MMAs form one chain of dependent accumulations (plus the all-ones one), and
            // the warp waits on it: two accumulators per chain (even / odd K step) halve its depth (H200, M = 1: wo
            // 6.43 -> 6.23 us, w2 12.49 -> 11.71); with more tiles the chains already interleave (wqkv got slower).
            constexpr int NACC = TN == 1 ? 2 : 1;
            float part[TN][NACC][4], xs2[NACC][4];
#pragma unroll
            for (int cc = 0; cc < CPG; ++cc) {
                const int c = u * CPG + cc;
                U4 w[TN];
#pragma unroll
                for (int tn = 0; tn < TN; ++tn) w[tn] = wv[(c * TN + tn) * 32];
#pragma unroll
                for (int kt = 0; kt < 4; ++kt) {
                    const U4& xq = xb.v[c][kt >> 1];
                    const u32 b0 = (kt & 1) ? xq.z : xq.x, b1 = (kt & 1) ? xq.w : xq.y;
                    const int h = kt % NACC;
                    if (cc == 0 && kt < NACC) mma16816_zero(xs2[h], BF16X2_ONE, BF16X2_ONE, BF16X2_ONE, BF16X2_ONE, b0, b1);
                    else mma16816(xs2[h], BF16X2_ONE, BF16X2_ONE, BF16X2_ONE, BF16X2_ONE, b0, b1);
#pragma unroll
                    for (int tn = 0; tn < TN; ++tn) {
                        const u32 word = word_of(w[tn], kt);
                        u32 a[4];
#pragma unroll
                        for (int i = 0; i < 4; ++i) a[i] = and_or(word >> (4 * i), 0x000F000Fu, BF16X2_128);
                        if (cc == 0 && kt < NACC) mma16816_zero(part[tn][h], a[0], a[1], a[2], a[3], b0, b1);
                        else mma16816(part[tn][h], a[0], a[1], a[2], a[3], b0, b1);
                    }
                }
            }
            float xs[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) xs[i] = NACC == 1 ? xs2[0][i] : xs2[0][i] + xs2[NACC - 1][i];
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {  // acc += s * (part - (128 + z) * xsum), rows g and g + 8
                const u16* p = pv + (u * TN + tn) * 32;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float s = bf16_to_float(p[g + 8 * h]);
                    const float nz = __fmaf_rn(bf16_to_float(p[16 + g + 8 * h]), -1.f, -128.f);
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const int i = 2 * h + j;
                        const float pt = NACC == 1 ? part[tn][0][i] : part[tn][0][i] + part[tn][NACC - 1][i];
                        acc[tn][0][i] = __fmaf_rn(s, __fmaf_rn(nz, xs[i], pt), acc[tn][0][i]);
                    }
                }
            }
        }
    };

#pragma unroll
    for (int b = 0; b < S - 1; ++b) issue(b, b);
    GemvX<B> x0, x1;  // activations double-buffered in registers
    load_x(x0, 0);
    int stage = 0, next_stage = S - 1;
    auto step = [&](int b, const GemvX<B>& cur, GemvX<B>& nxt) {
        cp_async_wait<S - 2>();  // batch b has landed (this thread's copies) ...
        __syncwarp();            // ... and the whole warp's (scales cross lanes); batch b - 1 is read
        issue(b + S - 1, next_stage);
        load_x(nxt, b + 1);
        compute(cur, b, stage);
        stage = stage + 1 == S ? 0 : stage + 1;
        next_stage = next_stage + 1 == S ? 0 : next_stage + 1;
    };
    for (int b = 0; b < n_batches; b += 2) {
        step(b, x0, x1);
        if (b + 1 >= n_batches) break;
        step(b + 1, x1, x0);
    }
    cp_async_wait<0>();

    if (PRO == PRO_NORM) publish_sumsq(ss, sumsq_smem, warp, lane);
    if (!sum_into_warp0<WK, PER_WARP>(&acc[0][0][0], reinterpret_cast<float*>(smem), warp, lane)) return;
    if (PRO == PRO_NORM) scale_by_rstd<WK>(acc, sumsq_smem, K, __int_as_float(eps_bits), M, t);
    store_gemv<EPI>(acc, out, rv, blockIdx.y, M, N, nt0, n_tiles, g, t, out_fp32);
}

// W [N, K] bf16 = (q - zero) * scale from the mma layout, for prefill (the product then goes to cuBLAS).
// One warp per (16-row tile, 64-deep chunk); a lane writes 16 consecutive k of rows g and g + 8.
extern "C" __global__ void __launch_bounds__(128) w4a16_mma_dequant(
        const U4* __restrict__ qw, const u16* __restrict__ scales, const u16* __restrict__ zeros,
        u16* __restrict__ w_out, int N, int K, int group_size) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 6;
    const long long idx = (long long)blockIdx.x * 4 + warp;
    if (idx >= (long long)(N >> 4) * n_chunks) return;
    const int nt = (int)(idx / n_chunks), c = (int)(idx % n_chunks);
    const U4 v = load_stream(qw + idx * 32 + lane);
    const int grp = (c << 6) / group_size;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int n = nt * 16 + g + 8 * h;
        const float s = bf16_to_float(scales[(u64)grp * N + n]);
        const float z = bf16_to_float(zeros[(u64)grp * N + n]);
        u32 packed[8];  // 16 bf16: k = 16t + 4kt + slot
#pragma unroll
        for (int kt = 0; kt < 4; ++kt) {
            const u32 word = word_of(v, kt);
            u16 e[4];
#pragma unroll
            for (int slot = 0; slot < 4; ++slot) {
                const int r = h + 2 * (slot >> 1) + 4 * (slot & 1);
                const float q = (float)((word >> (4 * r)) & 0xFu);
                e[slot] = float_to_bf16((q - z) * s);
            }
            packed[2 * kt] = e[0] | ((u32)e[1] << 16);
            packed[2 * kt + 1] = e[2] | ((u32)e[3] << 16);
        }
        U4* dst = reinterpret_cast<U4*>(w_out + (u64)n * K + (c << 6) + 16 * t);
        dst[0] = U4{packed[0], packed[1], packed[2], packed[3]};
        dst[1] = U4{packed[4], packed[5], packed[6], packed[7]};
    }
}


// ------------------------------------------------------------------------------------------------------
// Hopper (sm_90a): the same weight layout through wgmma, for decode batches of 9..64 rows.
//
// mma.sync issues one m16n8k16 per 4 weight pairs per 8 activation rows, so at M = 64 a warp spends more
// issue slots on MMAs and activation loads than the weights take to arrive, and the kernel trails cuBLAS.
// wgmma.m64nNk16 multiplies a warpgroup's 64 weight rows (4 warps x one 16-row tile, A from registers in
// exactly the mma.m16n8k16 fragment layout, so the de-quantization is unchanged) by N = 8 MT activation
// rows that it reads itself from shared memory, asynchronously, while the warps de-quantize the next batch.
// The accumulator fragment of each warp is that of MT m16n8 tiles, so the output store is shared too.
//
// B (the activations, K-major) sits in shared memory as 8x8 "core matrices" (8 rows x 16 bytes), one block
// of MT x 2 of them per 16-deep K step, in the K order of the weight layout (see the top of this file):
// virtual column c of K step kt of a chunk is k = 16 (c % 8 / 2) + 4 kt + (c % 2) + 2 (c / 8), so the
// activations cannot be copied in 16-byte pieces: each thread loads 16-byte pieces into registers and
// stores their four 4-byte words to their scattered places (4-byte cp.async did the same with three times
// the instructions).  The strides below (core matrices 144 / 288 bytes apart, K steps 32 mod 128 apart)
// put the 32 words a warp stores at once in 32 different banks.
// The loop is still latency-bound at M = 64 (Nsight Compute on an H200: 12 resident warps per SM, about half
// the issue slots used, 19% of DRAM bandwidth), so a producer warp with mbarriers would be the next step.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

template <int MT> struct Wgmma;
template <> struct Wgmma<1> {  // m64n8k16
    static __device__ __forceinline__ void run(float (&d)[1][4], const u32 (&a)[4], u64 desc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, "
                     "{%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
};
template <> struct Wgmma<2> {  // m64n16k16
    static __device__ __forceinline__ void run(float (&d)[2][4], const u32 (&a)[4], u64 desc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, "
                     "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
};
template <> struct Wgmma<3> {  // m64n24k16
    static __device__ __forceinline__ void run(float (&d)[3][4], const u32 (&a)[4], u64 desc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n24k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, "
                     "{%12, %13, %14, %15}, %16, p, 1, 1, 0;\n}"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
};
template <> struct Wgmma<4> {  // m64n32k16
    static __device__ __forceinline__ void run(float (&d)[4][4], const u32 (&a)[4], u64 desc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
                     "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
};
template <> struct Wgmma<5> {  // m64n40k16
    static __device__ __forceinline__ void run(float (&d)[5][4], const u32 (&a)[4], u64 desc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n40k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19}, "
                     "{%20, %21, %22, %23}, %24, p, 1, 1, 0;\n}"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
};
template <> struct Wgmma<6> {  // m64n48k16
    static __device__ __forceinline__ void run(float (&d)[6][4], const u32 (&a)[4], u64 desc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n48k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23}, "
                     "{%24, %25, %26, %27}, %28, p, 1, 1, 0;\n}"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
};
template <> struct Wgmma<7> {  // m64n56k16
    static __device__ __forceinline__ void run(float (&d)[7][4], const u32 (&a)[4], u64 desc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n56k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27}, "
                     "{%28, %29, %30, %31}, %32, p, 1, 1, 0;\n}"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
};
template <> struct Wgmma<8> {  // m64n64k16
    static __device__ __forceinline__ void run(float (&d)[8][4], const u32 (&a)[4], u64 desc) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                     "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
    }
};

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r) :: "memory"); }


// out[split, m, n] = sum over this split's K chunks of x[m, k] * W[n, k]; WG warpgroups per block share the
// staged activations; warp w of warpgroup v owns the 16-row tiles blockIdx.x * 4 TN WG + 4 (TN v + tn) + w
// (tn < TN), so each wgmma covers 64 consecutive rows.
// U chunks per pipeline batch, S shared-memory stages with S - 2 batches of copies in flight: a stage is
// refilled only after the wgmmas that read it have retired (wait_group 1 at the end of the next batch).
template <int MT, int TN, int U, int S, int WG>
__global__ void __launch_bounds__(128 * WG) w4a16_wgmma(
        const u16* __restrict__ x, const U4* __restrict__ qw, const u16* __restrict__ scales,
        const u16* __restrict__ zeros, void* __restrict__ out, int M, int N, int K, int group_shift,
        int chunks_per_split, int out_fp32) {
    static_assert(S >= 3, "S - 2 batches in flight");
    constexpr int WARPS = 4 * WG;
    constexpr int LBO = 144, SBO = 288;  // bytes between core matrices along K / along the 8-row groups
    constexpr int KT = ((MT * SBO - 32 + 127) / 128) * 128 + 32;  // bytes per K step, = 32 mod 128
    constexpr int X_CHUNK = 4 * KT;                                 // bytes of activations per chunk
    constexpr int W_STAGE = U * TN * 32;                            // U4 per stage per warp
    constexpr int S_STAGE = U * TN * 16;                            // u32 per stage per warp
    constexpr int X_BYTES = S * U * X_CHUNK;
    constexpr int W_BYTES = WARPS * S * W_STAGE * 16;
    extern __shared__ __align__(128) unsigned char smem[];
    U4* wq = reinterpret_cast<U4*>(smem + X_BYTES);               // [warp][stage][u][tn][lane]
    u32* sz = reinterpret_cast<u32*>(smem + X_BYTES + W_BYTES);   // [warp][stage][u][tn][16]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 6, n_tiles = N >> 4;
    const int tile0 = blockIdx.x * 4 * TN * WG + (warp >> 2) * 4 * TN + (warp & 3);
    const int c_begin = blockIdx.y * chunks_per_split;
    const int c_end = imin(c_begin + chunks_per_split, n_chunks);
    const int n_batches = c_end > c_begin ? (c_end - c_begin + U - 1) / U : 0;

    const U4* wnext[TN];  // this lane's weight vector of the next chunk to copy, per tile
    const u16* ssrc[TN];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        const int tile = imin(tile0 + 4 * tn, n_tiles - 1);  // tiles past N: computed, never stored
        wnext[tn] = qw + ((u64)tile * n_chunks + c_begin) * 32 + lane;
        ssrc[tn] = (lane < 8 ? scales : zeros) + tile * 16 + 2 * (lane & 7);
    }
    const u32 wdst = smem_addr(wq + warp * S * W_STAGE + lane);
    const u32 sdst = smem_addr(sz + warp * S * S_STAGE + (lane & 15));
    const U4* wown = wq + warp * S * W_STAGE + lane;
    const u16* sown = reinterpret_cast<const u16*>(sz + warp * S * S_STAGE);
    // Activations go through registers one batch ahead: 16-byte pieces (8 k) of the chunk rows are loaded at
    // the top of batch b's iteration for batch b + 1 and scattered at its bottom into batch b + 1's stage,
    // word w of piece j to K step 2 (j & 1) + (w >> 1), core matrix w & 1, byte 4 (j >> 1) of the row (the
    // permutation at the top of this file; bank-conflict free).  Thread tid owns piece tid % 8 of rows
    // tid / 8 + 16 WG i; rows past M are zeros.
    constexpr int THREADS = 128 * WG;
    constexpr int PIECES = (64 * MT + THREADS - 1) / THREADS;  // per thread per chunk
    constexpr int ROW_STEP = THREADS / 8;                       // a multiple of 8: same row within its group
    const int piece = threadIdx.x & 7, row0 = threadIdx.x >> 3;
    const u32 x_base = smem_addr(smem);
    const int x_thread = (row0 >> 3) * SBO + (row0 & 7) * 16 + 2 * (piece & 1) * KT + 4 * (piece >> 1);
    const u16* x_thread_src = x + (u64)row0 * K + (u64)c_begin * 64 + 8 * piece;  // row0, chunk c_begin
    const u64 x_step = (u64)ROW_STEP * K;
    U4 xr[U][PIECES];
    auto load_x = [&](int batch) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = imin(batch * U + u, c_end - 1 - c_begin);  // past the end: a valid chunk, unused
            const u16* src = x_thread_src + c * 64;
#pragma unroll
            for (int i = 0; i < PIECES; ++i) {
                if (row0 + ROW_STEP * i < M) xr[u][i] = load_cached(reinterpret_cast<const U4*>(src));
                else xr[u][i].x = xr[u][i].y = xr[u][i].z = xr[u][i].w = 0u;
                src += x_step;
            }
        }
    };
    auto store_x = [&](int stage) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int i = 0; i < PIECES; ++i) {
                if (row0 + ROW_STEP * i >= 8 * MT) break;
                unsigned char* at = smem + (stage * U + u) * X_CHUNK + x_thread + (ROW_STEP * i / 8) * SBO;
#pragma unroll
                for (int w = 0; w < 4; ++w)
                    *reinterpret_cast<u32*>(at + (w >> 1) * KT + (w & 1) * LBO) = word_of(xr[u][i], w);
            }
    };
    int c_next = c_begin;

    auto issue = [&](int stage) {  // weights of the next U chunks; always commits a group (empty past the end)
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c_next < c_end) {
                const u64 sz_off = (u64)(c_next >> group_shift) * N;
#pragma unroll
                for (int tn = 0; tn < TN; ++tn) {
                    cp_async16(wdst + (stage * W_STAGE + (u * TN + tn) * 32) * 16, wnext[tn]);
                    wnext[tn] += 32;
                    if (lane < 16) cp_async4(sdst + (stage * S_STAGE + (u * TN + tn) * 16) * 4, ssrc[tn] + sz_off);
                }
                ++c_next;
            }
        }
        cp_async_commit();
    };

    float acc[TN][MT][4];
    zero_acc(acc);

    // descriptor: start address >> 4 (bits 0-13), LBO >> 4 (16-29), SBO >> 4 (32-45), no swizzle
    const u64 desc0 = ((u64)(SBO >> 4) << 32) | ((u64)(LBO >> 4) << 16);
    if (n_batches > 0) {
        load_x(0);
        store_x(0);
    }
#pragma unroll
    for (int b = 0; b < S - 2; ++b) issue(b);
    int stage = 0, next_stage = S - 2;
    for (int b = 0; b < n_batches; ++b) {
        if (b + 1 < n_batches) load_x(b + 1);
        cp_async_wait<S - 3>();  // batch b's weights have landed (this thread's copies) ...
        fence_proxy_async();     // ... and its activations (stored last iteration) are visible to wgmma ...
        __syncthreads();         // ... for every thread; and batch b - 2's wgmmas have retired
        issue(next_stage);  // batch b + S - 2, into the stage batch b - 2 used
        u32 a[U][TN][4][4];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c_begin + b * U + u >= c_end) break;
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
                const U4 wv = wown[stage * W_STAGE + (u * TN + tn) * 32];
                const u16* p = sown + (stage * S_STAGE + (u * TN + tn) * 16) * 2;  // 16 scales, 16 zeros
                const GroupParams gp = group_params(p, g);
#pragma unroll
                for (int kt = 0; kt < 4; ++kt)
                    dequant_fragment<true>(word_of(wv, kt), gp.z_lo, gp.z_hi, gp.s_lo, gp.s_hi, a[u][tn][kt]);
            }
        }
        wgmma_fence();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c_begin + b * U + u >= c_end) break;
#pragma unroll
            for (int kt = 0; kt < 4; ++kt) {
                const u64 desc = desc0 | (u64)(((x_base + (stage * U + u) * X_CHUNK + kt * KT) & 0x3FFFF) >> 4);
#pragma unroll
                for (int tn = 0; tn < TN; ++tn) Wgmma<MT>::run(acc[tn], a[u][tn][kt], desc);
            }
        }
        wgmma_commit();
        wgmma_wait<1>();  // batch b - 1's wgmmas retired: every warpgroup's, once all pass the next barrier
        stage = stage + 1 == S ? 0 : stage + 1;
        if (b + 1 < n_batches) store_x(stage);  // batch b + 1, into the stage batch b + 1 - S (<= b - 2) used
        next_stage = next_stage + 1 == S ? 0 : next_stage + 1;
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
#pragma unroll
    for (int tn = 0; tn < TN; ++tn)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) pin(acc[tn][mt][i]);
    store_tiles(acc, out, blockIdx.y, M, N, tile0, 4, n_tiles, g, t, out_fp32);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL


// ------------------------------------------------------------------------------------------------------
// bf16 weights (nn.Linear's row-major [N, K]) at batch <= 8, for the fp16 baseline: cuBLAS's GEMV reads
// 4096 x 4096 at 2.6 TB/s and 4096 x 11008 at 3.4 TB/s on an H200 (the copy test moves 4.2), and the
// baseline must itself run near the roofline or int4's speed-up is overstated.  Same tiling as
// w4a16_gemv: a warp takes TN 16-row tiles, 64-deep chunks, one mma.m16n8k16 per 16-deep step with the
// weights as A.  Within a chunk, lane (g, t) reads k = 8t .. 8t+7 and 32+8t .. 32+8t+7 of rows g and g + 8
// (so each load instruction covers 64 contiguous bytes of 8 rows) and uses word s of each piece in K step
// s; the activations are read in the same K order, which leaves the dot products unchanged.  Loads go
// straight to registers, one batch of B chunks ahead; warps of a block split K.
// PRO and EPI: the decode-step fusions, as in w4a16_gemv.
template <int TN, int B, int WK, int PRO, int EPI>
__global__ void __launch_bounds__(32 * WK) bf16_gemv(
        const u16* __restrict__ x, const u16* __restrict__ w, void* __restrict__ out, int M, int N, int K,
        int chunks_per_split, int out_fp32, const u16* __restrict__ gamma, const u16* __restrict__ resid,
        int eps_bits) {
    constexpr int PER_WARP = TN * 4 * 32;
    __shared__ __align__(16) float red[WK > 1 ? (WK - 1) * PER_WARP : 1];
    __shared__ float sumsq_smem[PRO == PRO_NORM ? 8 * WK : 1];  // rows' sums of squares per warp
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 6, n_tiles = N >> 4;
    const int nt0 = blockIdx.x * TN;
    const int c_begin = blockIdx.y * chunks_per_split;
    const int c_end = imin(c_begin + chunks_per_split, n_chunks);
    const int batches = (c_end - c_begin + B - 1) / B;
    const int n_batches = batches > warp ? (batches - warp + WK - 1) / WK : 0;
    const int first = c_begin + warp * B;  // this warp's first chunk; then every WK * B chunks

    const U4* wsrc[TN][2];  // rows g and g + 8 of each tile, at this lane's first piece
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        const int tile = imin(nt0 + tn, n_tiles - 1);  // tiles past N: computed, never stored
#pragma unroll
        for (int h = 0; h < 2; ++h)
            wsrc[tn][h] = reinterpret_cast<const U4*>(w + (u64)(tile * 16 + g + 8 * h) * K + (u64)first * 64) + t;
    }
    const U4* xsrc = reinterpret_cast<const U4*>(x + (u64)imin(g, M - 1) * K + (u64)first * 64) + t;
    const U4* gsrc = reinterpret_cast<const U4*>(gamma + (u64)first * 64) + t;  // PRO_NORM: same k
    const int step = WK * B * 8;  // U4 between a warp's consecutive batches
    float ss = 0.f;  // PRO_NORM: sum of squares of row g over the activations this lane loads
    u16 rv[TN][2][2];  // EPI_RESIDUAL: warp 0's resid values, loaded now, used at the store
    if (EPI == EPI_RESIDUAL && warp == 0) load_resid(resid, M, N, nt0, n_tiles, g, t, rv);

    struct Batch { U4 w[B][TN][2][2]; U4 x[B][2]; U4 gm[B][2]; };  // gm: gamma (PRO_NORM)
    auto load = [&](Batch& bt, int batch) {
        if (batch >= n_batches) return;
        const int c0 = first + batch * WK * B;
#pragma unroll
        for (int c = 0; c < B; ++c)
            if (c0 + c < c_end) {
#pragma unroll
                for (int tn = 0; tn < TN; ++tn)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int j = 0; j < 2; ++j) bt.w[c][tn][h][j] = load_stream(wsrc[tn][h] + c * 8 + 4 * j);
                bt.x[c][0] = load_cached(xsrc + c * 8);
                bt.x[c][1] = load_cached(xsrc + c * 8 + 4);
                if (PRO == PRO_NORM) {  // applied in compute, once the loads have landed
                    bt.gm[c][0] = load_cached(gsrc + c * 8);
                    bt.gm[c][1] = load_cached(gsrc + c * 8 + 4);
                }
            }
#pragma unroll
        for (int tn = 0; tn < TN; ++tn) {
            wsrc[tn][0] += step;
            wsrc[tn][1] += step;
        }
        xsrc += step;
        gsrc += step;
    };

    float acc[TN][1][4];
    zero_acc(acc);
    auto compute = [&](const Batch& bt, int batch) {
        const int c0 = first + batch * WK * B;
#pragma unroll
        for (int c = 0; c < B; ++c) {
            if (c0 + c >= c_end) break;
            U4 xv[2] = {bt.x[c][0], bt.x[c][1]};
            if (PRO == PRO_NORM) {
                gamma_u4(xv[0], bt.gm[c][0], ss);
                gamma_u4(xv[1], bt.gm[c][1], ss);
            }
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const u32 b0 = word_of(xv[0], s), b1 = word_of(xv[1], s);
#pragma unroll
                for (int tn = 0; tn < TN; ++tn)
                    mma16816(acc[tn][0], word_of(bt.w[c][tn][0][0], s), word_of(bt.w[c][tn][1][0], s),
                             word_of(bt.w[c][tn][0][1], s), word_of(bt.w[c][tn][1][1], s), b0, b1);
            }
        }
    };

    Batch b0, b1;
    load(b0, 0);
    for (int b = 0; b < n_batches; b += 2) {
        load(b1, b + 1);
        compute(b0, b);
        if (b + 1 >= n_batches) break;
        load(b0, b + 2);
        compute(b1, b + 1);
    }

    if (PRO == PRO_NORM) publish_sumsq(ss, sumsq_smem, warp, lane);
    if (!sum_into_warp0<WK, PER_WARP>(&acc[0][0][0], red, warp, lane)) return;
    if (PRO == PRO_NORM) scale_by_rstd<WK>(acc, sumsq_smem, K, __int_as_float(eps_bits), M, t);
    store_gemv<EPI>(acc, out, rv, blockIdx.y, M, N, nt0, n_tiles, g, t, out_fp32);
}
