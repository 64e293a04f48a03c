//! The CUDA emulator's own tests: kernels with planted defects (a missing barrier, a barrier
//! not every thread reaches, shuffles with lanes gone, a write past the end of a buffer,
//! launches a GPU refuses) must each be caught. An emulator that passes everything would prove
//! nothing about the kernels it runs.
//!
//! These test the emulator, so they run only where it can be loaded: on a machine with a C++
//! compiler (it is built with the crate) and no CUDA driver. Elsewhere each prints why not.

use cudarc::driver::LaunchConfig;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use tokenformer_core::cuda::{emulator, Arg, CudaBackend};

/// The emulated device, or None after printing why these tests do not apply here.
fn emulated() -> Option<Arc<CudaBackend>> {
    match emulator::use_for_tests_if_no_driver() {
        Ok(true) => Some(CudaBackend::get(0).expect("the emulated device opens")),
        Ok(false) => {
            let _ = writeln!(std::io::stderr(), "not applicable: a CUDA driver is installed");
            None
        }
        Err(e) => {
            tokenformer_core::testing::report_skip(&e.to_string());
            None
        }
    }
}

/// The tests take turns: the order of blocks and threads is process-wide, and so is the one
/// context, whose error from a faulty launch is returned by the next call, whichever thread
/// makes it (as on a GPU).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn blocks_of(blocks: u32, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared }
}

/// A kernel: (module name, source, kernel name).
type Kernel = (&'static str, &'static str, &'static str);

/// Runs `kernel` on `input` with `n` as its one scalar, returning its `out_len` outputs, or the
/// error of the launch or of the synchronisation after it (where a GPU reports a fault).
fn run(
    backend: &Arc<CudaBackend>,
    (module, source, kernel): Kernel,
    cfg: LaunchConfig,
    input: &[f32],
    out_len: usize,
    n: u32,
) -> Result<Vec<f32>, String> {
    let x = backend.upload(input).map_err(|e| e.to_string())?;
    let mut y = backend.zeros(out_len).map_err(|e| e.to_string())?;
    // SAFETY: every kernel below takes (const float*, float*, unsigned int) as passed here; the
    // ones that go out of bounds do so on purpose, into the emulator's guard pages.
    let outputs = &mut [&mut y.slice];
    unsafe { backend.launch(module, source, kernel, cfg, &[&x.slice], outputs, &[Arg::U32(n)]) }
        .map_err(|e| e.to_string())?;
    backend.synchronize().map_err(|e| e.to_string())?;
    y.to_vec().map_err(|e| e.to_string())
}

const SHIFT: &str = r#"
// out[t] = in[(t + 1) % n], staged through shared memory.
extern "C" __global__ void shift_with_barrier(const float* in, float* out, unsigned int n) {
    __shared__ float tile[256];
    unsigned int t = threadIdx.x;
    tile[t] = in[t];
    __syncthreads();
    out[t] = tile[(t + 1) % n];
}
// The same without the barrier: a thread may read its neighbour's slot before it is written.
extern "C" __global__ void shift_without_barrier(const float* in, float* out, unsigned int n) {
    __shared__ float tile[256];
    unsigned int t = threadIdx.x;
    tile[t] = in[t];
    out[t] = tile[(t + 1) % n];
}
"#;

#[test]
fn a_missing_barrier_shows_as_a_difference_between_orders() {
    let _turn = one_at_a_time();
    let Some(backend) = emulated() else { return };
    let input: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let expected: Vec<f32> = (0..256).map(|i| ((i + 1) % 256) as f32).collect();
    let (good, racy) = (
        ("selftest_shift", SHIFT, "shift_with_barrier"),
        ("selftest_shift", SHIFT, "shift_without_barrier"),
    );
    let mut racy_outputs = Vec::new();
    for order in ["forward", "reverse", "random:7", "random:8"] {
        emulator::set_order(order).unwrap();
        let out = run(&backend, good, blocks_of(1, 256, 0), &input, 256, 256).unwrap();
        assert_eq!(out, expected, "with the barrier, order {order}");
        racy_outputs.push(run(&backend, racy, blocks_of(1, 256, 0), &input, 256, 256).unwrap());
    }
    emulator::set_order("forward").unwrap();
    // Forward: each thread reads a slot its neighbour has not written yet (the NaN fill of
    // shared memory), but the last, which wraps around to slot 0; reverse: every neighbour has
    // written first, but thread 255's (slot 0, thread 0's, runs last). The race shows.
    assert!(racy_outputs[0][..255].iter().all(|v| v.is_nan()), "{:?}", &racy_outputs[0][..8]);
    assert_eq!(racy_outputs[0][255], 0.0);
    assert_eq!(racy_outputs[1][..255], expected[..255]);
    assert!(racy_outputs[1][255].is_nan());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(racy_outputs[2..].iter().all(|o| bits(o) != bits(&racy_outputs[0])));
    assert!(racy_outputs[2..].iter().all(|o| bits(o) != bits(&racy_outputs[1])));
}

const DEFECTS: &str = r#"
// Threads 100 and up return; the others wait at a barrier they will never all reach.
extern "C" __global__ void divergent_barrier(const float* in, float* out, unsigned int n) {
    unsigned int t = threadIdx.x;
    if (t >= 100) return;
    __syncthreads();
    out[t] = in[t];
}
// The low half of each warp returns before a shuffle that names every lane.
extern "C" __global__ void shuffle_after_return(const float* in, float* out, unsigned int n) {
    unsigned int t = threadIdx.x;
    if (t % 32 < 16) return;
    out[t] = __shfl_xor_sync(0xffffffffu, in[t], 16);
}
// A full-warp shuffle in a block whose last warp has 16 lanes.
extern "C" __global__ void shuffle_with_missing_lanes(const float* in, float* out,
                                                      unsigned int n) {
    unsigned int t = threadIdx.x;
    out[t] = __shfl_xor_sync(0xffffffffu, in[t], 1);
}
// Writes one float past the end of `out` (n floats).
extern "C" __global__ void write_past_the_end(const float* in, float* out, unsigned int n) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t <= n) out[t] = in[0];
}
// A warp sum by shuffles, correct: the baseline that must pass.
extern "C" __global__ void warp_sums(const float* in, float* out, unsigned int n) {
    unsigned int t = threadIdx.x;
    float v = in[t];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    out[t] = v;
}
// Dynamic shared memory: each thread writes its slot, then reads the mirrored one.
extern "C" __global__ void mirror(const float* in, float* out, unsigned int n) {
    extern __shared__ float slots[];
    unsigned int t = threadIdx.x;
    slots[t] = in[t];
    __syncthreads();
    out[t] = slots[n - 1 - t];
}
"#;

