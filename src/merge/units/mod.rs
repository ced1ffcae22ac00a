//! A merge split into independent units for many processes or machines (`boft-merge --plan`,
//! `--unit K/N`, `--finalize`; docs/SCALE.md). A unit is one output file: one file of the base
//! merged for one job. Units share nothing but the staging folder beside each output
//! (`store`), so any number of them run anywhere that sees the same filesystem, in any order,
//! any number of times; finalize checks that every unit's record belongs to this merge and that
//! its file is intact, then links the files into the output and moves it into place.

mod store;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::pipeline::{self, OutFile};
use super::{plan_layers, Backend, Fate, Job, Plan, Progress, Stats};
use crate::checkpoint::Checkpoint;
use crate::error::{err, Class, Error, Result};
use crate::output::Staged;
use store::Store;
pub use store::{path_for as staging_path, Record};

/// One unit: file `file` of the base, merged for job `job`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// Its number among all units of the merge: `job × files + file`.
    pub index: usize,
    /// The job (the output) it belongs to.
    pub job: usize,
    /// Which file of the base (`Checkpoint::files`) it writes the merged copy of.
    pub file: usize,
    /// The size of that file.
    pub bytes: u64,
}

/// Worker `k` of `n` (`--unit K/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Which worker, 0 … n − 1.
    pub k: usize,
    /// How many workers.
    pub n: usize,
}

/// The most workers a merge is split among.
pub const MAX_WORKERS: usize = 1 << 20;

impl std::str::FromStr for Share {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Share, String> {
        let bad = || format!("{s:?}: expected K/N with 0 ≤ K < N ≤ {MAX_WORKERS}, as in 0/4");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || n > MAX_WORKERS || k >= n {
            return Err(bad());
        }
        Ok(Share { k, n })
    }
}

/// Every unit of a merge of `base` for `jobs` outputs, job by job, file by file.
pub fn units(base: &Checkpoint, jobs: usize) -> Vec<Unit> {
    let files = base.files.len();
    (0..jobs)
        .flat_map(|job| {
            base.files
                .iter()
                .enumerate()
                .map(move |(file, (_, f))| Unit {
                    index: job * files + file,
                    job,
                    file,
                    bytes: f.len() as u64,
                })
        })
        .collect()
}

/// Which of `n` workers runs each unit (by `Unit::index`): the largest unit first, each to the
/// worker with the fewest bytes so far (the lowest-numbered on a tie). Deterministic, so every
/// worker computes the same split without talking to the others.
pub fn assign(units: &[Unit], n: usize) -> Vec<usize> {
    use std::cmp::Reverse;
    let mut order: Vec<&Unit> = units.iter().collect();
    order.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.index.cmp(&b.index)));
    // Workers by (bytes so far, number), least first.
    let mut load: std::collections::BinaryHeap<Reverse<(u64, usize)>> =
        (0..n.max(1)).map(|w| Reverse((0, w))).collect();
    let mut who = vec![0; units.iter().map(|u| u.index + 1).max().unwrap_or(0)];
    for u in order {
        let Reverse((bytes, w)) = load.pop().expect("at least one worker");
        load.push(Reverse((bytes + u.bytes, w)));
        who[u.index] = w;
    }
    who
}

/// What identifies the base's layout: every weight file's name, size and header. The values
/// are each unit's own business (`file_fingerprint`), so that no worker reads beyond its files.
pub fn base_digest(base: &Checkpoint) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"boft-merge base v2\0");
    h.update((base.files.len() as u64).to_le_bytes());
    for (rel, f) in &base.files {
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update((f.len() as u64).to_le_bytes());
        h.update(f.header_bytes());
    }
    h.finalize().into()
}

/// Bytes of each tensor's start and of its end hashed into a file's fingerprint.
const SAMPLE_EDGE: usize = 4 << 10;
/// Windows of the file's data hashed besides, spread over it.
const SAMPLE_WINDOWS: usize = 16;
const SAMPLE_WINDOW: usize = 64 << 10;

