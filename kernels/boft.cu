// The device side of `--device cuda` (src/merge/cuda.rs): the element-wise steps around the
// block products, which cuBLAS does. Compiled by build.rs with nvcc into a fatbin holding SASS
// for the target architectures (no JIT on first use) and PTX for newer ones, with -fmad=false:
// every multiply and add here rounds on its own, as the CPU's do.
//
// A batch is `len` = rows × n elements, row-major; `dt` is the stored dtype: 0 f32, 1 bf16, 2
// f16. Scale modes: 0 none, 1 one factor per row (index row0 + r), 2 one per component.
#include <cuda_fp16.h>
#include <stdint.h>

typedef unsigned long long u64;

__device__ __forceinline__ float load_stored(const void *raw, u64 i, int dt) {
    if (dt == 1) {
        return __uint_as_float(((uint32_t)((const uint16_t *)raw)[i]) << 16);
    }
    if (dt == 2) {
        return __half2float(__ushort_as_half(((const uint16_t *)raw)[i]));
    }
    return ((const float *)raw)[i];
}

// Nearest-even, NaN kept with its quiet bit set: the bits of dtype::bf16_bits.
__device__ __forceinline__ uint16_t to_bf16(float x) {
    uint32_t b = __float_as_uint(x);
    if (isnan(x)) {
        return (uint16_t)((b >> 16) | 0x0040u);
    }
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Nearest-even (IEEE, subnormals included); NaN as F16C converts it (quiet bit set, mantissa
// truncated), which is what the CPU path's encoder gives.
__device__ __forceinline__ uint16_t to_f16(float x) {
    if (isnan(x)) {
        uint32_t b = __float_as_uint(x);
        return (uint16_t)(((b >> 16) & 0x8000u) | 0x7c00u | 0x0200u | ((b & 0x7fffffu) >> 13));
    }
    return __half_as_ushort(__float2half_rn(x));
}

__device__ __forceinline__ float scale_of(const float *scale, int mode, u64 row0, u64 r, u64 c) {
    if (mode == 1) {
        return scale[row0 + r];
    }
    if (mode == 2) {
        return scale[c];
    }
    return 1.0f;
}

#define GRID_STRIDE(i, len) \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (len); i += (u64)gridDim.x * blockDim.x)

extern "C" __global__ void boft_decode(const void *raw, float *t, u64 len, int dt) {
    GRID_STRIDE(i, len) { t[i] = load_stored(raw, i, dt); }
}

// t rounded to the dtype into raw_out; *flag set where a value the base held finite became
// NaN or ±Inf (the host then names the element, as the CPU path does).
extern "C" __global__ void boft_encode(const float *t, const void *raw_in, void *raw_out, u64 len, int dt,
                                       unsigned int *flag) {
    GRID_STRIDE(i, len) {
        float v = t[i];
        float stored;
        if (dt == 1) {
            uint16_t b = to_bf16(v);
            ((uint16_t *)raw_out)[i] = b;
            stored = __uint_as_float(((uint32_t)b) << 16);
        } else if (dt == 2) {
            uint16_t b = to_f16(v);
            ((uint16_t *)raw_out)[i] = b;
            stored = __half2float(__ushort_as_half(b));
        } else {
            ((float *)raw_out)[i] = v;
            stored = v;
        }
        if (!isfinite(stored) && isfinite(load_stored(raw_in, i, dt))) {
            atomicOr(flag, 1u);
        }
    }
}

// dst[r, j] = src[r, idx[j]] · scale (the scale of the source component); idx null: identity.
extern "C" __global__ void boft_gather(const float *src, float *dst, const unsigned int *idx, const float *scale,
                                       int mode, u64 row0, u64 len, unsigned int n) {
    GRID_STRIDE(i, len) {
        u64 r = i / n;
        unsigned int j = (unsigned int)(i - r * n);
        unsigned int c = idx ? idx[j] : j;
        float v = src[r * n + c];
        if (mode) {
            v = __fmul_rn(v, scale_of(scale, mode, row0, r, c));
        }
        dst[i] = v;
    }
}

// The end of a chain: t[r, q] = y[r, idx[q]] · scale, blended with t's own value (the chain's
// input) when blend ≠ 1, as `o + b·(v − o)` in three roundings.
extern "C" __global__ void boft_finish(const float *y, float *t, const unsigned int *idx, const float *scale,
                                       int mode, u64 row0, u64 len, unsigned int n, float blend) {
    GRID_STRIDE(i, len) {
        u64 r = i / n;
        unsigned int q = (unsigned int)(i - r * n);
        float v = y[r * n + (idx ? idx[q] : q)];
        if (mode) {
            v = __fmul_rn(v, scale_of(scale, mode, row0, r, q));
        }
        if (blend != 1.0f) {
            float o = t[i];
            v = __fadd_rn(o, __fmul_rn(blend, __fsub_rn(v, o)));
        }
        t[i] = v;
    }
}
