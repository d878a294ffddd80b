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

__device__ __forceinline__ void cp_async16(u32 smem_addr, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr), "l"(src));
}

__device__ __forceinline__ void cp_async4(u32 smem_addr, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(smem_addr), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// out[split, m, n] = sum over this split's K chunks of x[m, k] * W[n, k].
// MT: 8-row activation tiles (M <= 8 MT); TN: 16-row weight tiles per warp; WK: warps per block, which
// split the block's chunks between them and add up in shared memory at the end; U: chunks per batch;
// S: pipeline stages.  Each warp streams its weights, scales and zero points through a private S-stage
// ring in shared memory with cp.async, keeping S - 1 batches (up to tens of KB per SM) in flight without
// holding them in registers: enough outstanding reads to approach DRAM bandwidth on a short kernel.  A lane
// reads back only the weight vector it copied itself; scales and zero points cross lanes, hence the
// warp barrier.  Activations come from L1/L2 (small, shared by all blocks).
template <int MT, int TN, int WK, int U, int S>
__global__ void __launch_bounds__(32 * WK) w4a16_mma(
        const u16* __restrict__ x, const U4* __restrict__ qw, const u16* __restrict__ scales,
        const u16* __restrict__ zeros, void* __restrict__ out, int M, int N, int K, int group_size,
        int chunks_per_split, int out_fp32) {
    constexpr int PER_WARP = TN * MT * 4 * 32;  // accumulators per warp, for the final reduction
    constexpr int RING_BYTES = WK * S * U * TN * (32 * 16 + 16 * 4);
    constexpr int RED_BYTES = (WK - 1) * PER_WARP * 4;
    __shared__ __align__(16) unsigned char smem[RING_BYTES > RED_BYTES ? RING_BYTES : RED_BYTES];
    auto wq = reinterpret_cast<U4 (*)[S][U][TN][32]>(smem);  // [warp][stage][u][tn][lane]
    // 16 scales then 16 zero points (bf16) of a tile's rows
    auto sz = reinterpret_cast<u32 (*)[S][U][TN][16]>(smem + WK * S * U * TN * 32 * 16);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_chunks = K >> 6, n_tiles = N >> 4;
    const int nt0 = blockIdx.x * TN;
    const int split = blockIdx.y;
    const int c_begin = split * chunks_per_split;
    const int c_end = imin(c_begin + chunks_per_split, n_chunks);
    const int mine = c_end - c_begin - warp;  // chunks c_begin + warp + WK * j of this warp
    const int n_batches = mine > 0 ? (mine + WK * U - 1) / (WK * U) : 0;

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

    auto issue = [&](int batch) {  // always commits a group, empty past the end, so the wait counts hold
        if (batch < n_batches) {
            const int stage = batch % S;
            const int cb = c_begin + warp + batch * WK * U;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = imin(cb + u * WK, c_end - 1);  // past the end: a harmless re-read, never used
                const int grp = (c << 6) / group_size;
#pragma unroll
                for (int tn = 0; tn < TN; ++tn) {
                    cp_async16(smem_addr(&wq[warp][stage][u][tn][lane]), qw + ((u64)tile[tn] * n_chunks + c) * 32 + lane);
                    if (lane < 16) {
                        const u16* src = (lane < 8 ? scales : zeros) + (u64)grp * N + tile[tn] * 16 + 2 * (lane & 7);
                        cp_async4(smem_addr(&sz[warp][stage][u][tn][lane]), src);
                    }
                }
            }
        }
        cp_async_commit();
    };
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

#pragma unroll
    for (int b = 0; b < S - 1; ++b) issue(b);
    for (int b = 0; b < n_batches; ++b) {
        cp_async_wait<S - 2>();  // batch b has landed (this lane's copies) ...
        __syncwarp();            // ... and every lane's; also: all lanes are done reading batch b - 1
        issue(b + S - 1);        // into the stage batch b - 1 used
        const int stage = b % S;
        const int cb = c_begin + warp + b * WK * U;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = cb + u * WK;
            if (c >= c_end) break;
            U4 xv[MT][2];
            load_x(xv, c);
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
                const U4 wv = wq[warp][stage][u][tn][lane];
                const u16* p = reinterpret_cast<const u16*>(sz[warp][stage][u][tn]);
                const u32 s2 = (u32)p[g] | ((u32)p[g + 8] << 16);
                const u32 z2 = (u32)p[16 + g] | ((u32)p[24 + g] << 16);
#pragma unroll
                for (int kt = 0; kt < 4; ++kt) {
                    u32 a[4];
                    dequant_fragment(word_of(wv, kt), s2, z2, a);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        const U4& xq = xv[mt][kt >> 1];
                        mma16816(acc[tn][mt], a[0], a[1], a[2], a[3], (kt & 1) ? xq.z : xq.x, (kt & 1) ? xq.w : xq.y);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

    // warps 1.. hand their sums to warp 0 through shared memory (reusing the ring)
    if (WK > 1) {
        float* red = reinterpret_cast<float*>(smem);
        __syncthreads();
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