/// What identifies the values of base file `file` without reading all of it: its name, size and
/// header, the first and last 4 KiB of every tensor (all of a small one), and 1 MiB in 16
/// windows spread over its data. A fine-tune, a model edit, a merged LoRA or a norm- or
/// bias-only change moves the edges of every tensor it touches; a change confined to the
/// interior of large tensors (a repaired download) is not seen. A copy of the file elsewhere (a
/// node's local disk) has the same fingerprint.
pub fn file_fingerprint(base: &Checkpoint, file: usize) -> String {
    let (rel, f) = &base.files[file];
    let mut h = Sha256::new();
    h.update(b"boft-merge base file v1\0");
    h.update(rel.to_string_lossy().as_bytes());
    h.update([0]);
    h.update((f.len() as u64).to_le_bytes());
    h.update(f.header_bytes());
    for t in &f.tensors {
        let d = f.data(t);
        if d.len() <= 2 * SAMPLE_EDGE {
            h.update(d);
        } else {
            h.update(&d[..SAMPLE_EDGE]);
            h.update(&d[d.len() - SAMPLE_EDGE..]);
        }
    }
    let data = &f.bytes()[f.data_offset..];
    if data.len() > SAMPLE_WINDOWS * SAMPLE_WINDOW {
        let last = data.len() - SAMPLE_WINDOW;
        for i in 0..SAMPLE_WINDOWS {
            let at = last / (SAMPLE_WINDOWS - 1) * i;
            h.update(&data[at..at + SAMPLE_WINDOW]);
        }
    }
    format!("{:x}", h.finalize())
}

/// The files a reader opens for the adapter at `path` (`formats::read_alongside`, folders left
/// out).
pub fn adapter_files(path: &Path) -> Vec<PathBuf> {
    let mut v = crate::formats::read_alongside(path);
    v.retain(|p| p.is_file());
    v
}

/// SHA-256 of every file a reader opens for the adapter at `path` (`adapter_files`): their
/// names and bytes.
pub fn adapter_digest(path: &Path) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(b"boft-merge adapter v1\0");
    for p in adapter_files(path) {
        let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        h.update(name.unwrap_or_default().as_bytes());
        h.update([0]);
        let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        h.update(len.to_le_bytes());
        h.update(hash_file(&f, len).map_err(|e| Error::io(&p, e))?);
    }
    Ok(h.finalize().into())
}

/// A job's plan id: the base's identity, what the job does to it (`recipe`: its adapters'
/// digests and how each is applied, which the caller writes) and this tool's version. Units
/// and finalize of one merge compute the same id; anything that changes the output changes it.
pub fn plan_id(base: &[u8; 32], recipe: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"boft-merge plan v1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update([0]);
    h.update(base);
    h.update(recipe);
    format!("{:x}", h.finalize())
}

/// SHA-256 of the first `len` bytes of `f`, read by offset (the file's position is left alone).
fn hash_file(f: &std::fs::File, len: u64) -> std::io::Result<sha2::digest::Output<Sha256>> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0u64;
    while at < len {
        let want = ((len - at) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..want], at)?;
        h.update(&buf[..want]);
        at += want as u64;
    }
    Ok(h.finalize())
}

/// What a plan says a unit reads: a range of a file.
#[derive(Serialize, Debug)]
pub struct Range {
    /// The file.
    pub path: PathBuf,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A tensor of a unit's file and what happens to it.
#[derive(Serialize, Debug)]
pub struct TensorDoc {
    /// Its name in the file.
    pub name: String,
    /// `transform`, `replace` or `copy`.
    pub action: &'static str,
    /// Its bytes.
    pub bytes: u64,
}

/// One unit, as `--plan` prints it.
#[derive(Serialize, Debug)]
pub struct UnitDoc {
    /// Its number.
    pub unit: usize,
    /// The worker of `--unit K/N` that runs it (when a split was asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
    /// Its job (0 for a single merge).
    pub job: usize,
    /// The job's plan id.
    pub plan: String,
    /// The base file, relative to the base.
    pub file: String,
    /// Where the file ends up once finalized.
    pub writes: PathBuf,
    /// The staging folder it is written to first.
    pub staging: PathBuf,
    /// The size of the file it writes.
    pub bytes: u64,
    /// What it reads: ranges of the base file, and the adapters' files when it transforms or
    /// replaces anything.
    pub reads: Vec<Range>,
    /// Tensors transformed, replaced and copied.
    pub transformed: usize,
    /// See `transformed`.
    pub replaced: usize,
    /// See `transformed`.
    pub copied: usize,
    /// Its tensors in file order.
    pub tensors: Vec<TensorDoc>,
}

/// What finalize does for one job besides linking the units' files.
#[derive(Serialize, Debug)]
pub struct FinalizeDoc {
    /// The job.
    pub job: usize,
    /// Its output.
    pub output: PathBuf,
    /// Its plan id.
    pub plan: String,
    /// The base's other files (configs, the index) copied into it, relative to the base.
    pub copies: Vec<String>,
}

/// `boft-merge --plan`: the units of a merge.
#[derive(Serialize, Debug)]
pub struct PlanDoc {
    /// Always `boft-merge-plan`.
    pub format: &'static str,
    /// Layout version.
    pub version: u32,
    /// The base, as opened.
    pub base: PathBuf,
    /// How many units the merge has in all.
    pub units_total: usize,
    /// The split asked for (`--unit K/N`): N.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// The worker whose share `units` is: K.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
    /// The units (all of them, or worker K's).
    pub units: Vec<UnitDoc>,
    /// What `--finalize` then does.
    pub finalize: Vec<FinalizeDoc>,
}

/// What `plan` does to tensor `name`, as `--plan` says it.
fn action_name(plan: &Plan, name: &str) -> &'static str {
    match plan.fate(name) {
        Fate::Transformed => "transform",
        Fate::Replaced(_) => "replace",
        Fate::Untouched => "copy",
    }
}

