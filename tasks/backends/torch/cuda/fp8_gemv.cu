// FP8 W8A8 GEMV for decode batches M <= 8: e4m3 weights (row-major [N, K], one fp32 scale per row) times
// e4m3 activations (row-major [M, K], one fp32 scale per token), on the FP8 tensor cores (sm_89+).
//
// Same family as bf16_gemv in w4a16_mma.cu (compiled at run time by NVRTC, no headers, inline PTX): a warp
// takes TN 16-row weight tiles; the weights are mma.m16n8k32's A operand and the (at most 8) tokens its B
// operand, so batch 1 wastes tensor-core lanes, not bandwidth.  K is walked in 128-deep chunks (128 bytes
// of each row): lane (g = lane / 4, t = lane % 4) loads the 16 bytes at k = 16t and at 64 + 16t of rows g
// and g + 8 (each load instruction covers 8 rows x 64 contiguous bytes) and the same k of token g.  K step
// s (of 4 per chunk) takes piece p = s / 2, words j = 2 (s % 2) and j + 1 of those vectors as a0 | a2 (row g),
// a1 | a3 (row g + 8) and b0 | b1: the MMA pairs A's k = 4t + b with B's k = 4t + b, so both sides read the
// same physical k and the dot products are unchanged by the permutation.  Loads go straight to registers,
// one batch of B chunks ahead; warps of a block split K and add up in shared memory; blockIdx.y splits K
// across blocks (fp32 partials, summed by the caller).
//
// Products accumulate in fp32; the store multiplies by x_scale[m] * w_scale[n] (also for partials: the
// scale is linear, so the caller's sum is unchanged) and writes bf16 (one split) or fp32 (partials).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct __align__(16) U4 { u32 x, y, z, w; };

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

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

__device__ __forceinline__ u32 word_of(const U4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void mma_e4m3(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u16 float_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// out[split, m, n] = x_scale[m] * w_scale[n] * sum over this split's chunks of x[m, k] * w[n, k].
// TN: 16-row tiles per warp; B: 128-deep chunks per load batch; WK: warps per block (they split K).
template <int TN, int B, int WK>
__global__ void __launch_bounds__(32 * WK) fp8_gemv(
        const unsigned char* __restrict__ x, const float* __restrict__ x_scale, const unsigned char* __restrict__ w,
        const float* __restrict__ w_scale, void* __restrict__ out, int M, int N, int K, int chunks_per_split,
        int out_fp32) {
    constexpr int PER_WARP = TN * 4 * 32;
    __shared__ __align__(16) float red[WK > 1 ? (WK - 1) * PER_WARP : 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 7, n_tiles = N >> 4;
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
            wsrc[tn][h] = reinterpret_cast<const U4*>(w + (u64)(tile * 16 + g + 8 * h) * K + (u64)first * 128) + t;
    }
    const U4* xsrc = reinterpret_cast<const U4*>(x + (u64)imin(g, M - 1) * K + (u64)first * 128) + t;
    const int step = WK * B * 8;  // U4 between a warp's consecutive batches

    struct Batch { U4 w[B][TN][2][2]; U4 x[B][2]; };  // [chunk][tile][row half][piece]
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
                        for (int p = 0; p < 2; ++p) bt.w[c][tn][h][p] = load_stream(wsrc[tn][h] + c * 8 + 4 * p);
                bt.x[c][0] = load_cached(xsrc + c * 8);
                bt.x[c][1] = load_cached(xsrc + c * 8 + 4);
            }
#pragma unroll
        for (int tn = 0; tn < TN; ++tn) {
            wsrc[tn][0] += step;
            wsrc[tn][1] += step;
        }
        xsrc += step;
    };

    float acc[TN][4];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[tn][i] = 0.f;
    auto compute = [&](const Batch& bt, int batch) {
        const int c0 = first + batch * WK * B;
#pragma unroll
        for (int c = 0; c < B; ++c) {
            if (c0 + c >= c_end) break;
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int p = s >> 1, j = 2 * (s & 1);
                const u32 b0 = word_of(bt.x[c][p], j), b1 = word_of(bt.x[c][p], j + 1);
#pragma unroll
                for (int tn = 0; tn < TN; ++tn)
                    mma_e4m3(acc[tn], word_of(bt.w[c][tn][0][p], j), word_of(bt.w[c][tn][1][p], j),
                             word_of(bt.w[c][tn][0][p], j + 1), word_of(bt.w[c][tn][1][p], j + 1), b0, b1);
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

    if (WK > 1) {  // warps 1.. hand their sums to warp 0
        __syncthreads();
        float* mine = &acc[0][0];
        if (warp > 0) {
#pragma unroll
            for (int j = 0; j < PER_WARP / 32; ++j) red[((warp - 1) * PER_WARP / 32 + j) * 32 + lane] = mine[j];
        }
        __syncthreads();
        if (warp > 0) return;
        for (int w2 = 0; w2 < WK - 1; ++w2)
#pragma unroll
            for (int j = 0; j < PER_WARP / 32; ++j) mine[j] += red[(w2 * PER_WARP / 32 + j) * 32 + lane];
    }

    // C fragment: acc[i] is (n = g + 8 (i >> 1), m = 2t + (i & 1)) of the tile
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        const int tile = nt0 + tn;
        if (tile >= n_tiles) break;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = 2 * t + (i & 1), n = tile * 16 + g + 8 * (i >> 1);
            if (m >= M) continue;
            const float v = acc[tn][i] * x_scale[m] * w_scale[n];
            const u64 at = ((u64)blockIdx.y * M + m) * N + n;
            if (out_fp32) reinterpret_cast<float*>(out)[at] = v;
            else reinterpret_cast<u16*>(out)[at] = float_to_bf16(v);
        }
    }
}
