//! Where a training step spends its time, op by op: the table `tokenformer bench --profile`
//! prints.
//!
//! Off unless [`start`] was called on this thread, and then it costs one clock read per
//! recorded op. The forward time of an op is the time from the previous record to its own: its
//! kernels run just before `Var::from_op` records it, so that interval is the op's forward
//! work (plus the few instructions of graph bookkeeping in between). The backward time of an
//! op is its backward rule, timed exactly; adding up the gradients of a value used more than
//! once is counted under `gradient sums`. Work outside the graph (clipping, the optimizer) is
//! timed by the caller with [`time`], which also restarts the forward clock.

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Seconds spent in one op (or labelled piece of work) over the profiled steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpTime {
    pub name: &'static str,
    pub forward: Duration,
    pub backward: Duration,
    /// Forward records plus backward calls.
    pub calls: usize,
}

struct Profile {
    last: Instant,
    ops: Vec<OpTime>,
}

impl Profile {
    fn entry(&mut self, name: &'static str) -> &mut OpTime {
        match self.ops.iter().position(|o| o.name == name) {
            Some(i) => &mut self.ops[i],
            None => {
                self.ops.push(OpTime { name, ..OpTime::default() });
                self.ops.last_mut().expect("just pushed")
            }
        }
    }
}

thread_local! {
    static PROFILE: RefCell<Option<Profile>> = const { RefCell::new(None) };
}

/// Starts (or restarts) collecting on this thread, with empty tables.
pub fn start() {
    PROFILE.with(|p| *p.borrow_mut() = Some(Profile { last: Instant::now(), ops: Vec::new() }));
}

/// Stops collecting and returns the times, in the order ops were first seen.
pub fn finish() -> Vec<OpTime> {
    PROFILE.with(|p| p.borrow_mut().take().map(|p| p.ops).unwrap_or_default())
}

pub fn is_enabled() -> bool {
    PROFILE.with(|p| p.borrow().is_some())
}

/// Restarts the forward clock: what ran since the last record is counted nowhere.
pub fn mark() {
    PROFILE.with(|p| {
        if let Some(p) = p.borrow_mut().as_mut() {
            p.last = Instant::now();
        }
    });
}

/// Runs `f` and counts its time as forward work of `name` (for work outside the graph).
pub fn time<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    timed(name, |e| &mut e.forward, f)
}

/// Runs `f` and adds its time to the column `column` picks of `name`'s entry; restarts the
/// forward clock when `f` ends.
fn timed<R>(
    name: &'static str,
    column: impl FnOnce(&mut OpTime) -> &mut Duration,
    f: impl FnOnce() -> R,
) -> R {
    if !is_enabled() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let end = Instant::now();
    PROFILE.with(|p| {
        if let Some(p) = p.borrow_mut().as_mut() {
            let e = p.entry(name);
            *column(e) += end - start;
            e.calls += 1;
            p.last = end;
        }
    });
    out
}

/// Called when an op is recorded: the time since the previous record was its forward pass.
pub(crate) fn forward_recorded(name: &'static str) {
    PROFILE.with(|p| {
        if let Some(p) = p.borrow_mut().as_mut() {
            let now = Instant::now();
            let elapsed = now - p.last;
            let e = p.entry(name);
            e.forward += elapsed;
            e.calls += 1;
            p.last = now;
        }
    });
}

/// Runs the backward rule `f` of `name`, counting its time.
pub(crate) fn backward<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    timed(name, |e| &mut e.backward, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Var;
    use tokenformer_core::Tensor;

    #[test]
    fn records_forward_and_backward_per_op_only_while_enabled() {
        let x = Var::param(Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3]).unwrap());
        let _ = x.square().unwrap();
        start();
        let y = x.square().unwrap().sum_all().unwrap();
        y.backward().unwrap();
        time("optimizer", || ());
        let ops = finish();
        let names: Vec<_> = ops.iter().map(|o| o.name).collect();
        assert_eq!(names, ["square", "sum", "optimizer"]);
        // One forward record and one backward call each.
        assert!(ops[..2].iter().all(|o| o.calls == 2), "{ops:?}");
        assert!(!is_enabled());
        let _ = x.square().unwrap();
        assert!(finish().is_empty());
    }
}