/// Transformed, replaced and copied tensors of file `file` under `plan`, with their bytes.
fn file_stats(plan: &Plan, file: usize, st: &mut Stats) {
    for t in &plan.base.files[file].1.tensors {
        st.bytes += (t.end - t.start) as u64;
        match plan.fate(&t.name) {
            Fate::Transformed => st.transformed += 1,
            Fate::Replaced(_) => st.replaced += 1,
            Fate::Untouched => st.copied += 1,
        }
    }
}

fn plans<'a>(base: &'a Checkpoint, jobs: &[Job<'a>]) -> Result<Vec<Plan<'a>>> {
    jobs.iter().map(|j| plan_layers(base, &j.layers)).collect()
}

/// The units of a merge as `--plan` prints them: all, or worker `share.k`'s. `adapter_files`
/// are the files each job's adapters are read from.
pub fn plan_doc(
    base: &Checkpoint,
    jobs: &[Job],
    ids: &[String],
    adapter_files: &[Vec<PathBuf>],
    share: Option<Share>,
) -> Result<PlanDoc> {
    let plans = plans(base, jobs)?;
    let all = units(base, jobs.len());
    let who = share.map(|s| assign(&all, s.n));
    let mut docs = Vec::new();
    for u in &all {
        let worker = who.as_ref().map(|w| w[u.index]);
        if share.is_some_and(|s| Some(s.k) != worker) {
            continue;
        }
        let (rel, f) = &base.files[u.file];
        let plan = &plans[u.job];
        let dest = &jobs[u.job].dest;
        let mut reads = vec![Range {
            path: f.path.clone(),
            start: 0,
            end: f.data_offset as u64,
        }];
        let mut counts = Stats::default();
        file_stats(plan, u.file, &mut counts);
        let mut tensors = Vec::with_capacity(f.tensors.len());
        let mut sorted: Vec<_> = f.tensors.iter().collect();
        sorted.sort_by_key(|t| t.start);
        for t in sorted {
            let (start, end) = (
                (f.data_offset + t.start) as u64,
                (f.data_offset + t.end) as u64,
            );
            let last = reads.last_mut().expect("the header range");
            if last.end == start {
                last.end = end;
            } else if start < end {
                reads.push(Range {
                    path: f.path.clone(),
                    start,
                    end,
                });
            }
            tensors.push(TensorDoc {
                name: t.name.clone(),
                action: action_name(plan, &t.name),
                bytes: (t.end - t.start) as u64,
            });
        }
        if counts.transformed + counts.replaced > 0 {
            for p in &adapter_files[u.job] {
                let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                reads.push(Range {
                    path: p.clone(),
                    start: 0,
                    end: len,
                });
            }
        }
        docs.push(UnitDoc {
            unit: u.index,
            worker,
            job: u.job,
            plan: ids[u.job].clone(),
            file: rel.to_string_lossy().into_owned(),
            writes: if base.is_folder() {
                dest.join(rel)
            } else {
                dest.clone()
            },
            staging: staging_path(dest),
            bytes: u.bytes,
            reads,
            transformed: counts.transformed,
            replaced: counts.replaced,
            copied: counts.copied,
            tensors,
        });
    }
    Ok(PlanDoc {
        format: "boft-merge-plan",
        version: 1,
        base: base.root.clone(),
        units_total: all.len(),
        workers: share.map(|s| s.n),
        worker: share.map(|s| s.k),
        units: docs,
        finalize: jobs
            .iter()
            .enumerate()
            .map(|(j, job)| FinalizeDoc {
                job: j,
                output: job.dest.clone(),
                plan: ids[j].clone(),
                copies: base
                    .others
                    .iter()
                    .map(|r| r.to_string_lossy().into_owned())
                    .collect(),
            })
            .collect(),
    })
}

/// What one `--unit K/N` run did.
#[derive(Debug, Default)]
pub struct UnitsDone {
    /// The units it wrote.
    pub ran: Vec<Unit>,
    /// Its units that a valid record already covered, left as they were.
    pub skipped: Vec<Unit>,
    /// How many units the merge has.
    pub total: usize,
    /// What was written, per job (over the units it ran).
    pub stats: Vec<Stats>,
}

/// Why a unit is not ready for finalize.
enum Problem {
    /// No record.
    Missing,
    /// A record of another merge (another base, adapters, options or version).
    Stale,
    /// The record's file is gone, changed or replaced since the record was written.
    Changed(&'static str),
    /// The record itself is not one.
    Bad(Error),
    /// The record or its file could not be read (not the unit's fault: said as it is).
    Io(Error),
}

/// A file's modification time in nanoseconds since the epoch, as records hold it.
fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

/// Check unit `u`'s record against the plan (`id`) and the base file's fingerprint (`base_id`):
/// the record, when all is well. No handle is kept: finalize links by name and checks the inode
/// it linked.
fn check_unit(
    store: &Store,
    base: &Checkpoint,
    u: &Unit,
    id: &str,
    base_id: &str,
    rehash: bool,
) -> std::result::Result<Record, Problem> {
    use std::os::unix::fs::MetadataExt;
    let r = match store.read_record(u.file) {
        Ok(Some(r)) => r,
        Ok(None) => return Err(Problem::Missing),
        Err(e) if e.class == Class::Io => return Err(Problem::Io(e)),
        Err(e) => return Err(Problem::Bad(e)),
    };
    let rel = base.files[u.file].0.to_string_lossy();
    if r.plan != id || r.base != base_id || r.file != rel || r.size != u.bytes {
        return Err(Problem::Stale);
    }
    let f = match store.open_data(&r.data) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Problem::Changed("its file is missing"))
        }
        Err(e) => return Err(Problem::Io(Error::io(store.data_path(&r.data), e))),
    };
    let m = f
        .metadata()
        .map_err(|e| Problem::Io(Error::io(store.data_path(&r.data), e)))?;
    if !m.is_file() || m.len() != r.size || m.ino() != r.ino || mtime_ns(&m) != r.mtime_ns {
        return Err(Problem::Changed(
            "its file was changed or replaced after the record was written",
        ));
    }
    if rehash {
        let sum = hash_file(&f, r.size)
            .map_err(|e| Problem::Io(Error::io(store.data_path(&r.data), e)))?;
        if format!("{sum:x}") != r.sha256 {
            return Err(Problem::Changed(
                "its file's SHA-256 differs from the record's",
            ));
        }
    }
    Ok(r)
}

