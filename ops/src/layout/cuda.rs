//! CUDA glue for the layout ops: a strided gather for permute (and for broadcast_to, in the
//! reduce family) and one slab-copy kernel for narrow, concat and narrow's backward pass.

use crate::kernels::KernelSource;
use tokenformer_core::cuda::{
    count_u32, cuda_tensor, dims_arg, launch_1d, merge_axes, Arg, CudaStorage,
};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("layout");

pub(crate) fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    if perm.iter().enumerate().all(|(k, &p)| k == p) {
        return Ok(x.clone());
    }
    let out_dims: Vec<usize> = perm.iter().map(|&p| x.dims()[p]).collect();
    let x_strides = x.shape().strides();
    let read_strides: Vec<usize> = perm.iter().map(|&p| x_strides[p]).collect();
    strided_gather("permute", x, &out_dims, &read_strides)
}

/// `out[c] = x[Σ_k c_k·read_strides[k]]` for every coordinate c of `out_dims`. Every stride must
/// keep the offsets inside x: x's own strides, permuted, or 0 on an axis x is stretched along.
pub(crate) fn strided_gather(
    name: &'static str,
    x: &Tensor,
    out_dims: &[usize],
    read_strides: &[usize],
) -> Result<Tensor> {
    let xs = CudaStorage::of(x, name)?;
    let numel = out_dims.iter().product();
    let mut out = xs.backend.alloc(numel)?;
    let n = count_u32(name, numel)?;
    count_u32(name, x.numel())?;
    if n > 0 {
        let (dims, strides) = merge_axes(out_dims, &[read_strides.to_vec()]);
        let scalars = [
            Arg::U32(n),
            Arg::I32(dims.len() as i32),
            Arg::Dims(dims_arg(name, &dims)?),
            Arg::Dims(dims_arg(name, &strides[0])?),
        ];
        // SAFETY: matches strided_gather(x, out, n, rank, out_dims, x_strides); every
        // coordinate is below its axis size and the strides are x's own (or 0), so the offsets
        // address only elements of x.
        unsafe {
            xs.backend.launch(
                KERNELS.module,
                KERNELS.source,
                "strided_gather",
                launch_1d(n),
                &[&xs.slice],
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
    }
    Ok(cuda_tensor(out, out_dims))
}

/// Copies rows [src_start, src_start + len) of `src`'s axis (length src_dim) into rows
/// [dst_start, dst_start + len) of `dst`'s axis (length dst_dim); both are (outer, ·, inner).
struct Slab {
    outer: usize,
    len: usize,
    inner: usize,
    src_dim: usize,
    src_start: usize,
    dst_dim: usize,
    dst_start: usize,
}

fn copy_slab(name: &'static str, src: &CudaStorage, dst: &mut CudaStorage, s: Slab) -> Result<()> {
    // Every offset the kernel forms is below the larger of the two tensors.
    count_u32(name, s.outer * s.src_dim.max(s.dst_dim) * s.inner)?;
    let n = count_u32(name, s.outer * s.len * s.inner)?;
    if n == 0 {
        return Ok(());
    }
    let u32_of = |v: usize| count_u32(name, v).map(Arg::U32);
    let scalars = [
        Arg::U32(n),
        u32_of(s.len)?,
        u32_of(s.inner)?,
        u32_of(s.src_dim)?,
        u32_of(s.src_start)?,
        u32_of(s.dst_dim)?,
        u32_of(s.dst_start)?,
    ];
    // SAFETY: matches copy_slab(src, dst, n, len, inner, src_dim, src_start, dst_dim,
    // dst_start); the caller's slab lies inside both tensors.
    unsafe {
        src.backend.launch(
            KERNELS.module,
            KERNELS.source,
            "copy_slab",
            launch_1d(n),
            &[&src.slice],
            &mut [&mut dst.slice],
            &scalars,
        )
    }
}

pub(crate) fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let xs = CudaStorage::of(x, "narrow")?;
    let (outer, dim, inner) = x.shape().split_at_axis(axis);
    let mut out = xs.backend.alloc(outer * len * inner)?;
    let slab =
        Slab { outer, len, inner, src_dim: dim, src_start: start, dst_dim: len, dst_start: 0 };
    copy_slab("narrow", xs, &mut out, slab)?;
    let mut dims = x.dims().to_vec();
    dims[axis] = len;
    Ok(cuda_tensor(out, &dims))
}

pub(crate) fn concat(xs: &[Tensor], axis: usize) -> Result<Tensor> {
    let first = CudaStorage::of(&xs[0], "concat")?;
    let mut dims = xs[0].dims().to_vec();
    dims[axis] = xs.iter().map(|x| x.dims()[axis]).sum();
    let (outer, total, inner) = tokenformer_core::Shape::new(&dims).split_at_axis(axis);
    let mut out = first.backend.alloc(outer * total * inner)?;
    let mut offset = 0;
    for x in xs {
        let len = x.dims()[axis];
        let slab = Slab {
            outer,
            len,
            inner,
            src_dim: len,
            src_start: 0,
            dst_dim: total,
            dst_start: offset,
        };
        copy_slab("concat", CudaStorage::of(x, "concat")?, &mut out, slab)?;
        offset += len;
    }
    Ok(cuda_tensor(out, &dims))
}

pub(crate) fn narrow_backward(
    g: &Tensor,
    input_dims: &[usize],
    axis: usize,
    start: usize,
) -> Result<Tensor> {
    let gs = CudaStorage::of(g, "narrow_backward")?;
    let (outer, len, inner) = g.shape().split_at_axis(axis);
    let mut out = gs.backend.zeros(input_dims.iter().product())?;
    let slab = Slab {
        outer,
        len,
        inner,
        src_dim: len,
        src_start: 0,
        dst_dim: input_dims[axis],
        dst_start: start,
    };
    copy_slab("narrow_backward", gs, &mut out, slab)?;
    Ok(cuda_tensor(out, input_dims))
}
