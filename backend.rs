//! The one place that names concrete backends: which device a run uses and the dispatch from a
//! runtime choice to generic code (`model`, `data`, `rl` stay generic over `B: Backend`).
//!
//! `auto` picks CUDA when built with `--features cuda` and a CUDA device answers, else a wgpu
//! GPU adapter when built with `wgpu` (the default) and one exists (software CPU adapters such
//! as llvmpipe are skipped: the native CPU backend is faster), else the CPU. Probing never
//! crashes a machine without a GPU: each probe runs under `catch_unwind` with the panic
//! message silenced.

use std::fmt;
use std::str::FromStr;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;

use crate::error::{Error, Result};

/// The CPU backend every test runs on (see BENCHMARKS.md for why flex over ndarray).
pub type Cpu = Flex;
#[cfg(feature = "wgpu")]
pub type Gpu = burn::backend::Wgpu;
#[cfg(feature = "cuda")]
pub type CudaGpu = burn::backend::Cuda;

/// Whether `B` is a CPU backend (flex, or ndarray when built in), with or without autodiff:
/// what defaults that differ between the CPU and GPUs (a LoRA base's precision) go by.
pub fn is_cpu<B: burn::tensor::backend::Backend>() -> bool {
    use std::any::TypeId;
    let b = TypeId::of::<B>();
    #[cfg(feature = "ndarray")]
    if [
        TypeId::of::<burn::backend::NdArray>(),
        TypeId::of::<Autodiff<burn::backend::NdArray>>(),
    ]
    .contains(&b)
    {
        return true;
    }
    [TypeId::of::<Cpu>(), TypeId::of::<Autodiff<Cpu>>()].contains(&b)
}

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Wgpu,
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(Error::Unknown {
                kind: "device",
                name: other.into(),
                expected: "auto, cpu, wgpu, cuda".into(),
            }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        })
    }
}

/// What `--devices` asks for: one backend kind and a device ordinal per data-parallel peer
/// (`cuda:0,cuda:1`; `cpu,cpu` is two peers on the one CPU device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    pub choice: DeviceChoice,
    pub indices: Vec<usize>,
}

impl FromStr for DeviceList {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::config("devices", s, reason.to_string());
        let mut choice = None;
        let mut indices = Vec::new();
        for item in s.split(',') {
            let (kind, index) = match item.trim().split_once(':') {
                Some((k, i)) => (
                    k,
                    i.parse::<usize>()
                        .map_err(|_| bad("an ordinal after `:` must be a number"))?,
                ),
                None => (item.trim(), 0),
            };
            let kind: DeviceChoice = kind.parse()?;
            if kind == DeviceChoice::Auto {
                return Err(bad("name the backend of every device (cpu, wgpu or cuda), not auto"));
            }
            if choice.is_some_and(|c| c != kind) {
                return Err(bad("all devices must be of one backend"));
            }
            choice = Some(kind);
            indices.push(index);
        }
        let choice = choice.ok_or_else(|| bad("no devices"))?;
        if choice != DeviceChoice::Cpu {
            let mut seen = indices.clone();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() != indices.len() {
                return Err(bad("a GPU may be named once"));
            }
        }
        Ok(Self { choice, indices })
    }
}

/// The device of `primary`'s kind with ordinal `index` (`cuda:1` beside `cuda:0`); the CPU
/// backend has one device, which every ordinal names.
pub fn device_at<B: burn::tensor::backend::Backend>(primary: &B::Device, index: usize) -> Result<B::Device> {
    use burn::tensor::backend::Device;
    let mut id = primary.to_id();
    id.index_id = u16::try_from(index).map_err(|_| Error::config("devices", index, "device ordinal too large"))?;
    Ok(B::Device::from_id(id))
}

/// Generic work to run on whichever backend is chosen at run time.
pub trait BackendTask {
    type Output;
    /// `label` says in words which backend and device this is, for logs and metrics.
    fn run<B: AutodiffBackend>(self, device: B::Device, label: String) -> Self::Output;
}

/// Resolves `choice` to a concrete backend and device and runs `task` on it. With `auto`, the
/// label also names the devices that were tried and skipped, and why.
pub fn dispatch<T: BackendTask>(choice: DeviceChoice, task: T) -> Result<T::Output> {
    let mut skipped = Vec::new();
    match choice {
        DeviceChoice::Cpu => Ok(run_cpu(task, &skipped)),
        DeviceChoice::Cuda => match run_cuda(task, true, &mut skipped)? {
            Ok(out) => Ok(out),
            Err(_) => unreachable!("a required backend either runs or errors"),
        },
        DeviceChoice::Wgpu => match run_wgpu(task, true, &mut skipped)? {
            Ok(out) => Ok(out),
            Err(_) => unreachable!("a required backend either runs or errors"),
        },
        DeviceChoice::Auto => {
            let task = match run_cuda(task, false, &mut skipped)? {
                Ok(out) => return Ok(out),
                Err(task) => task,
            };
            let task = match run_wgpu(task, false, &mut skipped)? {
                Ok(out) => return Ok(out),
                Err(task) => task,
            };
            Ok(run_cpu(task, &skipped))
        }
    }
}