/// A data file being written, removed unless published.
struct Pending<'s> {
    store: &'s Store,
    unit: Unit,
    name: String,
    path: PathBuf,
    /// A second handle: it keeps the file locked (and readable) after the writer's is closed.
    handle: std::fs::File,
    published: bool,
    _fault: crate::fault::StagedGuard,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.published {
            self.store.remove_data(&self.name);
        }
    }
}

/// `boft-merge --unit K/N`: write worker `share.k`'s units into each output's staging folder,
/// each file synced and then published by its record. Units whose record is valid already are
/// skipped; whatever fails leaves no record (and removes its file).
#[allow(clippy::too_many_arguments)]
pub fn run(
    base: &Checkpoint,
    jobs: &[Job],
    ids: &[String],
    share: Share,
    inputs: &[&Path],
    force: bool,
    backend: &dyn Backend,
    progress: &dyn Progress,
) -> Result<UnitsDone> {
    // Refused before anything is written, as a whole merge would be.
    super::check_outputs(base, jobs, inputs, force)?;
    let plans = plans(base, jobs)?;
    let all = units(base, jobs.len());
    let who = assign(&all, share.n);
    let mut done = UnitsDone {
        total: all.len(),
        stats: vec![Stats::default(); jobs.len()],
        ..UnitsDone::default()
    };
    let mine: Vec<Unit> = all
        .iter()
        .filter(|u| who[u.index] == share.k)
        .copied()
        .collect();
    let mut stores: Vec<Option<Store>> = (0..jobs.len()).map(|_| None).collect();
    for u in &mine {
        if stores[u.job].is_none() {
            stores[u.job] = Store::open(&jobs[u.job].dest, true)?;
        }
    }
    let store = |j: usize| stores[j].as_ref().expect("opened above");
    // Each base file's fingerprint, once, for those of this share.
    let mut prints: Vec<Option<String>> = vec![None; base.files.len()];
    for u in &mine {
        if prints[u.file].is_none() {
            prints[u.file] = Some(file_fingerprint(base, u.file));
        }
    }
    let print = |f: usize| prints[f].as_deref().expect("computed above");
    let mut todo = Vec::new();
    for u in mine {
        if check_unit(store(u.job), base, &u, &ids[u.job], print(u.file), false).is_ok() {
            done.skipped.push(u);
        } else {
            todo.push(u);
        }
    }
    if todo.is_empty() {
        return Ok(done);
    }
    let mut pending = Vec::with_capacity(todo.len());
    let mut outs = Vec::with_capacity(todo.len());
    let mut sparse = pipeline::Sparse::default();
    for u in &todo {
        let s = store(u.job);
        let (f, name, path) = s.create_data(u.file)?;
        let handle = f.try_clone().map_err(|e| Error::io(&path, e))?;
        pending.push(Pending {
            store: s,
            unit: *u,
            _fault: crate::fault::register_staged(&path, false),
            name,
            path: path.clone(),
            handle,
            published: false,
        });
        outs.push(OutFile::new(base, u.job, u.file, f, path, &mut sparse)?);
    }
    let plan_refs: Vec<&Plan> = plans.iter().collect();
    let dests: Vec<&Path> = jobs.iter().map(|j| j.dest.as_path()).collect();
    // Each file is hashed as soon as the writer has synced it, while the next ones are written.
    let record = |p: &Pending| -> Result<Record> {
        use std::os::unix::fs::MetadataExt;
        let sum = hash_file(&p.handle, p.unit.bytes).map_err(|e| Error::io(&p.path, e))?;
        let m = p.handle.metadata().map_err(|e| Error::io(&p.path, e))?;
        Ok(Record {
            format: store::RECORD_FORMAT.into(),
            version: store::RECORD_VERSION,
            plan: ids[p.unit.job].clone(),
            base: print(p.unit.file).to_string(),
            file: base.files[p.unit.file].0.to_string_lossy().into_owned(),
            data: p.name.clone(),
            size: m.len(),
            sha256: format!("{sum:x}"),
            ino: m.ino(),
            mtime_ns: mtime_ns(&m),
        })
    };
    let made: Vec<std::sync::Mutex<Option<Record>>> = pending
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    pipeline::write(&plan_refs, &dests, outs, backend, progress, &|i| {
        let r = record(&pending[i])?;
        *made[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        Ok(())
    })?;
    for s in stores.iter().flatten() {
        s.sync_data();
    }
    let records: Vec<Record> = made
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("the writer reports every file it completes")
        })
        .collect();
    crate::output::check_interrupted()?;
    for (p, r) in pending.iter_mut().zip(&records) {
        p.store.write_record(p.unit.file, r)?;
        p.published = true;
    }
    for p in &pending {
        p.store.sweep(p.unit.file, &p.name);
        file_stats(&plans[p.unit.job], p.unit.file, &mut done.stats[p.unit.job]);
    }
    done.ran = todo;
    Ok(done)
}

