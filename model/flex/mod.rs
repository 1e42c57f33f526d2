//! Fast paths for the CPU backend (burn-flex) where Burn 0.21's generic operations leave most
//! of the time on the table: in decoding the KV-cache write copies the whole cache and
//! attention runs on one core; in chunked passes the head split copies element by element;
//! SwiGLU's sigmoid calls a scalar `expf` per element, in training twice; a large model's
//! decoding products repack every weight on every call; sampling makes five passes over the
//! vocabulary after a softmax that runs a whole decoding batch on one thread. Each function
//! takes any backend's tensors, recognises flex tensors at run time (`swiglu` also
//! `Autodiff<Flex>`'s, with its own backward), and otherwise (GPU backends, other dtypes or
//! layouts) falls back to the portable Burn operation, so callers stay generic over
//! `B: Backend`.

/// Defines `fn $name` whose body is compiled twice: for AVX2 and FMA, taken where the CPU has
/// them, and for baseline x86-64 (where the compiler may only use 4-wide SSE2). The choice is
/// made per CPU, so one machine always runs the same code.
macro_rules! wide_fn {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                return unsafe { wide($($arg),*) };
            }
            portable($($arg),*)
        }
    };
}

mod attention;
mod cdf;
mod flash;
mod packed;
mod panels;
mod permute;
mod softmax_cdf;
mod swiglu;
mod write;

pub(crate) use attention::masked_attention;
pub(crate) use cdf::inverse_cdf;
pub(crate) use flash::{causal_backward, causal_forward, FUSED_ROWS};
pub(crate) use packed::{packed_matmul, packing, packing_allowed, PackedScope, PACK_FROM_BYTES};
pub(crate) use permute::swap_middle;
pub(crate) use softmax_cdf::sample_softmax;
pub(crate) use swiglu::swiglu;
pub(crate) use write::write_slots;