fn run_cpu<T: BackendTask>(task: T, skipped: &[String]) -> T::Output {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    task.run::<Autodiff<Cpu>>(
        Default::default(),
        with_skipped(format!("cpu (flex, {threads} threads)"), skipped),
    )
}

fn with_skipped(label: String, skipped: &[String]) -> String {
    if skipped.is_empty() {
        label
    } else {
        format!("{label}; skipped: {}", skipped.join("; "))
    }
}

/// Runs `f` with panics caught and their messages silenced; `None` if it panicked.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn quietly<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(f).ok();
    std::panic::set_hook(hook);
    out
}

/// `Ok(Ok(out))` ran on CUDA; `Ok(Err(task))` not available and not required (the reason
/// is added to `skipped`).
// Without the `cuda` feature nothing is pushed to `skipped`, so clippy would have it a slice.
#[allow(unused_variables, clippy::ptr_arg)]
fn run_cuda<T: BackendTask>(task: T, required: bool, skipped: &mut Vec<String>) -> Result<Result<T::Output, T>> {
    #[cfg(feature = "cuda")]
    {
        use burn::backend::cuda::CudaDevice;
        use burn::prelude::*;
        configure_cubecl(None);
        let device = CudaDevice::default();
        let probe = device.clone();
        let ok = quietly(move || {
            let t = Tensor::<CudaGpu, 1>::from_floats([1.0, 2.0], &probe);
            t.sum().into_scalar() == 3.0
        });
        if ok == Some(true) {
            kernel_cache_note("cuda");
            return Ok(Ok(
                task.run::<Autodiff<CudaGpu>>(device, with_skipped("cuda:0".into(), skipped))
            ));
        }
        if required {
            return Err(Error::config(
                "device",
                "cuda",
                "no CUDA device answered (driver missing or no GPU)",
            ));
        }
        skipped.push("cuda (no CUDA device answered)".into());
        Ok(Err(task))
    }
    #[cfg(not(feature = "cuda"))]
    {
        if required {
            return Err(Error::config(
                "device",
                "cuda",
                "this binary was built without `--features cuda`",
            ));
        }
        Ok(Err(task))
    }
}

/// A wgpu adapter that answered a probe, with Burn's runtime already set up on it.
#[cfg(feature = "wgpu")]
pub struct WgpuAdapter {
    /// The device to run on (Burn's default wgpu device, now bound to this adapter).
    pub device: burn::backend::wgpu::WgpuDevice,
    /// The adapter's name as the driver gives it, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// The graphics API wgpu reaches it through (Vulkan, Metal, Dx12, …).
    pub api: String,
    /// A CPU implementation (llvmpipe/lavapipe, SwiftShader): slower than the native CPU backend.
    pub software: bool,
}

/// Finds the wgpu adapter Burn would use and sets its runtime up, once per process (later
/// calls return the same answer). `None` when no adapter answers. Quiet: probing on a headless
/// machine prints nothing (see [`quiet_headless_probing`]) and a failed probe's panic is silenced.
#[cfg(feature = "wgpu")]
pub fn probe_wgpu() -> Option<&'static WgpuAdapter> {
    use burn::backend::wgpu::{graphics::AutoGraphicsApi, init_setup, WgpuDevice};
    static ADAPTER: std::sync::OnceLock<Option<WgpuAdapter>> = std::sync::OnceLock::new();
    ADAPTER
        .get_or_init(|| {
            quiet_headless_probing();
            configure_cubecl(None);
            // `init_setup` also registers Burn's runtime for `DefaultDevice` on the adapter it
            // picked, so that device is the one to use (a second `init_device` on the same
            // setup would start a second runtime on the same GPU).
            let setup = quietly(|| init_setup::<AutoGraphicsApi>(&WgpuDevice::DefaultDevice, Default::default()))?;
            let info = setup.adapter.get_info();
            Some(WgpuAdapter {
                device: WgpuDevice::DefaultDevice,
                name: info.name.clone(),
                api: format!("{:?}", setup.backend),
                software: format!("{:?}", info.device_type) == "Cpu",
            })
        })
        .as_ref()
}

