//! `--device cuda`: row batches on an NVIDIA GPU through the CUDA driver API and cuBLAS
//! (cudarc, which loads libcuda and libcublas when the device is opened: the binary links
//! neither). A batch crosses the bus in its stored dtype, 16-bit data at half the bytes of f32,
//! through pinned host buffers it is read into straight from the file; on the device it is
//! converted to f32, taken through every chain (`device_plan`: one gather, a batched block
//! product per factor with one permutation between products, one scatter with the scale and
//! blend), rounded to its dtype once, and checked for values that became non-finite. Every
//! worker thread runs its batches on a stream of its own, so one thread's transfers overlap the
//! others' kernels. The element-wise kernels (kernels/boft.cu) are compiled by build.rs into
//! SASS for the target GPUs, so nothing is compiled when the device is first used.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys, CudaContext, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::backend::{Backend, Emit, Fill};
use super::device_plan::{fingerprint, DevicePlan, ScaleMode};
use crate::checkpoint::{dtype, Dtype};
use crate::error::{Class, Error, Result};
use crate::math::kernel::{Chain, Scratch};

/// The kernels, compiled by build.rs.
static KERNELS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/boft_kernels.fatbin"));

/// Elements per batch unless `BOFT_CUDA_BATCH` says otherwise: 2 MiB of bf16. On the H200 check
/// (docs/GPU.md) batches of 256 Ki elements were no faster in wall time and spent 1.6× the device
/// time on fixed costs (a dozen launches, two copies, one synchronisation per batch); small
/// tensors are kept apart by the pipeline transforming several at once instead.
const BATCH: usize = 1 << 20;

/// Device memory the uploaded chains may hold; the least recently used go first past it.
const CACHE_BYTES: usize = 2 << 30;

fn de(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::bare(Class::Io, format!("cuda: {what} failed ({e:?})"))
}

