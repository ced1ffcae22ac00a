//! The structured kernel: apply a chain of block-diagonal factors, each conjugated by a gather
//! permutation, to many vectors at once. Cost is O(factors · b) per element; no n×n matrix is
//! ever formed.
//!
//! A factor with gather permutation `p` and blocks `Q_0..Q_{D−1}` maps a vector x to y with
//! `g[j] = x[p[j]]`, `h = blockdiag(Q) g`, `y[p[j]] = h[j]` (i.e. `y = Pᵀ · blockdiag(Q) · P · x`).
//! The chain applies factor 0 first.

/// One butterfly (or plain block-diagonal) factor.
#[derive(Debug, Clone)]
pub struct Factor {
    /// Block size.
    pub h: usize,
    /// Number of blocks; `h * d` is the vector length.
    pub d: usize,
    /// Row-major h×h blocks: `d − repeat` of them (see `repeat`).
    pub blocks: Vec<f32>,
    /// The first stored block also serves the next `repeat` positions: shared blocks (PEFT
    /// `block_share`) are stored once and never expanded over the diagonal. 0 for `d` distinct
    /// blocks.
    pub repeat: usize,
    /// Gather permutation, None for the identity.
    pub perm: Option<Vec<u32>>,
}

impl Factor {
    /// Vector length: `h × d`.
    pub fn n(&self) -> usize {
        self.h * self.d
    }

    /// Block `k` (a position on the diagonal, `0..d`), row-major.
    pub fn block(&self, k: usize) -> &[f32] {
        let (hh, i) = (self.h * self.h, k.saturating_sub(self.repeat));
        &self.blocks[i * hh..(i + 1) * hh]
    }
}

/// What a per-row scale multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleOn {
    /// One factor per vector (input-side adapters: a vector is a weight row, scaled whole).
    Vector,
    /// One factor per vector component (output-side adapters: a vector is a weight column).
    Component,
}

/// A full transform of vectors of length n: optional scale, factors, optional scale.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Vector length.
    pub n: usize,
    /// The factors, applied first to last.
    pub factors: Vec<Factor>,
    /// Per-vector (or per-component) scale, if any.
    pub scale: Option<Vec<f32>>,
    /// What the scale multiplies.
    pub scale_on: ScaleOn,
    /// Apply the scale before the factors (un-merge) instead of after (merge).
    pub scale_first: bool,
    /// Linear strength `x + t·(F(x) − x)`; 1.0 applies F itself.
    pub blend: f32,
}

/// Reusable buffers for `apply_rows`, one set per worker thread.
#[derive(Default)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    orig: Vec<f32>,
    runs: Vec<(usize, usize, usize)>,
}

impl Chain {
    fn scale_rows(&self, x: &mut [f32], row0: usize, rows: usize) {
        let Some(s) = &self.scale else { return };
        let n = self.n;
        match self.scale_on {
            ScaleOn::Vector => {
                for r in 0..rows {
                    let f = s[row0 + r];
                    for v in &mut x[r * n..(r + 1) * n] {
                        *v *= f;
                    }
                }
            }
            ScaleOn::Component => {
                for r in 0..rows {
                    for (v, f) in x[r * n..(r + 1) * n].iter_mut().zip(s) {
                        *v *= f;
                    }
                }
            }
        }
    }

    /// Transform `rows` vectors stored row-major in `x` (`rows × n`). `row0` is the index of the
    /// first vector, for per-vector scales.
    pub fn apply_rows(&self, x: &mut Vec<f32>, row0: usize, rows: usize, scratch: &mut Scratch) {
        self.apply_isa(Isa::detect(), Layout::Rows(rows), x, row0, scratch)
    }

    /// `apply_rows` with a given compiled form of the block kernel (the benchmark harness
    /// measures each form the CPU has). `isa` must be one the CPU runs: at most `Isa::best()`.
    pub fn apply_rows_isa(
        &self,
        isa: Isa,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        scratch: &mut Scratch,
    ) {
        self.apply_isa(isa, Layout::Rows(rows), x, row0, scratch)
    }

    /// Transform the `t` columns of `x`, an `n × t` row-major tile (column `c` is vector
    /// `col0 + c`), without transposing it: each block multiplies whole row pieces, and
    /// permutations move rows. Every output is the same chain of fused multiply-adds as
    /// `apply_rows` gives that column, so results are bit for bit the same on the fixed-size
    /// kernels (to rounding on the GEMM path of other block sizes).
    pub fn apply_cols(&self, x: &mut Vec<f32>, col0: usize, t: usize, scratch: &mut Scratch) {
        self.apply_isa(Isa::detect(), Layout::Cols(t), x, col0, scratch)
    }

    /// `apply_cols` with a given compiled form of the block kernel (for the benchmark harness,
    /// like `apply_rows_isa`). `isa` must be one the CPU runs: at most `Isa::best()`.
    pub fn apply_cols_isa(
        &self,
        isa: Isa,
        x: &mut Vec<f32>,
        col0: usize,
        t: usize,
        scratch: &mut Scratch,
    ) {
        self.apply_isa(isa, Layout::Cols(t), x, col0, scratch)
    }

