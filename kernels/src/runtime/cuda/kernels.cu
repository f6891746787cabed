// tensorferry CUDA kernels: cast, checksum, strided pack/unpack.
//
// Compiled once per process with NVRTC (no headers, no CUDA toolkit). Every
// function here is a line-by-line translation of the CPU reference in
// kernels/src/cast.rs (`bits`), kernels/src/cpu/checksum.rs and
// kernels/src/cpu/pack.rs; results must be bit-identical. Only integer
// arithmetic is used for casts, so no compiler flag (ftz, fast-math) and no
// hardware conversion instruction can change a bit.
//
// The tests compile this file on the host with g++ behind a header of shims
// (kernels/tests/cuda_source.rs) and run the kernels there against the CPU
// reference, so keep to what that header provides: blockIdx, blockDim,
// threadIdx, gridDim, atomicAdd on unsigned int, __clzll.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// ---------------------------------------------------------------------------
// Cast: the generic narrowing and widening of kernels/src/cast.rs, with the
// formats as template parameters (exponent bits, mantissa bits, finite-only,
// saturating).

template <u32 E, u32 M, bool FIN, bool SAT>
struct Fmt {
    static __device__ __forceinline__ i64 bias() { return (1LL << (E - 1)) - 1; }
    static __device__ __forceinline__ u64 inf_code() { return ((1ULL << E) - 1) << M; }
    static __device__ __forceinline__ u64 max_finite() {
        return FIN ? (inf_code() | ((1ULL << M) - 2)) : (inf_code() - 1);
    }
    static __device__ __forceinline__ u64 nan(u64 payload) {
        return SAT ? ((1ULL << (E + M)) - 1) : (inf_code() | (1ULL << (M - 1)) | payload);
    }
};

typedef Fmt<11, 52, false, false> F64;
typedef Fmt<8, 23, false, false> F32;
typedef Fmt<5, 10, false, false> F16;
typedef Fmt<8, 7, false, false> BF16;
typedef Fmt<4, 3, true, true> E4M3;
typedef Fmt<5, 2, false, true> E5M2;

__device__ __forceinline__ u64 round_shift(u64 m, u32 shift) {
    if (shift == 0) return m;
    if (shift >= 64) return 0;
    u64 q = m >> shift;
    u64 rem = m & ((1ULL << shift) - 1);
    u64 half = 1ULL << (shift - 1);
    if (rem > half || (rem == half && (q & 1ULL) == 1ULL)) return q + 1;
    return q;
}

template <u32 SE, u32 SM, class S, u32 DE, u32 DM, bool DFIN, bool DSAT>
__device__ __forceinline__ u64 narrow(u64 x) {
    typedef Fmt<DE, DM, DFIN, DSAT> D;
    const u32 width = SE + SM;
    u64 out_sign = ((x >> width) & 1ULL) << (DE + DM);
    i64 e = (i64)((x >> SM) & ((1ULL << SE) - 1));
    u64 m = x & ((1ULL << SM) - 1);
    if (e == (i64)((1ULL << SE) - 1)) {
        if (m != 0) return out_sign | D::nan(m >> (SM - DM));
        return out_sign | (DFIN ? D::max_finite() : D::inf_code());
    }
    i64 e_eff;
    if (e == 0) {
        e_eff = 1;
    } else {
        m |= 1ULL << SM;
        e_eff = e;
    }
    i64 t = e_eff - S::bias() + D::bias();
    u32 drop = SM - DM;
    u64 r;
    if (t >= 1) {
        r = ((u64)(t - 1) << DM) + round_shift(m, drop);
    } else {
        r = round_shift(m, drop + (u32)(1 - t));
    }
    if (r > D::max_finite()) return out_sign | (DSAT ? D::max_finite() : D::inf_code());
    return out_sign | r;
}

template <u32 SE, u32 SM, bool SFIN, class S, u32 DE, u32 DM, class D>
__device__ __forceinline__ u64 widen(u64 x) {
    const u32 width = SE + SM;
    u64 out_sign = ((x >> width) & 1ULL) << (DE + DM);
    u64 abs = x & ((1ULL << width) - 1);
    i64 e = (i64)(abs >> SM);
    u64 m = abs & ((1ULL << SM) - 1);
    const u32 shift = DM - SM;
    bool special = SFIN ? (abs == (1ULL << width) - 1) : (e == (i64)((1ULL << SE) - 1));
    if (special) {
        if (SFIN || m != 0) return out_sign | D::inf_code() | (1ULL << (DM - 1)) | (m << shift);
        return out_sign | D::inf_code();
    }
    if (SE == DE) return out_sign | (abs << shift);
    if (e == 0) {
        if (m == 0) return out_sign;
        i64 p = 63 - (i64)__clzll((i64)m);
        i64 field = p + 1 - S::bias() - (i64)SM + D::bias();
        u64 man = (m ^ (1ULL << p)) << ((i64)DM - p);
        return out_sign | ((u64)field << DM) | man;
    }
    i64 field = e - S::bias() + D::bias();
    return out_sign | ((u64)field << DM) | (m << shift);
}

