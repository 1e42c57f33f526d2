//! The wgpu device for the tests that compare it with the CPU backend.

use std::sync::OnceLock;

use burn::backend::wgpu::WgpuDevice;

/// The wgpu device, or `None` (with the reason printed) when this machine has no adapter and
/// the run does not require one.
pub fn gpu() -> Option<WgpuDevice> {
    static DEVICE: OnceLock<Option<WgpuDevice>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            mrt::backend::isolate_kernel_caches_for_tests();
            match mrt::backend::probe_wgpu() {
                Some(a) => {
                    eprintln!(
                        "wgpu tests on {} ({}{})",
                        a.name,
                        a.api,
                        if a.software { ", software" } else { "" }
                    );
                    Some(a.device.clone())
                }
                None if std::env::var_os("MRT_REQUIRE_WGPU").is_some() => {
                    panic!("MRT_REQUIRE_WGPU is set but no wgpu adapter answered (is a Vulkan driver installed?)")
                }
                None => {
                    eprintln!("skipped: no wgpu adapter on this machine (Debian: apt-get install mesa-vulkan-drivers)");
                    None
                }
            }
        })
        .clone()
}
