// tensorferry WGSL checksum (docs/wire-format.md): one invocation hashes one
// 4096-byte block with its 16 lanes and adds the block's terms to the two
// sums with atomics (sums are modulo 2^32, so order does not matter). The
// host mixes in the length. A dispatch covers `blocks` whole or partial
// blocks starting at block index `first_block`; `len` is the bytes bound
// (the last block is zero-padded past it).

struct Params {
    first_block: u32,
    len: u32,
    blocks: u32,
    _a: u32,
}

@group(0) @binding(0) var<storage, read> data: array<u32>;
@group(0) @binding(1) var<storage, read_write> sums: array<atomic<u32>, 2>;
@group(0) @binding(2) var<uniform> params: Params;

const P1: u32 = 0x9E3779B1u;
const P2: u32 = 0x85EBCA77u;
const P3: u32 = 0xC2B2AE3Du;
const P4: u32 = 0x27D4EB2Fu;
const P5: u32 = 0x165667B1u;

fn rotl(x: u32, r: u32) -> u32 { return (x << r) | (x >> (32u - r)); }

// Word `w` of the bound bytes, little-endian, zero past `len`.
fn word(w: u32) -> u32 {
    let at = w * 4u;
    if (at >= params.len) { return 0u; }
    let v = data[w];
    let keep = params.len - at;
    if (keep >= 4u) { return v; }
    return v & ((1u << (8u * keep)) - 1u);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= params.blocks) { return; }
    let k = params.first_block + i;
    let base = i * 1024u;
    var acc: array<u32, 16>;
    for (var l = 0u; l < 16u; l++) {
        acc[l] = k * P5 + l * P4 + P1;
    }
    for (var r = 0u; r < 64u; r++) {
        for (var l = 0u; l < 16u; l++) {
            acc[l] = rotl(acc[l] + word(base + r * 16u + l) * P2, 13u) * P1;
        }
    }
    var h = k * P3;
    for (var l = 0u; l < 16u; l++) {
        h = rotl(h ^ acc[l], 17u) * P4 + P5;
    }
    atomicAdd(&sums[0], h);
    atomicAdd(&sums[1], h * (k * 2u + 1u));
}
