//! Benchmarks of the engine: raw matmul throughput and full training steps (forward, backward,
//! AdamW) of a TokenFormer preset, with model FLOP/s and MFU.
//!
//! Model FLOPs follow SPEC §2: 6·(matmul parameters) + 12·L·d·T per token, attention counted
//! non-causally as llm.c and PaLM do; MFU divides by the card's peak for the arithmetic mode in
//! use (fp32 CUDA cores, or TF32 tensor cores with `--tf32`), or on the CPU by the fp32 peak
//! an FMA loop measures on the same threads (see [`cpu_info`]).

use crate::config::ModelConfig;
use crate::model::TokenFormer;
use crate::optim::Optimizer;
use crate::train::train_step;
use serde::Serialize;
use std::time::Instant;
use tokenformer_autograd::profile;
use tokenformer_core::{Device, Error, Result, Rng, Tensor};
use tokenformer_ops::adamw::AdamW;
use tokenformer_ops::matmul::{matmul, matmul_backward};

/// The shape of a timed product: (m × k)·(k × n).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MatmulShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl MatmulShape {
    /// `N` (a square product) or `MxKxN`.
    pub fn parse(text: &str) -> Result<MatmulShape> {
        let bad = || {
            Error::invalid(format!(
                "--matmul {text:?}: expected a size N or a shape MxKxN (as 2048x384x1536)"
            ))
        };
        let dims: Vec<usize> = text
            .split(['x', 'X'])
            .map(|d| d.trim().parse::<usize>().map_err(|_| bad()))
            .collect::<Result<_>>()?;
        match dims[..] {
            [n] => Ok(MatmulShape { m: n, k: n, n }),
            [m, k, n] => Ok(MatmulShape { m, k, n }),
            _ => Err(bad()),
        }
    }

    /// Whether nothing is to be timed (a zero anywhere).
    pub fn is_empty(&self) -> bool {
        self.m == 0 || self.k == 0 || self.n == 0
    }

    /// Multiply-adds of one product.
    fn macs(&self) -> f64 {
        self.m as f64 * self.k as f64 * self.n as f64
    }
}

impl std::fmt::Display for MatmulShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.m, self.k, self.n)
    }
}

#[derive(Debug, Serialize)]
pub struct MatmulBench {
    pub shape: MatmulShape,
    /// The best time of C = A·B.
    pub seconds: f64,
    pub gflops: f64,
    /// With `backward`: the best time of both gradient products, G·Bᵀ and Aᵀ·G.
    pub backward_seconds: Option<f64>,
    pub backward_gflops: Option<f64>,
}

/// GFLOP/s of an (m × k)·(k × n) matmul on `device`, and with `backward` of its two gradient
/// products: the best of `repeats` timed runs after one warm-up.
pub fn bench_matmul(
    shape: MatmulShape,
    backward: bool,
    repeats: usize,
    device: Device,
) -> Result<MatmulBench> {
    let mut rng = Rng::new(0);
    let MatmulShape { m, k, n } = shape;
    let a = Tensor::randn(&[m, k], 1.0, &mut rng).to_device(device)?;
    let b = Tensor::randn(&[k, n], 1.0, &mut rng).to_device(device)?;
    let best = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        synchronize(&f()?)?;
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            let out = f()?;
            synchronize(&out)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let seconds = best(&|| matmul(&a, &b, false, false))?;
    let backward_seconds = if backward {
        let g = Tensor::randn(&[m, n], 1.0, &mut rng).to_device(device)?;
        Some(best(&|| {
            let (ga, gb) = matmul_backward(&a, &b, &g, false, false)?;
            synchronize(&ga)?;
            Ok(gb)
        })?)
    } else {
        None
    };
    let gflops = |flops: f64, s: f64| flops / s / 1e9;
    Ok(MatmulBench {
        shape,
        seconds,
        gflops: gflops(2.0 * shape.macs(), seconds),
        backward_seconds,
        backward_gflops: backward_seconds.map(|s| gflops(4.0 * shape.macs(), s)),
    })
}

/// The processor as the CPU kernels see it, with its measured peak.
#[derive(Debug, Serialize)]
pub struct CpuInfo {
    /// The model name (`/proc/cpuinfo`).
    pub processor: String,
    /// rayon's pool size: the threads a step runs on.
    pub threads: usize,
    /// The vector instructions the kernels use: avx512, avx2 or plain.
    pub vector_isa: String,
    /// Floats per vector register.
    pub vector_lanes: usize,
    /// Data cache bytes per core and where they were read.
    pub l1d_bytes: usize,
    pub l2_bytes: usize,
    pub l3_bytes: usize,
    pub cache_source: String,
    /// The GEMM's register tile and blocks, where the packed GEMM runs.
    pub gemm_blocking: Option<GemmBlocking>,
    /// fp32 FLOP/s of an FMA loop on one thread and on all of the pool's threads.
    pub peak_gflops_one_thread: f64,
    pub peak_gflops_all_threads: f64,
}

#[derive(Debug, Serialize)]
pub struct GemmBlocking {
    pub mr: usize,
    pub nr: usize,
    pub kc: usize,
    pub mc: usize,
    pub nc: usize,
}

