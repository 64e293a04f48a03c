//! Turning a token stream into training batches.
//!
//! A language model learns to predict token t+1 from tokens ..=t, so one training example is a
//! window of `seq + 1` consecutive tokens: the first `seq` are the inputs, the last `seq` (the
//! same window shifted by one) are the targets. Training windows start at random offsets drawn
//! from our own `Rng`, whose whole state is four u64s: saving it in a checkpoint and restoring it
//! makes a resumed run draw exactly the batches the uninterrupted run would have drawn.
//!
//! Validation instead reads the *same* windows every time (the first K, back to back from the
//! start of the validation tokens, or K spread evenly over them), so validation losses at
//! different steps measure the model, not the luck of the draw.
//!
//! Ids are delivered as f32 (our tensors are f32); every id is below 2^24, where f32 holds
//! integers exactly.

use tokenformer_core::{Error, Result, Rng};

/// `batch` rows of `seq` ids each, row-major: row b is `inputs[b*seq..(b+1)*seq]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub inputs: Vec<f32>,
    pub targets: Vec<f32>,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    /// Checks that every input and target is below `vocab`, naming the first that is not.
    /// The trainer calls this on the host before the upload: on a GPU the kernels do not
    /// check ids (a bad one would only show up as a NaN loss; see `tokenformer_ops::embedding`).
    pub fn check_ids(&self, vocab: usize) -> Result<()> {
        let all = self.inputs.iter().chain(&self.targets);
        match all.enumerate().find(|(_, &id)| !(id >= 0.0 && (id as usize) < vocab)) {
            None => Ok(()),
            Some((i, id)) => Err(Error::invalid(format!(
                "batch: token id {id} at {} {} is outside the vocabulary (size {vocab}); \
                 the token file does not match the model's tokenizer",
                if i < self.inputs.len() { "input" } else { "target" },
                i % self.inputs.len().max(1)
            ))),
        }
    }

    fn from_starts(data: &[u32], starts: &[usize], seq: usize) -> Batch {
        let mut inputs = Vec::with_capacity(starts.len() * seq);
        let mut targets = Vec::with_capacity(starts.len() * seq);
        for &s in starts {
            let window = &data[s..s + seq + 1];
            inputs.extend(window[..seq].iter().map(|&t| t as f32));
            targets.extend(window[1..].iter().map(|&t| t as f32));
        }
        Batch { inputs, targets, batch: starts.len(), seq }
    }
}

fn check_window(data: &[u32], seq: usize, what: &str) -> Result<()> {
    if seq == 0 {
        return Err(Error::invalid("sequence length must be at least 1"));
    }
    if data.len() < seq + 1 {
        return Err(Error::invalid(format!(
            "{what} data has {} tokens, fewer than one window of seq_len + 1 = {} tokens \
             (use a shorter sequence length or more data)",
            data.len(),
            seq + 1
        )));
    }
    Ok(())
}

/// Draws random training windows. Holds no data, only its RNG and the batch shape, so it can
/// live next to the dataset without borrowing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batcher {
    rng: Rng,
    batch: usize,
    seq: usize,
}

impl Batcher {
    /// `seed` should be the run's data seed (kept apart from the model-init seed, so changing
    /// the initialisation does not change the batches).
    pub fn new(seed: u64, batch: usize, seq: usize) -> Result<Batcher> {
        Batcher::from_state(Rng::new(seed).state(), batch, seq)
    }

    /// Rebuilds a batcher from a saved `state()`: the next batch is the one the saved batcher
    /// would have drawn next.
    pub fn from_state(state: [u64; 4], batch: usize, seq: usize) -> Result<Batcher> {
        if batch == 0 || seq == 0 {
            return Err(Error::invalid(format!(
                "batch size and sequence length must be at least 1 (got {batch} and {seq})"
            )));
        }
        Ok(Batcher { rng: Rng::from_state(state), batch, seq })
    }

    pub fn state(&self) -> [u64; 4] {
        self.rng.state()
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }

    pub fn seq_len(&self) -> usize {
        self.seq
    }

    /// The next batch of `batch` windows, each starting uniformly in
    /// `0..=data.len() - (seq + 1)`. On error the RNG is left untouched.
    pub fn next_batch(&mut self, data: &[u32]) -> Result<Batch> {
        check_window(data, self.seq, "training")?;
        let positions = (data.len() - self.seq) as u64;
        let starts: Vec<usize> =
            (0..self.batch).map(|_| self.rng.below(positions) as usize).collect();
        Ok(Batch::from_starts(data, &starts, self.seq))
    }
}

/// The fixed validation windows. The data is cut into `available` back-to-back windows (window
/// j starts at token j·seq) and `count` of them are read: window i is slot j = ⌊i·available /
/// count⌋, which is i when reading the first ones and spreads them evenly otherwise. Every token
/// is predicted at most once. Yields batches of up to `batch` windows (the last one may be
/// smaller).
#[derive(Clone, Debug)]
pub struct ValWindows<'a> {
    data: &'a [u32],
    batch: usize,
    seq: usize,
    next: usize,
    count: usize,
    /// The windows the data holds; `count` of them are read.
    available: usize,
    spread: bool,
}

/// The first `max_windows` validation windows of `seq + 1` tokens (fewer if the data is
/// shorter), in batches of `batch`.
pub fn val_windows(
    data: &[u32],
    batch: usize,
    seq: usize,
    max_windows: usize,
) -> Result<ValWindows<'_>> {
    check_window(data, seq, "validation")?;
    if batch == 0 || max_windows == 0 {
        return Err(Error::invalid(
            "validation needs a batch size and a window count of at least 1",
        ));
    }
    let available = (data.len() - 1) / seq;
    let count = available.min(max_windows);
    Ok(ValWindows { data, batch, seq, next: 0, count, available, spread: false })
}