/// Device memory, freed on drop.
struct DevMem {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DevMem {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DevMem> {
        // SAFETY: the context is current on this thread (every entry point binds it).
        let ptr = unsafe { drv::malloc_sync(bytes.max(4)) }.map_err(|e| de("cuMemAlloc", e))?;
        Ok(DevMem {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }

    /// `data` uploaded on `stream`, complete when this returns.
    fn upload<T>(ctx: &Arc<CudaContext>, stream: &CudaStream, data: &[T]) -> Result<DevMem> {
        let m = DevMem::new(ctx, std::mem::size_of_val(data))?;
        // SAFETY: `m` holds `data`'s bytes; the copy is complete before `data` can go.
        unsafe { drv::memcpy_htod_async(m.ptr, data, stream.cu_stream()) }
            .map_err(|e| de("upload", e))?;
        stream.synchronize().map_err(|e| de("upload", e))?;
        Ok(m)
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        // Every user of the memory synchronised its stream before letting go of it.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemAlloc in this context, freed once.
        let _ = unsafe { drv::free_sync(self.ptr) };
    }
}

/// Page-locked host memory (the bus reads and writes it without a staging copy).
struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain memory owned by one slot, used by one thread at a time.
unsafe impl Send for Pinned {}

impl Pinned {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Pinned> {
        // SAFETY: the context is current; flags 0 (cached: the host reads the results).
        let ptr = unsafe { drv::malloc_host(bytes.max(4), 0) }
            .map_err(|e| de("cuMemHostAlloc", e))? as *mut u8;
        // Touch every page now, not inside the first batch's timed read.
        // SAFETY: `bytes` bytes were just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes.max(4)) };
        Ok(Pinned {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }

    fn get(&self, len: usize) -> &[u8] {
        assert!(len <= self.bytes);
        // SAFETY: in bounds of the allocation, initialised at creation.
        unsafe { std::slice::from_raw_parts(self.ptr, len) }
    }

    fn get_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.bytes);
        // SAFETY: as `get`, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc, freed once, no copy in flight (streams synced).
        let _ = unsafe { drv::free_host(self.ptr as *mut c_void) };
    }
}

/// One worker's stream, cuBLAS handle and batch buffers.
struct Slot {
    stream: Arc<CudaStream>,
    blas: blas_sys::cublasHandle_t,
    /// Capacity in elements.
    cap: usize,
    pin_in: Pinned,
    pin_out: Pinned,
    flag_host: Pinned,
    raw_in: DevMem,
    raw_out: DevMem,
    t: DevMem,
    a: DevMem,
    b: DevMem,
    flag: DevMem,
}

// SAFETY: a slot is used by one thread at a time (taken from and returned to the pool).
unsafe impl Send for Slot {}

impl Slot {
    fn new(ctx: &Arc<CudaContext>, cap: usize) -> Result<Slot> {
        let stream = ctx.new_stream().map_err(|e| de("cuStreamCreate", e))?;
        let handle = blas::create_handle().map_err(|e| de("cublasCreate", e))?;
        // SAFETY: a live handle and stream of this context.
        unsafe { blas::set_stream(handle, stream.cu_stream() as _) }
            .map_err(|e| de("cublasSetStream", e))?;
        let f32s = cap * 4;
        Ok(Slot {
            stream,
            blas: handle,
            cap,
            pin_in: Pinned::new(ctx, f32s)?,
            pin_out: Pinned::new(ctx, f32s)?,
            flag_host: Pinned::new(ctx, 4)?,
            raw_in: DevMem::new(ctx, f32s)?,
            raw_out: DevMem::new(ctx, f32s)?,
            t: DevMem::new(ctx, f32s)?,
            a: DevMem::new(ctx, f32s)?,
            b: DevMem::new(ctx, f32s)?,
            flag: DevMem::new(ctx, 4)?,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { blas::destroy_handle(self.blas) };
    }
}

/// A chain on the device: its plan's index arrays and every factor's blocks written out.
struct Prepared {
    n: usize,
    factors: Vec<(usize, usize, DevMem)>,
    gather: Option<DevMem>,
    between: Vec<Option<DevMem>>,
    scatter: Option<DevMem>,
    scale: Option<DevMem>,
    gather_mode: ScaleMode,
    finish_mode: ScaleMode,
    blend: f32,
    bytes: usize,
}

/// What a cached chain is known by: the chain itself, held weakly (its allocation, and so its
/// address, cannot be reused while the cache holds the key, and its blocks are not kept alive
/// by it), or its content where only a borrow was handed over.
#[derive(Clone)]
enum Key {
    Chain(Weak<Chain>),
    Content(u64),
}

impl Key {
    fn is(&self, other: &Key) -> bool {
        match (self, other) {
            (Key::Chain(a), Key::Chain(b)) => a.ptr_eq(b),
            (Key::Content(a), Key::Content(b)) => a == b,
            _ => false,
        }
    }

    /// A chain that no longer exists will not be asked for again.
    fn dead(&self) -> bool {
        matches!(self, Key::Chain(w) if w.strong_count() == 0)
    }
}

/// Batch timings summed over worker threads (`BOFT_DEVICE_STATS`).
#[derive(Default)]
struct Stats {
    /// Opening the device: driver, context, kernels, the first slot (cuBLAS).
    open_s: f64,
    /// When the first batch started and the last ended, from the start of opening.
    first_s: Option<f64>,
    last_s: f64,
    batches: u64,
    elements: u64,
    bus_bytes: u64,
    read_s: f64,
    device_s: f64,
    emit_s: f64,
}

/// The element-wise kernels.
struct Kernels {
    decode: sys::CUfunction,
    encode: sys::CUfunction,
    gather: sys::CUfunction,
    finish: sys::CUfunction,
    _module: Arc<CudaModule>,
}

/// `--device cuda[:N]`.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    label: String,
    /// Elements per batch.
    batch: usize,
    slots: Mutex<Vec<Slot>>,
    cache: Mutex<VecDeque<(Key, Arc<Prepared>)>>,
    stats: Option<Mutex<Stats>>,
    /// When opening began (for the stats' timestamps).
    opened: Instant,
}

// SAFETY: the CUfunction handles are immutable after loading and valid in every thread that
// binds the context; everything mutable is behind a mutex.
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

fn no_device(spec: &str, why: impl std::fmt::Display) -> Error {
    Error::bare(
        Class::NoDevice,
        format!("--device {spec}: no usable CUDA device ({why})"),
    )
}

impl CudaBackend {
    /// Open `cuda` or `cuda:N`: the driver, the device, the kernels and one batch slot, so
    /// that a machine that cannot run the merge says so before anything is read.
    pub fn open(spec: &str) -> Result<CudaBackend> {
        let ordinal = match spec.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map_err(|_| {
                Error::bare(
                    Class::Usage,
                    format!("--device {spec}: expected cuda or cuda:N"),
                )
            })?,
            None => 0,
        };
        let opened = Instant::now();
        // SAFETY: only tries to load the libraries.
        if !unsafe { sys::is_culib_present() } {
            return Err(no_device(
                spec,
                "libcuda.so.1 not found: is the NVIDIA driver installed?",
            ));
        }
        // SAFETY: as above.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(no_device(
                spec,
                "libcublas not found: install the CUDA toolkit's cuBLAS or put its lib folder \
                 on LD_LIBRARY_PATH",
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| no_device(spec, format!("{e:?}")))?;
        // Every buffer belongs to one slot and one stream, synchronised before it is reused:
        // cudarc's per-allocation events would only add work.
        // SAFETY: no cudarc-managed allocation exists yet or is ever made.
        unsafe { ctx.disable_event_tracking() };
        let module = ctx
            .load_module(Ptx::from_binary(KERNELS.to_vec()))
            .map_err(|e| no_device(spec, format!("loading the kernels: {e:?}")))?;
        let f = |name: &str| -> Result<sys::CUfunction> {
            Ok(module
                .load_function(name)
                .map_err(|e| no_device(spec, format!("kernel {name}: {e:?}")))?
                .cu_function())
        };
        let kernels = Kernels {
            decode: f("boft_decode")?,
            encode: f("boft_encode")?,
            gather: f("boft_gather")?,
            finish: f("boft_finish")?,
            _module: module.clone(),
        };
        let batch = std::env::var("BOFT_CUDA_BATCH")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&b| b > 0)
            .unwrap_or(BATCH);
        let first = Slot::new(&ctx, batch).map_err(|e| no_device(spec, e.message))?;
        Ok(CudaBackend {
            ctx,
            kernels,
            label: format!("cuda:{ordinal}"),
            batch,
            slots: Mutex::new(vec![first]),
            cache: Mutex::new(VecDeque::new()),
            stats: std::env::var_os("BOFT_DEVICE_STATS").map(|_| {
                Mutex::new(Stats {
                    open_s: opened.elapsed().as_secs_f64(),
                    ..Stats::default()
                })
            }),
            opened,
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| de("cuCtxSetCurrent", e))
    }

