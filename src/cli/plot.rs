//! The PNG plot of `boft-extract --sweep`: captured share against parameter count, one curve per
//! butterfly factor, each point tagged with its block size. The plot has one fixed shape, so a
//! small rasteriser of its own (2 px lines, filled markers, an embedded 5×8 bitmap font) costs
//! less than a charting crate and its font stack; only the encoding comes from `png`. No file
//! I/O here: the caller writes the bytes atomically.

/// One curve: its legend label (e.g. "m=2") and its points, joined in order of x.
pub struct Series {
    /// The legend text.
    pub label: String,
    /// The points; those with a non-finite value or x ≤ 0 are left out.
    pub points: Vec<Point>,
}

/// A point: parameters (x, on a log axis), captured share (y) and the tag written beside it.
pub struct Point {
    /// Parameter count.
    pub x: f64,
    /// Captured share, 0..1.
    pub y: f64,
    /// Text beside the point (e.g. "b=8"); for the ceiling, its legend text.
    pub tag: String,
}

type Rgb = [u8; 3];
/// Left, top, right, bottom, inclusive.
type Rect = (i64, i64, i64, i64);

const W: i64 = 800;
const H: i64 = 500;
/// The plot's frame; data maps `PAD` inside it, so markers on the ranges' ends stay whole.
const FRAME: Rect = (84, 50, 776, 440);
const PAD: i64 = 8;
/// Font pixel size and character advance.
const S: i64 = 2;
const ADV: i64 = 6 * S;
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [228, 228, 228];
const CEILING: Rgb = [90, 90, 90];
/// Tableau's colours less its grey, which the ceiling has.
#[rustfmt::skip]
const PALETTE: [Rgb; 9] = [
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207],
];