__device__ __forceinline__ u16 f32_to_f16(u32 x) { return (u16)narrow<8, 23, F32, 5, 10, false, false>(x); }
__device__ __forceinline__ u16 f32_to_bf16(u32 x) { return (u16)narrow<8, 23, F32, 8, 7, false, false>(x); }
__device__ __forceinline__ u8 f32_to_e4m3(u32 x) { return (u8)narrow<8, 23, F32, 4, 3, true, true>(x); }
__device__ __forceinline__ u8 f32_to_e5m2(u32 x) { return (u8)narrow<8, 23, F32, 5, 2, false, true>(x); }
__device__ __forceinline__ u32 f64_to_f32(u64 x) { return (u32)narrow<11, 52, F64, 8, 23, false, false>(x); }
__device__ __forceinline__ u16 f64_to_f16(u64 x) { return (u16)narrow<11, 52, F64, 5, 10, false, false>(x); }
__device__ __forceinline__ u16 f64_to_bf16(u64 x) { return (u16)narrow<11, 52, F64, 8, 7, false, false>(x); }
__device__ __forceinline__ u32 f16_to_f32(u16 x) { return (u32)widen<5, 10, false, F16, 8, 23, F32>(x); }
__device__ __forceinline__ u32 bf16_to_f32(u16 x) { return (u32)widen<8, 7, false, BF16, 8, 23, F32>(x); }
__device__ __forceinline__ u32 e4m3_to_f32(u8 x) { return (u32)widen<4, 3, true, E4M3, 8, 23, F32>(x); }
__device__ __forceinline__ u32 e5m2_to_f32(u8 x) { return (u32)widen<5, 2, false, E5M2, 8, 23, F32>(x); }
__device__ __forceinline__ u64 f32_to_f64(u32 x) { return widen<8, 23, false, F32, 11, 52, F64>(x); }
__device__ __forceinline__ u64 f16_to_f64(u16 x) { return widen<5, 10, false, F16, 11, 52, F64>(x); }
__device__ __forceinline__ u64 bf16_to_f64(u16 x) { return widen<8, 7, false, BF16, 11, 52, F64>(x); }
__device__ __forceinline__ u16 f16_to_bf16(u16 x) { return f32_to_bf16(f16_to_f32(x)); }
__device__ __forceinline__ u16 bf16_to_f16(u16 x) { return f32_to_f16(bf16_to_f32(x)); }

// One kernel per cast: `tf_cast_<from>_<to>(src, dst, n)` over n elements,
// grid-stride so any grid covers any n.
#define TF_CAST(NAME, S, D, FN)                                                        \
    extern "C" __global__ void tf_cast_##NAME(const S* src, D* dst, u64 n) {          \
        u64 stride = (u64)blockDim.x * (u64)gridDim.x;                                 \
        for (u64 i = (u64)blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += stride) { \
            dst[i] = FN(src[i]);                                                       \
        }                                                                              \
    }

TF_CAST(f32_f16, u32, u16, f32_to_f16)
TF_CAST(f32_bf16, u32, u16, f32_to_bf16)
TF_CAST(f32_f64, u32, u64, f32_to_f64)
TF_CAST(f32_f8e4m3, u32, u8, f32_to_e4m3)
TF_CAST(f32_f8e5m2, u32, u8, f32_to_e5m2)
TF_CAST(f16_f32, u16, u32, f16_to_f32)
TF_CAST(f16_bf16, u16, u16, f16_to_bf16)
TF_CAST(f16_f64, u16, u64, f16_to_f64)
TF_CAST(bf16_f32, u16, u32, bf16_to_f32)
TF_CAST(bf16_f16, u16, u16, bf16_to_f16)
TF_CAST(bf16_f64, u16, u64, bf16_to_f64)
TF_CAST(f64_f32, u64, u32, f64_to_f32)
TF_CAST(f64_f16, u64, u16, f64_to_f16)
TF_CAST(f64_bf16, u64, u16, f64_to_bf16)
TF_CAST(f8e4m3_f32, u8, u32, e4m3_to_f32)
TF_CAST(f8e5m2_f32, u8, u32, e5m2_to_f32)

// ---------------------------------------------------------------------------
// Checksum (docs/wire-format.md). One thread hashes one 4096-byte block with
// its 16 lanes and adds the block's terms to the two sums; the host mixes in
// the length. Sums are modulo 2^32, so the order of the atomic adds does not
// matter.

