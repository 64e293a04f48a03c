//! CUDA glue for reductions and broadcasting. A sum over several axes reduces each run of
//! adjacent reduced axes in turn, innermost first, as the CPU reference does; each run is an
//! (outer, dim, inner) reduction done by one of two kernels (see kernels.cu).

use super::reduced_dims;
use crate::kernels::KernelSource;
use crate::unary::affine;
use cudarc::driver::LaunchConfig;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_1d, Arg, CudaStorage, BLOCK};
use tokenformer_core::{Result, Shape, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("reduce");

/// Rows up to this long are summed by one thread each; longer ones by a block of threads.
const SHORT_ROW: usize = 64;
/// Rows per chunk of the two-level column sum (`sum_column_chunks`), and its block shape (the
/// COLUMN_TILE and COLUMN_ROW_THREADS of kernels.cu).
const COLUMN_CHUNK_ROWS: usize = 64;
const COLUMN_TILE: u32 = 32;
const COLUMN_ROW_THREADS: u32 = 8;
/// The grid's y and z limit.
const MAX_GRID_YZ: usize = 65_535;
/// The fewest values a block sums in `sum_row_chunks`.
const MIN_CHUNK: usize = 8 * 1024;
/// The most chunks per row (the grid's y limit).
const MAX_CHUNKS: usize = 65_535;

/// out[o, i] = Σ_d x[o, d, i] for x of `outer·dim·inner` values, as a flat tensor.
fn sum_axis(
    name: &'static str,
    x: &Tensor,
    outer: usize,
    dim: usize,
    inner: usize,
) -> Result<Tensor> {
    let xs = CudaStorage::of(x, name)?;
    let backend = &xs.backend;
    count_u32(name, x.numel())?;
    let n_out = outer * inner;
    if n_out == 0 || dim == 0 {
        return Ok(cuda_tensor(backend.zeros(n_out)?, &[n_out]));
    }
    if inner > 1 && outer <= MAX_GRID_YZ && crate::fused::enabled("reduce")? {
        return sum_columns(name, x, outer, dim, inner);
    }
    if inner > 1 || dim <= SHORT_ROW {
        let mut out = backend.alloc(n_out)?;
        let n = count_u32(name, n_out)?;
        let scalars = [
            Arg::U32(count_u32(name, outer)?),
            Arg::U32(count_u32(name, dim)?),
            Arg::U32(count_u32(name, inner)?),
        ];
        // SAFETY: matches sum_strided(x, out, outer, dim, inner); x holds outer·dim·inner
        // values and out one per (outer, inner) position.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                "sum_strided",
                launch_1d(n),
                &[&xs.slice],
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
        return Ok(cuda_tensor(out, &[n_out]));
    }
    // Long contiguous rows: a block per chunk of each row, then the chunks' sums the same way.
    // The chunk size depends only on the row length, so the grouping (and the bits) is fixed.
    let chunk = MIN_CHUNK.max(dim.div_ceil(MAX_CHUNKS));
    let chunks = dim.div_ceil(chunk);
    let mut out = backend.alloc(outer * chunks)?;
    let cfg = LaunchConfig {
        grid_dim: (count_u32(name, outer)?, count_u32(name, chunks)?, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let scalars = [Arg::U32(count_u32(name, dim)?), Arg::U32(count_u32(name, chunk)?)];
    // SAFETY: matches sum_row_chunks(x, out, len, chunk); block (r, c) reads row r of x inside
    // [0, dim) and writes out[r·chunks + c], inside the outer·chunks values allocated.
    unsafe {
        backend.launch(
            KERNELS.module,
            KERNELS.source,
            "sum_row_chunks",
            cfg,
            &[&xs.slice],
            &mut [&mut out.slice],
            &scalars,
        )
    }?;
    let partial = cuda_tensor(out, &[outer * chunks]);
    if chunks == 1 {
        Ok(partial)
    } else {
        sum_axis(name, &partial, outer, chunks, 1)
    }
}

/// out[o, i] = Σ_d x[o, d, i] for inner > 1 by the two-level column sum of kernels.cu: chunks
/// of rows summed by blocks, then the chunks' sums of each column by `sum_axis` (one thread per
/// column, or two levels again for very tall inputs).
fn sum_columns(
    name: &'static str,
    x: &Tensor,
    outer: usize,
    dim: usize,
    inner: usize,
) -> Result<Tensor> {
    let xs = CudaStorage::of(x, name)?;
    // A constant chunk, so the grouping of old rows never depends on how many rows follow;
    // only a sum of more than 4 M rows takes longer chunks (the grid's y limit).
    let chunk_rows = COLUMN_CHUNK_ROWS.max(dim.div_ceil(MAX_GRID_YZ));
    let chunks = dim.div_ceil(chunk_rows);
    let mut partial = xs.backend.alloc(outer * chunks * inner)?;
    let cfg = LaunchConfig {
        grid_dim: (
            count_u32(name, inner)?.div_ceil(COLUMN_TILE),
            count_u32(name, chunks)?,
            count_u32(name, outer)?,
        ),
        block_dim: (COLUMN_TILE, COLUMN_ROW_THREADS, 1),
        shared_mem_bytes: 0,
    };
    let scalars = [
        Arg::U32(count_u32(name, dim)?),
        Arg::U32(count_u32(name, inner)?),
        Arg::U32(count_u32(name, chunk_rows)?),
    ];
    // SAFETY: matches sum_column_chunks(x, partial, dim, inner, chunk_rows); block (t, c, o)
    // reads rows [c·chunk_rows, min((c+1)·chunk_rows, dim)) of columns below inner of x's
    // slab o, and writes partial[(o·chunks + c)·inner + column], inside outer·chunks·inner.
    unsafe {
        xs.backend.launch(
            KERNELS.module,
            KERNELS.source,
            "sum_column_chunks",
            cfg,
            &[&xs.slice],
            &mut [&mut partial.slice],
            &scalars,
        )
    }?;
    let partial = cuda_tensor(partial, &[outer * chunks * inner]);
    if chunks == 1 {
        Ok(partial)
    } else {
        sum_axis(name, &partial, outer, chunks, inner)
    }
}

/// Sums x over the axes flagged in `reduced`, as a flat tensor (the caller reshapes it).
/// Adjacent axes with the same flag are merged and axes of length 1 skipped, as on the CPU.
fn sum_over(name: &'static str, x: &Tensor, reduced: &[bool]) -> Result<Tensor> {
    let mut groups: Vec<(usize, bool)> = Vec::new();
    for (&d, &r) in x.dims().iter().zip(reduced) {
        if d == 1 {
            continue;
        }
        match groups.last_mut() {
            Some((size, flag)) if *flag == r => *size *= d,
            _ => groups.push((d, r)),
        }
    }
    let mut sizes: Vec<usize> = groups.iter().map(|&(size, _)| size).collect();
    let mut current = x.clone();
    for (i, &(_, is_reduced)) in groups.iter().enumerate().rev() {
        if is_reduced {
            let outer = sizes[..i].iter().product();
            let inner = sizes[i + 1..].iter().product();
            current = sum_axis(name, &current, outer, sizes[i], inner)?;
            sizes[i] = 1;
        }
    }
    Ok(current)
}

pub(crate) fn sum(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let reduced: Vec<bool> = (0..x.rank()).map(|axis| axes.contains(&axis)).collect();
    sum_over("sum", x, &reduced)?.reshape(&reduced_dims(x.dims(), axes, keepdim))
}

pub(crate) fn mean(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let count: usize = axes.iter().map(|&axis| x.dims()[axis]).product();
    affine(&sum(x, axes, keepdim)?, 1.0 / count as f32, 0.0)
}

/// Runs `kernel` with one thread per (outer, inner) position of the reduction along `axis`,
/// reading x (and g, when given) and writing `out_len` values.
fn launch_axis_kernel(
    name: &'static str,
    kernel: &str,
    x: &Tensor,
    axis: usize,
    g: Option<&Tensor>,
    out_len: usize,
) -> Result<CudaStorage> {
    let xs = CudaStorage::of(x, name)?;
    let (outer, dim, inner) = x.shape().split_at_axis(axis);
    count_u32(name, x.numel())?;
    let mut out = xs.backend.alloc(out_len)?;
    let threads = count_u32(name, outer * inner)?;
    if threads == 0 {
        return Ok(out);
    }
    let mut inputs = vec![&xs.slice];
    if let Some(g) = g {
        inputs.push(&CudaStorage::of(g, name)?.slice);
    }
    let scalars = [
        Arg::U32(count_u32(name, outer)?),
        Arg::U32(count_u32(name, dim)?),
        Arg::U32(count_u32(name, inner)?),
    ];
    // SAFETY: matches max_axis(x, out, outer, dim, inner) and
    // max_axis_backward(x, g, gx, outer, dim, inner); x holds outer·dim·inner values, g (when
    // given) one per (outer, inner) position, and out_len is what the kernel writes.
    unsafe {
        xs.backend.launch(
            KERNELS.module,
            KERNELS.source,
            kernel,
            launch_1d(threads),
            &inputs,
            &mut [&mut out.slice],
            &scalars,
        )
    }?;
    Ok(out)
}

pub(crate) fn max(x: &Tensor, axis: usize, keepdim: bool) -> Result<Tensor> {
    let (outer, _, inner) = x.shape().split_at_axis(axis);
    let out = launch_axis_kernel("max", "max_axis", x, axis, None, outer * inner)?;
    Ok(cuda_tensor(out, &reduced_dims(x.dims(), &[axis], keepdim)))
}

pub(crate) fn sum_all(x: &Tensor) -> Result<Tensor> {
    sum_axis("sum_all", x, 1, x.numel(), 1)?.reshape(&[])
}

pub(crate) fn broadcast_to(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    if x.dims() == dims {
        return Ok(x.clone());
    }
    let strides = x.shape().broadcast_strides(&Shape::new(dims));
    crate::layout::strided_gather_cuda("broadcast_to", x, dims, &strides)
}

pub(crate) fn sum_to_shape(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    if x.dims() == dims {
        return Ok(x.clone());
    }
    let reduced = super::broadcast_axes(x.dims(), dims);
    sum_over("sum_to_shape", x, &reduced)?.reshape(dims)
}

pub(crate) fn max_backward(x: &Tensor, axis: usize, _keepdim: bool, g: &Tensor) -> Result<Tensor> {
    let out = launch_axis_kernel("max_backward", "max_axis_backward", x, axis, Some(g), x.numel())?;
    Ok(cuda_tensor(out, x.dims()))
}
