//! What several integration tests share: a scratch directory per test.

use std::path::PathBuf;

/// A scratch directory under the system's temporary folder, named after the test binary, the
/// test and the process, emptied when made and removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let binary = env!("CARGO_CRATE_NAME");
        let dir = std::env::temp_dir().join(format!("tf-{binary}-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
