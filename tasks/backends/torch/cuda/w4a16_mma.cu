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
// De-quantization per pair of weights: one shift, one LOP3 (0x4300 | q is the bf16 128 + q), an exact
// bf16x2 subtraction of 128 + zero, and one bf16x2 multiply by the scale: w = bf16((q - z) * s), the same
// values as the reference de-quantization.  Products accumulate in fp32 in the tensor cores.

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

__device__ __forceinline__ u32 prmt(u32 a, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %1, %2;" : "=r"(d) : "r"(a), "r"(sel));
    return d;
}

// The A fragments of one K step of one 16-row tile: (q - z) * s for the lane's 8 weights.  sz packs the
// raw bf16 scale of rows g (low half) and g + 8 (high half); zz the same for the zero points.
__device__ __forceinline__ void dequant_fragment(u32 word, u32 sz, u32 zz, u32 (&a)[4]) {
    const u32 s_lo = prmt(sz, 0x1010u), s_hi = prmt(sz, 0x3232u);  // {s_g, s_g}, {s_g+8, s_g+8}
    const u32 z_lo = fma2(prmt(zz, 0x1010u), BF16X2_ONE, BF16X2_128);  // 128 + zero, exact
    const u32 z_hi = fma2(prmt(zz, 0x3232u), BF16X2_ONE, BF16X2_128);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 v = ((word >> (4 * i)) & 0x000F000Fu) | BF16X2_128;  // 128 + q, two at once
        a[i] = fma2(fma2((i & 1) ? z_hi : z_lo, BF16X2_NEG_ONE, v), (i & 1) ? s_hi : s_lo, BF16X2_NEG_ZERO);
    }
}

__device__ __forceinline__ u32 load_pair(const u16* __restrict__ p, u64 at) {  // rows g and g + 8
    return (u32)p[at] | ((u32)p[at + 8] << 16);
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

// out[split, m, n] = sum over this split's K chunks of x[m, k] * W[n, k]; activations read from global
// memory (L2) by each warp.  MT: 8-row activation tiles (M <= 8 MT); TN: 16-row weight tiles per warp;
// WK: warps per block, which split the block's chunks between them and add up in shared memory; U: chunks
// per batch.  Software-pipelined: the next batch's weights, scales and zero points are in flight while the
// current batch is de-quantized and multiplied, so a warp never waits for DRAM with nothing else queued.
template <int MT, int TN, int WK, int U>
__global__ void __launch_bounds__(32 * WK) w4a16_mma(
        const u16* __restrict__ x, const U4* __restrict__ qw, const u16* __restrict__ scales,
        const u16* __restrict__ zeros, void* __restrict__ out, int M, int N, int K, int group_size,
        int chunks_per_split, int out_fp32) {
    constexpr bool X_BATCH = MT * U <= 8;  // load a whole batch's activations at once (else chunk by chunk)
    constexpr int XU = X_BATCH ? U : 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 6, n_tiles = N >> 4;
    const int nt0 = blockIdx.x * TN;
    const int split = blockIdx.y;
    const int c_begin = split * chunks_per_split;
    const int c_end = imin(c_begin + chunks_per_split, n_chunks);

    int tile[TN];  // clamped so that every load is in bounds; tiles past N are computed, never stored
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) tile[tn] = imin(nt0 + tn, n_tiles - 1);

    float acc[TN][MT][4];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[tn][mt][i] = 0.f;

    U4 w[2][U][TN];
    u32 sz[2][U][TN], zz[2][U][TN];

    auto load_x = [&](U4 (&dst)[MT][2], int c) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int m = mt * 8 + g;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                if (m < M) {
                    dst[mt][half] = load_cached(reinterpret_cast<const U4*>(x + (u64)m * K + (c << 6) + 16 * t + 8 * half));
                } else {
                    dst[mt][half].x = dst[mt][half].y = dst[mt][half].z = dst[mt][half].w = 0u;
                }
            }
        }
    };
    auto load_batch = [&](int buf, int cb) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = imin(cb + u * WK, c_end - 1);  // past the end: a harmless re-read, never used
            const int grp = (c << 6) / group_size;
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
                w[buf][u][tn] = load_stream(qw + ((u64)tile[tn] * n_chunks + c) * 32 + lane);
                const u64 at = (u64)grp * N + tile[tn] * 16 + g;
                sz[buf][u][tn] = load_pair(scales, at);
                zz[buf][u][tn] = load_pair(zeros, at);
            }
        }
    };

    // one pipeline step: batch cb from buffer B while batch cb + WK*U loads into the other; B is a literal
    // at both (inlined) call sites, so the double buffers stay in registers (a loop-carried index would
    // put them in local memory)
    auto step = [&](const int B, int cb) {
        if (cb + WK * U < c_end) load_batch(B ^ 1, cb + WK * U);
        U4 xa[XU][MT][2];  // activations come from L1/L2: short latency, not worth double-buffering
        if (X_BATCH) {
#pragma unroll
            for (int u = 0; u < XU; ++u) load_x(xa[u], imin(cb + u * WK, c_end - 1));
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = cb + u * WK;
            if (c >= c_end) break;
            U4 xl[MT][2];
            if (!X_BATCH) load_x(xl, c);
#pragma unroll
            for (int kt = 0; kt < 4; ++kt) {
#pragma unroll
                for (int tn = 0; tn < TN; ++tn) {
                    u32 a[4];
                    dequant_fragment(word_of(w[B][u][tn], kt), sz[B][u][tn], zz[B][u][tn], a);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        const U4& xv = X_BATCH ? xa[u < XU ? u : 0][mt][kt >> 1] : xl[mt][kt >> 1];
                        mma16816(acc[tn][mt], a[0], a[1], a[2], a[3], (kt & 1) ? xv.z : xv.x, (kt & 1) ? xv.w : xv.y);
                    }
                }
            }
        }
    };
    const int stride = WK * U;
    if (c_begin + warp < c_end) load_batch(0, c_begin + warp);
    for (int cb = c_begin + warp; cb < c_end; cb += 2 * stride) {
        step(0, cb);
        if (cb + stride < c_end) step(1, cb + stride);
    }

    // warps 1.. hand their sums to warp 0 through shared memory
    constexpr int PER_WARP = TN * MT * 4 * 32;
    __shared__ float red[WK > 1 ? (WK - 1) * PER_WARP : 1];
    if (WK > 1) {
        if (warp > 0) {
#pragma unroll
            for (int tn = 0; tn < TN; ++tn)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        red[(warp - 1) * PER_WARP + ((tn * MT + mt) * 4 + i) * 32 + lane] = acc[tn][mt][i];
        }
        __syncthreads();
        if (warp > 0) return;
        for (int w2 = 0; w2 < WK - 1; ++w2)
#pragma unroll
            for (int tn = 0; tn < TN; ++tn)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        acc[tn][mt][i] += red[w2 * PER_WARP + ((tn * MT + mt) * 4 + i) * 32 + lane];
    }
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        if (nt0 + tn >= n_tiles) break;
        store_tile<MT>(acc[tn], out, split, M, N, nt0 + tn, g, t, out_fp32);
    }
}

