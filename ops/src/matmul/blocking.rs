//! The packed GEMM's block sizes, derived from the processor's caches and vector width as in
//! the analytical model of BLIS (Low, Igual, Smith and Quintana-Ortí, "Analytical Modeling Is
//! Enough for High-Performance BLIS", ACM TOMS 43(2), 2016), rather than tuned on one machine.
//!
//! The loops of a product (see `packed.rs`), outermost first: columns of B in slabs of NC,
//! the reduction in blocks of KC, rows of A in blocks of MC, then one NR-wide micro-panel of B
//! against every MR-row micro-panel of A, each through the MR × NR register kernel. The model
//! puts each operand in the cache level that matches its reuse:
//!
//! - the register tile MR × NR: NR is two vectors (the kernels load two vectors of B per
//!   step), and MR the fewest rows whose MR·NR/lanes accumulators cover FMA latency × FMA pipes
//!   (4 × 2 on current x86 cores) twice over, as far as the registers allow next to NR/lanes B
//!   vectors and one broadcast of A: 8 × 32 with AVX-512 (16 of 32 registers accumulate) and
//!   6 × 16 with AVX2 (12 of 16, the most that fit). The model's bound alone (covering the
//!   latency once) would allow 4 × 32, whose B loads per FMA are half as many again; filling
//!   every register (14 × 32) ran 7% slower on Zen 4 than 8 × 32 (1024³, one thread: 97 against
//!   104 GFLOP/s), its extra rows buying no FMA throughput but more A streams and address
//!   arithmetic;
//! - KC from the L1 data cache: a KC × NR micro-panel of B stays there while MR × KC panels
//!   of A stream through. Of the cache's W ways one is left for C and the lines in flight,
//!   and the rest are shared in proportion NR : MR, so B gets C_B = ⌊(W − 1) / (1 + MR/NR)⌋
//!   ways and KC = C_B · (L1 sets) · (line) / (NR · 4 bytes);
//! - MC from L2: the MC × KC block of A stays there while micro-panels of B pass through.
//!   B's micro-panel takes ⌈KC·NR·4 / (L2 sets · line)⌉ ways, one more is left for C, and A
//!   gets the rest: MC = (its ways) · (L2 sets) · (line) / (KC · 4), down to a multiple of MR;
//! - NC from this core's share of L3 in the same way: the KC × NC slab of B stays in L3 while
//!   the blocks of A go by (in L2, which current L3s do not duplicate), one way left for C.
//!
//! What stays fixed, and why: single precision (4 bytes); NR at two vectors (the kernels are
//! written for two B loads per step); and the register counts, lanes and FMA latency × pipes
//! of each instruction set, which are architectural (16 or 32 registers, 8 or 16 lanes) or
//! the same on every x86 core of the last decade (4 or 5 cycles, two pipes). Everything that
//! differs between processors of one instruction set, the cache sizes and ways, is read at run
//! time. None of it changes a result: every element of C is one chain of FMAs over k in order
//! whatever the blocks (see `packed.rs`), so the blocking is free to follow the machine.

use crate::processor::{CacheInfo, CacheLevel, VectorIsa};

/// Bytes of one element (f32).
const ELEM: usize = 4;

/// FMA latency (cycles) × FMA pipes that the register tile must cover with independent
/// accumulators: 4 × 2 on Skylake to Sapphire Rapids and Zen 2 to Zen 5 (Zen 4 runs a 512-bit
/// FMA on both of its 256-bit pipes: 4 × 1 then).
const FMA_IN_FLIGHT: usize = 8;

/// The block sizes of one product (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    /// Rows of the register tile.
    pub mr: usize,
    /// Columns of the register tile (two vectors).
    pub nr: usize,
    /// Depth of a k-block: a KC × NR panel of B stays in L1.
    pub kc: usize,
    /// Rows of a block of A that stays in L2 (a multiple of MR).
    pub mc: usize,
    /// Columns of a slab of B that stays in L3 (a multiple of NR).
    pub nc: usize,
}

impl std::fmt::Display for Blocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tile {}x{}, KC {}, MC {}, NC {}", self.mr, self.nr, self.kc, self.mc, self.nc)
    }
}

/// The register tile (MR, NR) for an instruction set: NR two vectors; MR the fewest rows
/// whose accumulators cover FMA latency × pipes twice over, within the registers that two B
/// vectors and one broadcast of A leave.
pub fn register_tile(isa: VectorIsa) -> (usize, usize) {
    let vectors_per_row = 2;
    let nr = vectors_per_row * isa.lanes();
    let fits = (isa.registers() - vectors_per_row - 1) / vectors_per_row;
    let covers = (2 * FMA_IN_FLIGHT).div_ceil(vectors_per_row);
    (covers.min(fits), nr)
}

/// Ways of `cache` that `bytes` laid out contiguously occupy (rounded up).
fn ways_for(cache: &CacheLevel, bytes: usize) -> usize {
    bytes.div_ceil(cache.sets() * cache.line)
}

