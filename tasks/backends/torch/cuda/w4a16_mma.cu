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

// out[split, m, n] = sum over this split's K chunks of x[m, k] * W[n, k].
// MT: 8-row activation tiles (M <= 8 MT); TN: 16-row weight tiles per warp; WK: warps per block, which
// split the block's chunks between them and add up in shared memory; U: chunks loaded ahead per warp.
template <int MT, int TN, int WK, int U>
__global__ void __launch_bounds__(32 * WK) w4a16_mma(
        const u16* __restrict__ x, const U4* __restrict__ qw, const u16* __restrict__ scales,
        const u16* __restrict__ zeros, void* __restrict__ out, int M, int N, int K, int group_size,
        int chunks_per_split, int out_fp32) {
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

    for (int c0 = c_begin + warp; c0 < c_end; c0 += WK * U) {
        U4 w[U][TN];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = imin(c0 + u * WK, c_end - 1);  // past the end: a harmless re-read, skipped below
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) w[u][tn] = load_stream(qw + ((u64)tile[tn] * n_chunks + c) * 32 + lane);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * WK;
            if (c >= c_end) break;
            const int grp = (c << 6) / group_size;
            u32 s_lo[TN], s_hi[TN], z_lo[TN], z_hi[TN];
#pragma unroll
            for (int tn = 0; tn < TN; ++tn) {
                const int n = tile[tn] * 16 + g;
                const u64 at = (u64)grp * N + n;
                u32 s0 = scales[at], s1 = scales[at + 8], z0 = zeros[at], z1 = zeros[at + 8];
                s_lo[tn] = s0 | (s0 << 16);
                s_hi[tn] = s1 | (s1 << 16);
                z_lo[tn] = fma2(z0 | (z0 << 16), BF16X2_ONE, BF16X2_128);  // 128 + zero, exact
                z_hi[tn] = fma2(z1 | (z1 << 16), BF16X2_ONE, BF16X2_128);
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                U4 xf[MT];  // activations k = chunk*64 + 16t + 8 half + [0, 8) of rows mt*8 + g
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int m = mt * 8 + g;
                    if (m < M) {
                        xf[mt] = load_cached(reinterpret_cast<const U4*>(x + (u64)m * K + (c << 6) + 16 * t + 8 * half));
                    } else {
                        xf[mt].x = xf[mt].y = xf[mt].z = xf[mt].w = 0u;
                    }
                }
#pragma unroll
                for (int kh = 0; kh < 2; ++kh) {
                    const int kt = 2 * half + kh;
#pragma unroll
                    for (int tn = 0; tn < TN; ++tn) {
                        const u32 word = word_of(w[u][tn], kt);
                        u32 a[4];
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const u32 v = ((word >> (4 * i)) & 0x000F000Fu) | BF16X2_128;  // 128 + q, two at once
                            const u32 zz = (i & 1) ? z_hi[tn] : z_lo[tn];
                            const u32 ss = (i & 1) ? s_hi[tn] : s_lo[tn];
                            a[i] = fma2(fma2(zz, BF16X2_NEG_ONE, v), ss, BF16X2_NEG_ZERO);  // (q - z) * s
                        }
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            const u32 b0 = kh ? xf[mt].z : xf[mt].x;
                            const u32 b1 = kh ? xf[mt].w : xf[mt].y;
                            mma16816(acc[tn][mt], a[0], a[1], a[2], a[3], b0, b1);
                        }
                    }
                }
            }
        }
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
    // C fragment: c0, c1 = (n = g, m = 2t, 2t + 1); c2, c3 = (n = g + 8, same m)
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) {
        if (nt0 + tn >= n_tiles) break;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = mt * 8 + 2 * t + (i & 1);
                const int n = (nt0 + tn) * 16 + g + 8 * (i >> 1);
                if (m < M) {
                    const u64 at = ((u64)split * M + m) * N + n;
                    if (out_fp32) reinterpret_cast<float*>(out)[at] = acc[tn][mt][i];
                    else reinterpret_cast<u16*>(out)[at] = float_to_bf16(acc[tn][mt][i]);
                }
            }
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