/// PNG bytes of the plot.
pub fn png(title: &str, series: &[Series], ceiling: Option<&Point>) -> Vec<u8> {
    let valid = |p: &&Point| p.x.is_finite() && p.x > 0.0 && p.y.is_finite();
    let curves: Vec<Vec<&Point>> = (series.iter())
        .map(|s| {
            let mut v: Vec<&Point> = s.points.iter().filter(valid).collect();
            v.sort_by(|a, b| a.x.total_cmp(&b.x));
            v
        })
        .collect();
    // The ceiling's line needs only its y; its marker needs both.
    let ceil_y = ceiling.map(|c| c.y).filter(|y| y.is_finite());
    let ceil_pt = ceiling.filter(valid);
    let all = || curves.iter().flatten().copied().chain(ceil_pt);
    let ax = Axes::new(all().map(|p| p.x.log10()), all().map(|p| p.y).chain(ceil_y));

    let mut c = Canvas(vec![255; (W * H * 3) as usize]);
    let (fl, ft, fr, fb) = FRAME;
    for (v, label) in ax.x_ticks() {
        let x = px(ax.x(v));
        c.rect((x, ft, x, fb), GRID);
        c.rect((x, fb, x, fb + 4), BLACK);
        c.text(&label, x - width(&label) / 2, fb + 8, BLACK);
    }
    for (v, label) in ax.y_ticks() {
        let y = px(ax.y(v));
        c.rect((fl, y, fr, y), GRID);
        c.rect((fl - 4, y, fl, y), BLACK);
        c.text(&label, fl - 8 - width(&label), y - 7, BLACK);
    }
    let (xt, yt, none) = ("parameters", "captured share", "no data");
    c.text(xt, (fl + fr - width(xt)) / 2, fb + 32, BLACK);
    c.text_up(yt, 10, (ft + fb + width(yt)) / 2, BLACK);
    if let Some(y) = ceil_y.map(|y| ax.y(y)) {
        c.line((fl as f64, y), (fr as f64, y), CEILING, true);
    }
    for (i, pts) in curves.iter().enumerate() {
        for w in pts.windows(2) {
            c.line(ax.at(w[0]), ax.at(w[1]), colour(i), false);
        }
    }
    // Markers claim their space first, so that no tag hides one.
    let mut taken: Vec<Rect> = Vec::new();
    let marks = curves
        .iter()
        .enumerate()
        .flat_map(|(i, pts)| pts.iter().map(move |p| (*p, Marker::of(i), colour(i))));
    for (p, m, col) in marks.chain(ceil_pt.map(|p| (p, Marker::Diamond, BLACK))) {
        let (x, y) = ax.at(p);
        let r = c.marker(m, x, y, col);
        taken.push((px(x) - r, px(y) - r, px(x) + r, px(y) + r));
    }
    c.outline(FRAME, BLACK);
    if all().next().is_none() {
        c.text(none, (fl + fr - width(none)) / 2, (ft + fb) / 2, CEILING);
    }

    let ceil_label = ceiling.map(|p| Some(p.tag.as_str()).filter(|t| !t.is_empty()));
    let ceil_label = ceil_label.map(|t| t.unwrap_or("dense Procrustes"));
    let mut entries: Vec<(String, Marker, Rgb)> = (series.iter().enumerate())
        .map(|(i, s)| (clip(&s.label, 24), Marker::of(i), colour(i)))
        .chain(ceil_label.map(|l| (clip(l, 24), Marker::Diamond, BLACK)))
        .collect();
    let fit = ((fb - ft - 20) / 22) as usize;
    if entries.len() > fit {
        let more = entries.len() + 1 - fit;
        entries.truncate(fit - 1);
        entries.push((format!("+{more} more"), Marker::None, BLACK));
    }
    if !entries.is_empty() {
        taken.push(c.legend(&entries, &taken));
    }

    // A tag takes the first spot around its point (above, below, beside, diagonal) that overlaps
    // nothing drawn in; with none free it is left out, so that a crowded plot stays legible.
    for (i, pts) in curves.iter().enumerate() {
        for p in pts {
            let tag = clip(&p.tag, 16);
            let (x, y, w) = (px(ax.at(p).0), px(ax.at(p).1), width(&tag));
            let (l, r, a, b) = (x - 9 - w, x + 9, y - 22, y + 7);
            let spots = [
                (x - w / 2, a - 2),
                (x - w / 2, b + 2),
                (r, y - 7),
                (l, y - 7),
            ];
            let spots = spots.into_iter().chain([(l, a), (r, a), (l, b), (r, b)]);
            let inside = |r: &Rect| r.0 > fl && r.2 < fr && r.1 > ft && r.3 < fb;
            let free = (spots.map(|(x, y)| (x, y, x + w, y + 16)))
                .find(|r| inside(r) && !taken.iter().any(|t| overlaps(*t, *r)));
            if let Some(r) = free {
                c.halo_text(&tag, r.0, r.1, colour(i));
                taken.push((r.0 - 3, r.1, r.2 + 3, r.3));
            }
        }
    }
    let title = clip(title, ((W - 20) / ADV) as usize);
    c.text(&title, (W - width(&title)) / 2, 16, BLACK);
    encode(&c.0).unwrap_or_default()
}

/// Never fails: the writer is in memory and the header fixed and valid.
fn encode(px: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(px)?;
    w.finish()?;
    Ok(out)
}

fn colour(i: usize) -> Rgb {
    PALETTE[i % PALETTE.len()]
}

/// Canvas coordinates, bounded so that no later integer arithmetic can overflow.
fn px(v: f64) -> i64 {
    if v.is_nan() {
        -1
    } else {
        v.clamp(-1e4, 1e4).round() as i64
    }
}

fn overlaps(a: Rect, b: Rect) -> bool {
    a.0 <= b.2 && b.0 <= a.2 && a.1 <= b.3 && b.1 <= a.3
}

fn width(s: &str) -> i64 {
    (s.chars().count() as i64 * ADV - S).max(0)
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    s.chars().take(n - 2).chain("..".chars()).collect()
}

/// The visible ranges: x in log10 units, at least a decade wide so that 1-2-5 ticks always
/// give two labels; y from below the lowest point up to 1 (higher only when data is).
struct Axes {
    lx: (f64, f64),
    y: (f64, f64),
}