const LEGAL: &str = r#"
// Legal CUDA that mixes masks: the low half-warp meets alone, then the whole warp shuffles,
// then the high half meets alone. out[t] = in[t ^ 16] + 100.
extern "C" __global__ void half_warps_then_whole(const float* in, float* out, unsigned int n) {
    unsigned int t = threadIdx.x;
    if (t % 32 < 16) __syncwarp(0x0000ffffu);
    float v = __shfl_xor_sync(0xffffffffu, in[t] + 100.0f, 16);
    if (t % 32 >= 16) __syncwarp(0xffff0000u);
    out[t] = v;
}
// __syncwarp after some lanes returned is legal: returned lanes count as arrived. A shuffle
// down by 0xffffffe1 moves by 1 (only the low five bits count).
extern "C" __global__ void syncwarp_after_returns(const float* in, float* out, unsigned int n) {
    unsigned int t = threadIdx.x;
    if (t % 32 < 8) return;
    __syncwarp();
    out[t] = __shfl_down_sync(0xffffff00u, in[t], 0xffffffe1u);
}
// Dynamic shared memory declared at file scope, and __launch_bounds__ after `void`.
extern __shared__ float file_scope_slots[];
extern "C" __global__ void __launch_bounds__(64) reverse_via_file_scope(const float* in,
                                                                        float* out, unsigned int n) {
    unsigned int t = threadIdx.x;
    file_scope_slots[t] = in[t];
    __syncthreads();
    out[t] = file_scope_slots[n - 1 - t];
}
"#;

#[test]
fn legal_mixed_masks_file_scope_shared_memory_and_launch_bounds_work() {
    let _turn = one_at_a_time();
    let Some(backend) = emulated() else { return };
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    for order in ["forward", "reverse", "random:3"] {
        emulator::set_order(order).unwrap();
        let kernel = ("selftest_legal", LEGAL, "half_warps_then_whole");
        let out = run(&backend, kernel, blocks_of(1, 64, 0), &input, 64, 64).unwrap();
        let expected: Vec<f32> = (0..64).map(|t| ((t ^ 16) + 100) as f32).collect();
        assert_eq!(out, expected, "order {order}");
    }
    emulator::set_order("forward").unwrap();
    let kernel = ("selftest_legal", LEGAL, "syncwarp_after_returns");
    let out = run(&backend, kernel, blocks_of(1, 32, 0), &input, 32, 32).unwrap();
    // Lanes 8-30 read the next lane; lane 31, past the end of the warp, its own value.
    let expected: Vec<f32> =
        (0..32).map(|t| [0, t + 1, 31][(t >= 8) as usize + (t == 31) as usize] as f32).collect();
    assert_eq!(out, expected);
    let kernel = ("selftest_legal", LEGAL, "reverse_via_file_scope");
    let out = run(&backend, kernel, blocks_of(1, 64, 256), &input, 64, 64).unwrap();
    assert_eq!(out, input.iter().rev().copied().collect::<Vec<_>>());
}

