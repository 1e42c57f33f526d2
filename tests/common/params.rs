//! Comparing trained parameters: every float parameter of a checkpoint, and the largest
//! difference relative to the largest parameter. Included with `#[path]` by the tests that
//! compare data-parallel runs with one device (not part of `common`, which every test builds).

use std::path::Path;

use burn::backend::Flex;
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use mrt::model::{checkpoint, Transformer};

/// Every float parameter of a checkpoint's model, flattened in visiting order.
pub fn params(ckpt: &Path) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<Bk: Backend> ModuleVisitor<Bk> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            self.0
                .extend(p.val().into_data().convert::<f32>().to_vec::<f32>().unwrap());
        }
    }
    let model: Transformer<Flex> = checkpoint::load(ckpt, None)
        .unwrap()
        .model(&Default::default())
        .unwrap();
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// max |a − b| / max |a| over all parameters.
pub fn relative_difference(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    let diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    diff / scale
}
