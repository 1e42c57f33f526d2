//! Train / validation / held-out split by a hash of the problem's *split key*. A problem's split
//! is a pure function of what the model is shown, so no run, seed or sampling order can leak a
//! held-out prompt into training. Validation problems are for choosing hyper-parameters (α and
//! the like), held-out problems only for the numbers a report gives.

/// Which side of the split a problem is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    Train,
    Validation,
    HeldOut,
}

/// FNV-1a, 64 bit: stable across platforms and Rust versions (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `HeldOut` for a `held_out` fraction of keys, `Validation` for the next `validation`
/// fraction, `Train` for the rest. The held-out buckets come first, so adding or resizing the
/// validation split never moves a problem into or out of the held-out set.
pub fn split_of_key(key: &str, held_out: f64, validation: f64) -> Split {
    let bucket = (fnv1a(key.as_bytes()) % 10_000) as f64;
    if bucket < held_out * 10_000.0 {
        Split::HeldOut
    } else if bucket < (held_out + validation) * 10_000.0 {
        Split::Validation
    } else {
        Split::Train
    }
}