#define P1 0x9E3779B1u
#define P2 0x85EBCA77u
#define P3 0xC2B2AE3Du
#define P4 0x27D4EB2Fu
#define P5 0x165667B1u

__device__ __forceinline__ u32 rotl32(u32 x, u32 r) { return (x << r) | (x >> (32 - r)); }

// Word `w` (0..1024) of the block starting at byte `start`, zero past `len`.
__device__ __forceinline__ u32 load_word(const u8* data, u64 len, u64 start, u32 w) {
    u64 at = start + 4ULL * w;
    if (at + 4 <= len) return ((const u32*)data)[at / 4];
    u32 v = 0;
    for (u32 b = 0; b < 4; b++) {
        if (at + b < len) v |= (u32)data[at + b] << (8 * b);
    }
    return v;
}

// sums[0] += Σ h_k, sums[1] += Σ h_k × (2k + 1), for blocks
// first_block .. first_block + blocks of `data` (which is `len` bytes from
// block 0 of the checksummed buffer).
extern "C" __global__ void tf_checksum_blocks(const u8* data, u64 len, u64 first_block, u64 blocks,
                                              u32* sums) {
    u64 stride = (u64)blockDim.x * (u64)gridDim.x;
    u32 lo = 0, hi = 0;
    for (u64 i = (u64)blockIdx.x * (u64)blockDim.x + threadIdx.x; i < blocks; i += stride) {
        u64 block = first_block + i;
        u32 k = (u32)block;
        u64 start = block * 4096ULL;
        u32 acc[16];
        for (u32 l = 0; l < 16; l++) acc[l] = k * P5 + l * P4 + P1;
        if (start + 4096ULL <= len) {
            const u32* words = (const u32*)(data + start);
            for (u32 r = 0; r < 64; r++) {
                for (u32 l = 0; l < 16; l++) {
                    acc[l] = rotl32(acc[l] + words[r * 16 + l] * P2, 13) * P1;
                }
            }
        } else {
            for (u32 r = 0; r < 64; r++) {
                for (u32 l = 0; l < 16; l++) {
                    acc[l] = rotl32(acc[l] + load_word(data, len, start, r * 16 + l) * P2, 13) * P1;
                }
            }
        }
        u32 h = k * P3;
        for (u32 l = 0; l < 16; l++) h = rotl32(h ^ acc[l], 17) * P4 + P5;
        lo += h;
        hi += h * (k * 2u + 1u);
    }
    if (lo != 0 || hi != 0) {
        atomicAdd(&sums[0], lo);
        atomicAdd(&sums[1], hi);
    }
}

// ---------------------------------------------------------------------------
// Pack / unpack a strided view. `dims` holds `rank` pairs (size, stride) in
// elements, outermost first (the merged plan of kernels/src/cpu/pack.rs).
// Packed element p sits at storage element offset + Σ index_d × stride_d.

__device__ __forceinline__ u64 strided_index(u64 p, u32 rank, const u64* dims, u64 offset) {
    u64 s = offset;
    for (u32 d = rank; d-- > 0;) {
        u64 size = dims[2 * d];
        u64 stride = dims[2 * d + 1];
        s += (p % size) * stride;
        p /= size;
    }
    return s;
}

__device__ __forceinline__ void move_elem(const u8* from, u64 fi, u8* to, u64 ti, u32 elem) {
    switch (elem) {
    case 1: to[ti] = from[fi]; break;
    case 2: ((u16*)to)[ti] = ((const u16*)from)[fi]; break;
    case 4: ((u32*)to)[ti] = ((const u32*)from)[fi]; break;
    case 8: ((u64*)to)[ti] = ((const u64*)from)[fi]; break;
    default:
        for (u32 b = 0; b < elem; b++) to[ti * elem + b] = from[fi * elem + b];
    }
}

extern "C" __global__ void tf_pack(const u8* storage, u8* packed, u64 n, u32 elem, u32 rank,
                                   const u64* dims, u64 offset) {
    u64 stride = (u64)blockDim.x * (u64)gridDim.x;
    for (u64 p = (u64)blockIdx.x * (u64)blockDim.x + threadIdx.x; p < n; p += stride) {
        move_elem(storage, strided_index(p, rank, dims, offset), packed, p, elem);
    }
}

// The view must not overlap itself (checked on the host): each storage
// element has one writer.
extern "C" __global__ void tf_unpack(const u8* packed, u8* storage, u64 n, u32 elem, u32 rank,
                                     const u64* dims, u64 offset) {
    u64 stride = (u64)blockDim.x * (u64)gridDim.x;
    for (u64 p = (u64)blockIdx.x * (u64)blockDim.x + threadIdx.x; p < n; p += stride) {
        move_elem(packed, p, storage, strided_index(p, rank, dims, offset), elem);
    }
}