    /// The chain on a batch of vectors laid out as `layout` says (`first`: the index of the
    /// first vector, for per-vector scales): scale, factors (gather, blocks, scatter), scale,
    /// blend, the same steps whichever way the vectors lie.
    fn apply_isa(
        &self,
        isa: Isa,
        layout: Layout,
        x: &mut Vec<f32>,
        first: usize,
        scratch: &mut Scratch,
    ) {
        assert!(
            isa as u8 >= Isa::best() as u8,
            "{isa:?} is not available on this CPU"
        );
        let n = self.n;
        debug_assert_eq!(x.len(), layout.count() * n);
        if self.blend != 1.0 {
            scratch.orig.clear();
            scratch.orig.extend_from_slice(x);
        }
        if self.scale_first {
            self.scale(layout, x, first);
        }
        let fold_scale = match layout {
            Layout::Rows(rows) => self.folded_scale(first, rows),
            Layout::Cols(_) => None,
        };
        let mut scaled = false;
        for (i, f) in self.factors.iter().enumerate() {
            debug_assert_eq!(f.n(), n);
            if let Layout::Rows(rows) = layout {
                let s = fold_scale.filter(|_| i + 1 == self.factors.len());
                if super::tile::rows_in_place(isa, f, x, rows, s, false) {
                    scaled = s.is_some();
                    continue;
                }
            }
            // Sized where a factor needs them, not for chains whose every factor runs tiled
            // (a Lanczos step's vector would zero them on every call).
            scratch.a.resize(x.len(), 0.0);
            if let Layout::Cols(t) = layout {
                // The permutation folded into the column kernel's row addressing: one pass.
                if col_blocks_fixed_in(isa, f, f.perm.as_deref(), x, &mut scratch.a, t, (0, t)) {
                    std::mem::swap(x, &mut scratch.a);
                    continue;
                }
            }
            match &f.perm {
                Some(p) => {
                    scratch.b.resize(x.len(), 0.0);
                    layout.gather(x, &mut scratch.a, p, &mut scratch.runs, n);
                    layout.blocks(isa, f, &scratch.a, &mut scratch.b);
                    layout.scatter(&scratch.b, x, p, &scratch.runs, n);
                }
                None => {
                    layout.blocks(isa, f, x, &mut scratch.a);
                    std::mem::swap(x, &mut scratch.a);
                }
            }
        }
        if !self.scale_first && !scaled {
            self.scale(layout, x, first);
        }
        if self.blend != 1.0 {
            let t = self.blend;
            for (v, o) in x.iter_mut().zip(&scratch.orig) {
                *v = o + t * (*v - o);
            }
        }
    }

    fn scale(&self, layout: Layout, x: &mut [f32], first: usize) {
        match layout {
            Layout::Rows(rows) => self.scale_rows(x, first, rows),
            Layout::Cols(t) => self.scale_cols(x, first, t),
        }
    }

    /// `scale_rows` for a tile of columns (see `apply_cols`).
    fn scale_cols(&self, x: &mut [f32], col0: usize, t: usize) {
        let Some(s) = &self.scale else { return };
        match self.scale_on {
            ScaleOn::Vector => {
                for row in x.chunks_exact_mut(t) {
                    for (v, f) in row.iter_mut().zip(&s[col0..col0 + t]) {
                        *v *= f;
                    }
                }
            }
            ScaleOn::Component => {
                for (row, f) in x.chunks_exact_mut(t).zip(s) {
                    for v in row {
                        *v *= f;
                    }
                }
            }
        }
    }

    /// `mt.apply_rows(x, 0, rows, scratch)` for `mt = self.transposed()`, bit for bit, without
    /// its per-call copies: where every factor has a tiled kernel, each block's transpose is
    /// taken as it is loaded (verify's Lanczos steps apply `M` and `Mᵀ` to one vector dozens of
    /// times; transposing every block per call was most of its cost); elsewhere `mt` itself
    /// applies (the untiled kernel transposes each block it loads either way).
    pub fn apply_rows_transposed(
        &self,
        mt: &Chain,
        x: &mut Vec<f32>,
        rows: usize,
        scratch: &mut Scratch,
    ) {
        let isa = Isa::detect();
        if !self.tiled(isa) || self.blend != 1.0 {
            return mt.apply_rows(x, 0, rows, scratch);
        }
        self.factors_transposed(isa, x, rows, None);
    }

    /// The per-row scales of rows `row0..row0 + rows` where they apply after the factors: the
    /// tiled kernel folds them into the last factor's stores (the same single rounding as
    /// scaling afterwards). None where the scale comes first, is per component, or is absent.
    fn folded_scale(&self, row0: usize, rows: usize) -> Option<&[f32]> {
        match &self.scale {
            Some(s) if !self.scale_first && self.scale_on == ScaleOn::Vector => {
                s.get(row0..row0 + rows)
            }
            _ => None,
        }
    }

    /// Every factor of this chain (all tiled in `isa`) applied transposed, last first, to `rows`
    /// rows of `x`, each row of the last one's results times `scale[r]` where given.
    fn factors_transposed(&self, isa: Isa, x: &mut [f32], rows: usize, scale: Option<&[f32]>) {
        let last = self.factors.len().saturating_sub(1);
        for (i, f) in self.factors.iter().rev().enumerate() {
            let s = scale.filter(|_| i == last);
            let done = super::tile::rows_in_place(isa, f, x, rows, s, true);
            debug_assert!(done);
        }
    }

    /// Whether every factor runs the tiled row kernel in `isa`.
    fn tiled(&self, isa: Isa) -> bool {
        self.factors.iter().all(|f| super::tile::has_tile(isa, f))
    }

    /// `apply_rows(x, row0, rows, scratch)`, bit for bit, given `mt = self.transposed()`: where
    /// `mt` runs tiled, the factors run as `mt.apply_rows_transposed`, which copies no block
    /// (see there). The merge holds each input-side chain's transpose for this: transposing
    /// every block on every call was a quarter of its kernel time.
    pub fn apply_rows_given_transpose(
        &self,
        mt: &Chain,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        scratch: &mut Scratch,
    ) {
        self.apply_rows_given_transpose_isa(Isa::detect(), mt, x, row0, rows, scratch)
    }

    /// `apply_rows_given_transpose` with a given compiled form of the block kernel (for the
    /// benchmark harness, like `apply_rows_isa`). `isa` must be one the CPU runs.
    pub fn apply_rows_given_transpose_isa(
        &self,
        isa: Isa,
        mt: &Chain,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        scratch: &mut Scratch,
    ) {
        if self.blend != 1.0 || !mt.tiled(isa) {
            return self.apply_rows_isa(isa, x, row0, rows, scratch);
        }
        if self.scale_first {
            self.scale_rows(x, row0, rows);
        }
        let fold = self
            .folded_scale(row0, rows)
            .filter(|_| !mt.factors.is_empty());
        mt.factors_transposed(isa, x, rows, fold);
        if !self.scale_first && fold.is_none() {
            self.scale_rows(x, row0, rows);
        }
    }

    /// The chain's `Mᵀ` without its scale: factors in reverse order with transposed blocks
    /// (`(PᵀQP)ᵀ = PᵀQᵀP`). For an orthogonal chain this is its inverse.
    pub fn transposed(&self) -> Chain {
        let mut t = self.clone();
        t.factors.reverse();
        for f in &mut t.factors {
            let mut b = Vec::with_capacity(f.blocks.len());
            for q in f.blocks.chunks_exact(f.h * f.h) {
                b.extend(super::blocks::transpose(f.h, q));
            }
            f.blocks = b;
        }
        t.scale = None;
        t
    }