/// Mesa's Vulkan loader and drivers look for a Wayland/X11 session under `XDG_RUNTIME_DIR` and
/// print `error: XDG_RUNTIME_DIR is invalid or not set` when a headless machine has none —
/// alarming noise for a probe that is expected to find no display. Pointing the variable at a
/// private directory of our own (mode 0700, as the spec asks) before the first wgpu call keeps
/// probing quiet; a variable the user set is left alone.
#[cfg(feature = "wgpu")]
fn quiet_headless_probing() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir()) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let dir = std::env::temp_dir().join(format!("mrt-runtime-{uid}"));
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        // Only a directory this user owns (another user could have made the name first).
        if std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && m.uid() == uid) {
            // Called before any wgpu thread exists; nothing else reads the environment concurrently.
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

/// `Ok(Ok(out))` ran on a wgpu adapter; `Ok(Err(task))` none usable and not required (the
/// reason is added to `skipped`).
#[allow(unused_variables)]
fn run_wgpu<T: BackendTask>(task: T, required: bool, skipped: &mut Vec<String>) -> Result<Result<T::Output, T>> {
    #[cfg(feature = "wgpu")]
    {
        match probe_wgpu() {
            // A software adapter is slower than the native CPU backend: `auto` skips it, and
            // `--device wgpu` uses it with a warning.
            Some(a) if a.software && !required => {
                skipped.push(format!(
                    "wgpu {} (software adapter: emulates a GPU on the CPU, slower than flex)",
                    a.name
                ));
            }
            Some(a) => {
                if a.software {
                    eprintln!(
                        "warning: wgpu adapter `{}` is a software adapter that emulates a GPU on the CPU; \
                         `--device cpu` is faster",
                        a.name
                    );
                }
                kernel_cache_note("wgpu");
                let label = with_skipped(format!("wgpu ({}, {})", a.name, a.api), skipped);
                return Ok(Ok(task.run::<Autodiff<Gpu>>(a.device.clone(), label)));
            }
            None if required => return Err(Error::config("device", "wgpu", "no wgpu adapter found")),
            None => skipped.push("wgpu (no adapter found)".into()),
        }
        Ok(Err(task))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        if required {
            return Err(Error::config(
                "device",
                "wgpu",
                "this binary was built without the `wgpu` feature",
            ));
        }
        Ok(Err(task))
    }
}

/// Where compiled GPU kernels are kept between runs: `$XDG_CACHE_HOME/mrt` or `~/.cache/mrt`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("mrt"))
}

/// Sets cubecl's runtime configuration once, before its first kernel: what a `cubecl.toml` and
/// the `CUBECL_*` variables say is kept, and, unless they chose otherwise, compiled kernels are
/// kept on disk (cubecl 0.10 does so for CUDA's PTX and for SPIR-V; with the WGSL compiler that
/// `wgpu` uses here the driver's own shader cache does that job) and `autotune` redirects the
/// autotune results. Returns false when cubecl was configured already (nothing changed).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn configure_cubecl(autotune: Option<std::path::PathBuf>) -> bool {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    static DONE: std::sync::Once = std::sync::Once::new();
    let mut fresh = false;
    DONE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            config.compilation.cache = kernel_cache_dir().map(|d| CacheConfig::File(d.join("kernels")));
        }
        if let Some(dir) = autotune {
            config.autotune.cache = CacheConfig::File(dir);
        }
        // `set` panics if cubecl already read its configuration (a kernel ran before us).
        fresh = quietly(move || CubeClRuntimeConfig::set(config)).is_some();
    });
    fresh
}

/// Tells the user why the first steps on a GPU are slow.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn kernel_cache_note(backend: &str) {
    let what = if backend == "cuda" {
        let at = kernel_cache_dir()
            .map(|d| format!(", kept in {} for the next run", d.join("kernels").display()))
            .unwrap_or_default();
        format!("NVRTC compiles ~100 kernels, about a minute{at}")
    } else {
        "the driver compiles shaders: seconds on a GPU, minutes on a software adapter; most drivers keep them for \
            the next run"
            .to_string()
    };
    eprintln!("note: the first steps on {backend} compile and autotune GPU kernels ({what})");
}

/// For tests on a GPU backend: autotune results go to a fresh directory of this process, so
/// that a result cached by an earlier run (another build, another autotune level) can neither
/// hide nor cause a failure. Call before the first GPU kernel.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn isolate_kernel_caches_for_tests() {
    let dir = std::env::temp_dir().join(format!("mrt-autotune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        configure_cubecl(Some(dir)),
        "cubecl was configured before the test could isolate its autotune cache"
    );
}

/// Keeps freed tensor buffers in the process instead of handing them back to the kernel.
///
/// CPU backends allocate a fresh buffer per op. glibc serves large ones with `mmap` and unmaps
/// them on free, so every step page-faults its whole working set back in: on the `tiny`
/// training step that was 45% of the time (BENCHMARKS.md). Called once at start by the
/// binaries and benches; a no-op elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any worker thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1); // -1: never trim
    }
}

/// The end of every binary's `main`: an error is printed as `error: …` (with its causes) and
/// turned into a failing exit code, never a panic backtrace.
pub fn exit_code<E: std::fmt::Display>(result: std::result::Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