impl Axes {
    fn new(lxs: impl Iterator<Item = f64>, ys: impl Iterator<Item = f64>) -> Axes {
        fn extent(it: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
            it.fold(None, |acc, v| {
                Some(acc.map_or((v, v), |(a, b): (f64, f64)| (a.min(v), b.max(v))))
            })
        }
        let (lo, hi) = extent(lxs).unwrap_or((0.0, 1.0));
        let (mid, half) = ((lo + hi) / 2.0, ((hi - lo) / 2.0).max(0.5) * 1.06);
        let (ymin, ymax) = extent(ys).unwrap_or((0.0, 1.0));
        let top = ymax.max(1.0);
        let bottom = ymin - ((top - ymin) * 0.05).max(0.02);
        let bottom = if ymin >= 0.0 { bottom.max(0.0) } else { bottom };
        let y = if (top - bottom).is_finite() && top > bottom {
            (bottom, top)
        } else {
            (0.0, 1.0)
        };
        Axes {
            lx: (mid - half, mid + half),
            y,
        }
    }
    fn x(&self, x: f64) -> f64 {
        let (l, r) = ((FRAME.0 + PAD) as f64, (FRAME.2 - PAD) as f64);
        l + (x.log10() - self.lx.0) / (self.lx.1 - self.lx.0) * (r - l)
    }
    fn y(&self, y: f64) -> f64 {
        let (t, b) = ((FRAME.1 + PAD) as f64, (FRAME.3 - PAD) as f64);
        b - (y - self.y.0) / (self.y.1 - self.y.0) * (b - t)
    }
    fn at(&self, p: &Point) -> (f64, f64) {
        (self.x(p.x), self.y(p.y))
    }
    /// Powers of ten (thinned to about seven); within one decade, 1-2-5 steps.
    fn x_ticks(&self) -> Vec<(f64, String)> {
        let (lo, hi) = self.lx;
        let decades: Vec<i32> = (lo.ceil() as i32..=hi.floor() as i32).collect();
        let vals: Vec<f64> = if decades.len() >= 2 {
            let step = decades.len().div_ceil(7);
            decades
                .iter()
                .step_by(step)
                .map(|&k| 10f64.powi(k))
                .collect()
        } else {
            (lo.floor() as i32..=hi.floor() as i32)
                .flat_map(|k| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(k)))
                .filter(|v| (lo..=hi).contains(&v.log10()))
                .collect()
        };
        vals.into_iter().map(|v| (v, x_label(v))).collect()
    }
    /// About five steps of 1, 2 or 5 times a power of ten.
    fn y_ticks(&self) -> Vec<(f64, String)> {
        let (lo, hi) = self.y;
        let raw = (hi - lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .map(|m| m * mag)
            .into_iter()
            .find(|s| *s >= raw);
        let step = step.unwrap_or(raw);
        let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
        let first = (lo / step).ceil() as i64;
        (first..first.saturating_add(12))
            .map(|i| i as f64 * step)
            .take_while(|v| *v <= hi + step * 1e-9)
            .map(|v| (v, format!("{v:.decimals$}")))
            .map(|(v, s)| (v, if s.len() < 8 { s } else { format!("{v:.1e}") }))
            .collect()
    }
}

