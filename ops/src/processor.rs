//! The processor as the CPU kernels see it: its name, the widest vector instructions they may
//! use, and its data caches. The GEMM derives its blocking from these (see
//! `matmul::blocking`), and `bench` prints them.
//!
//! `TOKENFORMER_CPU_ISA` caps the vector width every kernel family uses: `avx512` (the
//! default where the processor has it), `avx2` (AVX2 and FMA: what a processor without
//! AVX-512 runs) or `plain` (the builds' baseline code and the reference GEMM). A cap above
//! what the processor has changes nothing. It lets one machine time the narrower paths.
//!
//! Cache sizes come from Linux's sysfs, else from CPUID (leaf 4 on Intel, 0x8000001D on AMD),
//! else from defaults that fit most x86 cores of the last decade (32 KiB 8-way L1d, 1 MiB
//! 16-way L2, 2 MiB of L3 per core). They are read once per process.

use std::sync::OnceLock;
use tokenformer_core::{Error, Result};

/// The name of the variable that caps the vector width.
pub const ISA_VAR: &str = "TOKENFORMER_CPU_ISA";

/// The vector instructions the CPU kernels are compiled and chosen for, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VectorIsa {
    /// The build's baseline (SSE2 on x86-64): the kernels' plain copies.
    Plain,
    /// 256-bit AVX2 with FMA: 8 floats a register, 16 registers.
    Avx2,
    /// 512-bit AVX-512F (with FMA): 16 floats a register, 32 registers.
    Avx512,
}

impl VectorIsa {
    /// Floats per vector register.
    pub const fn lanes(self) -> usize {
        match self {
            VectorIsa::Plain => 4,
            VectorIsa::Avx2 => 8,
            VectorIsa::Avx512 => 16,
        }
    }

    /// Architectural vector registers.
    pub const fn registers(self) -> usize {
        match self {
            VectorIsa::Plain | VectorIsa::Avx2 => 16,
            VectorIsa::Avx512 => 32,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            VectorIsa::Plain => "plain",
            VectorIsa::Avx2 => "avx2",
            VectorIsa::Avx512 => "avx512",
        }
    }
}

impl std::fmt::Display for VectorIsa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            VectorIsa::Plain => "baseline (no AVX2/FMA)",
            VectorIsa::Avx2 => "AVX2 + FMA, 256-bit",
            VectorIsa::Avx512 => "AVX-512, 512-bit",
        };
        f.write_str(text)
    }
}

/// The widest vector instructions this processor has (FMA included), ignoring the cap.
pub fn detected_isa() -> VectorIsa {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return VectorIsa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return VectorIsa::Avx2;
        }
    }
    VectorIsa::Plain
}

/// Reads a value of `TOKENFORMER_CPU_ISA`.
pub fn parse_isa(spec: &str) -> Result<VectorIsa> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "avx512" | "avx-512" => Ok(VectorIsa::Avx512),
        "avx2" => Ok(VectorIsa::Avx2),
        "plain" | "none" | "baseline" => Ok(VectorIsa::Plain),
        other => {
            Err(Error::invalid(format!("{ISA_VAR}={other:?}: expected avx512, avx2 or plain")))
        }
    }
}

/// The cap set by `TOKENFORMER_CPU_ISA`, or an error naming a value it cannot read.
pub fn isa_cap() -> Result<Option<VectorIsa>> {
    static CAP: OnceLock<Option<String>> = OnceLock::new();
    match CAP.get_or_init(|| std::env::var(ISA_VAR).ok()) {
        Some(spec) => parse_isa(spec).map(Some),
        None => Ok(None),
    }
}

/// The vector instructions the kernels use: the widest the processor has, held to the cap
/// where one is set. An unreadable cap is ignored here; [`checked_isa`] reports it (the GEMM
/// calls that, so a bad value stops the first product).
pub fn vector_isa() -> VectorIsa {
    static ISA: OnceLock<VectorIsa> = OnceLock::new();
    *ISA.get_or_init(|| match isa_cap() {
        Ok(Some(cap)) => cap.min(detected_isa()),
        _ => detected_isa(),
    })
}

/// As [`vector_isa`], or the error of an unreadable `TOKENFORMER_CPU_ISA`.
pub fn checked_isa() -> Result<VectorIsa> {
    isa_cap()?;
    Ok(vector_isa())
}

/// The processor's model name (`/proc/cpuinfo`, else CPUID's brand string).
pub fn model_name() -> String {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let from_proc = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
        });
        from_proc
            .or_else(cpuid::brand)
            .unwrap_or_else(|| format!("unknown {} processor", std::env::consts::ARCH))
    })
    .clone()
}