/// The one line finalize refuses with: the first unit that is not ready, and how many others.
fn incomplete(base: &Checkpoint, jobs: &[Job], mut problems: Vec<(Unit, Problem)>) -> Error {
    if let Some(i) = problems
        .iter()
        .position(|(_, p)| matches!(p, Problem::Io(_)))
    {
        let Problem::Io(e) = problems.swap_remove(i).1 else {
            unreachable!("matched above")
        };
        return e;
    }
    let total = units(base, jobs.len()).len();
    let (u, p) = &problems[0];
    let what = format!(
        "unit {} of {total} ({})",
        u.index,
        base.files[u.file].0.display()
    );
    let why = match p {
        Problem::Missing => "has not run (no record)".to_string(),
        Problem::Stale => {
            "ran for another merge (its record's base, adapters, options or version differ)"
                .to_string()
        }
        Problem::Changed(why) => format!("does not match its record: {why}"),
        Problem::Bad(e) => format!("has a bad record: {e}"),
        Problem::Io(_) => unreachable!("reported as it is, above"),
    };
    let others = if problems.len() > 1 {
        let list: Vec<String> = problems[1..]
            .iter()
            .take(8)
            .map(|(u, _)| u.index.to_string())
            .collect();
        format!(
            "; so do{} unit{} {}{}",
            if problems.len() == 2 { "es" } else { "" },
            if problems.len() == 2 { "" } else { "s" },
            list.join(", "),
            if problems.len() > 9 { ", …" } else { "" }
        )
    } else {
        String::new()
    };
    err(
        Class::UnitsIncomplete,
        &jobs[u.job].dest,
        format!(
            "{what} {why}{others}: run {} (--unit K/N) and --finalize again; nothing was moved",
            if problems.len() > 1 { "them" } else { "it" }
        ),
    )
}

