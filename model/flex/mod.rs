//! Fast paths for the CPU backend (burn-flex) where Burn 0.21's generic operations leave most
//! of the time on the table: in decoding the KV-cache write copies the whole cache and
//! attention runs on one core; in chunked passes the head split copies element by element;
//! SwiGLU's sigmoid calls a scalar `expf` per element, in training twice. Each function takes
//! any backend's tensors, recognises flex tensors at run time (`swiglu` also `Autodiff<Flex>`'s,
//! with its own backward), and otherwise (GPU backends, other dtypes or layouts) falls back to
//! the portable Burn operation, so callers stay generic over `B: Backend`.

mod attention;
mod flash;
mod permute;
mod swiglu;
mod write;

pub(crate) use attention::masked_attention;
pub(crate) use flash::{causal_backward, causal_forward, FUSED_ROWS};
pub(crate) use permute::swap_middle;
pub(crate) use swiglu::swiglu;
pub(crate) use write::write_slots;