/// Measured fp32 peak of the vector unit the kernels use ([`vector_isa`]), in FLOP/s: a loop
/// of independent fused multiply-adds (more accumulators than FMA latency × pipes on any x86
/// core, so nothing waits) on the calling thread (`all_threads` false) or on every thread of
/// rayon's pool at once, the best of a few repetitions. Without FMA, a multiply and an add.
pub fn peak_flops(all_threads: bool) -> f64 {
    let isa = vector_isa();
    let run = || {
        let start = std::time::Instant::now();
        let flops = fma_loop(isa);
        (flops, start.elapsed().as_secs_f64())
    };
    let mut best = 0.0f64;
    for _ in 0..5 {
        let rate = if all_threads {
            let start = std::time::Instant::now();
            let flops: f64 = rayon::broadcast(|_| run().0).iter().sum();
            flops / start.elapsed().as_secs_f64()
        } else {
            let (flops, seconds) = run();
            flops / seconds
        };
        best = best.max(rate);
    }
    best
}

/// Runs the FMA loop for `isa` once and returns the floating-point operations it did.
fn fma_loop(isa: VectorIsa) -> f64 {
    const STEPS: usize = 1 << 21;
    // Through black_box, so the compiler cannot see how many steps run.
    let steps = std::hint::black_box(STEPS);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `vector_isa` picks an instruction set only where the processor has it.
        let (sum, flops_per_step) = unsafe {
            match isa {
                VectorIsa::Avx512 => (peak::avx512(steps), 24 * 16 * 2),
                VectorIsa::Avx2 => (peak::avx2(steps), 12 * 8 * 2),
                VectorIsa::Plain => (peak::sse(steps), 12 * 4 * 2),
            }
        };
        std::hint::black_box(sum);
        (steps * flops_per_step) as f64
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        let mut acc = [1.0f32; 8];
        for _ in 0..steps {
            for a in acc.iter_mut() {
                *a = std::hint::black_box(*a).mul_add(0.999_999, 1e-6);
            }
        }
        std::hint::black_box(acc);
        (steps * 8 * 2) as f64
    }
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// `steps` rounds of 24 independent zmm FMAs; returns a value that depends on all of them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(steps: usize) -> f32 {
        let (m, a) = (
            _mm512_set1_ps(std::hint::black_box(0.999_999)),
            _mm512_set1_ps(std::hint::black_box(1e-6)),
        );
        let mut acc = [_mm512_set1_ps(1.0); 24];
        for _ in 0..steps {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, m, a);
            }
        }
        let mut total = _mm512_setzero_ps();
        for x in acc {
            total = _mm512_add_ps(total, x);
        }
        _mm512_reduce_add_ps(total)
    }

    /// `steps` rounds of 12 independent ymm FMAs (16 registers: 12 accumulators and the two
    /// operands).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(steps: usize) -> f32 {
        let (m, a) = (
            _mm256_set1_ps(std::hint::black_box(0.999_999)),
            _mm256_set1_ps(std::hint::black_box(1e-6)),
        );
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..steps {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, m, a);
            }
        }
        let mut total = _mm256_setzero_ps();
        for x in acc {
            total = _mm256_add_ps(total, x);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), total);
        lanes.iter().sum()
    }

    /// `steps` rounds of 12 independent SSE multiplies and adds.
    pub(super) unsafe fn sse(steps: usize) -> f32 {
        let (m, a) =
            (_mm_set1_ps(std::hint::black_box(0.999_999)), _mm_set1_ps(std::hint::black_box(1e-6)));
        let mut acc = [_mm_set1_ps(1.0); 12];
        for _ in 0..steps {
            for x in acc.iter_mut() {
                *x = _mm_add_ps(_mm_mul_ps(*x, m), a);
            }
        }
        let mut total = _mm_setzero_ps();
        for x in acc {
            total = _mm_add_ps(total, x);
        }
        let mut lanes = [0.0f32; 4];
        _mm_storeu_ps(lanes.as_mut_ptr(), total);
        lanes.iter().sum()
    }
}

/// One data cache as the blocking uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLevel {
    /// Bytes one core can use: the whole cache for L1d and L2, its share of a shared L3.
    pub size: usize,
    /// Associativity (ways per set).
    pub ways: usize,
    /// Bytes per line.
    pub line: usize,
}

impl CacheLevel {
    /// Lines per way: size / (ways · line).
    pub fn sets(&self) -> usize {
        (self.size / (self.ways.max(1) * self.line.max(1))).max(1)
    }
}

/// The data caches of one core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheInfo {
    pub l1d: CacheLevel,
    pub l2: CacheLevel,
    /// This core's share of the last-level cache.
    pub l3: CacheLevel,
    /// Where the figures came from: "sysfs", "cpuid" or "defaults".
    pub source: &'static str,
}

