//! What the test suites share below the ops crate: how a test that cannot run here says so,
//! and how a GPU test finds its device.

use std::io::Write;

/// Prints `skipped: <test>: <why>` on the process's stderr, for a test that returns without
/// checking anything because something it needs is missing. The test harness captures
/// `eprintln!` of passing tests, and a skip must be seen; the test's name comes from its
/// thread (the harness names each test's thread after it), so skips of tests running in
/// parallel can be told apart and counted (`.ci/run` totals them by reason).
pub fn report_skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

/// Whether a GPU test has a CUDA device to run on: the GPU, or where no CUDA driver is installed
/// the CUDA emulator (it says so once). When there is neither, reports the skip and returns
/// false; with `TOKENFORMER_REQUIRE_CUDA=1` (set on GPU machines) that is a failure instead.
pub fn cuda_device_or_skip() -> bool {
    use crate::cuda::{cuda_required, emulator, CudaBackend};
    match emulator::use_for_tests_if_no_driver().and_then(|_| CudaBackend::get(0)) {
        Ok(_) => true,
        Err(e) => {
            assert!(!cuda_required(), "TOKENFORMER_REQUIRE_CUDA=1 but no CUDA device: {e}");
            report_skip(&format!("no CUDA device ({e})"));
            false
        }
    }
}