    /// The dense n×n matrix M (row-major, f64), found by pushing the identity through the chain:
    /// row j of the result is `M e_j`, i.e. the result is Mᵀ, transposed back. O(n²) memory:
    /// for measuring small transforms, never for merging.
    pub fn dense(&self) -> Vec<f64> {
        let n = self.n;
        let mut x = vec![0f32; n * n];
        for j in 0..n {
            x[j * n + j] = 1.0;
        }
        self.apply_rows(&mut x, 0, n, &mut Scratch::default());
        let mut m = vec![0f64; n * n];
        for j in 0..n {
            for i in 0..n {
                m[i * n + j] = x[j * n + i] as f64;
            }
        }
        m
    }
}

/// How a batch of vectors lies in memory.
#[derive(Clone, Copy)]
enum Layout {
    /// This many vectors, one per row (`rows × n`).
    Rows(usize),
    /// This many vectors, one per column of an `n × t` row-major tile.
    Cols(usize),
}

impl Layout {
    fn count(self) -> usize {
        match self {
            Layout::Rows(c) | Layout::Cols(c) => c,
        }
    }

    /// Component `j` of every vector from component `p[j]`. The permutation moves by its runs,
    /// which this computes into `runs` for `scatter`; for a few row vectors (verify's Lanczos
    /// steps and probes) element by element instead: finding the runs costs more than the moves
    /// it saves, and LyCORIS's interleaving permutations have none longer than one element.
    fn gather(
        self,
        x: &[f32],
        out: &mut [f32],
        p: &[u32],
        runs: &mut Vec<(usize, usize, usize)>,
        n: usize,
    ) {
        if let Layout::Rows(rows) = self {
            if rows < FEW_ROWS {
                for (o, x) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)).take(rows) {
                    o.iter_mut().zip(p).for_each(|(o, &pj)| *o = x[pj as usize]);
                }
                return;
            }
        }
        self::runs(p, runs);
        match self {
            Layout::Rows(rows) => gather(x, out, runs, rows, n),
            // Components are rows of the tile: whole row runs move at once.
            Layout::Cols(t) => {
                for &(j, pj, len) in runs.iter() {
                    out[j * t..(j + len) * t].copy_from_slice(&x[pj * t..(pj + len) * t]);
                }
            }
        }
    }

    /// The inverse of `gather`, with the `runs` it computed.
    fn scatter(
        self,
        h: &[f32],
        x: &mut [f32],
        p: &[u32],
        runs: &[(usize, usize, usize)],
        n: usize,
    ) {
        if let Layout::Rows(rows) = self {
            if rows < FEW_ROWS {
                for (h, x) in h.chunks_exact(n).zip(x.chunks_exact_mut(n)).take(rows) {
                    h.iter().zip(p).for_each(|(&h, &pj)| x[pj as usize] = h);
                }
                return;
            }
        }
        match self {
            Layout::Rows(rows) => scatter(h, x, runs, rows, n),
            Layout::Cols(t) => {
                for &(j, pj, len) in runs {
                    x[pj * t..(pj + len) * t].copy_from_slice(&h[j * t..(j + len) * t]);
                }
            }
        }
    }

    /// Every block of `f` applied to every vector.
    fn blocks(self, isa: Isa, f: &Factor, src: &[f32], out: &mut [f32]) {
        match self {
            Layout::Rows(rows) => blocks_times_with(isa, f, src, out, rows),
            Layout::Cols(t) => col_blocks_times(isa, f, src, out, t),
        }
    }
}

/// Below this many row vectors a permutation is applied element by element, not by its runs.
const FEW_ROWS: usize = 8;

/// A permutation as maximal runs `(j, p[j], len)` with `p[j + k] = p[j] + k`: butterfly
/// permutations move half-blocks, so gathers and scatters become a few memcpys per row.
pub(crate) fn runs(p: &[u32], out: &mut Vec<(usize, usize, usize)>) {
    out.clear();
    let mut j = 0;
    while j < p.len() {
        let start = j;
        while j + 1 < p.len() && p[j + 1] == p[j] + 1 {
            j += 1;
        }
        out.push((start, p[start] as usize, j + 1 - start));
        j += 1;
    }
}

/// `out[r, j] = x[r, p[j]]` for every row r, `p` given as its `runs`.
pub(crate) fn gather(
    x: &[f32],
    out: &mut [f32],
    runs: &[(usize, usize, usize)],
    rows: usize,
    n: usize,
) {
    for r in 0..rows {
        let (src, dst) = (&x[r * n..(r + 1) * n], &mut out[r * n..(r + 1) * n]);
        for &(j, pj, len) in runs {
            // LyCORIS boft's interleaving permutations are all runs of one: a `memcpy` call
            // per element was a fifth of a verify's time.
            if len == 1 {
                dst[j] = src[pj];
            } else {
                dst[j..j + len].copy_from_slice(&src[pj..pj + len]);
            }
        }
    }
}

fn scatter(h: &[f32], x: &mut [f32], runs: &[(usize, usize, usize)], rows: usize, n: usize) {
    for r in 0..rows {
        let (src, dst) = (&h[r * n..(r + 1) * n], &mut x[r * n..(r + 1) * n]);
        for &(j, pj, len) in runs {
            if len == 1 {
                dst[pj] = src[j];
            } else {
                dst[pj..pj + len].copy_from_slice(&src[j..j + len]);
            }
        }
    }
}

/// One core's L2 cache in bytes, as Linux reports it; 512 KiB where it does not (the output-side
/// merge sizes the column strips it hands `apply_cols` from it).
pub(crate) fn l2_bytes() -> usize {
    static L2: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L2.get_or_init(|| {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index2/size");
        let kib = text.ok().and_then(|t| {
            t.trim()
                .strip_suffix('K')
                .and_then(|k| k.parse::<usize>().ok())
        });
        // Whatever sysfs says, strips stay sensible: between 256 KiB and 8 MiB.
        kib.map_or(512 << 10, |k| (k << 10).clamp(256 << 10, 8 << 20))
    })
}

/// Which compiled form of the block kernel runs, chosen once from what the CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit vectors (AVX-512F with FMA).
    Avx512,
    /// 256-bit vectors (AVX2 with FMA).
    Avx2,
    /// The portable build (SSE2 on x86-64; whatever the target has elsewhere).
    Portable,
}

