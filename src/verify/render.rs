//! The human-readable report (the JSON one is the `Report` itself, serialised).

use super::{Check, Report, Status};

/// The human-readable report.
pub fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for a in &report.adapters {
        let _ = writeln!(
            s,
            "adapter {} ({} {}): {} targets, {} replaced tensors",
            a.path,
            a.source_format,
            a.source_version,
            a.targets.len(),
            a.replacements
        );
        let _ = writeln!(
            s,
            "  {:<48} {:>6} {:>3} {:>4} {:>11} {:>9} {:>9} {:>8} {:>13}",
            "target", "n", "N", "b", "|BᵀB−I|", "reach", "‖M−I‖F", "θmax°", "scale"
        );
        for t in &a.targets {
            let scale = match (t.scale_min, t.scale_max) {
                (Some(lo), Some(hi)) => format!("{lo:.3}..{hi:.3}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "  {:<48} {:>6} {:>3} {:>4} {:>11.2e} {:>9} {:>9.4} {:>8.3} {:>13}",
                t.target,
                t.n,
                t.factors,
                t.block_size,
                t.block_orthogonality,
                format!("{}/{}", t.reach.min, t.n),
                t.distance_from_identity.value,
                t.max_angle_deg.value,
                scale
            );
        }
    }
    if let Some(m) = &report.merged {
        let _ = writeln!(
            s,
            "{} {}: compared by name {} tensors, {} elements ({} transformed, {} replaced, {} untouched); {} missing, {} extra; {} layout as the base",
            m.proof,
            m.path,
            m.tensors,
            m.elements,
            m.transformed,
            m.replaced,
            m.untouched,
            m.missing,
            m.extra,
            if m.same_layout { "same" } else { "not the same" }
        );
    }
    let _ = writeln!(s, "checks:");
    let mut ids: Vec<&str> = Vec::new();
    for c in &report.checks {
        if !ids.contains(&c.check) {
            ids.push(c.check);
        }
    }
    for id in ids {
        let of: Vec<&Check> = report.checks.iter().filter(|c| c.check == id).collect();
        let fails = of.iter().filter(|c| c.status == Status::Fail).count();
        let info = of.iter().all(|c| c.status == Status::Info);
        let worst = of
            .iter()
            .filter_map(|c| c.value)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let thr = of.iter().find_map(|c| c.threshold);
        let status = if info {
            "INFO"
        } else if fails > 0 {
            "FAIL"
        } else {
            "PASS"
        };
        let detail = match (info, worst, thr) {
            (false, Some(w), Some(t)) => format!(" worst {w:.3e}, threshold {t:.1e}"),
            _ => String::new(),
        };
        let _ = writeln!(s, "  {status} {id:<24} {} subjects{detail}", of.len());
        for c in of.iter().filter(|c| c.status == Status::Fail) {
            let _ = writeln!(s, "    FAIL {} {}: {}", c.check, c.subject, c.message);
        }
    }
    let mut ids: Vec<&str> = report.checks.iter().map(|c| c.check).collect();
    ids.dedup();
    ids.sort();
    ids.dedup();
    let _ = write!(
        s,
        "{}: {} checks on {} results ({} pass, {} info, {} failed)",
        if report.passed { "PASS" } else { "FAIL" },
        ids.len(),
        report.checks.len(),
        report
            .checks
            .iter()
            .filter(|c| c.status == Status::Pass)
            .count(),
        report
            .checks
            .iter()
            .filter(|c| c.status == Status::Info)
            .count(),
        report.failed.len()
    );
    if let Some(m) = &report.merged {
        let _ = write!(
            s,
            "; {} tensors and {} elements compared",
            m.tensors, m.elements
        );
    }
    let _ = writeln!(s);
    s
}