/// 1k, 20k, 5M for the usual parameter counts; 0.5 below one; 1e15 beyond the SI prefixes.
fn x_label(v: f64) -> String {
    let k = (v.log10() + 1e-9).floor() as i32;
    let m = (v / 10f64.powi(k)).round() as i64;
    match k {
        0..=11 => format!(
            "{}{}",
            m * 10i64.pow(k as u32 % 3),
            ["", "k", "M", "G"][k as usize / 3]
        ),
        -2..=-1 => format!("0.{}{m}", "0".repeat((-k - 1) as usize)),
        _ => format!("{m}e{k}"),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
    None,
}

impl Marker {
    /// Shapes cycle too, so that curves stay apart in greyscale; the diamond is the ceiling's.
    fn of(i: usize) -> Marker {
        [Marker::Circle, Marker::Square, Marker::Triangle][i % 3]
    }
}

/// RGB rows, top first.
struct Canvas(Vec<u8>);

impl Canvas {
    /// Clipped to the canvas, so that no input makes a long loop.
    fn rect(&mut self, (x0, y0, x1, y1): Rect, c: Rgb) {
        for y in y0.max(0)..=y1.min(H - 1) {
            for x in x0.max(0)..=x1.min(W - 1) {
                let i = ((y * W + x) * 3) as usize;
                self.0[i..i + 3].copy_from_slice(&c);
            }
        }
    }

    fn outline(&mut self, (x0, y0, x1, y1): Rect, c: Rgb) {
        for r in [
            (x0, y0, x1, y0),
            (x0, y1, x1, y1),
            (x0, y0, x0, y1),
            (x1, y0, x1, y1),
        ] {
            self.rect(r, c);
        }
    }

    /// A 2 px line: a 2×2 stamp per step along the major axis keeps the width even at any
    /// slope, and without Wu's blending the colours stay exact (the tests look for them).
    fn line(&mut self, a: (f64, f64), b: (f64, f64), c: Rgb, dashed: bool) {
        let (x0, y0, x1, y1) = (px(a.0), px(a.1), px(b.0), px(b.1));
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in (0..=n).filter(|i| !dashed || i % 14 < 8) {
            let (x, y) = (x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n);
            self.rect((x, y, x + 1, y + 1), c);
        }
    }

    /// Draws a marker; its radius.
    fn marker(&mut self, m: Marker, x: f64, y: f64, c: Rgb) -> i64 {
        let (x, y, r) = (px(x), px(y), if m == Marker::Diamond { 7i64 } else { 4 });
        for (dx, dy) in (-r..=r).flat_map(|dy| (-r..=r).map(move |dx| (dx, dy))) {
            let inside = match m {
                Marker::Circle => dx * dx + dy * dy <= r * r + r,
                Marker::Square => dx.abs() < r && dy.abs() < r,
                Marker::Triangle => 2 * dx.abs() <= dy + r,
                Marker::Diamond => dx.abs() + dy.abs() <= r,
                Marker::None => false,
            };
            if inside {
                self.rect((x + dx, y + dy, x + dx, y + dy), c);
            }
        }
        r
    }

    /// A boxed legend in the frame's corner that covers the fewest of `taken`; its box.
    fn legend(&mut self, entries: &[(String, Marker, Rgb)], taken: &[Rect]) -> Rect {
        let (w, h) = (
            52 + entries.iter().map(|e| width(&e.0)).max().unwrap_or(0),
            10 + 22 * entries.len() as i64,
        );
        let (fl, ft, fr, fb) = FRAME;
        let corners = [
            (fr - 10 - w, fb - 10 - h),
            (fl + 10, ft + 10),
            (fr - 10 - w, ft + 10),
        ];
        let boxed = |(x, y): (i64, i64)| (x, y, x + w, y + h);
        let covered = |r: &Rect| taken.iter().filter(|t| overlaps(**t, *r)).count();
        let r = corners
            .map(boxed)
            .into_iter()
            .min_by_key(covered)
            .unwrap_or(boxed(corners[0]));
        self.rect(r, WHITE);
        self.outline(r, CEILING);
        for (k, (label, m, col)) in entries.iter().enumerate() {
            let y = r.1 + 16 + 22 * k as i64;
            if *m != Marker::None {
                self.line(
                    ((r.0 + 8) as f64, y as f64),
                    ((r.0 + 36) as f64, y as f64),
                    *col,
                    *m == Marker::Diamond,
                );
                self.marker(*m, (r.0 + 22) as f64, y as f64, *col);
            }
            self.text(label, r.0 + 44, y - 7, BLACK);
        }
        r
    }

    /// Text with its top-left at (x, y); characters outside the font show as '?'.
    fn text(&mut self, s: &str, x: i64, y: i64, c: Rgb) {
        for (u, v) in ink(s) {
            self.rect((x + u, y + v, x + u + S - 1, y + v + S - 1), c);
        }
    }

    /// Text turned a quarter left, (x, y) its bottom-left.
    fn text_up(&mut self, s: &str, x: i64, y: i64, c: Rgb) {
        for (u, v) in ink(s) {
            self.rect((x + v, y - u - S + 1, x + v + S - 1, y - u), c);
        }
    }

    /// Text with a white rim, legible where it crosses a curve.
    fn halo_text(&mut self, s: &str, x: i64, y: i64, c: Rgb) {
        for (dx, dy) in (-1..=1).flat_map(|dx| (-1..=1).map(move |dy| (dx, dy))) {
            self.text(s, x + dx, y + dy, WHITE);
        }
        self.text(s, x, y, c);
    }
}

/// The top-left corners of a text's inked font pixels, relative to its own top-left.
fn ink(s: &str) -> impl Iterator<Item = (i64, i64)> + '_ {
    s.chars().enumerate().flat_map(|(i, ch)| {
        let bits = GLYPH_BITS[GLYPHS.find(ch).or(GLYPHS.find('?')).unwrap_or(0)];
        (0..40i64)
            .filter(move |k| bits >> (39 - k) & 1 == 1)
            .map(move |k| (i as i64 * ADV + k % 5 * S, k / 5 * S))
    })
}