impl Isa {
    /// The best form this CPU runs; `BOFT_KERNEL=avx2|portable` asks for a narrower one (for
    /// measuring and testing the fallbacks on a CPU that has more).
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("BOFT_KERNEL").as_deref() {
                Ok("portable") => Isa::Portable,
                Ok("avx2") if best != Isa::Portable => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// The widest form this CPU runs, whatever `BOFT_KERNEL` says.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // The AVX-512 forms are compiled with VL too (EVEX encodings of 256-bit and
            // narrower operations); a CPU with F but not VL (Xeon Phi) gets the AVX2 forms.
            if has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma") {
                return Isa::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Its name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// Return from the enclosing function through `$kernel::<H>` when the factor's block size has a
/// kernel of its own (the fixed sizes, row or column form).
macro_rules! fixed {
    ($kernel:ident, $f:expr, $($arg:expr),* $(=> $ret:expr)?) => {
        // SAFETY: `Isa::detect` chose this form only where the CPU has its features.
        unsafe {
            match $f.h {
                2 => return { $kernel::<2>($f, $($arg),*) $(; $ret)? },
                4 => return { $kernel::<4>($f, $($arg),*) $(; $ret)? },
                8 => return { $kernel::<8>($f, $($arg),*) $(; $ret)? },
                10 => return { $kernel::<10>($f, $($arg),*) $(; $ret)? },
                12 => return { $kernel::<12>($f, $($arg),*) $(; $ret)? },
                16 => return { $kernel::<16>($f, $($arg),*) $(; $ret)? },
                20 => return { $kernel::<20>($f, $($arg),*) $(; $ret)? },
                24 => return { $kernel::<24>($f, $($arg),*) $(; $ret)? },
                32 => return { $kernel::<32>($f, $($arg),*) $(; $ret)? },
                _ => {}
            }
        }
    };
}

fn blocks_times_with(isa: Isa, f: &Factor, src: &[f32], out: &mut [f32], rows: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => fixed!(blocks_times_fixed_avx512, f, src, out, rows),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => fixed!(blocks_times_fixed_avx2, f, src, out, rows),
        _ => {}
    }
    if f.h < 8 {
        return blocks_times_small(f, src, out, rows);
    }
    blocks_times_gemm(f, src, out, rows)
}

/// Blocks narrower than 8 on any CPU: a GEMM call per block costs far more than its few
/// multiplications (a verify probe of 2^17 blocks of 2 spent 19 s in matrixmultiply's setup).
fn blocks_times_small(f: &Factor, src: &[f32], out: &mut [f32], rows: usize) {
    let (h, n) = (f.h, f.n());
    for k in 0..f.d {
        let q = f.block(k);
        for r in 0..rows {
            let x = &src[r * n + k * h..][..h];
            let y = &mut out[r * n + k * h..][..h];
            for (i, yi) in y.iter_mut().enumerate() {
                let row = &q[i * h..(i + 1) * h];
                *yi = row
                    .iter()
                    .zip(x)
                    .fold(0.0, |a, (&qij, &xj)| xj.mul_add(qij, a));
            }
        }
    }
}

/// The common block sizes, compiled for AVX2+FMA: the accumulators of one output row piece stay
/// in registers and the transposed block stays in L1, which beats a general GEMM's packing at
/// these tiny sizes by a wide margin.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn blocks_times_fixed_avx2<const H: usize>(
    f: &Factor,
    src: &[f32],
    out: &mut [f32],
    rows: usize,
) {
    blocks_times_fixed::<H>(f, src, out, rows)
}

/// The same kernel compiled for AVX-512: a block row of 16 or 32 is one or two registers, and
/// each output is the same chain of fused multiply-adds in the same order, so results are bit
/// for bit those of the AVX2 form.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn blocks_times_fixed_avx512<const H: usize>(
    f: &Factor,
    src: &[f32],
    out: &mut [f32],
    rows: usize,
) {
    blocks_times_fixed::<H>(f, src, out, rows)
}

#[inline(always)]
fn blocks_times_fixed<const H: usize>(f: &Factor, src: &[f32], out: &mut [f32], rows: usize) {
    let n = f.n();
    let mut qt = vec![[0f32; H]; H];
    for k in 0..f.d {
        let q = f.block(k);
        for (i, row) in q.chunks_exact(H).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                qt[j][i] = v;
            }
        }
        let mut r = 0;
        // Two rows at a time share every load of the block.
        while r + 1 < rows {
            let x0: &[f32; H] = src[r * n + k * H..][..H].try_into().unwrap();
            let x1: &[f32; H] = src[(r + 1) * n + k * H..][..H].try_into().unwrap();
            let (mut a0, mut a1) = ([0f32; H], [0f32; H]);
            for j in 0..H {
                let (b0, b1) = (x0[j], x1[j]);
                let qj = &qt[j];
                for i in 0..H {
                    a0[i] = b0.mul_add(qj[i], a0[i]);
                    a1[i] = b1.mul_add(qj[i], a1[i]);
                }
            }
            out[r * n + k * H..][..H].copy_from_slice(&a0);
            out[(r + 1) * n + k * H..][..H].copy_from_slice(&a1);
            r += 2;
        }
        if r < rows {
            let x0: &[f32; H] = src[r * n + k * H..][..H].try_into().unwrap();
            let mut a0 = [0f32; H];
            for j in 0..H {
                for i in 0..H {
                    a0[i] = x0[j].mul_add(qt[j][i], a0[i]);
                }
            }
            out[r * n + k * H..][..H].copy_from_slice(&a0);
        }
    }
}

/// `out[block k rows, :] = Q_k · src[block k rows, :]` for an `n × t` row-major tile: the
/// column form of `blocks_times`.
fn col_blocks_times(isa: Isa, f: &Factor, src: &[f32], out: &mut [f32], t: usize) {
    if col_blocks_fixed_in(isa, f, None, src, out, t, (0, t)) {
        return;
    }
    if f.h < 8 {
        // Portable, small blocks: the same fused multiply-adds one element at a time.
        let h = f.h;
        for k in 0..f.d {
            let q = f.block(k);
            for i in 0..h {
                let y = &mut out[(k * h + i) * t..][..t];
                y.fill(0.0);
                for j in 0..h {
                    let (qij, x) = (q[i * h + j], &src[(k * h + j) * t..][..t]);
                    for (yc, &xc) in y.iter_mut().zip(x) {
                        *yc = xc.mul_add(qij, *yc);
                    }
                }
            }
        }
        return;
    }
    let h = f.h;
    for k in 0..f.d {
        let q = f.block(k);
        // SAFETY: every pointer and stride addresses inside `q` (h×h), and the h rows of block
        // k of `src` and `out` (row stride t).
        unsafe {
            matrixmultiply::sgemm(
                h,
                h,
                t,
                1.0,
                q.as_ptr(),
                h as isize,
                1,
                src.as_ptr().add(k * h * t),
                t as isize,
                1,
                0.0,
                out.as_mut_ptr().add(k * h * t),
                t as isize,
                1,
            );
        }
    }
}

