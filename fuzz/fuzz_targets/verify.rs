//! `boft-verify`, structure-aware: a random small canonical adapter (tests/common/canonical_gen.rs)
//! or a PEFT adapter from an arbitrary `adapter_config.json` (structured.rs), with random
//! settings, verified alone, against its base, and against merged checkpoints. Never a panic; a
//! refusal is one line; the report renders as text and JSON. Where the dense reference says what
//! the merge gives (finite values, consistent targets), a checkpoint holding it must pass
//! `merged-values`, and the same checkpoint with one element moved far must fail it.
#![no_main]

use boft::adapter::{canonical, Adapter};
use boft::checkpoint::{Checkpoint, SafeFile};
use boft::formats::peft;
use boft::merge;
use boft::verify::{self, Proof, Report, Settings, Status, CHECKS};
use libfuzzer_sys::fuzz_target;

#[path = "structured.rs"]
mod structured;

use structured::{
    base_of, checkpoint, extremes, one_line, random_case, random_peft, reference, Bytes, Draw,
};

const TOLERANCES: &[f64] = &[1e-5, 1e-3, 0.0, 1.0, 1e-12, 1e300];

fn settings(d: &mut impl Draw) -> Settings {
    let mut s = Settings {
        tolerance: TOLERANCES[d.range(0, TOLERANCES.len() - 1)],
        merged_tolerance: TOLERANCES[d.range(0, TOLERANCES.len() - 1)],
        probes: d.range(1, 9),
        same_layout: d.chance(0.1),
        ..Settings::default()
    };
    if d.chance(0.3) {
        let picked: Vec<&str> = CHECKS.iter().copied().filter(|_| d.chance(0.3)).collect();
        if !picked.is_empty() {
            s.checks = Some(Settings::parse_checks(&picked.join(",")).expect("known checks"));
        }
    }
    s
}

fn run(
    a: &Adapter,
    base: Option<&Checkpoint>,
    second: Option<(&Checkpoint, Proof)>,
    s: &Settings,
) -> Option<Report> {
    match verify::verify(&[("adapter".into(), a.clone())], base, second, s) {
        Ok(r) => {
            let _ = verify::render(&r);
            serde_json::to_string(&r).expect("report serialises");
            assert_eq!(r.passed, r.failed.is_empty());
            Some(r)
        }
        Err(e) => {
            one_line(&e);
            None
        }
    }
}

fn status(r: &Report, check: &str) -> Vec<Status> {
    r.checks
        .iter()
        .filter(|c| c.check == check)
        .map(|c| c.status)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut d = Bytes(data);
    let s = settings(&mut d);
    if d.chance(0.3) {
        let p = random_peft(&mut d);
        let Ok(f) = SafeFile::from_bytes(peft::WEIGHTS, p.weights) else {
            return;
        };
        let mut a = match peft::import_bytes(&p.config, f) {
            Ok(a) => a,
            Err(e) => return one_line(&e),
        };
        run(&a, None, None, &s);
        if let Err(e) = merge::fit_in(&p.base, &mut a, false, None).and_then(|_| a.materialise()) {
            return one_line(&e);
        }
        run(&a, Some(&p.base), None, &s);
        run(&a, Some(&p.base), Some((&p.base, Proof::Restored)), &s);
        return;
    }
    let case = random_case(&mut d);
    let mut targets = case.targets.clone();
    let wild = extremes(&mut d, &mut targets);
    let adapter = Adapter {
        targets,
        source_format: "fuzz".into(),
        ..Default::default()
    };
    let Ok(bytes) = canonical::to_bytes(&adapter) else {
        return;
    };
    let f = SafeFile::from_bytes("adapter.safetensors", bytes).expect("our own file parses");
    let mut a = match canonical::from_file(f) {
        Ok(a) => a,
        Err(e) => return one_line(&e),
    };
    run(&a, None, None, &s);
    let base = base_of(&case);
    if let Err(e) = merge::fit_in(&base, &mut a, false, None).and_then(|_| a.materialise()) {
        return one_line(&e);
    }
    run(&a, Some(&base), None, &s);
    run(&a, Some(&base), Some((&base, Proof::Restored)), &s);
    let Some(want) = reference(&a.targets, &case.shape, &case.w) else {
        return;
    };
    if wild || !want.iter().all(|x| x.is_finite() && x.abs() < 1e6) {
        return;
    }
    // A transform that nearly annihilates the weight (near-singular raw or Neumann blocks)
    // leaves outputs far smaller than what was summed to make them: f32 sums are then off by
    // more than any tolerance relative to the output, a fact about f32, not about the merge.
    let largest = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if largest(&want) < 1e-2 * largest(&case.w) {
        return;
    }
    // The reference rounds once from f64; the merge sums in f32. A loose tolerance leaves room
    // for that and still catches a wrong transform.
    let proof = Settings {
        merged_tolerance: 1e-3,
        checks: Some(Settings::parse_checks("merged-values").unwrap()),
        ..Settings::default()
    };
    let merged = |w: &[f32]| {
        checkpoint(
            "merged.safetensors",
            &[
                ("w.weight", case.shape.clone(), w.to_vec()),
                ("w.bias", vec![3], vec![1.0, 2.0, 3.0]),
            ],
        )
    };
    let honest = merged(&want);
    if let Some(r) = run(&a, Some(&base), Some((&honest, Proof::Merged)), &proof) {
        assert!(
            status(&r, "merged-values")
                .iter()
                .all(|s| *s == Status::Pass),
            "the dense reference's merge fails merged-values: {:#?}\n{:#?}",
            r.checks,
            a.targets
        );
    }
    let mut tampered = want.clone();
    let i = d.range(0, tampered.len() - 1);
    let big = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    tampered[i] += 10.0 * big;
    let bad = merged(&tampered);
    if let Some(r) = run(&a, Some(&base), Some((&bad, Proof::Merged)), &proof) {
        assert!(
            !r.passed && status(&r, "merged-values").contains(&Status::Fail),
            "a merged element moved by {} passes merged-values: {:#?}",
            10.0 * big,
            r.checks
        );
    }
});