impl CacheInfo {
    /// Figures for a processor whose caches cannot be read.
    pub const DEFAULT: CacheInfo = CacheInfo {
        l1d: CacheLevel { size: 32 << 10, ways: 8, line: 64 },
        l2: CacheLevel { size: 1 << 20, ways: 16, line: 64 },
        l3: CacheLevel { size: 2 << 20, ways: 16, line: 64 },
        source: "defaults",
    };
}

/// The caches of the core running this process, read once (see the module doc).
pub fn cache_info() -> CacheInfo {
    static INFO: OnceLock<CacheInfo> = OnceLock::new();
    *INFO.get_or_init(|| {
        let found = sysfs_caches().or_else(cpuid::caches);
        found.unwrap_or(CacheInfo::DEFAULT)
    })
}

/// A cache as the operating system or CPUID describes it.
#[derive(Clone, Copy, Debug)]
struct RawCache {
    level: u32,
    /// Data or unified (instruction caches are left out before this).
    size: usize,
    ways: usize,
    line: usize,
    /// Logical processors sharing it.
    sharing: usize,
}

/// Per-core figures from the caches of one logical processor; None without an L1d and an L2.
fn per_core(caches: &[RawCache], source: &'static str) -> Option<CacheInfo> {
    let find = |level| caches.iter().find(|c| c.level == level && c.size > 0);
    let (l1, l2) = (find(1)?, find(2)?);
    // L1d and L2 belong to one core (shared only by its SMT threads); the L3 is split
    // between the cores that share it.
    let threads_per_core = l1.sharing.max(1);
    let level = |c: &RawCache, size: usize| CacheLevel {
        size,
        ways: c.ways.max(1),
        line: if c.line > 0 { c.line } else { 64 },
    };
    let l3 = match find(3) {
        Some(c) => level(c, c.size / (c.sharing / threads_per_core).max(1)),
        None => level(l2, l2.size),
    };
    Some(CacheInfo { l1d: level(l1, l1.size), l2: level(l2, l2.size), l3, source })
}

/// `/sys/devices/system/cpu/cpu0/cache/index*`: level, type, size, ways, line, sharing CPUs.
fn sysfs_caches() -> Option<CacheInfo> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut caches = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).ok();
        let Some(kind) = read("type") else { continue };
        if kind.trim() == "Instruction" {
            continue;
        }
        let number = |name: &str| read(name).and_then(|v| v.trim().parse::<usize>().ok());
        let (Some(level), Some(size)) =
            (number("level"), read("size").and_then(|s| parse_size(&s)))
        else {
            continue;
        };
        caches.push(RawCache {
            level: level as u32,
            size,
            ways: number("ways_of_associativity").unwrap_or(0),
            line: number("coherency_line_size").unwrap_or(0),
            sharing: read("shared_cpu_list").map(|l| count_cpu_list(&l)).unwrap_or(1),
        });
    }
    per_core(&caches, "sysfs")
}

/// "32K", "1024K", "32M" or a plain byte count, in bytes.
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, scale) = match text.chars().last()? {
        'K' | 'k' => (&text[..text.len() - 1], 1 << 10),
        'M' | 'm' => (&text[..text.len() - 1], 1 << 20),
        'G' | 'g' => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    digits.trim().parse::<usize>().ok().map(|v| v * scale)
}

/// How many CPUs a list such as "0-3,8,10-11" names.
fn count_cpu_list(list: &str) -> usize {
    list.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 1,
            },
            None => 1,
        })
        .sum::<usize>()
        .max(1)
}

#[cfg(target_arch = "x86_64")]
mod cpuid {
    use super::{per_core, CacheInfo, RawCache};
    use std::arch::x86_64::__cpuid_count;

    /// The brand string of leaves 0x80000002..4.
    pub(super) fn brand() -> Option<String> {
        // The extended leaves are read only after leaf 0x80000000 says they exist.
        let max = __cpuid_count(0x8000_0000, 0).eax;
        if max < 0x8000_0004 {
            return None;
        }
        let mut bytes = Vec::with_capacity(48);
        for leaf in 0x8000_0002..=0x8000_0004u32 {
            let r = __cpuid_count(leaf, 0);
            for word in [r.eax, r.ebx, r.ecx, r.edx] {
                bytes.extend_from_slice(&word.to_le_bytes());
            }
        }
        let text = String::from_utf8_lossy(&bytes).trim_matches(char::from(0)).trim().to_string();
        (!text.is_empty()).then_some(text)
    }