/// `max_windows` validation windows spread evenly over the data (all of them if the data holds
/// no more), in batches of `batch`: a sample of the whole validation set, where
/// [`val_windows`] reads only its start.
pub fn val_windows_spread(
    data: &[u32],
    batch: usize,
    seq: usize,
    max_windows: usize,
) -> Result<ValWindows<'_>> {
    Ok(ValWindows { spread: true, ..val_windows(data, batch, seq, max_windows)? })
}

impl ValWindows<'_> {
    /// Number of windows the full pass covers.
    pub fn num_windows(&self) -> usize {
        self.count
    }
}

impl Iterator for ValWindows<'_> {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.count {
            return None;
        }
        let end = (self.next + self.batch).min(self.count);
        let slot = |i: usize| if self.spread { i * self.available / self.count } else { i };
        let starts: Vec<usize> = (self.next..end).map(|i| slot(i) * self.seq).collect();
        self.next = end;
        Some(Batch::from_starts(self.data, &starts, self.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    #[test]
    fn same_seed_same_batches_and_restore_continues_identically() {
        let data = ramp(1000);
        let mut a = Batcher::new(42, 4, 16).unwrap();
        let mut b = Batcher::new(42, 4, 16).unwrap();
        for _ in 0..5 {
            assert_eq!(a.next_batch(&data).unwrap(), b.next_batch(&data).unwrap());
        }
        let saved = a.state();
        let ahead: Vec<Batch> = (0..5).map(|_| a.next_batch(&data).unwrap()).collect();
        let mut resumed = Batcher::from_state(saved, 4, 16).unwrap();
        let again: Vec<Batch> = (0..5).map(|_| resumed.next_batch(&data).unwrap()).collect();
        assert_eq!(ahead, again);
        assert_ne!(Batcher::new(43, 4, 16).unwrap().next_batch(&data).unwrap(), ahead[0]);
    }

    #[test]
    fn windows_are_shifted_by_one_and_in_bounds() {
        // With seq + 1 == len there is exactly one possible window.
        let data = ramp(9);
        let mut b = Batcher::new(1, 3, 8).unwrap();
        let batch = b.next_batch(&data).unwrap();
        assert_eq!(batch.inputs, (0..8).cycle().take(24).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(batch.targets[..8], (1..9).map(|x| x as f32).collect::<Vec<_>>()[..]);

        let data = ramp(100);
        let mut b = Batcher::new(7, 8, 10).unwrap();
        let mut seen_last = false;
        for _ in 0..500 {
            let batch = b.next_batch(&data).unwrap();
            assert_eq!(batch.inputs.len(), 80);
            for row in 0..8 {
                let x = &batch.inputs[row * 10..(row + 1) * 10];
                let y = &batch.targets[row * 10..(row + 1) * 10];
                assert!(x.iter().zip(y).all(|(a, b)| b - a == 1.0));
                assert!(y[9] <= 99.0);
                seen_last |= y[9] == 99.0;
            }
        }
        assert!(seen_last, "the last window was never drawn");
    }

    #[test]
    fn too_short_data_is_one_clear_error() {
        let mut b = Batcher::new(0, 2, 8).unwrap();
        let state = b.state();
        let err = b.next_batch(&ramp(8)).unwrap_err().to_string();
        assert!(err.contains("8 tokens") && err.contains("= 9 tokens"), "{err}");
        assert_eq!(b.state(), state);
        assert!(val_windows(&ramp(3), 1, 8, 4).is_err());
        assert!(Batcher::new(0, 0, 8).is_err());
    }

    #[test]
    fn validation_windows_are_fixed_and_consecutive() {
        let data = ramp(100);
        // 99 / 10 = 9 windows available; ask for 5 in batches of 2 → 2 + 2 + 1.
        let v = val_windows(&data, 2, 10, 5).unwrap();
        assert_eq!(v.num_windows(), 5);
        let batches: Vec<Batch> = v.collect();
        assert_eq!(batches.iter().map(|b| b.batch).collect::<Vec<_>>(), [2, 2, 1]);
        let targets: Vec<f32> = batches.iter().flat_map(|b| b.targets.clone()).collect();
        assert_eq!(targets, (1..51).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(val_windows(&data, 2, 10, 1000).unwrap().num_windows(), 9);
        let again: Vec<Batch> = val_windows(&data, 2, 10, 5).unwrap().collect();
        assert_eq!(again, batches);
    }

    #[test]
    fn spread_validation_windows_sample_the_whole_set() {
        let data = ramp(100);
        // 9 windows of 10 available; 3 spread ones are slots 0, 3 and 6.
        let v = val_windows_spread(&data, 2, 10, 3).unwrap();
        assert_eq!(v.num_windows(), 3);
        let inputs: Vec<f32> = v.flat_map(|b| b.inputs).collect();
        let want: Vec<f32> =
            [0, 30, 60].iter().flat_map(|&s| s..s + 10).map(|x| x as f32).collect();
        assert_eq!(inputs, want);
        // With no more windows than asked for, spread and first are the same windows.
        let all: Vec<Batch> = val_windows_spread(&data, 4, 10, 50).unwrap().collect();
        assert_eq!(all, val_windows(&data, 4, 10, 50).unwrap().collect::<Vec<_>>());
        assert!(val_windows_spread(&ramp(3), 1, 8, 4).is_err());
    }
}
