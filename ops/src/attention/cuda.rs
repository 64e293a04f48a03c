//! CUDA glue of the fused causal attention: the kernels of kernels.cu, with tile sizes chosen so
//! that each block's shared memory fits the 48 KiB every CUDA GPU gives a block without opting
//! in to more.

use super::score_scale;
use crate::kernels::KernelSource;
use cudarc::driver::LaunchConfig;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_1d, Arg, CudaStorage};
use tokenformer_core::{Error, Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("attention");

/// ATTENTION_THREADS of kernels.cu.
const THREADS: u32 = 128;
const SHARED_BYTES: usize = 48 * 1024;

/// The kernels' three layouts of shared memory, in floats, for a tile size and head dim (the
/// sums at the top of each kernel in kernels.cu; rows of q, k, v and g are `d | 1` apart).
#[derive(Clone, Copy)]
enum Kernel {
    Forward,
    BackwardKv,
    BackwardQ,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Forward => "attention_forward",
            Kernel::BackwardKv => "attention_backward_kv",
            Kernel::BackwardQ => "attention_backward_q",
        }
    }

    fn shared_floats(self, tile: usize, d: usize) -> usize {
        let stride = d | 1;
        match self {
            Kernel::Forward => 2 * tile * stride + tile * d + tile * tile + 3 * tile,
            Kernel::BackwardKv => 4 * tile * stride + 2 * tile * tile + 2 * tile * d + 2 * tile,
            Kernel::BackwardQ => 4 * tile * stride + 2 * tile * tile + tile * d + 2 * tile,
        }
    }

    /// The largest tile (rows of one side per block) whose shared memory fits, and its bytes.
    fn tile(self, op: &'static str, d: usize) -> Result<(usize, u32)> {
        [32, 16, 8, 4, 2, 1]
            .into_iter()
            .map(|tile| (tile, self.shared_floats(tile, d) * 4))
            .find(|&(_, bytes)| bytes <= SHARED_BYTES)
            .map(|(tile, bytes)| (tile, bytes as u32))
            .ok_or_else(|| {
                Error::Cuda(format!(
                    "{op}: head dim {d} is too large for the fused kernel's shared memory; \
                     run the plain attention with TOKENFORMER_FUSED=attention:0"
                ))
            })
    }

    /// One block per (head, tile) of `t` rows.
    fn launch(
        self,
        op: &'static str,
        heads: usize,
        (t, d): (usize, usize),
    ) -> Result<(LaunchConfig, [Arg; 3])> {
        let (tile, shared_mem_bytes) = self.tile(op, d)?;
        let blocks = count_u32(op, heads * t.div_ceil(tile))?;
        let cfg =
            LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes };
        let sizes =
            [Arg::U32(count_u32(op, t)?), Arg::U32(count_u32(op, d)?), Arg::U32(tile as u32)];
        Ok((cfg, sizes))
    }
}

/// (heads, T, d_h) of q [B, H, T, d_h], with every count the kernels index checked to fit u32.
fn sizes(op: &'static str, q: &Tensor) -> Result<(usize, usize, usize)> {
    count_u32(op, q.numel())?;
    let d = q.dims();
    Ok((d[0] * d[1], d[2], d[3]))
}

pub(crate) fn causal_attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let op = "causal_attention_fused";
    let (heads, t, d) = sizes(op, q)?;
    let qs = CudaStorage::of(q, op)?;
    let backend = &qs.backend;
    let mut out = backend.alloc(q.numel())?;
    let mut lse = backend.alloc(heads * t)?;
    if heads > 0 && t > 0 {
        let (cfg, [t_arg, d_arg, tile_arg]) = Kernel::Forward.launch(op, heads, (t, d))?;
        // With no features every score is 0 (a scale of 1/√0 would make it NaN).
        let scale = if d == 0 { 0.0 } else { score_scale(d) };
        // SAFETY: attention_forward(q, k, v, out, lse, T, D, tile, scale); block b reads head
        // b / tiles of q, k, v and writes that head's rows of its own query tile in out
        // [heads·T·D] and lse [heads·T]; its shared memory is the `cfg` bytes computed from
        // the same layout.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                Kernel::Forward.name(),
                cfg,
                &[&qs.slice, &CudaStorage::of(k, op)?.slice, &CudaStorage::of(v, op)?.slice],
                &mut [&mut out.slice, &mut lse.slice],
                &[t_arg, d_arg, tile_arg, Arg::F32(scale)],
            )
        }?;
    }
    Ok((cuda_tensor(out, q.dims()), cuda_tensor(lse, &q.dims()[..3])))
}

pub(crate) fn causal_attention_fused_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    g_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "causal_attention_fused_backward";
    let (heads, t, d) = sizes(op, q)?;
    let qs = CudaStorage::of(q, op)?;
    let backend = &qs.backend;
    let (ks, vs) = (&CudaStorage::of(k, op)?.slice, &CudaStorage::of(v, op)?.slice);
    let (gs, lse_s) = (&CudaStorage::of(g_out, op)?.slice, &CudaStorage::of(lse, op)?.slice);
    let mut gq = backend.alloc(q.numel())?;
    let mut gk = backend.alloc(q.numel())?;
    let mut gv = backend.alloc(q.numel())?;
    if heads > 0 && t > 0 && d > 0 {
        let rows = count_u32(op, heads * t)?;
        let mut delta = backend.alloc(heads * t)?;
        // SAFETY: attention_backward_delta(out, g, delta, rows, D): thread i < rows reads row i
        // of out and g [rows·D] and writes delta[i].
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                "attention_backward_delta",
                launch_1d(rows),
                &[&CudaStorage::of(out, op)?.slice, gs],
                &mut [&mut delta.slice],
                &[Arg::U32(rows), Arg::U32(count_u32(op, d)?)],
            )
        }?;
        let scale = score_scale(d);
        let (cfg, [t_arg, d_arg, tile_arg]) = Kernel::BackwardKv.launch(op, heads, (t, d))?;
        // SAFETY: attention_backward_kv(q, k, v, g, lse, delta, gk, gv, T, D, tile, scale);
        // block b reads head b / tiles of the [heads·T·D] inputs and [heads·T] lse and delta,
        // and writes its own key tile's rows of gk and gv; shared memory as computed above.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                Kernel::BackwardKv.name(),
                cfg,
                &[&qs.slice, ks, vs, gs, lse_s, &delta.slice],
                &mut [&mut gk.slice, &mut gv.slice],
                &[t_arg, d_arg, tile_arg, Arg::F32(scale)],
            )
        }?;
        let (cfg, [t_arg, d_arg, tile_arg]) = Kernel::BackwardQ.launch(op, heads, (t, d))?;
        // SAFETY: attention_backward_q(q, k, v, g, lse, delta, gq, T, D, tile, scale); block b
        // writes its own query tile's rows of gq; otherwise as above.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                Kernel::BackwardQ.name(),
                cfg,
                &[&qs.slice, ks, vs, gs, lse_s, &delta.slice],
                &mut [&mut gq.slice],
                &[t_arg, d_arg, tile_arg, Arg::F32(scale)],
            )
        }?;
    }
    let dims = q.dims();
    Ok((cuda_tensor(gq, dims), cuda_tensor(gk, dims), cuda_tensor(gv, dims)))
}
