// tensorferry WGSL strided pack / unpack (kernels/src/cpu/pack.rs).
// `dims` holds `rank` pairs (size, stride), in elements, outermost first;
// packed element p sits at storage element offset + Σ index_d × stride_d.
// Each invocation owns one packed u32 word, so no two write the same word of
// the packed buffer; unpack of elements narrower than a word writes storage
// bytes with atomic and/or, so neighbours in one word do not race. Views
// handed to unpack never overlap (checked on the host).
//
// The runtime prepends the declaration of `base`, the strided storage: array<u32> for pack and
// whole-word unpack, array<atomic<u32>> for byte-wise unpack.

struct Params {
    n: u32,       // elements
    elem: u32,    // bytes per element
    rank: u32,
    offset: u32,  // storage element of the view's first element
    words: u32,   // packed words (invocations that do work)
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(1) var<storage, read_write> packed: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read> dims: array<u32>;

fn strided(e: u32) -> u32 {
    var p = e;
    var s = params.offset;
    for (var d = params.rank; d > 0u; d--) {
        let size = dims[2u * (d - 1u)];
        let stride = dims[2u * (d - 1u) + 1u];
        s += (p % size) * stride;
        p = p / size;
    }
    return s;
}

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * 64u; }