const OVERRUNS: &str = r#"
// Writes 64 floats past the end of a static shared array.
extern "C" __global__ void shared_overrun(const float* in, float* out, unsigned int n) {
    __shared__ float tile[64];
    unsigned int t = threadIdx.x;
    tile[t] = in[t];
    __syncthreads();
    out[t] = tile[t % 64];
}
// A local array of 1 MiB, four times a thread's stack.
extern "C" __global__ void stack_overrun(const float* in, float* out, unsigned int n) {
    volatile float big[262144];
    for (unsigned int i = 0; i < 262144; i += 1024) big[i] = in[0];
    out[threadIdx.x] = big[n];
}
"#;

#[test]
fn overruns_of_shared_memory_and_of_a_threads_stack_are_caught() {
    let _turn = one_at_a_time();
    let Some(backend) = emulated() else { return };
    let kernel = ("selftest_overruns", OVERRUNS, "shared_overrun");
    let err = run(&backend, kernel, blocks_of(1, 128, 0), &[1.0; 128], 128, 128).unwrap_err();
    assert!(err.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{err}");
    let kernel = ("selftest_overruns", OVERRUNS, "stack_overrun");
    let err = run(&backend, kernel, blocks_of(1, 4, 0), &[1.0; 4], 4, 8).unwrap_err();
    assert!(err.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{err}");
}

fn defect(name: &'static str) -> Kernel {
    ("selftest_defects", DEFECTS, name)
}

#[test]
fn correct_shuffles_and_dynamic_shared_memory_pass() {
    let _turn = one_at_a_time();
    let Some(backend) = emulated() else { return };
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let sums = run(&backend, defect("warp_sums"), blocks_of(1, 64, 0), &input, 64, 64).unwrap();
    let first: f32 = (0..32).map(|i| i as f32).sum();
    let second: f32 = (32..64).map(|i| i as f32).sum();
    assert!(sums[..32].iter().all(|&v| v == first) && sums[32..].iter().all(|&v| v == second));
    let mirrored = run(&backend, defect("mirror"), blocks_of(1, 64, 256), &input, 64, 64).unwrap();
    assert_eq!(mirrored, input.iter().rev().copied().collect::<Vec<_>>());
}

#[test]
fn a_barrier_not_every_thread_reaches_is_an_error() {
    let _turn = one_at_a_time();
    let Some(backend) = emulated() else { return };
    let cfg = blocks_of(1, 128, 0);
    let err = run(&backend, defect("divergent_barrier"), cfg, &[1.0; 128], 128, 128).unwrap_err();
    assert!(err.contains("CUDA_ERROR_LAUNCH_FAILED"), "{err}");
    // The error was reported once: the device goes on working.
    let ok = run(&backend, defect("warp_sums"), blocks_of(1, 32, 0), &[1.0; 32], 32, 32);
    assert_eq!(ok.unwrap(), vec![32.0; 32]);
}

#[test]
fn shuffles_with_lanes_returned_or_missing_are_errors() {
    let _turn = one_at_a_time();
    let Some(backend) = emulated() else { return };
    let cfg = blocks_of(1, 64, 0);
    let err = run(&backend, defect("shuffle_after_return"), cfg, &[1.0; 64], 64, 64).unwrap_err();
    assert!(err.contains("CUDA_ERROR_LAUNCH_FAILED"), "{err}");
    let cfg = blocks_of(1, 48, 0);
    let missing = defect("shuffle_with_missing_lanes");
    let err = run(&backend, missing, cfg, &[1.0; 48], 48, 48).unwrap_err();
    assert!(err.contains("CUDA_ERROR_LAUNCH_FAILED"), "{err}");
}

#[test]
fn a_write_past_the_end_of_a_buffer_is_an_illegal_address() {
    let _turn = one_at_a_time();
    let Some(backend) = emulated() else { return };
    // 1000 floats: 4000 bytes, a multiple of 16, so the guard page begins right after the last.
    let cfg = blocks_of(4, 256, 0);
    let err = run(&backend, defect("write_past_the_end"), cfg, &[1.0], 1000, 1000).unwrap_err();
    assert!(err.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{err}");
    // The same kernel with room for the extra float is fine.
    let fine = run(&backend, defect("write_past_the_end"), cfg, &[1.0], 1001, 1000).unwrap();
    assert_eq!(fine, vec![1.0; 1001]);
}

#[test]
fn launches_a_gpu_refuses_are_refused() {
    let _turn = one_at_a_time();
    let Some(backend) = emulated() else { return };
    let input = vec![0.0; 2048];
    let odd_block =
        LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 65), shared_mem_bytes: 0 };
    for (what, cfg) in [
        ("1025 threads a block", blocks_of(1, 1025, 0)),
        ("an empty grid", blocks_of(0, 32, 0)),
        ("a block 65 threads deep in z", odd_block),
        ("64 KiB of dynamic shared memory without opting in", blocks_of(1, 32, 64 * 1024)),
    ] {
        let err = run(&backend, defect("warp_sums"), cfg, &input, 2048, 32).unwrap_err();
        assert!(err.contains("CUDA_ERROR_INVALID_VALUE"), "{what}: {err}");
    }
}