/// 5×8 glyphs, 40 bits each: eight rows of five, top row in the high bits, leftmost column
/// first; rows 0-6 are the body, row 7 the descender.
const GLYPHS: &str =
    " 0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,=%()-+:/_'?![]*<>;";
#[rustfmt::skip]
const GLYPH_BITS: [u64; 83] = [
    0,
    0x74675CC5C0, 0x23084211C0, 0x74422223E0, 0xF88820C5C0, 0x11952F8840, 0xFC3C10C5C0,
    0x3221E8C5C0, 0xF844442100, 0x7462E8C5C0, 0x7462F08980, 0x7463F8C620, 0xF463E8C7C0,
    0x74610845C0, 0xE4A318CB80, 0xFC21E843E0, 0xFC21E84200, 0x746178C5E0, 0x8C63F8C620,
    0x71084211C0, 0x3884214980, 0x8CA98A4A20, 0x84210843E0, 0x8EEB58C620, 0x8C7359C620,
    0x746318C5C0, 0xF463E84200, 0x74631AC9A0, 0xF463EA4A20, 0x7C20E087C0, 0xF908421080,
    0x8C6318C5C0, 0x8C6318A880, 0x8C635AD540, 0x8C54454620, 0x8C54421080, 0xF8444443E0,
    0x001C17C5E0, 0x842D98C7C0, 0x001D0845C0, 0x085B38C5E0, 0x001D1FC1C0, 0x3251C42100,
    0x001F18BC2E, 0x842D98C620, 0x20184211C0, 0x100C210A4C, 0x84254C5240, 0x61084211C0,
    0x00355AD6A0, 0x002D98C620, 0x001D18C5C0, 0x003D18FA10, 0x001F18BC21, 0x002D984200,
    0x001F0707C0, 0x42388424C0, 0x002318CDA0, 0x002318A880, 0x00231AD540, 0x0022A22A20,
    0x002318BC2E, 0x003E2223E0, 0x0000003180, 0x0000003088, 0x003E0F8000, 0xC644444C60,
    0x1110841040, 0x4104211100, 0x0001F00000, 0x0109F21000, 0x0318063000, 0x0044444000,
    0x000000001F, 0x2110000000, 0x7442220080, 0x2108420080, 0x72108421C0, 0x70842109C0,
    0x012AEA9000, 0x1111041040, 0x4104111100, 0x0318061100,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(x: f64, y: f64, tag: &str) -> Point {
        Point {
            x,
            y,
            tag: tag.to_string(),
        }
    }

    /// The sweep's usual shape: three factors, five block sizes, a dense ceiling beyond.
    fn sweep() -> Vec<Series> {
        (1..=3)
            .map(|m| Series {
                label: format!("m={m}"),
                points: [2, 4, 8, 16, 32]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        let x = 100.0 * 4.6f64.powi(i as i32) * (1.0 + 0.12 * (m - 1) as f64);
                        pt(
                            x,
                            0.2 + 0.75 * (i as f64 / 4.0).powf(0.8)
                                - 0.05 * (3 - m) as f64 * (i as f64 / 4.0),
                            &format!("b={b}"),
                        )
                    })
                    .collect(),
            })
            .collect()
    }

    /// Decodes a PNG, checking it is 8-bit RGB of the plot's size; its pixels.
    fn decode(bytes: &[u8]) -> Vec<Rgb> {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        assert_eq!(
            (info.color_type, info.bit_depth),
            (png::ColorType::Rgb, png::BitDepth::Eight)
        );
        buf[..info.buffer_size()]
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect()
    }

    fn count(px: &[Rgb], c: Rgb) -> usize {
        px.iter().filter(|p| **p == c).count()
    }

    #[test]
    fn sweep_plot_has_each_colour_on_white() {
        let ceiling = pt(500_000.0, 0.97, "dense Procrustes");
        let bytes = png("BOFT sweep: q_proj", &sweep(), Some(&ceiling));
        // Set BOFT_PLOT_SAMPLE=path to look at the plot.
        if let Some(path) = std::env::var_os("BOFT_PLOT_SAMPLE") {
            std::fs::write(path, &bytes).unwrap();
        }
        let px = decode(&bytes);
        assert_eq!(px[0], WHITE);
        assert_eq!(px[px.len() - 1], WHITE);
        assert!(count(&px, WHITE) > px.len() / 2);
        for i in 0..3 {
            assert!(count(&px, colour(i)) > 100, "series {i}");
        }
        assert!(count(&px, CEILING) > 100);
        assert!(count(&px, BLACK) > 1000);
    }

    #[test]
    fn degenerate_inputs_still_make_a_plot() {
        let one = |p: Point| {
            vec![Series {
                label: "m=1".into(),
                points: vec![p],
            }]
        };
        let nan = pt(f64::NAN, f64::NAN, "nan");
        let cases: Vec<(Vec<Series>, Option<Point>)> = vec![
            (vec![], None),
            (
                vec![Series {
                    label: String::new(),
                    points: vec![],
                }],
                None,
            ),
            (one(pt(1000.0, 0.5, "b=8")), None),
            (one(pt(f64::NAN, 0.5, "")), Some(pt(f64::INFINITY, 0.9, ""))),
            (one(pt(0.0, 0.5, "")), Some(pt(-5.0, f64::NAN, ""))),
            (one(pt(-1.0, f64::NEG_INFINITY, "")), Some(nan)),
            (
                one(pt(f64::MIN_POSITIVE, 1e308, "")),
                Some(pt(f64::MAX, -1e308, "")),
            ),
            (one(pt(1e-320, 1.0, "")), None),
            (
                vec![Series {
                    label: "flat".into(),
                    points: (1..9).map(|i| pt(i as f64 * 1e3, 0.7, "b=1")).collect(),
                }],
                None,
            ),
            (
                vec![Series {
                    label: "é ✓ unicode".into(),
                    points: (0..1000)
                        .map(|i| pt(1.0 + i as f64, (i as f64).sin(), "b=2"))
                        .collect(),
                }],
                None,
            ),
            (
                (0..40)
                    .map(|i| Series {
                        label: format!("m={i} and a very long label indeed"),
                        points: vec![pt(10.0 + i as f64, 0.5, "")],
                    })
                    .collect(),
                None,
            ),
        ];
        for (series, ceiling) in &cases {
            let b = png(&"long title ".repeat(20), series, ceiling.as_ref());
            decode(&b);
        }
        // A lone point is still drawn.
        assert!(count(&decode(&png("", &cases[2].0, None)), PALETTE[0]) > 20);
    }

    #[test]
    fn log_ticks_label_powers_of_ten_and_fill_a_single_decade() {
        let ticks = |lo: f64, hi: f64| {
            let ax = Axes::new([lo, hi].into_iter().map(f64::log10), [0.5].into_iter());
            ax.x_ticks().into_iter().map(|t| t.1).collect::<Vec<_>>()
        };
        assert_eq!(ticks(100.0, 50_000.0), ["100", "1k", "10k"]);
        assert_eq!(ticks(300.0, 700.0), ["200", "500", "1k"]);
        assert_eq!(ticks(2e6, 5e8), ["10M", "100M"]);
        assert_eq!(x_label(0.05), "0.05");
        assert_eq!(x_label(2e13), "2e13");
    }

    #[test]
    fn y_range_ends_at_one_and_reaches_below_the_lowest_share() {
        let ax = Axes::new([2.0].into_iter(), [0.2, 0.95].into_iter());
        assert!(ax.y.0 < 0.2 && ax.y.0 >= 0.0 && ax.y.1 == 1.0);
        let labels: Vec<String> = ax.y_ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(labels.last().map(String::as_str), Some("1.0"));
        let flat = Axes::new([2.0].into_iter(), [1.0, 1.0].into_iter());
        assert!(flat.y.0 < 1.0 && flat.y_ticks().len() >= 2);
    }
}