/// `boft-merge --finalize`: check every unit of every job (its record belongs to this merge, its
/// file is the one recorded; with `rehash`, its bytes hash to the record's SHA-256), then stage
/// each output from the units' files (hard links where the filesystem allows, copies where not)
/// and the base's other files, and move all of them into place together. Refused with one line
/// naming a unit when any is not ready; nothing is moved then.
pub fn finalize(
    base: &Checkpoint,
    jobs: &[Job],
    ids: &[String],
    inputs: &[&Path],
    force: bool,
    rehash: bool,
) -> Result<Vec<Stats>> {
    // Refused before anything is written, as a whole merge would be.
    super::check_outputs(base, jobs, inputs, force)?;
    let plans = plans(base, jobs)?;
    let stores = jobs
        .iter()
        .map(|j| Store::open(&j.dest, false))
        .collect::<Result<Vec<_>>>()?;
    let all = units(base, jobs.len());
    let prints: Vec<String> = (0..base.files.len())
        .into_par_iter()
        .map(|f| file_fingerprint(base, f))
        .collect();
    let checked: Vec<std::result::Result<Record, Problem>> = all
        .par_iter()
        .map(|u| match &stores[u.job] {
            Some(s) => check_unit(s, base, u, &ids[u.job], &prints[u.file], rehash),
            None => Err(Problem::Missing),
        })
        .collect();
    let mut records = Vec::with_capacity(all.len());
    let mut problems = Vec::new();
    for (u, c) in all.iter().zip(checked) {
        match c {
            Ok(r) => records.push(r),
            Err(p) => problems.push((*u, p)),
        }
    }
    if !problems.is_empty() {
        return Err(incomplete(base, jobs, problems));
    }
    let mut staged = Vec::with_capacity(jobs.len());
    let mut stats = vec![Stats::default(); jobs.len()];
    for (j, job) in jobs.iter().enumerate() {
        let store = stores[j].as_ref().expect("checked above");
        let mine = all.iter().zip(&records).filter(|(u, _)| u.job == j);
        let s = if base.is_folder() {
            let s = Staged::dir(&job.dest)?;
            for (u, r) in mine {
                place(store, &s, u, r, &base.files[u.file].0)?;
            }
            pipeline::copy_others(base, &s)?;
            s
        } else {
            let (u, r) = mine
                .into_iter()
                .next()
                .expect("a file base has one unit per job");
            let (f, linkable) = open_checked(store, u, r)?;
            let name = std::ffi::CString::new(r.data.as_str()).expect("a plain name");
            let linked = if linkable {
                Staged::file_linked(&job.dest, store.data_dir(), &name, r.ino)?
            } else {
                None
            };
            match linked {
                Some(s) => s,
                None => {
                    let s = Staged::file(&job.dest)?;
                    copy_into(&f, s.file_handle(), s.path())?;
                    s
                }
            }
        };
        for u in all.iter().filter(|u| u.job == j) {
            file_stats(&plans[j], u.file, &mut stats[j]);
        }
        stats[j].left_out = base.left_out.clone();
        staged.push(s);
    }
    crate::output::check_interrupted()?;
    for s in &staged {
        s.check_commit()?;
    }
    for s in staged {
        s.commit_checked()?;
    }
    for s in stores.into_iter().flatten() {
        s.remove();
    }
    Ok(stats)
}