/// Reads the processor's name, caches and vector unit, and measures its fp32 peak.
pub fn cpu_info() -> Result<CpuInfo> {
    use tokenformer_ops::processor;
    let isa = processor::checked_isa()?;
    let cache = processor::cache_info();
    let gemm_blocking = tokenformer_ops::matmul::cpu_gemm_choice()?.map(|(_, b)| GemmBlocking {
        mr: b.mr,
        nr: b.nr,
        kc: b.kc,
        mc: b.mc,
        nc: b.nc,
    });
    Ok(CpuInfo {
        processor: processor::model_name(),
        threads: rayon::current_num_threads(),
        vector_isa: isa.name().to_string(),
        vector_lanes: isa.lanes(),
        l1d_bytes: cache.l1d.size,
        l2_bytes: cache.l2.size,
        l3_bytes: cache.l3.size,
        cache_source: cache.source.to_string(),
        gemm_blocking,
        peak_gflops_one_thread: processor::peak_flops(false) / 1e9,
        peak_gflops_all_threads: processor::peak_flops(true) / 1e9,
    })
}

/// Waits until the work that produced `t` is done (a no-op on the CPU).
fn synchronize(t: &Tensor) -> Result<()> {
    synchronize_device(t.device())
}

/// Waits until all work queued on `device` is done (a no-op on the CPU).
fn synchronize_device(device: Device) -> Result<()> {
    if let Device::Cuda(ordinal) = device {
        tokenformer_core::cuda::CudaBackend::get(ordinal)?.synchronize()?;
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct TrainBench {
    pub device: String,
    pub device_name: String,
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub tf32: bool,
    pub params: usize,
    pub step_seconds: f64,
    pub forward_backward_seconds: f64,
    pub tokens_per_sec: f64,
    pub model_tflops: f64,
    /// Peak for this mode, in TFLOP/s: the card's where the card is known, or the CPU's
    /// measured fp32 peak on all threads (see [`TrainBench::with_peak`]).
    pub peak_tflops: Option<f64>,
    pub mfu: Option<f64>,
    pub peak_memory_bytes: u64,
    /// Time per op over the timed steps, when asked for (`--profile`).
    pub profile: Option<Vec<ProfileRow>>,
}

impl TrainBench {
    /// Sets the peak (TFLOP/s) that MFU divides by: on the CPU the measured one of
    /// [`CpuInfo`], which `bench_train` does not measure itself.
    pub fn with_peak(mut self, peak_tflops: f64) -> TrainBench {
        self.peak_tflops = Some(peak_tflops);
        self.mfu = Some(self.model_tflops / peak_tflops);
        self
    }
}

/// One line of the profile: an op (or a piece of work outside the graph) and its time per step.
#[derive(Debug, Serialize)]
pub struct ProfileRow {
    pub name: String,
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    /// (forward + backward) / step time.
    pub share: f64,
}

/// The profiler's totals as per-step rows, largest first, with a last row for the time no
/// op accounts for.
fn profile_rows(ops: Vec<profile::OpTime>, steps: usize, step_seconds: f64) -> Vec<ProfileRow> {
    let per_step = |d: std::time::Duration| d.as_secs_f64() / steps as f64;
    let mut rows: Vec<ProfileRow> = ops
        .into_iter()
        .map(|o| {
            let (f, b) = (per_step(o.forward), per_step(o.backward));
            ProfileRow {
                name: o.name.to_string(),
                forward_seconds: f,
                backward_seconds: b,
                share: (f + b) / step_seconds,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.share.total_cmp(&a.share));
    let accounted: f64 = rows.iter().map(|r| r.forward_seconds + r.backward_seconds).sum();
    let rest = (step_seconds - accounted).max(0.0);
    rows.push(ProfileRow {
        name: "(outside ops)".into(),
        forward_seconds: rest,
        backward_seconds: 0.0,
        share: rest / step_seconds,
    });
    rows
}

/// Dense peak TFLOP/s by card name: (fp32, tf32). Vendor figures without sparsity.
pub fn peak_tflops(device_name: &str, tf32: bool) -> Option<f64> {
    const TABLE: &[(&str, f64, f64)] = &[
        ("H200", 67.0, 494.7),
        ("H100 PCIe", 51.2, 378.0),
        ("H100", 67.0, 494.7),
        ("A100", 19.5, 156.0),
        ("L40S", 91.6, 183.0),
        ("A10G", 31.2, 62.5),
        ("RTX 4090", 82.6, 82.6),
    ];
    TABLE
        .iter()
        .find(|(name, _, _)| device_name.contains(name))
        .map(|&(_, fp32, t)| if tf32 { t } else { fp32 })
}

/// Times the steps of a benchmark. On a GPU it records CUDA events on the device's stream at
/// each mark, so the host never waits for the device between backward and the update (which
/// would leave the device idle while the host queues the next kernels); the times are read once
/// at the end. On the CPU it reads the clock. Marks come in order: the start of a step, the end
/// of its backward pass, then the next step's start (the end of the last step being a final
/// mark).
struct StepTimer {
    device: Device,
    events: Vec<tokenformer_core::cuda::DeviceEvent>,
    instants: Vec<Instant>,
}

impl StepTimer {
    fn new(device: Device) -> Result<StepTimer> {
        Ok(StepTimer { device, events: Vec::new(), instants: Vec::new() })
    }

    fn mark(&mut self) -> Result<()> {
        match self.device {
            Device::Cuda(ordinal) => {
                let backend = tokenformer_core::cuda::CudaBackend::get(ordinal)?;
                self.events.push(backend.record_event()?);
            }
            Device::Cpu => self.instants.push(Instant::now()),
        }
        Ok(())
    }

    /// (seconds from the first mark to the last, seconds spent in forward and backward).
    fn seconds(&self) -> Result<(f64, f64)> {
        let between = |a: usize, b: usize| -> Result<f64> {
            match self.device {
                Device::Cuda(_) => self.events[b].seconds_since(&self.events[a]),
                Device::Cpu => Ok(self.instants[b].duration_since(self.instants[a]).as_secs_f64()),
            }
        };
        let marks = self.events.len().max(self.instants.len());
        if marks < 3 {
            return Ok((0.0, 0.0));
        }
        let mut forward_backward = 0.0;
        for start in (0..marks - 1).step_by(2) {
            forward_backward += between(start, start + 1)?;
        }
        Ok((between(0, marks - 1)?, forward_backward))
    }
}

/// Peak resident memory of this process (Linux VmHWM), for CPU runs.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Times `steps` full training steps (after two warm-up steps) of `config` on random tokens;
/// with `profile`, also the time per op (see `tokenformer_autograd::profile`).
#[allow(clippy::too_many_arguments)]
pub fn bench_train(
    preset: &str,
    config: &ModelConfig,
    batch: usize,
    seq: usize,
    steps: usize,
    device: Device,
    tf32: bool,
    profile: bool,
) -> Result<TrainBench> {
    if batch == 0 || seq == 0 || steps == 0 {
        return Err(Error::invalid("bench: --batch, --seq and --steps must be positive"));
    }
    if seq > config.max_seq_len {
        return Err(Error::invalid(format!(
            "bench: --seq {seq} exceeds the preset's max_seq_len {}",
            config.max_seq_len
        )));
    }
    if device.is_cuda() {
        tokenformer_core::cuda::set_tf32(tf32);
    }
    let mut model = TokenFormer::init(config, 0, device)?;
    let hp = AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut optimizer = Optimizer::new(&model, hp)?;
    let mut rng = Rng::new(1);
    let tokens: Vec<f32> =
        (0..batch * (seq + 1)).map(|_| rng.below(config.vocab_size as u64) as f32).collect();
    let all = Tensor::from_vec(tokens, &[batch, seq + 1])?.to_device(device)?;
    let inputs = tokenformer_ops::layout::narrow(&all, 1, 0, seq)?;
    let targets = tokenformer_ops::layout::narrow(&all, 1, 1, seq)?;
    let mut timer = StepTimer::new(device)?;
    let mut step = |timer: &mut StepTimer, timed: bool| -> Result<()> {
        if timed {
            timer.mark()?;
        }
        let batch = || Ok((inputs.clone(), targets.clone()));
        // The end of the backward pass, when this step is timed.
        let mut marked = Ok(());
        let after_backward = |_| {
            if timed {
                marked = timer.mark();
            }
            false
        };
        train_step(&mut model, &mut optimizer, 1, batch, 1.0, 1e-4, after_backward)?;
        marked
    };
    step(&mut timer, false)?;
    step(&mut timer, false)?;
    synchronize_device(device)?;
    if profile {
        profile::start();
    }
    for _ in 0..steps {
        step(&mut timer, true)?;
    }
    timer.mark()?;
    let (total, forward_backward) = timer.seconds()?;
    let step_seconds = total / steps as f64;
    let profile = profile.then(|| profile_rows(profile::finish(), steps, step_seconds));
    let tokens_per_sec = (batch * seq) as f64 / step_seconds;
    let model_tflops = tokens_per_sec * config.train_flops_per_token(seq) / 1e12;
    let (device_name, peak_memory_bytes) = match device {
        Device::Cpu => (tokenformer_ops::processor::model_name(), peak_rss_bytes()),
        Device::Cuda(ordinal) => {
            let backend = tokenformer_core::cuda::CudaBackend::get(ordinal)?;
            (backend.name()?, backend.memory_stats()?.peak_bytes as u64)
        }
    };
    let peak = if device.is_cuda() { peak_tflops(&device_name, tf32) } else { None };
    Ok(TrainBench {
        device: device.to_string(),
        device_name,
        preset: preset.to_string(),
        batch,
        seq,
        steps,
        tf32,
        params: config.param_count(),
        step_seconds,
        forward_backward_seconds: forward_backward / steps as f64,
        tokens_per_sec,
        model_tflops,
        peak_tflops: peak,
        mfu: peak.map(|p| model_tflops / p),
        peak_memory_bytes,
        profile,
    })
}