    /// The deterministic cache parameters: leaf 4 (Intel) or 0x8000001D (AMD), which share
    /// a layout.
    pub(super) fn caches() -> Option<CacheInfo> {
        // Each leaf is read only where the processor reports it.
        let vendor = __cpuid_count(0, 0);
        let amd = vendor.ebx == u32::from_le_bytes(*b"Auth");
        let leaf = if amd {
            let max = __cpuid_count(0x8000_0000, 0).eax;
            if max < 0x8000_001D {
                return None;
            }
            0x8000_001D
        } else {
            if vendor.eax < 4 {
                return None;
            }
            4
        };
        let mut caches = Vec::new();
        for sub in 0..16 {
            let r = __cpuid_count(leaf, sub);
            let kind = r.eax & 0x1f;
            if kind == 0 {
                break;
            }
            if kind == 2 {
                continue; // an instruction cache
            }
            let line = (r.ebx & 0xfff) as usize + 1;
            let partitions = ((r.ebx >> 12) & 0x3ff) as usize + 1;
            let ways = ((r.ebx >> 22) & 0x3ff) as usize + 1;
            let sets = r.ecx as usize + 1;
            caches.push(RawCache {
                level: (r.eax >> 5) & 0x7,
                size: line * partitions * ways * sets,
                ways,
                line,
                sharing: ((r.eax >> 14) & 0xfff) as usize + 1,
            });
        }
        per_core(&caches, "cpuid")
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod cpuid {
    use super::CacheInfo;
    pub(super) fn brand() -> Option<String> {
        None
    }
    pub(super) fn caches() -> Option<CacheInfo> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cpu_lists_are_read_as_linux_writes_them() {
        assert_eq!(parse_size("32K\n"), Some(32 << 10));
        assert_eq!(parse_size("1024K"), Some(1 << 20));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("big"), None);
        assert_eq!(count_cpu_list("0\n"), 1);
        assert_eq!(count_cpu_list("0-1"), 2);
        assert_eq!(count_cpu_list("0-3,8,10-11"), 7);
    }

    #[test]
    fn a_shared_last_level_cache_is_split_between_the_cores_that_share_it() {
        // Two SMT threads per core, an L3 of 32 MiB shared by 16 threads: 8 cores, 4 MiB each.
        let cache = |level, size, ways, sharing| RawCache { level, size, ways, line: 64, sharing };
        let caches =
            [cache(1, 48 << 10, 12, 2), cache(2, 2 << 20, 16, 2), cache(3, 32 << 20, 16, 16)];
        let info = per_core(&caches, "test").unwrap();
        assert_eq!(info.l1d, CacheLevel { size: 48 << 10, ways: 12, line: 64 });
        assert_eq!(info.l1d.sets(), 64);
        assert_eq!(info.l2.size, 2 << 20);
        assert_eq!(info.l3.size, 4 << 20);
        // Without an L2 there is nothing to block for: the caller falls back.
        assert!(per_core(&caches[..1], "test").is_none());
    }

    #[test]
    fn cpuid_and_sysfs_agree_on_the_first_level_where_both_can_be_read() {
        let (Some(from_cpuid), Some(from_sysfs)) = (cpuid::caches(), sysfs_caches()) else {
            let test = "cpuid_and_sysfs_agree_on_the_first_level_where_both_can_be_read";
            eprintln!("skipped: {test}: CPUID or sysfs gives no cache figures here");
            return;
        };
        assert_eq!(from_cpuid.l1d, from_sysfs.l1d, "{from_cpuid:?} {from_sysfs:?}");
        assert_eq!(from_cpuid.l2.size, from_sysfs.l2.size, "{from_cpuid:?} {from_sysfs:?}");
    }

    #[test]
    fn the_caches_of_this_machine_are_plausible() {
        let info = cache_info();
        assert!(info.l1d.size >= 4 << 10 && info.l1d.size <= info.l2.size, "{info:?}");
        assert!(info.l1d.ways >= 1 && info.l1d.line >= 16, "{info:?}");
        assert!(!model_name().is_empty());
    }

    #[test]
    fn the_cap_reads_three_names_and_rejects_others() {
        assert_eq!(parse_isa("avx512").unwrap(), VectorIsa::Avx512);
        assert_eq!(parse_isa(" AVX2 ").unwrap(), VectorIsa::Avx2);
        assert_eq!(parse_isa("plain").unwrap(), VectorIsa::Plain);
        let err = parse_isa("sse9").unwrap_err().to_string();
        assert!(err.contains(ISA_VAR) && err.contains("avx2"), "{err}");
        assert!(VectorIsa::Avx2.min(VectorIsa::Avx512) == VectorIsa::Avx2);
    }
}