__device__ __forceinline__ void cp_async16(u32 smem_addr, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr), "l"(src), "r"(src_bytes));
}

// The same product for larger batches (M >= 16): the NW warps of a block take different weight tiles
// (NW * TN of them) over the same K chunks, so the activations are read from L2 once per block into
// shared memory (cp.async, double-buffered one batch ahead) instead of once per warp.  Each warp keeps its
// next batch of weights, scales and zero points in flight in registers, as above.
template <int MT, int TN, int NW, int U>
__global__ void __launch_bounds__(32 * NW) w4a16_mma_xs(
        const u16* __restrict__ x, const U4* __restrict__ qw, const u16* __restrict__ scales,
        const u16* __restrict__ zeros, void* __restrict__ out, int M, int N, int K, int group_size,
        int chunks_per_split, int out_fp32) {
    constexpr int ROWS = MT * 8, STRIDE = 72;  // 64 k + 8 pad (bf16): conflict-free 16-byte fragment reads
    __shared__ __align__(16) u16 xs[2][U][ROWS][STRIDE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 6, n_tiles = N >> 4;
    const int nt0 = (blockIdx.x * NW + warp) * TN;
    const int split = blockIdx.y;
    const int c_begin = split * chunks_per_split;
    const int c_end = imin(c_begin + chunks_per_split, n_chunks);

    int tile[TN];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) tile[tn] = imin(nt0 + tn, n_tiles - 1);
    float acc[TN][MT][4];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[tn][mt][i] = 0.f;

    U4 w[2][U][TN];
    u32 sz[2][U][TN], zz[2][U][TN];
    auto load_batch = [&](int buf, int cb) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = imin(cb + u, c_end - 1);
            const int grp = (c << 6) / group_size;
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
                w[buf][u][tn] = load_stream(qw + ((u64)tile[tn] * n_chunks + c) * 32 + lane);
                const u64 at = (u64)grp * N + tile[tn] * 16 + g;
                sz[buf][u][tn] = load_pair(scales, at);
                zz[buf][u][tn] = load_pair(zeros, at);
            }
        }
    };
    auto copy_x = [&](int buf, int cb) {  // U chunks x ROWS rows x 8 pieces of 16 bytes
        for (int p = threadIdx.x; p < U * ROWS * 8; p += NW * 32) {
            const int u = p / (ROWS * 8), row = (p / 8) % ROWS, piece = p % 8;
            const int c = imin(cb + u, c_end - 1);
            const int m = imin(row, M - 1);
            const u32 dst = (u32)__cvta_generic_to_shared(&xs[buf][u][row][piece * 8]);
            cp_async16(dst, x + (u64)m * K + (c << 6) + piece * 8, row < M ? 16 : 0);  // rows past M: zeros
        }
        asm volatile("cp.async.commit_group;");
    };

    auto step = [&](const int B, int cb) {
        if (cb + U < c_end) {
            copy_x(B ^ 1, cb + U);
            load_batch(B ^ 1, cb + U);
        } else {
            asm volatile("cp.async.commit_group;");
        }
        asm volatile("cp.async.wait_group 1;");
        __syncthreads();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (cb + u >= c_end) break;
#pragma unroll
            for (int kt = 0; kt < 4; ++kt) {
                u32 b[MT][2];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const u32* row = reinterpret_cast<const u32*>(&xs[B][u][mt * 8 + g][16 * t + 4 * kt]);
                    b[mt][0] = row[0];
                    b[mt][1] = row[1];
                }
#pragma unroll
                for (int tn = 0; tn < TN; ++tn) {
                    u32 a[4];
                    dequant_fragment(word_of(w[B][u][tn], kt), sz[B][u][tn], zz[B][u][tn], a);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma16816(acc[tn][mt], a[0], a[1], a[2], a[3], b[mt][0], b[mt][1]);
                }
            }
        }
        __syncthreads();  // everyone is done with this buffer before the next batch's copy overwrites it
    };
    copy_x(0, c_begin);
    load_batch(0, c_begin);
    for (int cb = c_begin; cb < c_end; cb += 2 * U) {
        step(0, cb);
        if (cb + U < c_end) step(1, cb + U);
    }
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        if (nt0 + tn >= n_tiles) break;
        store_tile<MT>(acc[tn], out, split, M, N, nt0 + tn, g, t, out_fp32);
    }
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