/// The fixed-size column kernel on columns `cols.0..cols.1` of an `n × t` tile: block k's rows
/// are `idx[k·h..(k + 1)·h]` (the factor's gather permutation; `k·h..` without one), read from
/// `src` and written to the same rows of `out`, so gather, blocks and scatter are one pass.
/// False, with nothing written, when `isa` has no kernel for the block size.
fn col_blocks_fixed_in(
    isa: Isa,
    f: &Factor,
    idx: Option<&[u32]>,
    src: &[f32],
    out: &mut [f32],
    t: usize,
    cols: (usize, usize),
) -> bool {
    assert!(cols.0 <= cols.1 && cols.1 <= t);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => fixed!(col_blocks_fixed_avx512, f, idx, src, out, t, cols => true),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => fixed!(col_blocks_fixed_avx2, f, idx, src, out, t, cols => true),
        _ => {}
    }
    false
}

/// Register tiles of the AVX-512 column kernel: four output rows of 32 columns (two rows of 64
/// where the block size is not a multiple of 4), eight accumulators, each input load shared by
/// four rows and each broadcast block entry by two vectors; a strip narrower than that goes 16
/// columns at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn col_blocks_fixed_avx512<const H: usize>(
    f: &Factor,
    idx: Option<&[u32]>,
    src: &[f32],
    out: &mut [f32],
    t: usize,
    cols: (usize, usize),
) {
    if H.is_multiple_of(4) {
        col_blocks_fixed::<H, 4, 32, 16>(f, idx, src, out, t, cols)
    } else {
        col_blocks_fixed::<H, 2, 64, 16>(f, idx, src, out, t, cols)
    }
}

/// The AVX2 tile: four rows of 16 columns, eight of the 16 registers (wider tiles spill:
/// AVX2 has no broadcast operand, so loads and broadcasts need registers of their own; two rows
/// of 32 measured slower).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn col_blocks_fixed_avx2<const H: usize>(
    f: &Factor,
    idx: Option<&[u32]>,
    src: &[f32],
    out: &mut [f32],
    t: usize,
    cols: (usize, usize),
) {
    if H.is_multiple_of(4) {
        col_blocks_fixed::<H, 4, 16, 8>(f, idx, src, out, t, cols)
    } else {
        col_blocks_fixed::<H, 2, 32, 8>(f, idx, src, out, t, cols)
    }
}

/// Blocks of `H` on columns `c0..c1` of an `n × t` tile, `R` output rows by `W` columns per
/// register tile, then `V` columns, then one at a time for the last columns. `R` divides `H`.
#[inline(always)]
fn col_blocks_fixed<const H: usize, const R: usize, const W: usize, const V: usize>(
    f: &Factor,
    idx: Option<&[u32]>,
    src: &[f32],
    out: &mut [f32],
    t: usize,
    (c0, c1): (usize, usize),
) {
    debug_assert_eq!(H % R, 0);
    let n = f.n();
    assert!(src.len() >= n * t && out.len() >= n * t);
    for k in 0..f.d {
        let q = f.block(k);
        let rows: [usize; H] = std::array::from_fn(|j| {
            let r = idx.map_or(k * H + j, |p| p[k * H + j] as usize);
            assert!(r < n, "permutation index out of range");
            r * t
        });
        let mut c = c0;
        while c + W <= c1 {
            col_piece::<H, R, W>(q, &rows, src, out, c);
            c += W;
        }
        while c + V <= c1 {
            col_piece::<H, R, V>(q, &rows, src, out, c);
            c += V;
        }
        while c < c1 {
            col_piece::<H, R, 1>(q, &rows, src, out, c);
            c += 1;
        }
    }
}

/// Columns `c..c + W` of one block's `H` output rows, `R` rows at a time; `rows[j]` is the
/// offset of the block's row `j` in `src` and in `out`.
#[inline(always)]
fn col_piece<const H: usize, const R: usize, const W: usize>(
    q: &[f32],
    rows: &[usize; H],
    src: &[f32],
    out: &mut [f32],
    c: usize,
) {
    let (q, _) = q.as_chunks::<H>();
    let q = &q[..H];
    // Every row piece is in bounds: one check here, none in the loop that keeps the FMA ports
    // busy (a bounds check per load was a fifth of its instructions).
    let last = rows.iter().max().copied().unwrap_or(0) + c + W;
    assert!(last <= src.len() && last <= out.len());
    for i in (0..H).step_by(R) {
        let mut acc = [[0f32; W]; R];
        for j in 0..H {
            // SAFETY: rows[j] + c + W <= src.len(), checked above.
            let x: &[f32; W] = unsafe { &*(src.as_ptr().add(rows[j] + c) as *const [f32; W]) };
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = q[i + r][j];
                for l in 0..W {
                    a[l] = x[l].mul_add(qv, a[l]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            out[rows[i + r] + c..][..W].copy_from_slice(a);
        }
    }
}

/// Any other block size, and every block of 64 or more: one GEMM per block, `src_k · Q_kᵀ`
/// (matrixmultiply's packed kernels; from 64 on a block no longer fits the registers of the
/// fixed-size kernels above).
fn blocks_times_gemm(f: &Factor, src: &[f32], out: &mut [f32], rows: usize) {
    let (h, n) = (f.h, f.n());
    for k in 0..f.d {
        let q = f.block(k);
        // SAFETY: every pointer and stride addresses inside `src`, `q` and `out`: rows × h
        // entries starting at column k·h with row stride n, and the h×h block read transposed.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                h,
                h,
                1.0,
                src.as_ptr().add(k * h),
                n as isize,
                1,
                q.as_ptr(),
                1,
                h as isize,
                0.0,
                out.as_mut_ptr().add(k * h),
                n as isize,
                1,
            );
        }
    }
}

