//! Train / held-out split by a hash of the problem's canonical key. A problem's split is a pure
//! function of the problem, so no run, seed or sampling order can leak held-out problems into
//! training.

/// Which side of the split a problem is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Split {
    Train,
    HeldOut,
}

/// FNV-1a, 64 bit: stable across platforms and Rust versions (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// `HeldOut` for a `held_out` fraction of keys, `Train` for the rest.
pub fn split_of_key(key: &str, held_out: f64) -> Split {
    let bucket = fnv1a(key.as_bytes()) % 10_000;
    if (bucket as f64) < held_out * 10_000.0 {
        Split::HeldOut
    } else {
        Split::Train
    }
}
