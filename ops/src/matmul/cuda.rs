//! CUDA glue for matmul: cuBLAS SGEMM, with no kernel of our own.
//!
//! cuBLAS is column-major; our tensors are row-major. A row-major [r, c] matrix is, byte for
//! byte, the column-major [c, r] matrix, i.e. its transpose. So C = op(A)·op(B) in row-major is
//! computed as Cᵀ = op(B)ᵀ·op(A)ᵀ in column-major: pass B where cuBLAS expects its first
//! operand and A as its second, with the sizes swapped (cuBLAS m = our n, cuBLAS n = our m).
//! A transpose flag of ours becomes cuBLAS's transpose flag on that operand, and the leading
//! dimension of each operand is the row length it is stored with.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use tokenformer_core::cuda::{cuda_tensor, CudaStorage};
use tokenformer_core::{Error, Result, Tensor};

/// `v` as the 32-bit int cuBLAS takes, or an error naming the op.
fn int(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::Cuda(format!("{name}: size {v} is beyond cuBLAS's 32-bit ints")))
}

pub(crate) fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let name = "matmul";
    let (sa, sb) = (CudaStorage::of(a, name)?, CudaStorage::of(b, name)?);
    let backend = &sa.backend;
    let super::Plan { batch, m, k, n, a_shared, b_shared, out_dims } =
        super::plan(name, a, b, trans_a, trans_b)?;
    if batch * m * n == 0 {
        return Ok(cuda_tensor(backend.alloc(0)?, &out_dims));
    }
    if k == 0 {
        return Ok(cuda_tensor(backend.zeros(batch * m * n)?, &out_dims));
    }
    let mut out = backend.alloc(batch * m * n)?;
    // Elements between consecutive batches of each operand; 0 for a shared rank-2 operand.
    let stride_a = if a_shared { 0 } else { m * k };
    let stride_b = if b_shared { 0 } else { k * n };
    // A shared B with an untransposed A: A's batches stacked are one [batch·m, k] matrix, and
    // the whole product is a single GEMM.
    let (gemm_batch, rows) = if b_shared && !trans_a { (1, batch * m) } else { (batch, m) };
    let op =
        |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let gemm = GemmConfig {
        transa: op(trans_b),
        transb: op(trans_a),
        m: int(name, n)?,
        n: int(name, rows)?,
        k: int(name, k)?,
        alpha: 1.0f32,
        lda: int(name, if trans_b { k } else { n })?,
        ldb: int(name, if trans_a { m } else { k })?,
        beta: 0.0f32,
        ldc: int(name, n)?,
    };
    if gemm_batch == 1 {
        // SAFETY: the sizes and leading dimensions describe exactly the buffers of a, b, out.
        backend.with_blas("cuBLAS sgemm (matmul)", |blas| unsafe {
            blas.gemm(gemm, &sb.slice, &sa.slice, &mut out.slice)
        })?;
    } else {
        let cfg = StridedBatchedConfig {
            gemm,
            batch_size: int(name, gemm_batch)?,
            stride_a: stride_b as i64,
            stride_b: stride_a as i64,
            stride_c: (m * n) as i64,
        };
        // SAFETY: as above, batch by batch; a stride of 0 re-reads the shared operand.
        backend.with_blas("cuBLAS sgemm_strided_batched (matmul)", |blas| unsafe {
            blas.gemm_strided_batched(cfg, &sb.slice, &sa.slice, &mut out.slice)
        })?;
    }
    Ok(cuda_tensor(out, &out_dims))
}
