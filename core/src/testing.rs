//! What the test suites share below the ops crate: how a test that cannot run here says so.

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
