// tensorferry WGSL casts: a translation of kernels/src/cast.rs (`bits`) to
// 32-bit integers. WGSL has no 64-bit integers and (without an extension)
// no f16, so every value is handled as bits: f64 as a vec2<u32> (low word,
// high word), the 16- and 8-bit formats packed into u32 words. No float
// instruction touches a value, so nothing is flushed or rounded differently.
//
// The entry point is appended by the runtime for each cast; it reads with
// the read_* helpers and calls the functions below.

struct Params {
    n: u32,      // elements in this dispatch
    units: u32,  // invocations that do work: output words (8/16-bit) or elements
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;

fn read8(i: u32) -> u32 { return (src[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu; }
fn read16(i: u32) -> u32 { return (src[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu; }
fn read32(i: u32) -> u32 { return src[i]; }
fn read64(i: u32) -> vec2<u32> { return vec2<u32>(src[2u * i], src[2u * i + 1u]); }

fn fmt_bias(e: u32) -> i32 { return (1i << (e - 1u)) - 1i; }
fn inf_code(e: u32, m: u32) -> u32 { return ((1u << e) - 1u) << m; }
fn max_finite(e: u32, m: u32, fin: bool) -> u32 {
    if (fin) { return inf_code(e, m) | ((1u << m) - 2u); }
    return inf_code(e, m) - 1u;
}
fn nan_code(e: u32, m: u32, sat: bool, payload: u32) -> u32 {
    if (sat) { return (1u << (e + m)) - 1u; }
    return inf_code(e, m) | (1u << (m - 1u)) | payload;
}

// m >> shift, rounded to nearest, ties to even.
fn round_shift(m: u32, shift: u32) -> u32 {
    if (shift == 0u) { return m; }
    if (shift >= 32u) { return 0u; }
    let q = m >> shift;
    let rem = m & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u) == 1u)) { return q + 1u; }
    return q;
}

// f32 bits to a narrower format: de exponent bits, dm mantissa bits,
// fin = finite only (f8e4m3), sat = overflow saturates (both fp8 formats).
fn narrow32(x: u32, de: u32, dm: u32, fin: bool, sat: bool) -> u32 {
    let out_sign = (x >> 31u) << (de + dm);
    let e = i32((x >> 23u) & 0xffu);
    var m = x & 0x7fffffu;
    if (e == 255) {
        if (m != 0u) { return out_sign | nan_code(de, dm, sat, m >> (23u - dm)); }
        if (fin) { return out_sign | max_finite(de, dm, fin); }
        return out_sign | inf_code(de, dm);
    }
    var e_eff = e;
    if (e == 0) { e_eff = 1; } else { m = m | 0x800000u; }
    let t = e_eff - 127 + fmt_bias(de);
    let overflow = select(inf_code(de, dm), max_finite(de, dm, fin), sat);
    // Far past the largest exponent (and before the shift below could wrap).
    if (t > (1i << de)) { return out_sign | overflow; }
    let drop = 23u - dm;
    var r: u32;
    if (t >= 1) {
        r = (u32(t - 1) << dm) + round_shift(m, drop);
    } else {
        r = round_shift(m, drop + u32(1 - t));
    }
    if (r > max_finite(de, dm, fin)) { return out_sign | overflow; }
    return out_sign | r;
}

// A narrower format (se exponent bits, sm mantissa bits, fin = f8e4m3) to
// f32 bits, exactly.
fn widen32(x: u32, se: u32, sm: u32, fin: bool) -> u32 {
    let width = se + sm;
    let out_sign = ((x >> width) & 1u) << 31u;
    let abs = x & ((1u << width) - 1u);
    let e = i32(abs >> sm);
    let m = abs & ((1u << sm) - 1u);
    let shift = 23u - sm;
    var special: bool;
    if (fin) { special = abs == (1u << width) - 1u; } else { special = e == (1i << se) - 1i; }
    if (special) {
        if (fin || m != 0u) { return out_sign | 0x7f800000u | 0x400000u | (m << shift); }
        return out_sign | 0x7f800000u;
    }
    if (se == 8u) { return out_sign | (abs << shift); }
    if (e == 0) {
        if (m == 0u) { return out_sign; }
        let p = 31 - i32(countLeadingZeros(m));
        let field = p + 1 - fmt_bias(se) - i32(sm) + 127;
        let man = (m ^ (1u << u32(p))) << u32(23 - p);
        return out_sign | (u32(field) << 23u) | man;
    }
    let field = e - fmt_bias(se) + 127;
    return out_sign | (u32(field) << 23u) | (m << shift);
}

// (hi:lo) >> s, truncated; 1 <= s < 64.
fn shr64(hi: u32, lo: u32, s: u32) -> u32 {
    if (s >= 32u) { return hi >> (s - 32u); }
    return (lo >> s) | (hi << (32u - s));
}

// (hi:lo) >> shift rounded to nearest even, for hi < 2^21 (a 53-bit
// mantissa) and shift >= 29, so the result fits in 32 bits.
fn round_shift64(hi: u32, lo: u32, shift: u32) -> u32 {
    if (shift >= 54u) { return 0u; }
    var q: u32;
    var r: u32;
    var sticky: bool;
    if (shift >= 33u) {
        let s = shift - 32u;
        q = hi >> s;
        r = (hi >> (s - 1u)) & 1u;
        sticky = lo != 0u || (hi & ((1u << (s - 1u)) - 1u)) != 0u;
    } else if (shift == 32u) {
        q = hi;
        r = lo >> 31u;
        sticky = (lo & 0x7fffffffu) != 0u;
    } else {
        q = (lo >> shift) | (hi << (32u - shift));
        r = (lo >> (shift - 1u)) & 1u;
        sticky = (lo & ((1u << (shift - 1u)) - 1u)) != 0u;
    }
    if (r == 1u && (sticky || (q & 1u) == 1u)) { q = q + 1u; }
    return q;
}

// f64 bits (low, high word) to f32, f16 or bf16, rounded once.
fn narrow64(v: vec2<u32>, de: u32, dm: u32) -> u32 {
    let lo = v.x;
    let hi = v.y;
    let out_sign = (hi >> 31u) << (de + dm);
    let e = i32((hi >> 20u) & 0x7ffu);
    var mhi = hi & 0xfffffu;
    if (e == 2047) {
        if (mhi != 0u || lo != 0u) {
            return out_sign | inf_code(de, dm) | (1u << (dm - 1u)) | shr64(mhi, lo, 52u - dm);
        }
        return out_sign | inf_code(de, dm);
    }
    var e_eff = e;
    if (e == 0) { e_eff = 1; } else { mhi = mhi | 0x100000u; }
    let t = e_eff - 1023 + fmt_bias(de);
    if (t > (1i << de)) { return out_sign | inf_code(de, dm); }
    let drop = 52u - dm;
    var r: u32;
    if (t >= 1) {
        r = (u32(t - 1) << dm) + round_shift64(mhi, lo, drop);
    } else {
        r = round_shift64(mhi, lo, drop + u32(1 - t));
    }
    if (r > inf_code(de, dm) - 1u) { return out_sign | inf_code(de, dm); }
    return out_sign | r;
}

// f32 bits to f64 bits (low, high word), exactly.
fn f32_to_f64(x: u32) -> vec2<u32> {
    let sign = x & 0x80000000u;
    let e = (x >> 23u) & 0xffu;
    let m = x & 0x7fffffu;
    if (e == 255u) {
        if (m != 0u) { return vec2<u32>((m & 7u) << 29u, sign | 0x7ff80000u | (m >> 3u)); }
        return vec2<u32>(0u, sign | 0x7ff00000u);
    }
    if (e == 0u) {
        if (m == 0u) { return vec2<u32>(0u, sign); }
        let p = 31u - countLeadingZeros(m);
        let field = p + 874u; // p + 1 - 127 - 23 + 1023
        let mm = m ^ (1u << p);
        let s = 52u - p;
        var mhi: u32;
        var mlo: u32;
        if (s >= 32u) {
            mhi = mm << (s - 32u);
            mlo = 0u;
        } else {
            mhi = mm >> (32u - s);
            mlo = mm << s;
        }
        return vec2<u32>(mlo, sign | (field << 20u) | mhi);
    }
    return vec2<u32>((m & 7u) << 29u, sign | ((e + 896u) << 20u) | (m >> 3u));
}