    /// A slot holding at least `elems` elements.
    fn take(&self, elems: usize) -> Result<Slot> {
        let mut pool = self.slots.lock().unwrap();
        if let Some(i) = pool.iter().position(|s| s.cap >= elems) {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        Slot::new(&self.ctx, elems.max(self.batch))
    }

    /// `chain` on the device, uploaded once while the cache keeps it (on `stream`).
    fn prepared(&self, key: Key, chain: &Chain, stream: &CudaStream) -> Result<Arc<Prepared>> {
        // Held while uploading: the threads that start on a tensor together all want its
        // chain, and one upload serves them.
        let mut cache = self.cache.lock().unwrap();
        if let Some(i) = cache.iter().position(|(k, _)| k.is(&key)) {
            let hit = cache.remove(i).expect("found");
            let p = hit.1.clone();
            cache.push_back(hit);
            return Ok(p);
        }
        let plan = DevicePlan::of(chain).expect("takes_stored and apply check for factors");
        let ctx = &self.ctx;
        let up_idx = |v: &Option<Vec<u32>>| -> Result<Option<DevMem>> {
            v.as_ref()
                .map(|v| DevMem::upload(ctx, stream, v))
                .transpose()
        };
        let factors = chain
            .factors
            .iter()
            .map(|f| {
                // Stored as the product reads them unless blocks are shared.
                let m = if f.repeat == 0 {
                    DevMem::upload(ctx, stream, &f.blocks)?
                } else {
                    DevMem::upload(ctx, stream, &DevicePlan::blocks(f))?
                };
                Ok((f.h, f.d, m))
            })
            .collect::<Result<Vec<_>>>()?;
        let between = plan
            .between
            .iter()
            .map(up_idx)
            .collect::<Result<Vec<_>>>()?;
        let scale = chain
            .scale
            .as_ref()
            .map(|s| DevMem::upload(ctx, stream, s))
            .transpose()?;
        let mut p = Prepared {
            n: chain.n,
            gather: up_idx(&plan.gather)?,
            scatter: up_idx(&plan.scatter)?,
            factors,
            between,
            scale,
            gather_mode: DevicePlan::scale_mode(chain, true),
            finish_mode: DevicePlan::scale_mode(chain, false),
            blend: chain.blend,
            bytes: 0,
        };
        let extra = [&p.gather, &p.scatter, &p.scale]
            .into_iter()
            .chain(&p.between);
        p.bytes = p.factors.iter().map(|f| f.2.bytes).sum::<usize>()
            + extra.flatten().map(|m| m.bytes).sum::<usize>();
        let p = Arc::new(p);
        // Batches still running hold their own reference: dropping ours frees nothing in use.
        cache.retain(|(k, _)| !k.dead());
        cache.push_back((key, p.clone()));
        while cache.len() > 1 && cache.iter().map(|(_, p)| p.bytes).sum::<usize>() > CACHE_BYTES {
            cache.pop_front();
        }
        Ok(p)
    }

    /// Launch `f` over `len` elements (the kernels loop over what the grid does not cover).
    ///
    /// # Safety
    /// `params` point at the kernel's arguments, in order, with the types it declares.
    unsafe fn launch(
        &self,
        f: sys::CUfunction,
        len: usize,
        stream: &CudaStream,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let blocks = len.div_ceil(256).clamp(1, 1 << 14) as u32;
        drv::launch_kernel(
            f,
            (blocks, 1, 1),
            (256, 1, 1),
            0,
            stream.cu_stream(),
            params,
        )
        .map_err(|e| de("kernel launch", e))
    }

    /// One batch: `rows` rows of `n` elements stored as `dt`, through `chains`.
    #[allow(clippy::too_many_arguments)]
    fn batch(
        &self,
        slot: &mut Slot,
        chains: &[Arc<Prepared>],
        dt: Dtype,
        row0: usize,
        rows: usize,
        fill: Fill,
        emit: Emit,
    ) -> Result<()> {
        let n = chains[0].n;
        let len = rows * n;
        let bytes = len * dt.float_size().expect("takes_stored checked the dtype");
        let t0 = Instant::now();
        fill(slot.pin_in.get_mut(bytes))?;
        let t1 = Instant::now();
        let s = slot.stream.clone();
        let code: i32 = match dt {
            Dtype::BF16 => 1,
            Dtype::F16 => 2,
            _ => 0,
        };
        let (len64, n32, row064) = (len as u64, n as u32, row0 as u64);
        let null: sys::CUdeviceptr = 0;
        let ptr = |m: &Option<DevMem>| m.as_ref().map_or(null, |m| m.ptr);
        // SAFETY: every pointer is a live allocation of at least the bytes the kernels touch
        // (slot buffers hold `cap ≥ len` f32s, index arrays n entries, the scale the chain's
        // own length), and each argument matches the kernel's declaration in kernels/boft.cu.
        unsafe {
            drv::memcpy_htod_async(slot.raw_in.ptr, slot.pin_in.get(bytes), s.cu_stream())
                .map_err(|e| de("upload", e))?;
            drv::memset_d8_async(slot.flag.ptr, 0, 4, s.cu_stream())
                .map_err(|e| de("memset", e))?;
            let (mut raw_in, mut t) = (slot.raw_in.ptr, slot.t.ptr);
            let (mut l, mut c) = (len64, code);
            self.launch(
                self.kernels.decode,
                len,
                &s,
                &mut [arg(&mut raw_in), arg(&mut t), arg(&mut l), arg(&mut c)],
            )?;
            let (a, b) = (slot.a.ptr, slot.b.ptr);
            for p in chains {
                let mut cur = t;
                let mut scale = ptr(&p.scale);
                let (mut r0, mut n_) = (row064, n32);
                if p.gather.is_some() || p.gather_mode != ScaleMode::None {
                    let (mut src, mut dst, mut idx) = (t, a, ptr(&p.gather));
                    let mut mode = p.gather_mode as i32;
                    self.launch(
                        self.kernels.gather,
                        len,
                        &s,
                        &mut [
                            arg(&mut src),
                            arg(&mut dst),
                            arg(&mut idx),
                            arg(&mut scale),
                            arg(&mut mode),
                            arg(&mut r0),
                            arg(&mut l),
                            arg(&mut n_),
                        ],
                    )?;
                    cur = a;
                }
                for (i, (h, d, blocks)) in p.factors.iter().enumerate() {
                    let dst = if cur == a { b } else { a };
                    let (one, zero) = (1f32, 0f32);
                    let (h, d) = (*h as i32, *d as i32);
                    blas::sgemm_strided_batched(
                        slot.blas,
                        blas_sys::cublasOperation_t::CUBLAS_OP_T,
                        blas_sys::cublasOperation_t::CUBLAS_OP_N,
                        h,
                        rows as i32,
                        h,
                        &one,
                        blocks.ptr as *const f32,
                        h,
                        (h * h) as i64,
                        cur as *const f32,
                        n as i32,
                        h as i64,
                        &zero,
                        dst as *mut f32,
                        n as i32,
                        h as i64,
                        d,
                    )
                    .map_err(|e| de("cublasSgemmStridedBatched", e))?;
                    cur = dst;
                    if let Some(Some(idx)) = p.between.get(i) {
                        let (mut src, mut dst, mut idx) =
                            (cur, if cur == a { b } else { a }, idx.ptr);
                        let (mut nos, mut mode) = (null, 0i32);
                        self.launch(
                            self.kernels.gather,
                            len,
                            &s,
                            &mut [
                                arg(&mut src),
                                arg(&mut dst),
                                arg(&mut idx),
                                arg(&mut nos),
                                arg(&mut mode),
                                arg(&mut r0),
                                arg(&mut l),
                                arg(&mut n_),
                            ],
                        )?;
                        cur = dst;
                    }
                }
                let (mut y, mut tt, mut idx) = (cur, t, ptr(&p.scatter));
                let (mut mode, mut blend) = (p.finish_mode as i32, p.blend);
                self.launch(
                    self.kernels.finish,
                    len,
                    &s,
                    &mut [
                        arg(&mut y),
                        arg(&mut tt),
                        arg(&mut idx),
                        arg(&mut scale),
                        arg(&mut mode),
                        arg(&mut r0),
                        arg(&mut l),
                        arg(&mut n_),
                        arg(&mut blend),
                    ],
                )?;
            }
            let (mut raw_out, mut flag) = (slot.raw_out.ptr, slot.flag.ptr);
            self.launch(
                self.kernels.encode,
                len,
                &s,
                &mut [
                    arg(&mut t),
                    arg(&mut raw_in),
                    arg(&mut raw_out),
                    arg(&mut l),
                    arg(&mut c),
                    arg(&mut flag),
                ],
            )?;
            drv::memcpy_dtoh_async(slot.pin_out.get_mut(bytes), raw_out, s.cu_stream())
                .map_err(|e| de("download", e))?;
            drv::memcpy_dtoh_async(slot.flag_host.get_mut(4), flag, s.cu_stream())
                .map_err(|e| de("download", e))?;
        }
        s.synchronize().map_err(|e| de("cuStreamSynchronize", e))?;
        let t2 = Instant::now();
        let flagged = slot.flag_host.get(4) != [0, 0, 0, 0];
        emit(slot.pin_in.get(bytes), slot.pin_out.get(bytes), flagged)?;
        if let Some(st) = &self.stats {
            let mut st = st.lock().unwrap();
            st.batches += 1;
            let since = |t: Instant| (t - self.opened).as_secs_f64();
            st.first_s = Some(st.first_s.map_or(since(t0), |f| f.min(since(t0))));
            st.last_s = st.last_s.max(since(Instant::now()));
            st.elements += len as u64;
            st.bus_bytes += 2 * bytes as u64;
            st.read_s += (t1 - t0).as_secs_f64();
            st.device_s += (t2 - t1).as_secs_f64();
            st.emit_s += t2.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// `batch` with a slot of this thread's own for its duration; a slot whose batch failed
    /// on the device is dropped, not reused.
    fn run(
        &self,
        chains: &[(Key, &Chain)],
        dt: Dtype,
        row0: usize,
        rows: usize,
        fill: Fill,
        emit: Emit,
    ) -> Result<()> {
        self.bind()?;
        let n = chains[0].1.n;
        let mut slot = self.take(rows * n)?;
        let prepared = chains
            .iter()
            .map(|(k, c)| self.prepared(k.clone(), c, &slot.stream))
            .collect::<Result<Vec<_>>>()?;
        let r = self.batch(&mut slot, &prepared, dt, row0, rows, fill, emit);
        if r.is_ok() {
            self.slots.lock().unwrap().push(slot);
        }
        r
    }
}

/// A kernel argument's address, as cuLaunchKernel takes it.
fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let dropped = self.opened.elapsed().as_secs_f64();
        let _ = self.ctx.bind_to_thread();
        self.slots.lock().unwrap().clear();
        self.cache.lock().unwrap().clear();
        // Summed over threads: with batches overlapping these are busy times, not wall time.
        if let Some(st) = &self.stats {
            let st = st.lock().unwrap();
            eprintln!(
                "device-stats: device={} open_s={:.3} first_batch_s={:.3} last_batch_s={:.3} \
                 dropped_s={:.3} teardown_s={:.3} batches={} elements={} bus_gb={:.3} \
                 host_read_s={:.4} device_s={:.4} host_emit_s={:.4} bus_gbps_per_stream={:.2}",
                self.label,
                st.open_s,
                st.first_s.unwrap_or(0.0),
                st.last_s,
                dropped,
                self.opened.elapsed().as_secs_f64() - dropped,
                st.batches,
                st.elements,
                st.bus_bytes as f64 / 1e9,
                st.read_s,
                st.device_s,
                st.emit_s,
                st.bus_bytes as f64 / 1e9 / st.device_s.max(1e-12),
            );
        }
    }
}

impl Backend for CudaBackend {
    fn apply(
        &self,
        chain: &Chain,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        scratch: &mut Scratch,
    ) -> Result<()> {
        if chain.factors.is_empty() || x.is_empty() {
            chain.apply_rows(x, row0, rows, scratch);
            return Ok(());
        }
        let input = std::mem::take(x);
        let mut result = Vec::new();
        self.run(
            &[(Key::Content(fingerprint(chain)), chain)],
            Dtype::F32,
            row0,
            rows,
            &mut |buf| {
                dtype::encode_f32(Dtype::F32, &input, buf);
                Ok(())
            },
            &mut |_, out, _| {
                result.resize(input.len(), 0.0);
                dtype::decode_f32(Dtype::F32, out, &mut result);
                Ok(())
            },
        )?;
        *x = result;
        Ok(())
    }

    fn takes_stored(&self, chains: &[&Arc<Chain>], dtype: Dtype) -> bool {
        dtype.float_size().is_some()
            && chains
                .iter()
                .all(|c| !c.factors.is_empty() && c.n == chains[0].n)
    }

    fn apply_stored(
        &self,
        chains: &[&Arc<Chain>],
        dtype: Dtype,
        row0: usize,
        rows: usize,
        fill: Fill,
        emit: Emit,
    ) -> Result<()> {
        let keyed: Vec<(Key, &Chain)> = chains
            .iter()
            .map(|c| (Key::Chain(Arc::downgrade(c)), c.as_ref()))
            .collect();
        self.run(&keyed, dtype, row0, rows, fill, emit)
    }

    fn chunk_elems(&self) -> usize {
        self.batch
    }

    fn name(&self) -> String {
        self.label.clone()
    }
}
