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

/// Generic work to run on whichever backend is chosen at run time.
pub trait BackendTask {
    type Output;
    /// `label` says in words which backend and device this is, for logs and metrics.
    fn run<B: AutodiffBackend>(self, device: B::Device, label: String) -> Self::Output;
}

/// Resolves `choice` to a concrete backend and device and runs `task` on it.
pub fn dispatch<T: BackendTask>(choice: DeviceChoice, task: T) -> Result<T::Output> {
    match choice {
        DeviceChoice::Cpu => Ok(run_cpu(task)),
        DeviceChoice::Cuda => match run_cuda(task, true)? {
            Ok(out) => Ok(out),
            Err(_) => unreachable!("a required backend either runs or errors"),
        },
        DeviceChoice::Wgpu => match run_wgpu(task, true)? {
            Ok(out) => Ok(out),
            Err(_) => unreachable!("a required backend either runs or errors"),
        },
        DeviceChoice::Auto => {
            let task = match run_cuda(task, false)? {
                Ok(out) => return Ok(out),
                Err(task) => task,
            };
            let task = match run_wgpu(task, false)? {
                Ok(out) => return Ok(out),
                Err(task) => task,
            };
            Ok(run_cpu(task))
        }
    }
}

fn run_cpu<T: BackendTask>(task: T) -> T::Output {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    task.run::<Autodiff<Cpu>>(Default::default(), format!("cpu (flex, {threads} threads)"))
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

/// `Ok(Ok(out))` ran on CUDA; `Ok(Err(task))` not available and not required.
#[allow(unused_variables)]
fn run_cuda<T: BackendTask>(task: T, required: bool) -> Result<Result<T::Output, T>> {
    #[cfg(feature = "cuda")]
    {
        use burn::backend::cuda::CudaDevice;
        use burn::prelude::*;
        let device = CudaDevice::default();
        let probe = device.clone();
        let ok = quietly(move || {
            let t = Tensor::<CudaGpu, 1>::from_floats([1.0, 2.0], &probe);
            t.sum().into_scalar() == 3.0
        });
        if ok == Some(true) {
            return Ok(Ok(task.run::<Autodiff<CudaGpu>>(device, "cuda:0".into())));
        }
        if required {
            return Err(Error::config("device", "cuda", "no CUDA device answered (driver missing or no GPU)"));
        }
        Ok(Err(task))
    }
    #[cfg(not(feature = "cuda"))]
    {
        if required {
            return Err(Error::config("device", "cuda", "this binary was built without `--features cuda`"));
        }
        Ok(Err(task))
    }
}

/// `Ok(Ok(out))` ran on a wgpu GPU adapter; `Ok(Err(task))` none and not required.
#[allow(unused_variables)]
fn run_wgpu<T: BackendTask>(task: T, required: bool) -> Result<Result<T::Output, T>> {
    #[cfg(feature = "wgpu")]
    {
        use burn::backend::wgpu::{graphics::AutoGraphicsApi, init_device, init_setup, WgpuDevice};
        let setup = quietly(|| init_setup::<AutoGraphicsApi>(&WgpuDevice::DefaultDevice, Default::default()));
        if let Some(setup) = setup {
            let info = setup.adapter.get_info();
            // A software adapter (llvmpipe, SwiftShader) is slower than the native CPU backend;
            // use it only when wgpu was asked for by name.
            let software = format!("{:?}", info.device_type) == "Cpu";
            if !software || required {
                let label = format!("wgpu ({}, {:?})", info.name, setup.backend);
                let device = init_device(setup, Default::default());
                return Ok(Ok(task.run::<Autodiff<Gpu>>(device, label)));
            }
        }
        if required {
            return Err(Error::config("device", "wgpu", "no wgpu adapter found"));
        }
        Ok(Err(task))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        if required {
            return Err(Error::config("device", "wgpu", "this binary was built without the `wgpu` feature"));
        }
        Ok(Err(task))
    }
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