/// Apply the chain to one vector (for verification probes and tests).
pub fn apply_vec(chain: &Chain, v: &[f32]) -> Vec<f32> {
    let mut x = v.to_vec();
    chain.apply_rows(&mut x, 0, 1, &mut Scratch::default());
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense reference: build each factor as an n×n matrix and multiply, in f64.
    fn dense(f: &Factor) -> Vec<f64> {
        let n = f.n();
        let mut bd = vec![0f64; n * n];
        for k in 0..f.d {
            for i in 0..f.h {
                for j in 0..f.h {
                    bd[(k * f.h + i) * n + k * f.h + j] = f.block(k)[i * f.h + j] as f64;
                }
            }
        }
        let p: Vec<usize> = match &f.perm {
            Some(p) => p.iter().map(|&x| x as usize).collect(),
            None => (0..n).collect(),
        };
        // Pᵀ · BD · P with P[j, p[j]] = 1  =>  entry (a, b) = BD[p⁻¹(a), p⁻¹(b)].
        let mut inv = vec![0usize; n];
        for (j, &x) in p.iter().enumerate() {
            inv[x] = j;
        }
        let mut m = vec![0f64; n * n];
        for a in 0..n {
            for b in 0..n {
                m[a * n + b] = bd[inv[a] * n + inv[b]];
            }
        }
        m
    }

    fn rnd(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn fixed_size_kernels_match_the_gemm() {
        let mut seed = 9u64;
        for h in [2usize, 3, 4, 5, 7, 8, 10, 12, 16, 20, 24, 32] {
            let d = 3;
            let f = Factor {
                h,
                d,
                blocks: (0..d * h * h).map(|_| rnd(&mut seed)).collect(),
                repeat: 0,
                perm: None,
            };
            for rows in [1usize, 2, 7] {
                let src: Vec<f32> = (0..rows * h * d).map(|_| rnd(&mut seed)).collect();
                let mut a = vec![0f32; src.len()];
                let mut b = vec![0f32; src.len()];
                blocks_times_with(Isa::detect(), &f, &src, &mut a, rows);
                blocks_times_gemm(&f, &src, &mut b, rows);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-5, "h={h} rows={rows}: {x} vs {y}");
                }
            }
        }
    }

    /// The block sizes with kernels of their own (LyCORIS picks 10 and 20 for SD's 320- and
    /// 640-wide layers at dim 32).
    const FIXED: [usize; 9] = [2, 4, 8, 10, 12, 16, 20, 24, 32];

    #[test]
    fn every_kernel_form_this_cpu_runs_gives_the_same_bits() {
        // Each output is the same sequence of fused multiply-adds whatever the vector width, so
        // AVX-512, AVX2 and the portable build agree bit for bit (portable: on the fixed sizes
        // from 8 on, which it runs through the GEMM, only to rounding).
        let mut seed = 21u64;
        let forms: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|&i| i as u8 >= Isa::best() as u8)
            .collect();
        for h in FIXED {
            let d = 3;
            let f = Factor {
                h,
                d,
                blocks: (0..d * h * h).map(|_| rnd(&mut seed)).collect(),
                repeat: 0,
                perm: None,
            };
            let rows = 5;
            let src: Vec<f32> = (0..rows * h * d).map(|_| rnd(&mut seed)).collect();
            let outs: Vec<Vec<f32>> = forms
                .iter()
                .map(|&isa| {
                    let mut o = vec![0f32; src.len()];
                    blocks_times_with(isa, &f, &src, &mut o, rows);
                    o
                })
                .collect();
            for (isa, o) in forms.iter().zip(&outs) {
                if *isa == Isa::Portable && h >= 8 {
                    for (x, y) in o.iter().zip(&outs[0]) {
                        assert!((x - y).abs() < 1e-5, "h={h} {isa:?}");
                    }
                } else {
                    assert_eq!(o, &outs[0], "h={h} {isa:?} vs {:?}", forms[0]);
                }
            }
        }
    }

    /// A permutation of `n` that moves whole aligned pieces of `piece` components (as butterfly
    /// permutations move half-blocks), at random.
    fn piece_perm(n: usize, piece: usize, seed: &mut u64) -> Vec<u32> {
        let mut order: Vec<usize> = (0..n / piece).collect();
        for j in (1..order.len()).rev() {
            let k = (rnd(seed).abs() * 1e6) as usize % (j + 1);
            order.swap(j, k);
        }
        order
            .iter()
            .flat_map(|&o| (o * piece..(o + 1) * piece).map(|v| v as u32))
            .collect()
    }

    #[test]
    fn the_tiled_row_kernel_gives_the_bits_of_gather_blocks_scatter() {
        // The register-tiled kernel (permutation folded into its loads and stores, scale into
        // its last stores, in place) against the plain sequence it replaces, bit for bit, on
        // every compiled form this CPU has, for row counts around its tile heights.
        let mut seed = 77u64;
        let forms: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|&i| i as u8 >= Isa::best() as u8)
            .collect();
        for h in [16usize, 32] {
            let d = 8;
            let n = h * d;
            let perms = [
                None,
                Some(crate::math::perm::peft_boft(n, h, 1)),
                Some(crate::math::perm::peft_boft(n, h, 2)),
                Some(piece_perm(n, 8, &mut seed)),
                Some(piece_perm(n, 16, &mut seed)),
                // The first block's pieces in order, the rest's pieces of 8 swapped in pairs:
                // whether results store whole is a property of every block, not the first.
                Some(
                    (0..n as u32)
                        .map(|i| if (i as usize) < h { i } else { i ^ 8 })
                        .collect(),
                ),
            ];
            for perm in perms {
                let f = Factor {
                    h,
                    d,
                    blocks: (0..d * h * h).map(|_| rnd(&mut seed)).collect(),
                    repeat: 0,
                    perm,
                };
                for &isa in &forms {
                    assert!(super::super::tile::has_tile(isa, &f));
                    for rows in [1usize, 2, 3, 7, 8, 12, 13, 25] {
                        let x0: Vec<f32> = (0..rows * n).map(|_| rnd(&mut seed)).collect();
                        let scale: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 * 0.1).collect();
                        let mut want = x0.clone();
                        let (mut a, mut b) = (vec![0f32; x0.len()], vec![0f32; x0.len()]);
                        match &f.perm {
                            Some(p) => {
                                let mut r = Vec::new();
                                runs(p, &mut r);
                                gather(&want, &mut a, &r, rows, n);
                                blocks_times_with(isa, &f, &a, &mut b, rows);
                                scatter(&b, &mut want, &r, rows, n);
                            }
                            None => {
                                blocks_times_with(isa, &f, &want, &mut a, rows);
                                want.copy_from_slice(&a);
                            }
                        }
                        let mut got = x0.clone();
                        assert!(super::super::tile::rows_in_place(
                            isa, &f, &mut got, rows, None, false
                        ));
                        assert_eq!(
                            got,
                            want,
                            "h={h} rows={rows} {isa:?} perm={:?}",
                            f.perm.is_some()
                        );
                        let mut got = x0.clone();
                        super::super::tile::rows_in_place(
                            isa,
                            &f,
                            &mut got,
                            rows,
                            Some(&scale),
                            false,
                        );
                        for (r, row) in want.chunks_exact_mut(n).enumerate() {
                            row.iter_mut().for_each(|v| *v *= scale[r]);
                        }
                        assert_eq!(got, want, "scaled: h={h} rows={rows} {isa:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn transposed_applications_copy_no_block_and_give_the_same_bits() {
        let mut seed = 99u64;
        for (h, d) in [(16usize, 4usize), (32, 4), (8, 4), (12, 4)] {
            let n = h * d;
            for (scale_on, scale_first) in [
                (ScaleOn::Vector, false),
                (ScaleOn::Vector, true),
                (ScaleOn::Component, false),
                (ScaleOn::Component, true),
            ] {
                let chain = Chain {
                    n,
                    factors: (0..3)
                        .map(|i| Factor {
                            h,
                            d,
                            blocks: (0..d * h * h).map(|_| rnd(&mut seed)).collect(),
                            repeat: 0,
                            perm: (i > 0).then(|| crate::math::perm::peft_boft(n, h, i.min(2))),
                        })
                        .collect(),
                    scale: Some(match scale_on {
                        ScaleOn::Vector => (0..40).map(|r| 0.8 + r as f32 * 0.01).collect(),
                        ScaleOn::Component => (0..n).map(|i| 0.9 + i as f32 * 0.001).collect(),
                    }),
                    scale_on,
                    scale_first,
                    blend: 1.0,
                };
                let mt = chain.transposed();
                // Fewer rows than a tile, whole tiles of every form (8 and 12 rows) and a rest.
                for rows in [1usize, 5, 13, 26] {
                    let x0: Vec<f32> = (0..rows * n).map(|_| rnd(&mut seed)).collect();
                    let (mut a, mut b) = (x0.clone(), x0.clone());
                    mt.apply_rows(&mut a, 0, rows, &mut Scratch::default());
                    chain.apply_rows_transposed(&mt, &mut b, rows, &mut Scratch::default());
                    assert_eq!(a, b, "Mᵀ: h={h} rows={rows}");
                    let (mut a, mut b) = (x0.clone(), x0);
                    chain.apply_rows(&mut a, 2, rows, &mut Scratch::default());
                    chain.apply_rows_given_transpose(&mt, &mut b, 2, rows, &mut Scratch::default());
                    assert_eq!(
                        a, b,
                        "M: h={h} rows={rows} {scale_on:?} first={scale_first}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_tile_of_columns_gives_what_each_column_as_a_row_gives() {
        // apply_cols on an n × t tile against apply_rows on its transpose: permutations, both
        // kinds of scale before and after, a linear blend, shared blocks; every kernel form
        // this CPU has. Bit for bit on the fixed sizes and the portable small blocks, to
        // rounding on the GEMM sizes.
        let mut seed = 31u64;
        for (h, d) in [
            (2usize, 8usize),
            (3, 4),
            (4, 4),
            (5, 2),
            (8, 4),
            (16, 2),
            (32, 2),
            (64, 2),
            (12, 2),
            (20, 3),
            (10, 2),
        ] {
            let n = h * d;
            for (scale_on, scale_first, blend) in [
                (ScaleOn::Vector, false, 1.0f32),
                (ScaleOn::Component, false, 1.0),
                (ScaleOn::Component, true, 0.4),
                (ScaleOn::Vector, true, 1.0),
            ] {
                let factors: Vec<Factor> = (0..3)
                    .map(|i| {
                        let mut p: Vec<u32> = (0..n as u32).collect();
                        for j in (1..n).rev() {
                            let k = (rnd(&mut seed).abs() * 1e6) as usize % (j + 1);
                            p.swap(j, k);
                        }
                        let repeat = if i == 2 { d - 1 } else { 0 };
                        Factor {
                            h,
                            d,
                            blocks: (0..(d - repeat) * h * h).map(|_| rnd(&mut seed)).collect(),
                            repeat,
                            perm: (i == 1).then_some(p),
                        }
                    })
                    .collect();
                for t in [1usize, 7, 64, 130] {
                    let chain = Chain {
                        n,
                        factors: factors.clone(),
                        scale: Some(match scale_on {
                            ScaleOn::Vector => (0..t + 3).map(|c| 1.0 + c as f32 * 0.01).collect(),
                            ScaleOn::Component => (0..n).map(|i| 0.9 + i as f32 * 0.01).collect(),
                        }),
                        scale_on,
                        scale_first,
                        blend,
                    };
                    let tile: Vec<f32> = (0..n * t).map(|_| rnd(&mut seed)).collect();
                    let mut rows = vec![0f32; n * t];
                    for i in 0..n {
                        for c in 0..t {
                            rows[c * n + i] = tile[i * t + c];
                        }
                    }
                    // Columns 3.. of the scale: col0 = 3.
                    chain.apply_rows(&mut rows, 3, t, &mut Scratch::default());
                    let mut x = tile.clone();
                    chain.apply_cols(&mut x, 3, t, &mut Scratch::default());
                    let exact = h < 8 || FIXED.contains(&h);
                    for i in 0..n {
                        for c in 0..t {
                            let (a, b) = (x[i * t + c], rows[c * n + i]);
                            if exact {
                                assert_eq!(a.to_bits(), b.to_bits(), "h={h} t={t} {scale_on:?}");
                            } else {
                                assert!((a - b).abs() < 1e-4, "h={h} t={t}: {a} vs {b}");
                            }
                        }
                    }
                }
            }
        }
        // Each compiled form of the column kernel against the portable one.
        for h in FIXED {
            let f = Factor {
                h,
                d: 2,
                blocks: (0..2 * h * h).map(|_| rnd(&mut seed)).collect(),
                repeat: 0,
                perm: None,
            };
            let t = 150;
            let src: Vec<f32> = (0..2 * h * t).map(|_| rnd(&mut seed)).collect();
            let run = |isa| {
                let mut o = vec![0f32; src.len()];
                col_blocks_times(isa, &f, &src, &mut o, t);
                o
            };
            let best = run(Isa::best());
            for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
                if isa as u8 >= Isa::best() as u8 && !(isa == Isa::Portable && h >= 8) {
                    assert_eq!(run(isa), best, "h={h} {isa:?}");
                }
            }
        }
    }

    #[test]
    fn shared_blocks_apply_as_their_expansion() {
        // A factor storing one block for the first `repeat + 1` positions gives bit for bit
        // what the same blocks written out at every position give, on every kernel.
        let mut seed = 5u64;
        for (h, d) in [(8usize, 5usize), (16, 3), (5, 4), (64, 2)] {
            for repeat in 1..d {
                let stored: Vec<f32> = (0..(d - repeat) * h * h).map(|_| rnd(&mut seed)).collect();
                let shared = Factor {
                    h,
                    d,
                    blocks: stored.clone(),
                    repeat,
                    perm: None,
                };
                let mut expanded = shared.clone();
                expanded.repeat = 0;
                expanded.blocks = (0..d).flat_map(|k| shared.block(k).to_vec()).collect();
                assert_eq!(expanded.blocks.len(), d * h * h);
                let chain = |f: Factor| Chain {
                    n: h * d,
                    factors: vec![f],
                    scale: None,
                    scale_on: ScaleOn::Vector,
                    scale_first: false,
                    blend: 1.0,
                };
                let (a, b) = (chain(shared.clone()), chain(expanded));
                let x0: Vec<f32> = (0..3 * h * d).map(|_| rnd(&mut seed)).collect();
                let (mut x, mut y) = (x0.clone(), x0);
                a.apply_rows(&mut x, 0, 3, &mut Scratch::default());
                b.apply_rows(&mut y, 0, 3, &mut Scratch::default());
                assert_eq!(x, y, "h={h} d={d} repeat={repeat}");
                let (mut x, mut y) = (x.clone(), x);
                a.transposed()
                    .apply_rows(&mut x, 0, 3, &mut Scratch::default());
                b.transposed()
                    .apply_rows(&mut y, 0, 3, &mut Scratch::default());
                assert_eq!(x, y, "transposed, h={h} d={d} repeat={repeat}");
            }
        }
    }

    #[test]
    fn matches_dense_product() {
        let mut seed = 3u64;
        let (h, d) = (4, 4);
        let n = h * d;
        let factors: Vec<Factor> = (0..3)
            .map(|i| Factor {
                h,
                d,
                blocks: (0..d * h * h).map(|_| rnd(&mut seed)).collect(),
                repeat: 0,
                perm: if i == 0 {
                    None
                } else {
                    Some(crate::math::perm::peft_boft(n, h, i))
                },
            })
            .collect();
        let rows = 3;
        let x0: Vec<f32> = (0..rows * n).map(|_| rnd(&mut seed)).collect();
        let scale: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32 * 0.1).collect();
        let chain = Chain {
            n,
            factors: factors.clone(),
            scale: Some(scale.clone()),
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        };
        let mut x = x0.clone();
        chain.apply_rows(&mut x, 0, rows, &mut Scratch::default());

        // M = F2 · F1 · F0; each row r ↦ s_r · M r.
        let mut m: Vec<f64> = (0..n * n)
            .map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        for f in &factors {
            let fd = dense(f);
            let mut next = vec![0f64; n * n];
            for a in 0..n {
                for b in 0..n {
                    next[a * n + b] = (0..n).map(|k| fd[a * n + k] * m[k * n + b]).sum();
                }
            }
            m = next;
        }
        for r in 0..rows {
            for a in 0..n {
                let want: f64 = scale[r] as f64
                    * (0..n)
                        .map(|b| m[a * n + b] * x0[r * n + b] as f64)
                        .sum::<f64>();
                assert!(
                    (x[r * n + a] as f64 - want).abs() < 1e-5,
                    "{} vs {}",
                    x[r * n + a],
                    want
                );
            }
        }
    }

    /// Block sizes from 2 to 256 (fixed-size kernels and the GEMM path) and 1 to 6 factors with
    /// arbitrary permutations, against the dense product of the factors.
    #[test]
    fn every_block_size_and_factor_count() {
        let mut seed = 11u64;
        for (h, d) in [
            (2, 8),
            (3, 4),
            (8, 2),
            (16, 2),
            (32, 2),
            (64, 2),
            (128, 2),
            (256, 2),
        ] {
            let n = h * d;
            for nf in 1..=6 {
                let factors: Vec<Factor> = (0..nf)
                    .map(|i| {
                        let mut p: Vec<u32> = (0..n as u32).collect();
                        for j in (1..n).rev() {
                            let k = (rnd(&mut seed).abs() * 1e6) as usize % (j + 1);
                            p.swap(j, k);
                        }
                        Factor {
                            h,
                            d,
                            blocks: (0..d * h * h)
                                .map(|_| rnd(&mut seed) * 2.0 / (h as f32).sqrt())
                                .collect(),
                            repeat: 0,
                            perm: (i > 0).then_some(p),
                        }
                    })
                    .collect();
                let rows = 3;
                let x0: Vec<f32> = (0..rows * n).map(|_| rnd(&mut seed)).collect();
                let chain = Chain {
                    n,
                    factors: factors.clone(),
                    scale: None,
                    scale_on: ScaleOn::Vector,
                    scale_first: false,
                    blend: 1.0,
                };
                let mut x = x0.clone();
                chain.apply_rows(&mut x, 0, rows, &mut Scratch::default());
                for r in 0..rows {
                    let mut want: Vec<f64> =
                        x0[r * n..(r + 1) * n].iter().map(|&v| v as f64).collect();
                    for f in &factors {
                        let fd = dense(f);
                        want = (0..n)
                            .map(|a| (0..n).map(|b| fd[a * n + b] * want[b]).sum())
                            .collect();
                    }
                    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
                    for a in 0..n {
                        let e = (x[r * n + a] as f64 - want[a]).abs() / scale;
                        assert!(e < 1e-5, "h={h} factors={nf}: relative error {e:e}");
                    }
                }
            }
        }
    }
}
