//! Where a rollout row's randomness comes from (see [`RowRngs`]).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::split_rngs;

/// A rollout row's own generators, of its tokens and of its prover forks' forced answers: what
/// a row samples does not depend on the other rows of its batch.
#[derive(Debug, Clone)]
pub(super) struct RowRngs {
    pub(super) decode: StdRng,
    prover: StdRng,
}

impl RowRngs {
    /// Generators for the `n` rows that continue one seed, split from the seed's.
    pub(super) fn split(seed: &mut StdRng, n: usize) -> Vec<Self> {
        (0..n)
            .map(|_| {
                let mut r = split_rngs(seed, 2).into_iter();
                Self {
                    decode: r.next().expect("two"),
                    prover: r.next().expect("two"),
                }
            })
            .collect()
    }

    /// A generator for one prover fork of the row.
    pub(super) fn fork(&mut self) -> StdRng {
        StdRng::seed_from_u64(self.prover.random())
    }
}