/// Open the file a checked record names, still the inode checked; and whether it may become
/// the output's by a hard link: only when this user owns it and it has no other name, since
/// whoever holds a name for an inode can rewrite it after finalize (a unit file planted by
/// another account of a shared staging folder is copied instead).
fn open_checked(store: &Store, u: &Unit, r: &Record) -> Result<(std::fs::File, bool)> {
    use std::os::unix::fs::MetadataExt;
    let at = store.data_path(&r.data);
    let f = store.open_data(&r.data).map_err(|e| Error::io(&at, e))?;
    let m = f.metadata().map_err(|e| Error::io(&at, e))?;
    if m.ino() != r.ino || m.len() != r.size {
        return Err(err(
            Class::UnitsIncomplete,
            &at,
            format!(
                "unit {} changed while finalize ran (a unit running again?): run --finalize \
                 again; nothing was moved",
                u.index
            ),
        ));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    Ok((f, m.nlink() == 1 && m.uid() == me))
}

/// Put a checked unit file at `rel` in the staged folder: a hard link to it, or a copy.
fn place(store: &Store, staged: &Staged, u: &Unit, r: &Record, rel: &Path) -> Result<()> {
    let (f, linkable) = open_checked(store, u, r)?;
    let name = std::ffi::CString::new(r.data.as_str()).expect("a plain name");
    if linkable && staged.adopt(store.data_dir(), &name, r.ino, rel) {
        return Ok(());
    }
    let dst = staged.create(rel)?;
    copy_into(&f, &dst, &staged.path().join(rel)).map_err(|e| staged.blame_dest(e))
}

/// Copy the whole of `from` into `to` (in the kernel where it can), then sync it.
fn copy_into(from: &std::fs::File, to: &std::fs::File, to_path: &Path) -> Result<()> {
    let mut src = from;
    let mut dst = to;
    use std::io::Seek;
    src.seek(std::io::SeekFrom::Start(0))
        .map_err(|e| Error::io(to_path, e))?;
    std::io::copy(&mut src, &mut dst).map_err(|e| Error::io(to_path, e))?;
    dst.sync_all().map_err(|e| Error::io(to_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(bytes: &[u64]) -> Vec<Unit> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| Unit {
                index: i,
                job: 0,
                file: i,
                bytes: b,
            })
            .collect()
    }

    #[test]
    fn the_split_is_largest_first_to_the_least_loaded() {
        // 5 → w0, 4 → w1, then each 3 to the lighter: w1 (4 < 5), w0 (5 < 7), w1 (7 < 8).
        assert_eq!(assign(&sized(&[5, 4, 3, 3, 3]), 2), [0, 1, 1, 0, 1]);
        // Ties in size go by unit number; ties in load by worker number.
        assert_eq!(assign(&sized(&[1, 1, 1, 1]), 2), [0, 1, 0, 1]);
        // More workers than units: one unit each, the rest idle.
        let who = assign(&sized(&[3, 9, 1]), 5);
        assert_eq!(who, [1, 0, 2]);
        // One worker takes everything.
        assert_eq!(assign(&sized(&[3, 9, 1]), 1), [0, 0, 0]);
    }

    #[test]
    fn shares_parse_as_k_of_n() {
        assert_eq!("3/8".parse(), Ok(Share { k: 3, n: 8 }));
        assert_eq!("0/1".parse(), Ok(Share { k: 0, n: 1 }));
        for bad in ["8/8", "1/0", "-1/2", "a/2", "2", "", "1/2/3", "0/1048577"] {
            assert!(bad.parse::<Share>().is_err(), "{bad}");
        }
    }
}