/// The blocking for a core with caches `cache` running kernels of instruction set `isa`.
pub fn blocking(cache: &CacheInfo, isa: VectorIsa) -> Blocking {
    let (mr, nr) = register_tile(isa);

    // L1: ⌊(W − 1) / (1 + MR/NR)⌋ ways for the B micro-panel (at least one).
    let l1 = &cache.l1d;
    let b_ways = ((l1.ways.saturating_sub(1) * nr) / (nr + mr)).max(1);
    let kc = (b_ways * l1.sets() * l1.line / (nr * ELEM)).clamp(16, 1024);
    // A multiple of 8 keeps the panels' rows aligned to whole lines of B when NR·4 is 64.
    let kc = if kc >= 64 { kc / 8 * 8 } else { kc };

    // L2: the B micro-panel's ways and one for C; the rest hold the MC × KC block of A.
    let l2 = &cache.l2;
    let a_ways = l2.ways.saturating_sub(1 + ways_for(l2, kc * nr * ELEM)).max(1);
    let mc = (a_ways * l2.sets() * l2.line / (kc * ELEM) / mr * mr).max(mr);

    // L3: all ways but one (for C) hold the KC × NC slab of B. The block of A lives in L2,
    // and the L3 of current x86 cores does not keep a copy of what L2 holds (Intel since
    // Skylake-SP, AMD since Zen), so it takes no ways here.
    let l3 = &cache.l3;
    let slab_ways = l3.ways.saturating_sub(1).max(1);
    let nc = (slab_ways * l3.sets() * l3.line / (kc * ELEM) / nr * nr).max(nr);

    Blocking { mr, nr, kc, mc, nc }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caches(l1: (usize, usize), l2: (usize, usize), l3: (usize, usize)) -> CacheInfo {
        let level = |(size, ways)| CacheLevel { size, ways, line: 64 };
        CacheInfo { l1d: level(l1), l2: level(l2), l3: level(l3), source: "test" }
    }

    #[test]
    fn the_register_tile_fills_the_registers() {
        assert_eq!(register_tile(VectorIsa::Avx2), (6, 16));
        assert_eq!(register_tile(VectorIsa::Avx512), (8, 32));
    }

    #[test]
    fn sapphire_rapids_and_zen_4_get_blocks_from_their_caches() {
        // A Sapphire Rapids core: 48 KiB 12-way L1d (64 sets of 64 B), 2 MiB 16-way L2 (2048
        // sets) and 1.875 MiB 15-way of L3 (2048 sets).
        let spr = caches((48 << 10, 12), (2 << 20, 16), (1920 << 10, 15));
        let b = blocking(&spr, VectorIsa::Avx512);
        // L1: B gets ⌊11 · 32 / (32 + 8)⌋ = 8 ways: KC = 8 · 64 · 64 / (32 · 4) = 256.
        // L2: the 256 × 32 panel (32 KiB) takes one way of 128 KiB, C one, A the other 14:
        //     MC = 14 · 128 KiB / (256 · 4) = 1792.
        // L3: 14 ways of 128 KiB for B: NC = 14 · 128 KiB / (256 · 4) = 1792.
        assert_eq!(b, Blocking { mr: 8, nr: 32, kc: 256, mc: 1792, nc: 1792 });
        // AVX2 on the same core: B gets ⌊11 · 16 / 22⌋ = 8 ways: KC = 8 · 4096 / 64 = 512;
        // MC = 14 · 128 KiB / 2048 = 896, down to a multiple of 6: 894; NC = 896.
        let b = blocking(&spr, VectorIsa::Avx2);
        assert_eq!(b, Blocking { mr: 6, nr: 16, kc: 512, mc: 894, nc: 896 });

        // A Zen 4 core: 32 KiB 8-way L1d (64 sets), 1 MiB 8-way L2 (2048 sets), and a 32 MiB
        // 16-way L3 shared by 8 cores: 4 MiB (4096 sets) each.
        let zen4 = caches((32 << 10, 8), (1 << 20, 8), (4 << 20, 16));
        let b = blocking(&zen4, VectorIsa::Avx512);
        // L1: B gets ⌊7 · 32 / 40⌋ = 5 ways: KC = 5 · 4096 / 128 = 160.
        // L2: the 160 × 32 panel (20 KiB) takes one way, C one, A the other 6:
        //     MC = 6 · 128 KiB / 640 = 1228, down to a multiple of 8: 1224.
        // L3: 15 ways of 256 KiB for B: NC = 15 · 256 KiB / 640 = 6144.
        assert_eq!(b, Blocking { mr: 8, nr: 32, kc: 160, mc: 1224, nc: 6144 });
        // AVX2: B gets ⌊7 · 16 / 22⌋ = 5 ways: KC = 5 · 4096 / 64 = 320; MC = 6 · 128 KiB /
        // 1280 = 614, down to 612; NC = 15 · 256 KiB / 1280 = 3072.
        let b = blocking(&zen4, VectorIsa::Avx2);
        assert_eq!(b, Blocking { mr: 6, nr: 16, kc: 320, mc: 612, nc: 3072 });
    }

    #[test]
    fn every_cache_gives_usable_blocks() {
        for l1 in [(16 << 10, 4), (32 << 10, 8), (48 << 10, 12), (64 << 10, 4), (1 << 10, 1)] {
            for l2 in [(256 << 10, 4), (1 << 20, 8), (2 << 20, 16), (4 << 10, 1)] {
                for isa in [VectorIsa::Avx2, VectorIsa::Avx512] {
                    let b = blocking(&caches(l1, l2, (8 << 20, 16)), isa);
                    assert!((16..=1024).contains(&b.kc), "{b:?}");
                    assert!(b.mc >= b.mr && b.mc.is_multiple_of(b.mr), "{b:?}");
                    assert!(b.nc >= b.nr && b.nc.is_multiple_of(b.nr), "{b:?}");
                }
            }
        }
        // The defaults, for a processor whose caches cannot be read.
        let b = blocking(&CacheInfo::DEFAULT, VectorIsa::Avx2);
        assert_eq!((b.mr, b.nr, b.kc), (6, 16, 320));
    }
}
