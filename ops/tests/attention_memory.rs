//! The fused attention never makes a buffer of T² floats, which the plain composition does: the
//! heap's high-water mark is measured with a counting allocator around each version.
//!
//! This file holds one test on purpose: the allocator counts every thread of the process, so
//! no other test may run beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokenformer_core::{Rng, Tensor};
use tokenformer_ops::attention::{
    causal_attention, causal_attention_backward, causal_attention_fused,
    causal_attention_fused_backward, causal_probs,
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only add
// and subtract the sizes it was asked for.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the high-water mark of `f`, above what was live before it.
fn peak_during(f: impl FnOnce()) -> usize {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - before
}

#[test]
fn fused_attention_allocates_no_t_by_t_buffer() {
    let dims = [1, 2, 1024, 16];
    let mut rng = Rng::new(1);
    let [q, k, v, g] = [0; 4].map(|_| Tensor::randn(&dims, 1.0, &mut rng));
    let probs_bytes = dims[0] * dims[1] * dims[2] * dims[2] * 4; // 8 MiB
    let tensor_bytes = q.numel() * 4; // 128 KiB
                                      // Two worker threads, whatever the machine: each holds its own tile buffers.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let fused = peak_during(|| {
        pool.install(|| {
            let (out, lse) = causal_attention_fused(&q, &k, &v).unwrap();
            let grads = causal_attention_fused_backward(&q, &k, &v, &out, &lse, &g).unwrap();
            drop((out, lse, grads));
        })
    });
    let plain = peak_during(|| {
        pool.install(|| {
            let (out, probs) = causal_attention(&q, &k, &v).unwrap();
            drop(probs);
            let probs = causal_probs(&q, &k).unwrap();
            let grads = causal_attention_backward(&q, &k, &v, &probs, &g).unwrap();
            drop((out, grads));
        })
    });
    eprintln!(
        "peak heap above the inputs, [1, 2, 1024, 16]: fused {} KiB, plain {} KiB; one [B, H, T, T] \
         is {} KiB",
        fused / 1024,
        plain / 1024,
        probs_bytes / 1024
    );
    // The fused pair holds out, lse and three gradients (4 tensors and a bit) plus each
    // thread's tile buffers (about 100 KiB here); the plain pair holds several [B, H, T, T] at
    // once.
    assert!(fused < 8 * tensor_bytes, "fused attention peaked at {fused} bytes");
    assert!(fused < probs_bytes / 4, "fused attention peaked at {fused} bytes");
    assert!(plain >= 2 * probs_bytes, "plain attention peaked at only {plain} bytes");
}
